"""Tunables of the upstream pool. Defaults follow Bybit's documented limits (reference §2.5, §3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpstreamSettings:
    url: str
    # Bybit recommends a JSON ping every 20 s; a missing pong or a silent socket means the TCP
    # connection may be half-open, which only an application-level ping reveals.
    ping_interval: float = 20.0
    pong_timeout: float = 10.0
    silence_timeout: float = 30.0
    # Freshness: a connection from which nothing (data or pong) arrived for this long has its
    # streams marked stale. A connection quiet for half of it is probed with an early ping, so
    # a healthy one carrying only quiet topics answers in time and is never marked stale.
    stale_after: float = 3.0
    # A frame whose exchange timestamp is older than this marks its stream stale (0: no check):
    # the exchange (or a queue on the way) is behind, and old data must not pass for live.
    max_frame_age: float = 5.0
    max_topics_per_conn: int = 200
    # Bybit: "args" of one public connection may not exceed 21,000 characters.
    max_args_chars_per_conn: int = 21000
    batch_size: int = 10
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # Bybit: no more than 500 new connections per 5 minutes per IP.
    conn_budget: int = 500
    conn_budget_window: float = 300.0
    empty_conn_linger: float = 30.0
    handshake_timeout: float = 10.0
    # A subscribe/unsubscribe without a reply in this time is handled like a failed request.
    request_timeout: float = 10.0
    # Tries of a single topic whose request failed for a reason other than an unknown topic.
    subscribe_tries: int = 3
    max_frame_size: int = 16 * 1024 * 1024

    @property
    def silence_deadline(self) -> float:
        """The silence deadline in force: never shorter than a ping round (interval plus pong
        timeout), or a connection carrying only quiet topics would be declared dead between
        two healthy pongs."""
        return max(self.silence_timeout, self.ping_interval + self.pong_timeout)

    @property
    def probe_after(self) -> float:
        """Silence after which a ping goes out early, to tell a quiet connection from a dead one."""
        return self.stale_after / 2

    def __post_init__(self) -> None:
        positive = (
            "ping_interval",
            "pong_timeout",
            "silence_timeout",
            "stale_after",
            "backoff_base",
            "backoff_cap",
            "conn_budget_window",
            "handshake_timeout",
            "request_timeout",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        at_least_one = (
            "max_topics_per_conn",
            "max_args_chars_per_conn",
            "batch_size",
            "conn_budget",
            "subscribe_tries",
            "max_frame_size",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_frame_age < 0:
            raise ValueError("max_frame_age must be >= 0")
        if self.empty_conn_linger < 0:
            raise ValueError("empty_conn_linger must be >= 0")
        if self.backoff_cap < self.backoff_base:
            raise ValueError("backoff_cap must be >= backoff_base")
        if not self.url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must be ws:// or wss://, got {self.url!r}")

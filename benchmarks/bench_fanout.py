"""The node's hot path without sockets: one upstream frame's bytes -> parse -> feed (codec,
seq) -> memory bus -> hub fan-out -> one flush of each subscriber's real `ClientSession.flush`
into a transport that only counts bytes. This is the path the metrics counters sit on
(exchange lag in the feed, residence in the hub, socket writes in the session), so it is the
one to compare before and after a change there:

    .venv/bin/pytest benchmarks/bench_fanout.py --benchmark-columns=median,mean,stddev,rounds
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from fastproxy.bus import MemoryBus
from fastproxy.config import Config
from fastproxy.feed import Feed
from fastproxy.hub import Hub
from fastproxy.server import ClientSession, ProxyServer
from fastproxy.streams import stream_for_topic
from fastproxy.upstream import UpstreamSettings

TOPIC = "tickers.BTCUSDT"
SNAPSHOT = (
    b'{"topic":"tickers.BTCUSDT","type":"snapshot","data":{"symbol":"BTCUSDT",'
    b'"lastPrice":"63561.60","markPrice":"63560.80","indexPrice":"63585.51",'
    b'"bid1Price":"63561.50","bid1Size":"1.760","ask1Price":"63561.60","ask1Size":"4.690",'
    b'"price24hPcnt":"0.001455","highPrice24h":"63994.40","lowPrice24h":"62810.50",'
    b'"volume24h":"55362.9100","fundingRate":"0.00005013"},"cs":1,"ts":1786659827683}'
)
DELTA = (
    b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT",'
    b'"indexPrice":"63585.74"},"cs":2,"ts":1786659827983}'
)


class _Loop:
    """The hub schedules its flush with call_soon; the benchmark flushes by hand instead."""

    def call_soon(self, *args: Any) -> None:
        return None


class _Raw:
    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0


def _fresh(frame: bytes) -> bytes:
    """The frame stamped now: the feed takes an old exchange timestamp for stale data."""
    head, _, _ = frame.rpartition(b'"ts":')
    return head + b'"ts":' + str(int(time.time() * 1000)).encode() + b"}"


def _node(subscribers: int) -> tuple[Feed, Hub]:
    feed = Feed(UpstreamSettings(url="ws://127.0.0.1:1/v5/public/linear"))
    bus = MemoryBus(feed)
    hub = Hub(bus, linger=0, loop=_Loop())  # type: ignore[arg-type]
    bus.attach(hub)  # as the app does: the feed's output reaches this hub
    server = ProxyServer(Config(), hub)
    stream = stream_for_topic(TOPIC)
    for _ in range(subscribers):
        session = ClientSession(server, "127.0.0.1")
        session.raw = _Raw()
        hub.subscribe(session, [stream])
    feed._on_data(TOPIC, orjson.loads(_fresh(SNAPSHOT)))
    hub._flush()
    return feed, hub


@pytest.mark.parametrize("subscribers", [1, 100])
def test_frame_to_writes(benchmark: Any, subscribers: int) -> None:
    feed, hub = _node(subscribers)
    delta = _fresh(DELTA)

    def one_frame() -> None:
        feed._on_data(TOPIC, orjson.loads(delta))
        hub._flush()

    benchmark(one_frame)
    assert hub.deliveries > subscribers

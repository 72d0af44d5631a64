"""The upstream pool: Bybit topics spread over as few connections as the limits allow.

The pool owns the plan (which connection carries which topic), one `Runner` task per connection,
the shared connection budget and the counters for /health and /stats. All methods run on the
event loop thread; `subscribe`/`unsubscribe` never block: they change the plan and wake the
connection's task, which sends the requests (several calls in one loop tick become one batch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastproxy.upstream.connection import Runner
from fastproxy.upstream.plan import PoolPlan
from fastproxy.upstream.policy import ConnectionBudget
from fastproxy.upstream.protocol import WIRE_SUBSCRIBED, ConnectionState
from fastproxy.upstream.settings import UpstreamSettings

log = logging.getLogger("fastproxy.upstream")

DataCallback = Callable[[str, dict, int], None]
FailedCallback = Callable[[str, str], None]
ResetCallback = Callable[[str], None]
# (topic, reason or None, since): a topic went stale (reason) or live again (None); `since` is
# epoch ms of when that began.
StatusCallback = Callable[[str, str | None, int], None]

REASON_DOWN = "upstream connection down; reconnecting"
REASON_SILENT = "nothing received from the exchange for {:g} s"

_CALLBACK_LOG_INTERVAL = 10.0


class UpstreamPool:
    def __init__(
        self,
        settings: UpstreamSettings,
        on_data: DataCallback,
        on_failed: FailedCallback,
        on_reset: ResetCallback,
        *,
        on_status: StatusCallback | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.on_data = on_data
        self._on_failed = on_failed
        self._on_reset = on_reset
        self._on_status = on_status
        # Freshness: wanted topics that are stale now -> (reason, since epoch ms).
        self.stale: dict[str, tuple[str, int]] = {}
        self.rng = rng or random.Random()
        self.plan = PoolPlan(settings)
        self.budget = ConnectionBudget(settings.conn_budget, settings.conn_budget_window)
        self.runners: dict[int, Runner] = {}
        self.started = False
        self.stopping = False
        self.down_since: float | None = None
        self._generation = 0
        self._last_callback_log = -_CALLBACK_LOG_INTERVAL
        self._last_budget_log = -_CALLBACK_LOG_INTERVAL
        # Counters (monotonic, for /stats and metrics).
        self.messages_in = 0
        self.bad_frames = 0
        self.connect_attempts = 0
        self.connect_failures = 0
        self.reconnects = 0
        self.disconnects = 0
        self.dead_detected = 0
        self.callback_errors = 0

    # -- public API ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        for conn in list(self.plan.conns):
            if conn.wanted:
                self._kick(conn)
        self._update_up()

    async def stop(self) -> None:
        """Close every connection with a close frame and end every task."""
        self.stopping = True
        runners = list(self.runners.values())
        if runners:
            await asyncio.gather(*(r.shutdown() for r in runners), return_exceptions=True)
        self.runners.clear()

    def subscribe(self, topics: Iterable[str]) -> None:
        if isinstance(topics, str):
            topics = (topics,)
        topics = list(topics)
        touched, rejected = self.plan.subscribe(topics)
        for conn in touched:
            self._kick(conn)
        for topic in topics:
            conn = self.plan.where.get(topic)
            if conn is not None:
                self.refresh(conn, (topic,))
        for topic, reason in rejected:
            self.plan.remember_failed(topic, reason)
            # Not from inside subscribe(): the caller may be halfway through its own bookkeeping.
            self._call_soon(self._notify_failed, topic, reason)
        self._update_up()

    def unsubscribe(self, topics: Iterable[str]) -> None:
        if isinstance(topics, str):
            topics = (topics,)
        topics = list(topics)
        for topic in topics:
            self.stale.pop(topic, None)
        for conn in self.plan.unsubscribe(topics, time.monotonic()):
            runner = self.runners.get(conn.ident)
            if runner is not None:
                runner.wake.set()
        self._update_up()

    def resubscribe(self, topic: str) -> None:
        """Unsubscribe `topic` and subscribe it again on its connection (for a fresh snapshot)."""
        conn = self.plan.where.get(topic)
        if conn is not None and conn.resubscribe(topic):
            runner = self.runners.get(conn.ident)
            if runner is not None:
                runner.wake.set()

    def topic_state(self, topic: str) -> str | None:
        return self.plan.topic_state(topic)

    @property
    def is_up(self) -> bool:
        return not self.plan.where or any(conn.open for conn in self.plan.conns)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        conns = self.plan.conns
        last = max((c.last_data_at for c in conns if c.last_data_at is not None), default=None)
        return {
            "url": self.settings.url,
            "connections": len(conns),
            "connected": sum(1 for c in conns if c.open),
            # connections that carry topics but have no socket right now (reconnecting)
            "waiting": sum(1 for c in conns if c.wanted and not c.open),
            "topics": self.plan.counts(),
            "reconnects": self.reconnects,
            "disconnects": self.disconnects,
            "dead_detected": self.dead_detected,
            "connect_attempts": self.connect_attempts,
            "connect_failures": self.connect_failures,
            "budget_used": self.budget.used(now),
            "budget_limit": self.settings.conn_budget,
            "last_message_age": None if last is None else round(now - last, 3),
            "messages_in": self.messages_in,
            "bad_frames": self.bad_frames,
            "callback_errors": self.callback_errors,
            "down_since": self.down_since,
            "stale_topics": len(self.stale),
        }

    # -- freshness -----------------------------------------------------------------------------

    def refresh(self, conn: ConnectionState, topics: Iterable[str] | None = None) -> None:
        """Bring the freshness of `conn`'s wanted topics (all, or `topics`) up to date and report
        each change. A topic is stale while its connection is lost or failing to connect, while
        the connection is silent, and after that until the exchange confirms the topic again;
        a new topic on a healthy connection waiting for its first ack is not stale."""
        if self.stopping:
            return
        now = time.monotonic()
        if not conn.open:
            began = conn.down_since
            reason = REASON_DOWN if began is not None else None
        elif conn.silent:
            began = conn.last_frame_at
            reason = REASON_SILENT.format(self.settings.stale_after)
        else:
            began = now
            reason = None
        stale = self.stale
        for topic in conn.desired_topics() if topics is None else topics:
            entry = conn.topics.get(topic)
            if entry is None or not entry.desired or self.plan.where.get(topic) is not conn:
                continue
            if reason is not None:
                if topic not in stale:
                    self._report(topic, reason, began or now, now)
            elif topic in stale and conn.open and entry.wire == WIRE_SUBSCRIBED:
                self._report(topic, None, now, now)

    def _report(self, topic: str, reason: str | None, began: float, now: float) -> None:
        since = int((time.time() - (now - began)) * 1000)
        if reason is None:
            del self.stale[topic]
        else:
            self.stale[topic] = (reason, since)
        if self._on_status is None:
            return
        try:
            self._on_status(topic, reason, since)
        except Exception:
            self.callback_failed("on_status", topic)

    def confirmed(self, conn: ConnectionState) -> None:
        """Topics of `conn` the exchange just confirmed (ack or data): stale ones go live."""
        topics, conn.newly_confirmed = conn.newly_confirmed, []
        if self.stale:
            self.refresh(conn, topics)

    # -- runner management ---------------------------------------------------------------------

    def _kick(self, conn: ConnectionState) -> None:
        runner = self.runners.get(conn.ident)
        if runner is not None:
            runner.wake.set()
        elif self.started and not self.stopping:
            runner = self.runners[conn.ident] = Runner(self, conn)
            runner.start()

    def runner_exited(self, runner: Runner) -> None:
        conn = runner.state
        if self.runners.get(conn.ident) is runner:
            del self.runners[conn.ident]
        if self.stopping:
            return
        if conn.wanted == 0:
            self.plan.retire(conn)
        elif not conn.retired:
            # Only an outside cancel ends a runner with topics left; they still need a socket.
            log.warning("upstream connection task ended early; restarting it")
            self._kick(conn)
        self._update_up()

    def retire(self, runner: Runner) -> None:
        self.plan.retire(runner.state)

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    # -- events from runners -------------------------------------------------------------------

    def connection_opened(self, runner: Runner) -> None:
        if runner.connects > 1:
            self.reconnects += 1
        state = runner.state
        state.newly_confirmed.clear()
        log.info(
            "upstream connected",
            extra={"conn": state.ident, "generation": state.generation, "topics": state.wanted},
        )
        self._update_up()

    def connection_closed(self, runner: Runner, stale: list[str]) -> None:
        self.disconnects += 1
        self._update_up()
        if self.stopping:
            return
        self.refresh(runner.state)
        if stale:
            log.warning(
                "upstream connection lost",
                extra={"conn": runner.state.ident, "topics": len(stale)},
            )
        for topic in stale:
            try:
                self._on_reset(topic)
            except Exception:
                self.callback_failed("on_reset", topic)

    def connect_failed(self, runner: Runner, reason: str) -> None:
        self.connect_failures += 1
        state = runner.state
        if state.down_since is None:
            state.down_since = time.monotonic()
            self.refresh(state)
        log.warning(
            "upstream connect failed",
            extra={
                "conn": runner.state.ident,
                "reason": reason,
                "failures": runner.backoff.failures + 1,
            },
        )

    def budget_exhausted(self, wait: float) -> None:
        # Every waiting connection asks again when the window moves; one line per interval
        # is enough to say why nothing connects.
        now = time.monotonic()
        if now - self._last_budget_log >= _CALLBACK_LOG_INTERVAL:
            self._last_budget_log = now
            log.warning(
                "upstream connection budget spent; waiting",
                extra={
                    "wait": round(wait, 3),
                    "budget": self.settings.conn_budget,
                    "window": self.settings.conn_budget_window,
                },
            )

    def report_refused(self, conn: ConnectionState, failed: list[tuple[str, str]]) -> None:
        for topic, reason in failed:
            self.stale.pop(topic, None)
            if self.plan.refused(conn, topic, reason):
                self._notify_failed(topic, reason)
        self._update_up()

    def _notify_failed(self, topic: str, reason: str) -> None:
        log.warning("upstream topic failed", extra={"topic": topic, "reason": reason})
        try:
            self._on_failed(topic, reason)
        except Exception:
            self.callback_failed("on_failed", topic)

    def callback_failed(self, name: str, topic: str) -> None:
        """Log (at most every 10 s: a broken consumer must not flood the log) an exception
        raised by a callback; call from inside the `except` block."""
        self.callback_errors += 1
        now = time.monotonic()
        if now - self._last_callback_log >= _CALLBACK_LOG_INTERVAL:
            self._last_callback_log = now
            log.exception(
                "upstream %s callback raised",
                name,
                extra={"topic": topic, "callback_errors": self.callback_errors},
            )

    # -- helpers -------------------------------------------------------------------------------

    def _update_up(self) -> None:
        if self.is_up:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            fn(*args)
            return
        loop.call_soon(fn, *args)

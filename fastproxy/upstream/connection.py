"""The I/O shell of one upstream connection: a picows client driven by a `ConnectionState`.

One `Runner` task per pooled connection connects (within the pool's budget), runs the heartbeat
and request timers of its state, and reconnects with backoff when the socket is lost. Frames are
handled synchronously in the picows callback: parsed once, data handed straight to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from picows import WSCloseCode, WSHandshakeError, WSListener, WSMsgType, WSTransport, ws_connect

from fastproxy.upstream.policy import Backoff, ConnectionBudget
from fastproxy.upstream.protocol import ConnectionState
from fastproxy.upstream.settings import UpstreamSettings

if TYPE_CHECKING:
    from picows import WSFrame


log = logging.getLogger("fastproxy.upstream")

_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_CONTINUATION = WSMsgType.CONTINUATION
_monotonic = time.monotonic

# The timer loop wakes at least this often, so that a deadline created after it went to sleep
# (a request sent from a frame callback) is never missed by more than this.
_MAX_SLEEP = 1.0
_MIN_SLEEP = 0.005
_CLOSE_WAIT = 3.0


class _Listener(WSListener):
    """picows callbacks of one socket. The data path is kept short: it runs once per frame."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self.runner = runner
        self.state = runner.state
        self.pool = runner.pool
        self._fragments: list[bytes] | None = None
        self._fragment_size = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.runner.on_connected(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.runner.on_disconnected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == _TEXT and frame.fin:
            self.handle(frame.get_payload_as_memoryview())
        else:
            self._unusual_frame(transport, frame)

    def handle(self, payload: bytes | memoryview) -> None:
        """One complete text message: parsed once, data delivered, the rest to the state."""
        state = self.state
        now = _monotonic()
        state.last_frame_at = now
        pool = self.pool
        if state.silent:  # the exchange speaks again: its streams are fresh before this frame
            state.silent = False
            pool.refresh(state)
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            pool.bad_frames += 1
            return
        if type(msg) is not dict:
            pool.bad_frames += 1
            return
        topic = msg.get("topic")
        if topic is not None:
            if state.accept_data(topic, now):
                if state.newly_confirmed:  # live (if it was stale) before its data
                    pool.confirmed(state)
                pool.messages_in += 1
                try:
                    pool.on_data(topic, msg, state.generation)
                except Exception:
                    pool.callback_failed("on_data", topic)
            return
        try:
            failed = state.on_control(msg, now)
            if failed:
                pool.report_refused(state, failed)
            if state.newly_confirmed:
                pool.confirmed(state)
            if state.has_todo:
                self.runner.wake.set()
        except Exception:
            # A bug here must not cost the connection (picows would drop it); log and go on.
            log.exception("upstream control frame handling failed")

    def _unusual_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == _CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        # Bybit sends every message in one frame, but a relay in between may fragment.
        if msg_type == _TEXT:
            self._fragments = [frame.get_payload_as_bytes()]
            self._fragment_size = frame.payload_size
            return
        if msg_type != _CONTINUATION or self._fragments is None:
            return  # binary, pongs to nothing we sent, stray continuations
        self._fragment_size += frame.payload_size
        if self._fragment_size > self.pool.settings.max_frame_size:
            self._fragments = None
            self.pool.bad_frames += 1
            return
        self._fragments.append(frame.get_payload_as_bytes())
        if frame.fin:
            payload = b"".join(self._fragments)
            self._fragments = None
            self.handle(payload)


class RunnerOwner(Protocol):
    """What a Runner needs of the pool that runs it (the pool is the one implementation)."""

    settings: UpstreamSettings
    rng: random.Random
    budget: ConnectionBudget
    stopping: bool
    on_data: Callable[[str, dict, int], None]
    messages_in: int
    bad_frames: int
    connect_attempts: int
    dead_detected: int

    def next_generation(self) -> int: ...
    def connection_opened(self, runner: Runner) -> None: ...
    def connection_closed(self, runner: Runner, stale: list[str]) -> None: ...
    def connect_failed(self, runner: Runner, reason: str) -> None: ...
    def runner_exited(self, runner: Runner) -> None: ...
    def retire(self, runner: Runner) -> None: ...
    def budget_exhausted(self, wait: float) -> None: ...
    def report_refused(self, conn: ConnectionState, failed: list[tuple[str, str]]) -> None: ...
    def callback_failed(self, name: str, topic: str) -> None: ...


class Runner:
    """Keeps one pooled connection up for as long as it carries topics."""

    def __init__(self, pool: RunnerOwner, state: ConnectionState) -> None:
        self.pool = pool
        self.state = state
        settings = pool.settings
        self.backoff = Backoff(settings.backoff_base, settings.backoff_cap, pool.rng)
        self.wake = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.transport: WSTransport | None = None
        self.task: asyncio.Task[None] | None = None
        self.connects = 0
        self._settled = False
        self._closing = False
        self._exited = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"fastproxy-upstream-{self.state.ident}"
        )

    # -- picows callbacks ----------------------------------------------------------------------

    def _make_listener(self, *_: Any) -> _Listener:
        return _Listener(self)

    def on_connected(self, transport: WSTransport) -> None:
        if self._exited or self.pool.stopping:
            # The handshake finished after the task gave up on it (stop, timeout).
            transport.disconnect(graceful=False)
            return
        self.transport = transport
        self._settled = False
        self.connects += 1
        self.state.opened(_monotonic(), self.pool.next_generation())
        self.pool.connection_opened(self)
        self.flush()

    def on_disconnected(self, transport: WSTransport) -> None:
        if transport is not self.transport:
            return
        self.transport = None
        stale = self.state.closed(_monotonic())
        self.disconnected.set()
        self.wake.set()
        self.pool.connection_closed(self, stale)

    # -- sending -------------------------------------------------------------------------------

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        for request in self.state.take_requests(_monotonic()):
            transport.send(_TEXT, request)

    # -- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        pool = self.pool
        state = self.state
        try:
            while not pool.stopping and state.wanted > 0:
                try:
                    if await self._connect() and await self._session() == "idle":
                        return
                except Exception:
                    log.exception("upstream connection task failed; it reconnects")
                    self._abort()
                if pool.stopping or state.wanted == 0:
                    return
                delay = self.backoff.next_delay()
                log.info(
                    "upstream reconnect scheduled",
                    extra={"conn": state.ident, "delay": round(delay, 3)},
                )
                await asyncio.sleep(delay)
        finally:
            self._exited = True
            if not self._closing:
                self._abort()
            pool.runner_exited(self)

    async def _connect(self) -> bool:
        pool = self.pool
        settings = pool.settings
        while (wait := pool.budget.reserve(_monotonic())) > 0:
            pool.budget_exhausted(wait)
            await asyncio.sleep(wait)
            if pool.stopping or self.state.wanted == 0:
                return False
        pool.connect_attempts += 1
        self.disconnected.clear()
        try:
            # The outer limit covers the TCP connect too; picows' own timeout covers the
            # handshake and also closes the socket if this wait is cut short.
            async with asyncio.timeout(settings.handshake_timeout + 1.0):
                await ws_connect(
                    self._make_listener,
                    settings.url,
                    websocket_handshake_timeout=settings.handshake_timeout,
                    enable_auto_ping=False,
                    max_frame_size=settings.max_frame_size,
                    logger_name="upstream",
                )
        except WSHandshakeError as exc:
            status = exc.response.status if exc.response is not None else None
            reason = f"handshake refused: HTTP {int(status)}" if status else f"handshake: {exc}"
            await self._connect_failed(reason)
            return False
        except Exception as exc:  # refused, reset, DNS, TLS, timeout: all mean "try later"
            await self._connect_failed(f"{type(exc).__name__}: {exc}")
            return False
        if self.transport is None:  # closed again before we got here
            return self.disconnected.is_set()
        return True

    async def _connect_failed(self, reason: str) -> None:
        self.pool.connect_failed(self, reason)
        if self.transport is not None:
            self._abort()
            await self._wait_disconnected()

    async def _session(self) -> str:
        """Serve one open connection until it is lost ("lost") or closed as unused ("idle")."""
        state = self.state
        wake = self.wake
        while True:
            transport = self.transport
            if transport is None or self.disconnected.is_set():
                return "lost"
            now = _monotonic()
            tick = state.poll(now)
            if tick.failed:
                self.pool.report_refused(state, tick.failed)
            if state.newly_confirmed:
                self.pool.confirmed(state)
            if tick.silent:
                log.warning(
                    "upstream connection silent; its streams are stale",
                    extra={"conn": state.ident, "topics": state.wanted},
                )
                self.pool.refresh(state)
            if tick.dead is not None:
                log.warning(
                    "upstream connection dead; reconnecting",
                    extra={"conn": state.ident, "reason": tick.dead},
                )
                self.pool.dead_detected += 1
                transport.disconnect(graceful=False)
                await self._wait_disconnected()
                return "lost"
            if tick.idle:
                log.info("closing unused upstream connection", extra={"conn": state.ident})
                self.pool.retire(self)
                await self._close_gracefully()
                return "idle"
            if tick.ping is not None:
                transport.send(_TEXT, tick.ping)
            self.flush()
            if not self._settled and state.settled():
                # Subscribed and data flowing: this connection works, forget earlier failures.
                self._settled = True
                self.backoff.reset()
            delay = state.next_wakeup(now) - _monotonic()
            delay = min(max(delay, _MIN_SLEEP), _MAX_SLEEP)
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()

    # -- closing -------------------------------------------------------------------------------

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.disconnect(graceful=False)

    async def _wait_disconnected(self, timeout: float = _CLOSE_WAIT) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.disconnected.wait()
        except TimeoutError:
            # picows always reports the loss; should it not, the state must not wait forever.
            log.warning("upstream socket close not confirmed", extra={"conn": self.state.ident})
            self.on_disconnected(transport)

    def begin_close(self) -> None:
        """Say goodbye with a close frame and let the socket drain (shutdown, idle close)."""
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect(graceful=True)

    async def _close_gracefully(self) -> None:
        self.begin_close()
        await self._wait_disconnected()

    async def shutdown(self) -> None:
        self.begin_close()
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._wait_disconnected()

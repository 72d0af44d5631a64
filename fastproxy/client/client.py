"""The asyncio client: one picows connection, reconnected with backoff, around ClientCore.

The shell does the I/O only: it connects, sends what the core puts in its outbox, feeds the
core every message, and queues the core's events for the user's `async for`. When the user
falls behind by `max_queue` events it stops reading the socket (the server then sees a slow
reader, and may close it; the client reconnects and resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any

import orjson
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSError,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from fastproxy.client.book import Book
from fastproxy.client.core import ClientCore, ClientError, Event, Reply, SubscribeError
from fastproxy.upstream.policy import Backoff

log = logging.getLogger("fastproxy.client")

# Close codes after which reconnecting cannot help.
CLOSE_CONNECTION_LIMIT = 4003
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_CLOSED = object()  # wakes the iterator when the client is closed


class AuthError(ClientError):
    """The server refused the API key (HTTP 401 or 403 at the handshake)."""


class ConnectionLimitError(ClientError):
    """The server closed the connection with 4003: its connection limit (total or per
    address) is reached. Reconnecting at once would only be refused again."""


class ReconnectError(ClientError):
    """The connection was lost and `max_reconnects` attempts in a row failed."""


class _Listener(WSListener):
    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.close_code: int | None = None
        self.close_reason = ""
        self.lost = asyncio.Event()
        self._fragments: bytearray | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT or msg_type == WSMsgType.CONTINUATION:
            payload = self._assemble(frame, msg_type)
            if payload is not None:
                self.client._on_payload(payload)
        elif msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())  # type: ignore[call-overload]
            self.close_reason = (frame.get_close_message() or b"").decode("utf-8", "replace")
            with contextlib.suppress(Exception):
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def _assemble(self, frame: WSFrame, msg_type: WSMsgType) -> bytes | None:
        if msg_type == WSMsgType.CONTINUATION:
            if self._fragments is None:
                return None
            self._fragments += frame.get_payload_as_memoryview()
            if not frame.fin:
                return None
            payload, self._fragments = bytes(self._fragments), None
            return payload
        if not frame.fin:
            self._fragments = bytearray(frame.get_payload_as_memoryview())
            return None
        return frame.get_payload_as_bytes()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.lost.set()


class Client:
    """A fastproxy client that keeps its streams correct across reconnects.

    ```python
    async with Client("ws://127.0.0.1:8000/ws") as client:
        await client.subscribe("trade:BTCUSDT", "orderbook:50:BTCUSDT")
        async for event in client:
            ...
    ```

    Options: reconnect delays are uniform in [0, min(backoff_cap, backoff_base * 2**n)] after n
    failed attempts in a row; `max_reconnects` (None: forever) failed attempts in a row end the
    iteration with ReconnectError. The client pings a quiet server every `ping_interval` s and
    reconnects when no pong comes within `ping_timeout` s.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        backoff_base: float = 0.25,
        backoff_cap: float = 5.0,
        max_reconnects: int | None = None,
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        max_queue: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        if backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        if max_reconnects is not None and max_reconnects < 0:
            raise ValueError("max_reconnects must be None or >= 0")
        if max_queue < 2:
            raise ValueError("max_queue must be at least 2")
        self.url = url
        self._api_key = api_key
        self.max_reconnects = max_reconnects
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_queue = max_queue
        self._backoff = Backoff(backoff_base, backoff_cap, rng)
        self._core = ClientCore()
        self._events: deque[Any] = deque()
        self._wakeup: asyncio.Event | None = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._transport: WSTransport | None = None
        self._listener: _Listener | None = None
        self._runner: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._closed = False
        self._reading_paused = False
        self.reconnects = 0  # connections made after the first

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection; errors (refused, auth, bad URL) are raised as they are.
        Once connected, the client reconnects by itself."""
        if self._runner is not None:
            raise RuntimeError("Client is already connected")
        self._wakeup = asyncio.Event()
        await self._connect()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="fastproxy-client")

    async def close(self) -> None:
        """Close the connection and end the iteration (after the events already queued)."""
        if self._closed:
            return
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            with contextlib.suppress(Exception):
                transport.send_close(WSCloseCode.OK)
            listener = self._listener
            if listener is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.lost.wait(), 2.0)
            transport.disconnect(graceful=False)
        self._transport = None
        self._fail_waiters(ClientError("the client was closed"))
        self._push(_CLOSED)

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._core.connected

    # -- requests ------------------------------------------------------------------------

    async def subscribe(self, *args: str) -> list[str]:
        """Subscribe to streams (`trade:BTCUSDT`, `orderbook:50:BTCUSDT`, ...). Waits for the
        server's ack and returns the args it accepted; raises SubscribeError naming each arg it
        refused (the others stay subscribed) and ValueError for args that name no stream.
        While reconnecting it returns at once: the next connection subscribes them."""
        self._raise_if_unusable()
        req_id = self._core.subscribe(args)
        reply = await self._request(req_id)
        if reply is None:
            return list(args)
        if reply.get("op") == "error":
            raise SubscribeError(f"{reply.get('code')}: {reply.get('message')}")
        rejected = reply.get("rejected") or []
        if rejected:
            reasons = "; ".join(f"{item.get('arg')}: {item.get('reason')}" for item in rejected)
            raise SubscribeError(f"the server refused {reasons}", rejected)
        return list(reply.get("args") or args)

    async def unsubscribe(self, *args: str) -> None:
        """Stop streams. Their events still queued are dropped too."""
        self._raise_if_unusable()
        before = set(self._core.args())
        req_id = self._core.unsubscribe(args)
        gone = before - set(self._core.args())
        if gone:
            self._events = deque(
                item for item in self._events if not (isinstance(item, Event) and item.arg in gone)
            )
        await self._request(req_id)

    async def _request(self, req_id: str | None) -> dict[str, Any] | None:
        self._send_outbox()
        if req_id is None:
            return None
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiters[req_id] = future
        self._hand_back_replies()  # the request may already be answered (connection lost)
        try:
            return await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._waiters.pop(req_id, None)

    def _raise_if_unusable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientError("the client is closed")
        if self._runner is None:
            raise ClientError("the client is not connected; use `async with Client(...)`")

    # -- reading -------------------------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._events:
                item = self._events.popleft()
                if self._reading_paused and len(self._events) <= self.max_queue // 2:
                    self._resume_reading()
                if item is _CLOSED:
                    self._events.append(_CLOSED)  # every later call ends too
                    raise StopAsyncIteration
                if isinstance(item, BaseException):
                    self._events.append(item)
                    raise item
                return item  # type: ignore[no-any-return]
            if self._wakeup is None:
                raise ClientError("the client is not connected; use `async with Client(...)`")
            self._wakeup.clear()
            await self._wakeup.wait()

    def book(self, arg: str) -> Book | None:
        """The order book of a subscribed `orderbook:DEPTH:SYMBOL` stream, as of the last
        message received; None while there is no trusted book (before the first snapshot, or
        after a gap until the next)."""
        return self._core.book(arg)

    def state(self, arg: str) -> Any:
        """The latest complete data of a state stream (ticker, kline; a book as a dict)."""
        return self._core.state(arg)

    def freshness(self, arg: str) -> str:
        """ "live" or "stale", as the last status event for the stream said."""
        return self._core.freshness(arg)

    @property
    def subscriptions(self) -> list[str]:
        return self._core.args()

    @property
    def resyncs(self) -> int:
        """Books this client found broken and subscribed afresh."""
        return self._core.resyncs

    @property
    def pending(self) -> int:
        """Events received and not yet taken by the iteration (bounded near `max_queue`)."""
        return sum(isinstance(item, Event) for item in self._events)

    # -- the connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        try:
            transport, picows_listener = await asyncio.wait_for(
                ws_connect(
                    lambda: _Listener(self),
                    self.url,
                    websocket_handshake_timeout=self.connect_timeout,
                    enable_auto_ping=True,
                    auto_ping_idle_timeout=self.ping_interval,
                    auto_ping_reply_timeout=self.ping_timeout,
                    auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
                    enable_auto_pong=True,
                    max_frame_size=MAX_MESSAGE_SIZE,
                    extra_headers=headers,
                    logger_name=logging.LoggerAdapter(logging.getLogger("picows.client"), {}),
                ),
                self.connect_timeout,
            )
        except WSInvalidStatusError as exc:
            status = exc.response.status if exc.response is not None else None
            if status in (401, 403):
                raise AuthError(
                    f"{self.url} refused the connection with HTTP {int(status)}: "
                    + ("the API key was not accepted" if self._api_key else "it needs an API key")
                ) from None
            if status is not None and 400 <= int(status) < 500 and int(status) not in (408, 429):
                raise ClientError(
                    f"{self.url} refused the WebSocket upgrade with HTTP {int(status)}"
                ) from None
            raise
        listener = picows_listener if isinstance(picows_listener, _Listener) else None
        if listener is None or transport.is_disconnected:
            # Closed as soon as it opened (a connection limit), or gone during the handshake.
            code = listener.close_code if listener is not None else None
            if listener is not None and code == CLOSE_CONNECTION_LIMIT:
                raise self._limit_error(listener)
            raise ConnectionResetError(
                f"{self.url} closed the connection at once" + (f" ({code})" if code else "")
            )
        self._transport = transport
        self._listener = listener
        for event in self._core.connection_made():
            self._push(event)
        self._send_outbox()

    async def _run(self) -> None:
        """Wait for the connection to drop, then reconnect with backoff, until closed."""
        try:
            while True:
                listener = self._listener
                assert listener is not None
                await listener.lost.wait()
                self._on_lost(listener)
                if self._fatal is not None:
                    return
                await self._reconnect()
                if self._fatal is not None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must end the iteration, not hang it
            log.exception("client connection loop failed")
            self._fail(ClientError(f"the client failed: {exc!r}"))

    def _on_lost(self, listener: _Listener) -> None:
        code = listener.close_code
        self._transport = None
        self._reading_paused = False
        fatal: ClientError | None = None
        if code == CLOSE_CONNECTION_LIMIT:
            fatal = self._limit_error(listener)
            self._fatal = fatal  # before the waiters are answered: they must see it
        for event in self._core.connection_lost(int(time.time() * 1000)):
            self._push(event)
        if fatal is not None:
            self._core.replies.clear()
            self._fail(fatal)
            return
        self._hand_back_replies()
        log.info("connection lost; reconnecting", extra={"code": code, "url": self.url})

    def _limit_error(self, listener: _Listener) -> ConnectionLimitError:
        return ConnectionLimitError(
            f"{self.url} closed the connection with 4003 (connection limit reached)"
            + (f": {listener.close_reason}" if listener.close_reason else "")
        )

    async def _reconnect(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._backoff.next_delay())
            try:
                await self._connect()
            except ClientError as exc:
                self._fail(exc)
                return
            except (OSError, WSError, TimeoutError) as exc:
                failures += 1
                log.info("reconnect failed", extra={"url": self.url, "error": repr(exc)})
                if self.max_reconnects is not None and failures > self.max_reconnects:
                    self._fail(
                        ReconnectError(f"could not reconnect to {self.url} after {failures} tries")
                    )
                    return
                continue
            self.reconnects += 1
            return

    def _fail(self, exc: BaseException) -> None:
        self._fatal = exc
        self._fail_waiters(exc)
        self._push(exc)

    def _fail_waiters(self, exc: BaseException) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(exc)

    # -- frames in, events out -----------------------------------------------------------

    def _on_payload(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("ignored a frame that is not JSON", extra={"bytes": len(payload)})
            return
        if not isinstance(message, dict):
            return
        core = self._core
        now_ms = int(time.time() * 1000)
        for event in core.receive(message, now_ms):
            self._push(event)
        if message.get("op") == "subscribe":
            # A connection that got its subscriptions back has proven itself.
            self._backoff.reset()
        if core.confirm_due:
            core.confirm_due = False
            # After the frames that arrived with the ack (a stale status comes right after it).
            asyncio.get_running_loop().call_soon(self._confirm_live)
        self._send_outbox()
        self._hand_back_replies()

    def _confirm_live(self) -> None:
        for event in self._core.confirm_live(int(time.time() * 1000)):
            self._push(event)

    def _send_outbox(self) -> None:
        outbox = self._core.outbox
        transport = self._transport
        if not outbox or transport is None or transport.is_disconnected:
            return
        for request in outbox:
            transport.send(WSMsgType.TEXT, orjson.dumps(request))
        outbox.clear()

    def _hand_back_replies(self) -> None:
        replies = self._core.replies
        kept: list[Reply] = []
        for reply in replies:
            future = self._waiters.get(reply.req_id)
            if future is None:
                continue  # nobody waits (timed out)
            if not future.done():
                future.set_result(reply.message)
        replies[:] = kept

    def _push(self, item: Any) -> None:
        self._events.append(item)
        if self._wakeup is not None:
            self._wakeup.set()
        if (
            not self._reading_paused
            and len(self._events) >= self.max_queue
            and self._transport is not None
        ):
            self._reading_paused = True
            self._transport.underlying_transport.pause_reading()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            transport.underlying_transport.resume_reading()

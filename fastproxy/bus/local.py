"""Workers on one machine: one feed process, N worker processes, one Unix socket each.

`LocalBus` is the engine a worker runs: its hub's interest goes to the feed process, and the
Messages of the streams it holds come back as the feed built them (frame bytes, seq, epoch).
`LocalHub` is the feed process's end: it stands where a hub would for the machine's real
engine (memory alone, or Redis in a cluster), so the upstream feed and the codecs run once
for the machine, each topic is subscribed upstream once however many workers hold it, and the
machine is one node (one Redis client) in a cluster.

Fan-out to workers is one record per Message per worker holding its stream, never per client;
what is due for one worker in one loop tick goes out in one write. A worker that joins a stream
another worker already holds first gets the feed's last Message as its snapshot, so every
client on every worker sees the same seq line with no gap and no duplicate. The worker's end
applies the same delivery rules (fastproxy.bus.delivery) as every engine.

A worker keeps its own copy of each book it holds, fed with every Message it receives (as a
cluster follower does), so its late joiners get the whole book at once.

A worker that stops reading (its buffer at the feed passes LINK_BUFFER_LIMIT) is cut off: it
exits and the supervisor starts a fresh one; the feed never buffers without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastproxy import ipc
from fastproxy.bus.delivery import Delivery
from fastproxy.codec import Codec, Message, new_codec
from fastproxy.streams import KINDS, Stream, parse_stream_arg
from fastproxy.wire import SNAPSHOT, LastValues

if TYPE_CHECKING:
    from fastproxy.bus import Bus, Handler

log = logging.getLogger("fastproxy.bus.local")

LINK_BUFFER_LIMIT = 64 * 1024 * 1024
CONNECT_TIMEOUT = 10.0


class _WorkerLink(asyncio.Protocol):
    """The feed's end of one worker's socket."""

    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.reader = ipc.RecordReader()
        self.out: list[bytes] = []
        self.streams: set[str] = set()
        self.worker: int | None = None
        self.pid: int | None = None
        self.closed = False
        self._handlers = {
            ipc.HELLO: self._on_hello,
            ipc.ACQUIRE: self._on_acquire,
            ipc.RELEASE: self._on_release,
            ipc.REPORT: self._on_report,
            ipc.SYNC: self._on_sync,
            ipc.HISTORY_ASK: self._on_history_ask,
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.hub.links.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            ipc.dispatch(self.reader, data, self._handlers)
        except (ipc.IPCError, ValueError) as exc:
            log.error("worker link broken", extra={"worker": self.worker, "error": str(exc)})
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.hub.link_lost(self)

    def send(self, record: bytes) -> None:
        if self.closed:
            return
        out = self.out
        if not out:
            self.hub.dirty.append(self)
            self.hub.schedule_flush()
        out.append(record)

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.closed or self.transport is None or not out:
            return
        self.transport.writelines(out)
        if self.transport.get_write_buffer_size() > LINK_BUFFER_LIMIT:
            log.error(
                "worker stopped reading its feed; cutting it off",
                extra={"worker": self.worker, "pid": self.pid},
            )
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _on_hello(self, body: memoryview) -> None:
        hello = ipc.decode_json(body)
        self.worker, self.pid = int(hello["worker"]), int(hello["pid"])
        if self.hub.symbols is not None:
            self.send(self.hub.symbols)

    def _on_acquire(self, body: memoryview) -> None:
        self.hub.acquire(self, parse_stream_arg(ipc.decode_text(body)))

    def _on_release(self, body: memoryview) -> None:
        self.hub.release(self, parse_stream_arg(ipc.decode_text(body)))

    def _on_report(self, body: memoryview) -> None:
        if self.worker is not None:
            self.hub.reports[self.worker] = ipc.decode_json(body)

    def _on_history_ask(self, body: memoryview) -> None:
        token, arg, epoch, seq = ipc.decode_json(body)
        self.hub.answer_history(self, token, parse_stream_arg(arg), epoch, seq)

    def _on_sync(self, body: memoryview) -> None:
        token = ipc.decode_json(body)
        self.send(ipc.encode_json(ipc.SYNCED, {"token": token, "bus": self.hub.engine.status()}))


class LocalHub:
    """The feed process's end of the local bus: the machine's one hub for the real engine
    (a Handler: the engine delivers to it what the machine's workers hold)."""

    def __init__(self, engine: Bus, path: str, linger: float = 5.0, history: Any = None) -> None:
        self.engine = engine
        self.path = path
        self.linger = linger
        # recent frames of every stream the machine holds, for resumes on any worker (a
        # fastproxy.history.History); unused when the engine's history is shared (Redis)
        self.history = None if getattr(engine, "shared_history", False) else history
        self.links: set[_WorkerLink] = set()
        self.dirty: list[_WorkerLink] = []
        self.reports: dict[int, dict[str, Any]] = {}  # worker id -> its latest report
        self._holders: dict[str, set[_WorkerLink]] = {}  # stream id -> links holding it
        self._acquired: dict[str, Stream] = {}  # streams the engine was asked for
        self._last = LastValues()  # what a worker joining a held stream gets first
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stale: dict[str, tuple[str, int]] = {}  # stream id -> (reason, since) if stale
        self._waiting_ready: dict[str, set[_WorkerLink]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flush_scheduled = False
        self._server: asyncio.AbstractServer | None = None
        self.messages_in = 0
        self.records_out = 0
        self.symbols: bytes | None = None  # the SYMBOLS record every worker has (or gets)
        engine.attach(self)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _WorkerLink(self), self.path)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- interest from workers -----------------------------------------------------------

    def acquire(self, link: _WorkerLink, stream: Stream) -> None:
        sid = stream.stream_id
        timer = self._timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        self._holders.setdefault(sid, set()).add(link)
        link.streams.add(sid)
        if sid not in self._acquired:
            self._acquired[sid] = stream
            self.engine.acquire(stream)
        else:
            stale = self._stale.get(sid)
            if stale is not None:
                link.send(ipc.encode_json(ipc.STATUS, [sid, *stale]))
            # a book's last Message is a delta: the joining worker gets the whole book
            snapshot = self.engine.snapshot(stream) if stream.is_delta else self._last.snapshot(sid)
            if snapshot is not None:
                link.send(ipc.encode_message(snapshot))
        self._tell_ready(link, stream)

    def _engine_ready(self, stream: Stream) -> bool:
        ready = getattr(self.engine, "ready", None)
        return True if ready is None else bool(ready(stream))

    def _tell_ready(self, link: _WorkerLink, stream: Stream) -> None:
        """READY goes to the worker once the engine delivers every Message of the stream
        here (a follower in a cluster first subscribes its channel)."""
        sid = stream.stream_id
        if self._engine_ready(stream):
            link.send(ipc.encode_text(ipc.READY, sid))
            return
        waiting = self._waiting_ready.setdefault(sid, set())
        if not waiting:
            self._spawn(self._await_ready(stream))
        waiting.add(link)

    async def _await_ready(self, stream: Stream) -> None:
        sid = stream.stream_id
        while sid in self._acquired and not self._engine_ready(stream):
            await asyncio.sleep(0.02)
        for link in self._waiting_ready.pop(sid, set()):
            if sid in link.streams:
                link.send(ipc.encode_text(ipc.READY, sid))

    def answer_history(
        self, link: _WorkerLink, token: int, stream: Stream, epoch: str, seq: int
    ) -> None:
        """A worker's client resumes: what came after `seq`, from the engine's shared history
        (Redis) or from the rings this process keeps of every stream the machine holds."""
        self._spawn(self._history(link, token, stream, epoch, seq))

    async def _history(
        self, link: _WorkerLink, token: int, stream: Stream, epoch: str, seq: int
    ) -> None:
        entries: list[tuple[int, bytes]] | None = None
        try:
            if getattr(self.engine, "shared_history", False):
                entries = await self.engine.history_after(stream, epoch, seq)  # type: ignore[attr-defined]
            elif self.history is not None:
                frames = self.history.after(stream.stream_id, epoch, seq, time.monotonic())
                if frames is not None:
                    entries = [(seq + 1 + i, frame) for i, frame in enumerate(frames)]
        except Exception:
            log.exception("history lookup failed", extra={"stream": stream.stream_id})
        link.send(ipc.encode_history(token, entries))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release(self, link: _WorkerLink, stream: Stream) -> None:
        """A worker's last client left (after the worker's own linger): release at once."""
        sid = stream.stream_id
        link.streams.discard(sid)
        holders = self._holders.get(sid)
        if holders is not None:
            holders.discard(link)
        self._release(sid)

    def link_lost(self, link: _WorkerLink) -> None:
        """A worker is gone: its streams linger, so its clients reconnecting to another
        worker find them still upstream with their seq line unbroken."""
        self.links.discard(link)
        for sid in link.streams:
            holders = self._holders.get(sid)
            if holders is None:
                continue
            holders.discard(link)
            if not holders and sid not in self._timers:
                if self.linger > 0:
                    loop = asyncio.get_running_loop()
                    self._timers[sid] = loop.call_later(self.linger, self._release, sid)
                else:
                    self._release(sid)
        link.streams.clear()

    def _release(self, sid: str) -> None:
        self._timers.pop(sid, None)
        if self._holders.get(sid):
            return
        self._holders.pop(sid, None)
        self._last.forget(sid)
        self._stale.pop(sid, None)
        if self.history is not None:
            self.history.forget(sid)
        stream = self._acquired.pop(sid, None)
        if stream is not None:
            self.engine.release(stream)

    # -- from the engine -----------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        sid = message.stream_id
        if sid not in self._acquired:
            return
        self.messages_in += 1
        self._last.put(message)
        if self.history is not None:
            self.history.append(sid, message.epoch, message.seq, message.frame, time.monotonic())
        holders = self._holders.get(sid)
        if not holders:
            return
        record = ipc.encode_message(message)
        for link in holders:
            link.send(record)
        self.records_out += len(holders)

    def reset(self, stream: Stream) -> None:
        sid = stream.stream_id
        self._last.forget(sid)
        record = ipc.encode_text(ipc.RESET, sid)
        for link in self._holders.get(sid, ()):
            link.send(record)

    def status(self, stream: Stream, reason: str | None, since: int) -> None:
        """Freshness: stale for `reason` (None: live again) since `since` (epoch ms)."""
        sid = stream.stream_id
        if reason is None:
            self._stale.pop(sid, None)
        else:
            self._stale[sid] = (reason, since)
        record = ipc.encode_json(ipc.STATUS, [sid, reason, since])
        for link in self._holders.get(sid, ()):
            link.send(record)

    def reject(self, stream: Stream, reason: str) -> None:
        sid = stream.stream_id
        self._last.forget(sid)
        self._stale.pop(sid, None)
        if self.history is not None:
            self.history.forget(sid)
        self._acquired.pop(sid, None)
        timer = self._timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        record = ipc.encode_json(ipc.REJECT, [sid, reason])
        for link in self._holders.pop(sid, set()):
            link.streams.discard(sid)
            link.send(record)

    # -- to workers ----------------------------------------------------------------------

    def share_symbols(self, symbols: frozenset[str]) -> None:
        """The exchange's symbol list, fetched once for the machine: to every worker now and
        to every worker that links later."""
        self.symbols = ipc.encode_json(ipc.SYMBOLS, sorted(symbols))
        self.broadcast(self.symbols)

    def broadcast(self, record: bytes) -> None:
        for link in self.links:
            link.send(record)

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for link in dirty:
            link.flush()

    # -- introspection -------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._acquired)

    def streams_by_kind(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for sid, stream in self._acquired.items():
            if self._holders.get(sid):
                counts[stream.kind] += 1
        return counts

    def figures(self) -> dict[str, Any]:
        """For /stats (`status` is the Handler's freshness event)."""
        return {
            "workers_linked": len(self.links),
            "streams": len(self._acquired),
            "lingering": len(self._timers),
            "messages_in": self.messages_in,
            "records_out": self.records_out,
        }


class _FeedLink(asyncio.Protocol):
    """A worker's end of its socket to the feed process."""

    def __init__(self, bus: LocalBus) -> None:
        self.bus = bus
        self.reader = ipc.RecordReader()
        self.transport: asyncio.Transport | None = None
        self._handlers = {
            ipc.MESSAGE: bus._on_message,
            ipc.RESET: bus._on_reset,
            ipc.REJECT: bus._on_reject,
            ipc.NODE: bus._on_node,
            ipc.SYNCED: bus._on_synced,
            ipc.STATUS: bus._on_status,
            ipc.READY: bus._on_ready,
            ipc.HISTORY: bus._on_history,
            ipc.SYMBOLS: bus._on_symbols,
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            ipc.dispatch(self.reader, data, self._handlers)
        except (ipc.IPCError, ValueError) as exc:
            log.error("feed link broken", extra={"error": str(exc)})
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bus._link_lost()


class LocalBus:
    """The engine of a worker: interest to the feed process, Messages back from it."""

    name = "local"
    # resume reads the feed process's history, which covers every stream of the machine
    shared_history = True

    def __init__(
        self, path: str, worker: int = 0, on_lost: Callable[[], None] | None = None
    ) -> None:
        self.path = path
        self.worker = worker
        self.on_lost = on_lost
        self._delivery = Delivery(state=self.snapshot)
        self._held: dict[str, Stream] = {}
        # this worker's copy of each book it holds, at the last seq it received (for joiners)
        self._books: dict[str, Codec] = {}
        self._link: _FeedLink | None = None
        self._stopping = False
        self.linked = False
        self.node: dict[str, Any] | None = None  # the feed's latest node snapshot
        self.node_at = 0.0  # loop time it came
        self.first_node = asyncio.Event()
        self.feed_bus: dict[str, Any] = {}  # the feed-side engine's status, as of the last sync
        self.messages_in = 0
        self._syncs: dict[int, asyncio.Future[Any]] = {}
        self._sync_token = 0
        self._ready: set[str] = set()
        self.symbols: frozenset[str] | None = None  # the exchange's list, from the feed process

    def attach(self, handler: Handler) -> None:
        self._delivery.attach(handler)

    def symbol_known(self, symbol: str) -> bool | None:
        """True/False once the feed process has the exchange's list; None until then."""
        symbols = self.symbols
        return None if symbols is None else symbol in symbols

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        while True:
            try:
                _, self._link = await loop.create_unix_connection(
                    lambda: _FeedLink(self), self.path
                )
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self.linked = True
        self._send(ipc.encode_json(ipc.HELLO, {"worker": self.worker, "pid": os.getpid()}))
        for stream in self._held.values():
            self._send(ipc.encode_text(ipc.ACQUIRE, stream.arg))

    async def stop(self) -> None:
        self._stopping = True
        link = self._link
        if link is not None and link.transport is not None:
            link.transport.close()

    def acquire(self, stream: Stream) -> None:
        if stream.stream_id in self._held:
            return
        self._held[stream.stream_id] = stream
        self._delivery.hold(stream.stream_id, stream)
        self._send(ipc.encode_text(ipc.ACQUIRE, stream.arg))

    def release(self, stream: Stream) -> None:
        if self._held.pop(stream.stream_id, None) is not None:
            # the feed may drop the stream's codec: a later acquire can start a new epoch
            self._delivery.forget(stream.stream_id)
            self._books.pop(stream.stream_id, None)
            self._ready.discard(stream.stream_id)
            self._send(ipc.encode_text(ipc.RELEASE, stream.arg))

    async def settled(self) -> None:
        """Return once everything the feed process sent before now has been delivered here
        (and `feed_bus` is the feed side's engine status as of now)."""
        await self._ask(lambda token: ipc.encode_json(ipc.SYNC, token))

    def ready(self, stream: Stream) -> bool:
        """Every Message of `stream` reaches this worker from here on (the feed said so)."""
        return stream.stream_id in self._ready

    async def history_after(
        self, stream: Stream, epoch: str, seq: int
    ) -> list[tuple[int, bytes]] | None:
        """(seq, frame) of the stream's Messages after `seq` in `epoch`, from the history the
        feed process keeps for the machine, or None when it cannot bridge the gap."""
        return await self._ask(
            lambda token: ipc.encode_json(ipc.HISTORY_ASK, [token, stream.arg, epoch, seq])
        )

    async def _ask(self, record: Callable[[int], bytes]) -> Any:
        """Send a question to the feed process and wait for its answer (matched by token)."""
        self._sync_token += 1
        token = self._sync_token
        future = self._syncs[token] = asyncio.get_running_loop().create_future()
        self._send(record(token))
        try:
            return await asyncio.wait_for(future, CONNECT_TIMEOUT)
        finally:
            self._syncs.pop(token, None)

    def _answer(self, token: int, value: Any) -> None:
        future = self._syncs.get(token)
        if future is not None and not future.done():
            future.set_result(value)

    def report(self, stats: dict[str, Any]) -> None:
        """This worker's stats, for the node's aggregate."""
        self._send(ipc.encode_json(ipc.REPORT, stats))

    def _send(self, record: bytes) -> None:
        link = self._link
        if self.linked and link is not None and link.transport is not None:
            link.transport.write(record)

    def snapshot(self, stream: Stream) -> Message | None:
        """This worker's copy of a book as a snapshot at the last seq received (None: none)."""
        book = self._books.get(stream.stream_id)
        return None if book is None else book.snapshot()

    def status(self) -> dict[str, Any]:
        """This worker's end. The machine's engine applies the delivery rules first, so a gap
        is counted there (the worker sees it again, already a snapshot); duplicates are counted
        where they are dropped, on either side."""
        feed = self.feed_bus
        return {
            "engine": self.name,
            "healthy": self.linked,
            "worker": self.worker,
            "streams_held": len(self._held),
            "messages_in": self.messages_in,
            "duplicates_dropped": self._delivery.duplicates + feed.get("duplicates_dropped", 0),
            "gaps": feed.get("gaps", 0),
            "feed": feed,
        }

    @property
    def healthy(self) -> bool:
        return self.linked

    # -- from the feed -------------------------------------------------------------------

    def _on_message(self, body: memoryview) -> None:
        fields = ipc.MessageFields(body)
        stream = self._held.get(fields.stream_id)
        if stream is None:
            return
        self.messages_in += 1
        frame = fields.frame
        message = Message(
            fields.stream_id,
            fields.seq,
            fields.type,
            fields.ts,
            ipc.frame_payload(frame),
            frame,
            fields.epoch,
        )
        if stream.is_delta:
            self._follow_book(stream, message)
        self._delivery.deliver(message)

    def _follow_book(self, stream: Stream, message: Message) -> None:
        """Apply a book's Message to this worker's copy before it is delivered (joiners and
        conflated clients are served the copy at that seq). The feed sends a snapshot first
        and on every break, so an update that does not follow the copy only drops it."""
        sid = stream.stream_id
        last = self._delivery.last_seq(sid)
        if last is not None and message.seq <= last:
            return  # a duplicate: the delivery rules drop it
        book = self._books.get(sid)
        if message.type == SNAPSHOT:
            if book is None:
                book = self._books[sid] = new_codec(stream)
            book.follow(message)
        elif book is not None and book.seq == message.seq - 1 and book.epoch == message.epoch:
            book.follow(message)
        else:
            self._books.pop(sid, None)

    def _on_reset(self, body: memoryview) -> None:
        stream = self._held.get(ipc.decode_text(body))
        if stream is not None:
            self._books.pop(stream.stream_id, None)
            self._delivery.reset(stream)

    def _on_reject(self, body: memoryview) -> None:
        sid, reason = ipc.decode_json(body)
        stream = self._held.pop(sid, None)
        self._books.pop(sid, None)
        if stream is not None:
            self._delivery.reject(stream, reason)

    def _on_synced(self, body: memoryview) -> None:
        answer = ipc.decode_json(body)
        self.feed_bus = answer["bus"]
        self._answer(answer["token"], None)

    def _on_history(self, body: memoryview) -> None:
        self._answer(*ipc.decode_history(body))

    def _on_symbols(self, body: memoryview) -> None:
        self.symbols = frozenset(ipc.decode_json(body))

    def _on_ready(self, body: memoryview) -> None:
        sid = ipc.decode_text(body)
        if sid in self._held:
            self._ready.add(sid)

    def _on_status(self, body: memoryview) -> None:
        sid, reason, since = ipc.decode_json(body)
        stream = self._held.get(sid)
        if stream is not None:
            self._delivery.status(stream, reason, since)  # type: ignore[attr-defined]

    def _on_node(self, body: memoryview) -> None:
        self.node = ipc.decode_json(body)
        self.feed_bus = self.node.get("engine", self.feed_bus)
        self.node_at = asyncio.get_running_loop().time()
        self.first_node.set()

    def _link_lost(self) -> None:
        for future in self._syncs.values():
            if not future.done():
                future.set_exception(ConnectionError("lost the feed process"))
        was_linked, self.linked = self.linked, False
        if was_linked and not self._stopping:
            log.error("lost the feed process", extra={"worker": self.worker})
            if self.on_lost is not None:
                self.on_lost()

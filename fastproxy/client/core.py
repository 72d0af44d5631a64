"""The client's protocol session, sans-I/O: server messages in, events and requests out.

`ClientCore` knows which streams the user wants and where each stands (epoch, seq, book,
latest state, freshness). The I/O shell (`fastproxy.client.Client`) feeds it decoded server
messages and connection changes, sends what it puts in `outbox`, and hands its events to the
user. Nothing here touches a socket or a clock: times come in as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastproxy.client.book import Book, BookError, OrderBook
from fastproxy.client.sequence import SequenceCheck, Verdict
from fastproxy.streams import ORDERBOOK, StreamError, parse_stream_arg

# Event kinds. "error" is added to the documented four: the server refused a stream.
DATA = "data"
STATUS = "status"
GAP = "gap"
RECONNECTED = "reconnected"
ERROR = "error"

LIVE = "live"
STALE = "stale"

# The server takes at most this many args per request.
MAX_ARGS_PER_REQUEST = 1000


class ClientError(Exception):
    """Base of the errors this client raises."""


class SubscribeError(ClientError):
    """The server refused some or all of the streams asked for. `rejected` lists
    `{"arg", "reason"}` for each refused arg; the accepted ones are subscribed."""

    def __init__(self, message: str, rejected: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.rejected = rejected or []


@dataclass(frozen=True, slots=True)
class Event:
    """What the client yields. `kind` is "data", "status", "gap", "reconnected" or "error";
    `arg` the stream's arg as the user subscribed it (None for "reconnected" and connection-wide
    errors); `message` the server's message (a data, status or error message, the subscribe ack
    for "reconnected"), or for "gap" `{"op": "gap", "stream", "reason", "from", "to"}`."""

    kind: str
    arg: str | None
    message: dict[str, Any]


@dataclass(slots=True)
class _Stream:
    arg: str  # as the user wrote it
    stream_id: str
    kind: str
    check: SequenceCheck
    book: OrderBook | None
    last: Any = None  # the latest data of a state stream
    freshness: str = LIVE
    stale_by_client: bool = False  # stale because our connection dropped, not by the server
    confirm_pending: bool = False  # re-acked after a reconnect; live unless the server objects
    resync_req: str | None = None  # a book resubscribe in flight: drop its data until acked
    awaiting_snapshot: bool = False  # a book with no trusted state: updates cannot apply
    gap_told: bool = False  # the user was told of the gap before the next message already


@dataclass(slots=True)
class _Pending:
    op: str
    stream_ids: list[str]
    purpose: str = "user"  # "user"; "reconnect" (first chunk) or "rejoin"; "resync"


@dataclass(slots=True)
class Reply:
    """The server's answer to a request the user made (None: the connection dropped first; the
    request is then carried out on the next connection)."""

    req_id: str
    message: dict[str, Any] | None


@dataclass(slots=True)
class StreamName:
    arg: str
    stream_id: str
    kind: str
    is_state: bool  # every message is (or builds) the state; else each is news of its own
    depth: int | None = field(default=None)


def resolve(arg: str) -> StreamName:
    """Check an arg and name its stream; ValueError (StreamError) says what is wrong."""
    if not isinstance(arg, str):
        raise StreamError(f"stream args are strings, not {type(arg).__name__}")
    stream = parse_stream_arg(arg)
    return StreamName(arg, stream.stream_id, stream.kind, stream.is_state, stream.depth)


class ClientCore:
    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}  # stream id -> state
        self._pending: dict[str, _Pending] = {}
        self._next_id = 0
        self.connected = False
        self.outbox: list[dict[str, Any]] = []  # requests for the I/O shell to send, in order
        self.replies: list[Reply] = []  # answers to user requests, for the shell to hand back
        self.confirm_due = False  # call confirm_live() once this batch of frames is processed
        self.connections = 0
        self.duplicates = 0
        self.resyncs = 0

    # -- what the user asks --------------------------------------------------------------

    def subscribe(self, args: Iterable[str]) -> str | None:
        """Want these streams. Returns the req_id to wait for, or None when nothing needs to
        be sent now (all already held, or not connected: the next connection subscribes)."""
        names = [resolve(arg) for arg in args]  # all checked before any is applied
        new: list[_Stream] = []
        for name in names:
            if name.stream_id in self._streams:
                continue
            state = _Stream(
                arg=name.arg,
                stream_id=name.stream_id,
                kind=name.kind,
                check=SequenceCheck(event_stream=not name.is_state),
                book=OrderBook(name.depth) if name.kind == ORDERBOOK else None,
            )
            self._streams[name.stream_id] = state
            new.append(state)
        if not new or not self.connected:
            return None
        return self._request("subscribe", new, "user")

    def unsubscribe(self, args: Iterable[str]) -> str | None:
        names = [resolve(arg) for arg in args]
        gone = [self._streams.pop(n.stream_id) for n in names if n.stream_id in self._streams]
        if not gone or not self.connected:
            return None
        return self._request("unsubscribe", gone, "user")

    def _request(
        self,
        op: str,
        streams: list[_Stream],
        purpose: str,
        resume: dict[str, dict[str, Any]] | None = None,
    ) -> str:
        self._next_id += 1
        req_id = f"c{self._next_id}"
        request: dict[str, Any] = {"op": op, "args": [s.arg for s in streams], "req_id": req_id}
        if resume:
            request["resume"] = resume
        self.outbox.append(request)
        self._pending[req_id] = _Pending(op, [s.stream_id for s in streams], purpose)
        return req_id

    # -- what the user reads -------------------------------------------------------------

    def _lookup(self, arg: str) -> _Stream:
        state = self._streams.get(resolve(arg).stream_id)
        if state is None:
            raise KeyError(f"not subscribed to {arg}")
        return state

    def book(self, arg: str) -> Book | None:
        state = self._lookup(arg)
        if state.book is None:
            raise ValueError(f"{arg} is not an order book stream")
        return state.book.view()

    def state(self, arg: str) -> Any:
        state = self._lookup(arg)
        if state.check.event_stream:
            raise ValueError(f"{arg} is an event stream; it has no state, only events")
        if state.book is not None:
            view = state.book.view()
            if view is None:
                return None
            return {
                "bids": [list(level) for level in view.bids],
                "asks": [list(level) for level in view.asks],
                "updateId": view.update_id,
                "time": view.time,
            }
        return state.last

    def freshness(self, arg: str) -> str:
        return self._lookup(arg).freshness

    def args(self) -> list[str]:
        return [state.arg for state in self._streams.values()]

    # -- the connection ------------------------------------------------------------------

    def connection_made(self) -> list[Event]:
        """A new connection is up: subscribe everything wanted, resuming where each stream
        stands. A reconnect is announced with the ack of that subscribe (or at once when there
        is nothing to subscribe)."""
        self.connected = True
        self.connections += 1
        self._pending.clear()
        streams = list(self._streams.values())
        if not streams:
            if self.connections > 1:
                return [Event(RECONNECTED, None, {"op": "reconnected"})]
            return []
        for start in range(0, len(streams), MAX_ARGS_PER_REQUEST):
            chunk = streams[start : start + MAX_ARGS_PER_REQUEST]
            resume: dict[str, dict[str, Any]] = {}
            for state in chunk:
                state.resync_req = None
                position = state.check.position()
                if position is not None:
                    resume[state.arg] = {"epoch": position.epoch, "seq": position.seq}
            # One "reconnected" event per connection: only the first chunk's ack makes it.
            self._request("subscribe", chunk, "reconnect" if start == 0 else "rejoin", resume)
        return []

    def connection_lost(self, now_ms: int) -> list[Event]:
        """The connection is gone. Every stream is stale until the next one confirms it;
        requests in flight are answered with None (they are redone on the next connection)."""
        self.connected = False
        for req_id, pending in self._pending.items():
            if pending.purpose == "user":
                self.replies.append(Reply(req_id, None))
        self._pending.clear()
        self.outbox.clear()
        self.confirm_due = False
        events: list[Event] = []
        for state in self._streams.values():
            state.confirm_pending = False
            state.stale_by_client = True
            if state.freshness != STALE:
                state.freshness = STALE
                events.append(self._status(state, STALE, "disconnected from the server", now_ms))
        return events

    def confirm_live(self, now_ms: int) -> list[Event]:
        """After a reconnect's ack and whatever came with it: streams the server did not call
        stale are live again."""
        self.confirm_due = False
        events: list[Event] = []
        for state in self._streams.values():
            if state.confirm_pending:
                state.confirm_pending = False
                if state.stale_by_client:
                    events.extend(self._mark_live(state, now_ms))
        return events

    def _mark_live(self, state: _Stream, now_ms: int) -> list[Event]:
        state.stale_by_client = False
        if state.freshness == LIVE:
            return []
        state.freshness = LIVE
        return [self._status(state, LIVE, "reconnected", now_ms)]

    @staticmethod
    def _status(state: _Stream, value: str, reason: str, now_ms: int) -> Event:
        message = {
            "op": "status",
            "stream": state.stream_id,
            "state": value,
            "reason": reason,
            "since": now_ms,
        }
        return Event(STATUS, state.arg, message)

    # -- what the server says ------------------------------------------------------------

    def receive(self, message: dict[str, Any], now_ms: int) -> list[Event]:
        """One decoded server message in; the events it makes for the user out."""
        if "stream" in message and "op" not in message:
            return self._data(message, now_ms)
        op = message.get("op")
        if op == "status":
            return self._server_status(message)
        if op in ("subscribe", "unsubscribe"):
            return self._ack(message)
        if op == "error":
            return self._error(message)
        return []  # pong, or something newer than this client

    def _data(self, message: dict[str, Any], now_ms: int) -> list[Event]:
        state = self._streams.get(message["stream"])
        if state is None or state.resync_req is not None:
            return []  # unsubscribed, or a broken book waiting for its fresh snapshot
        events: list[Event] = []
        if state.stale_by_client and self.connected:
            events.extend(self._mark_live(state, now_ms))
            state.confirm_pending = False
        kind = message.get("type")
        book = state.book
        if book is not None and state.awaiting_snapshot and kind != "snapshot" and book.depth != 1:
            return events  # a delta cannot apply to a book we do not have
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = None
        epoch = message.get("epoch")  # on snapshots; an update that has one is checked too
        epoch = None if epoch is None else str(epoch)
        restarted = epoch is not None and state.check.epoch not in (None, epoch)
        verdict = state.check.check(str(kind), seq, epoch)
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
            return events
        if verdict is Verdict.GAP and not state.gap_told:
            reason = "the stream's numbering restarted" if restarted else "messages are missing"
            events.append(self._gap(state, reason, state.check.gap_from, seq))
        state.gap_told = False
        if book is not None:
            try:
                book.apply(str(kind), message.get("data"))
            except BookError as exc:
                events.append(self._gap(state, f"book resynchronised: {exc}", None, seq))
                self._resync(state)
                return events
            state.awaiting_snapshot = False
        elif not state.check.event_stream:
            state.last = message.get("data")
        events.append(Event(DATA, state.arg, message))
        return events

    def _gap(self, state: _Stream, reason: str, first: int | None, last: int | None) -> Event:
        message = {
            "op": "gap",
            "stream": state.stream_id,
            "reason": reason,
            "from": first,
            "to": last,
        }
        return Event(GAP, state.arg, message)

    def _resync(self, state: _Stream) -> None:
        """A broken book: ask the server for a fresh snapshot (unsubscribe, subscribe)."""
        self.resyncs += 1
        state.check.reset()
        state.awaiting_snapshot = True
        if not self.connected:
            return  # the next connection subscribes it afresh
        self._request("unsubscribe", [state], "resync")
        state.resync_req = self._request("subscribe", [state], "resync")

    def _server_status(self, message: dict[str, Any]) -> list[Event]:
        state = self._streams.get(message.get("stream"))  # type: ignore[arg-type]
        if state is None:
            return []
        value = message.get("state")
        if value in (LIVE, STALE):
            state.freshness = value
        state.stale_by_client = False
        state.confirm_pending = False
        return [Event(STATUS, state.arg, message)]

    def _ack(self, message: dict[str, Any]) -> list[Event]:
        req_id = message.get("req_id")
        pending = self._pending.pop(req_id, None) if isinstance(req_id, str) else None
        if pending is None:
            return []
        if pending.purpose == "user":
            self._drop_rejected(message)
            self.replies.append(Reply(req_id, message))  # type: ignore[arg-type]
            return []
        if pending.op != "subscribe":
            return []  # the unsubscribe half of a resync
        events: list[Event] = []
        if pending.purpose == "reconnect":
            events.append(Event(RECONNECTED, None, message))
        events.extend(self._refused(message))
        resumed = {_stream_id(arg) for arg in message.get("resumed") or () if isinstance(arg, str)}
        for stream_id in pending.stream_ids:
            state = self._streams.get(stream_id)
            if state is None:
                continue
            if pending.purpose == "resync":
                if state.resync_req == req_id:
                    state.resync_req = None
                continue
            state.confirm_pending = True
            self.confirm_due = True
            if stream_id in resumed:
                continue
            last = state.check.seq
            had = last is not None or (state.book is not None and state.book.ready)
            if state.check.event_stream and state.check.epoch is not None:
                # Keep the count: the new snapshot (the latest trades) may repeat some this
                # client has, which are then dropped; its jump (or new epoch) is the gap told
                # here. Without an epoch a restarted count could not be told from a repeat.
                state.gap_told = had
            else:
                state.check.reset()  # the snapshot is the whole state, whatever its seq
            if state.book is not None:
                state.book.clear()
                state.awaiting_snapshot = True
            if had:
                events.append(
                    self._gap(
                        state,
                        "the server could not resume the stream; a new snapshot follows",
                        last,
                        None,
                    )
                )
        return events

    def _drop_rejected(self, message: dict[str, Any]) -> list[str]:
        dropped = []
        for item in message.get("rejected") or ():
            arg = item.get("arg") if isinstance(item, dict) else None
            if not isinstance(arg, str):
                continue
            stream_id = _stream_id(arg)
            if stream_id is not None and self._streams.pop(stream_id, None) is not None:
                dropped.append(arg)
        return dropped

    def _refused(self, message: dict[str, Any]) -> list[Event]:
        """Streams a reconnect or resync could not get back: gone, and the user is told."""
        events = []
        reasons = {
            item.get("arg"): item.get("reason")
            for item in message.get("rejected") or ()
            if isinstance(item, dict)
        }
        for arg in self._drop_rejected(message):
            error = {
                "op": "error",
                "code": "REJECTED",
                "message": f"the server refused {arg}: {reasons.get(arg)}",
                "args": [arg],
            }
            events.append(Event(ERROR, arg, error))
        return events

    def _error(self, message: dict[str, Any]) -> list[Event]:
        req_id = message.get("req_id")
        pending = self._pending.pop(req_id, None) if isinstance(req_id, str) else None
        if pending is not None and pending.purpose == "user":
            if pending.op == "subscribe":
                for stream_id in pending.stream_ids:  # nothing of a refused request applies
                    self._streams.pop(stream_id, None)
            self.replies.append(Reply(req_id, message))  # type: ignore[arg-type]
            return []
        events: list[Event] = []
        ids = list(pending.stream_ids) if pending is not None and pending.op == "subscribe" else []
        for arg in message.get("args") or ():  # UPSTREAM_REJECTED names its args
            named = _stream_id(arg) if isinstance(arg, str) else None
            if named is not None:
                ids.append(named)
        for stream_id in ids:
            state = self._streams.pop(stream_id, None)
            if state is not None:
                events.append(Event(ERROR, state.arg, message))
        if not events:
            events.append(Event(ERROR, None, message))
        return events


def _stream_id(arg: str) -> str | None:
    try:
        return resolve(arg).stream_id
    except ValueError:
        return None

"""The hub: which local client holds which stream, and fan-out of shared frames to them.

Fan-out appends the Message's pre-built frame to each subscriber's pending output; every session
with something pending is flushed once per loop tick with one write (corking). Nothing here
serializes per client, awaits per send, or starts a task per message.

The hub also keeps, per stream, the last Message it delivered: a new subscriber's snapshot is
that Message marked `"type":"snapshot"` (every Message carries the stream's complete current
state: the merged ticker, the current candle, the latest trades), so a late joiner gets seq N and
the next live Message is N+1, with no gap and no duplicate on any node. Delta streams (books) are
the exception: an update holds only what changed, so their snapshot is the whole book, which the
bus asks of whoever keeps it (the owner's codec, or a follower's copy) at the same seq.

Clients that negotiated permessage-deflate are kept in sets of their own: a stream one of them
holds has each Message compressed once (the last-value cache builds and keeps the frame), and
that one compressed frame goes to all of them. Streams no such client holds are never compressed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from fastproxy.bus import Bus
from fastproxy.codec import Message, ws_text_frame
from fastproxy.freshness import FreshnessBoard, status_payload
from fastproxy.history import History, Position, decide
from fastproxy.protocol import UPSTREAM_REJECTED, error_reply
from fastproxy.streams import KINDS, Stream
from fastproxy.wire import SNAPSHOT, LastValues, as_snapshot

log = logging.getLogger("fastproxy.hub")


class Subscriber(Protocol):
    """What the hub needs of a client session."""

    out: list[bytes]  # frames due for this client, flushed once per tick
    streams: set[Stream]
    deflate: bool  # gets the shared compressed frames (permessage-deflate was agreed)

    def flush(self) -> None: ...


class Hub:
    def __init__(
        self,
        bus: Bus,
        linger: float = 5.0,
        loop: asyncio.AbstractEventLoop | None = None,
        history: History | None = None,
    ) -> None:
        self._bus = bus
        # Recent frames of every held stream (lingering ones too: a client that reconnects
        # within the linger resumes from here).
        self.history = History() if history is None else history
        self._linger = linger
        self._loop = loop
        self._subs: dict[str, set[Subscriber]] = {}  # stream_id -> local subscribers, plain
        self._zsubs: dict[str, set[Subscriber]] = {}  # stream_id -> those getting deflate frames
        self._streams: dict[str, Stream] = {}  # stream_id -> Stream, for streams held here
        self._values = LastValues()  # the last delivered Message of each stream held here
        self._release_timers: dict[str, asyncio.TimerHandle] = {}
        self._dirty: list[Subscriber] = []
        self._flush_scheduled = False
        self.freshness = FreshnessBoard()
        # Streams back to live: their next Message goes out as a snapshot.
        self._resnap: set[str] = set()
        self.messages_in = 0
        self.deliveries = 0
        self.releases = 0

    # -- subscriptions -------------------------------------------------------------------

    def resume(self, positions: dict[Stream, Position]) -> dict[Stream, list[bytes]]:
        """Of the streams a client asks to resume, those history can bridge: their frames after
        the client's seq. Call right before `subscribe` with the result, in the same tick, so
        that nothing is delivered in between."""
        now = time.monotonic()
        replays: dict[Stream, list[bytes]] = {}
        for stream, position in positions.items():
            sid = stream.stream_id
            span = self.history.span(sid) if sid in self._subs else None
            decision = decide(self.history, sid, position, span[0] if span else None, now)
            if decision.replay is not None:
                replays[stream] = decision.replay
        return replays

    def hold(self, streams: Iterable[Stream], for_seconds: float = 10.0) -> None:
        """Acquire streams with no subscriber yet, so that their Messages (and history) flow
        here while a resume is being prepared; released as usual if nobody subscribes."""
        loop = self._loop or asyncio.get_running_loop()
        for stream in streams:
            sid = stream.stream_id
            if sid in self._subs:
                continue
            self._subs[sid] = set()
            self._streams[sid] = stream
            self._bus.acquire(stream)
            self._release_timers[sid] = loop.call_later(
                max(self._linger, for_seconds), self._release, stream
            )

    def subscribe(
        self,
        session: Subscriber,
        streams: Iterable[Stream],
        replays: dict[Stream, list[bytes]] | None = None,
    ) -> None:
        """Add streams to a session; each gets the current snapshot queued at once, or, for a
        stream in `replays` (see `resume`), the Messages it missed."""
        for stream in streams:
            sid = stream.stream_id
            if sid not in self._subs:
                self._subs[sid] = set()
                self._streams[sid] = stream
                self._bus.acquire(stream)
            else:
                timer = self._release_timers.pop(sid, None)
                if timer is not None:
                    timer.cancel()
            (self._zsubs if session.deflate else self._subs).setdefault(sid, set()).add(session)
            session.streams.add(stream)
            stale = self.freshness.stale(sid)
            if stale is not None:  # right after the ack, before any data
                self.send_payload(session, status_payload(sid, *stale))
            replay = replays.get(stream) if replays else None
            if replay is not None:
                for frame in replay:
                    self.send(session, frame)
                continue
            snapshot = self.snapshot(sid)
            if snapshot is not None:
                frame = self._values.frame_of(snapshot) if session.deflate else snapshot.frame
                self.send(session, frame)

    def unsubscribe(self, session: Subscriber, streams: Iterable[Stream]) -> None:
        for stream in streams:
            session.streams.discard(stream)
            sid = stream.stream_id
            subs = (self._zsubs if session.deflate else self._subs).get(sid)
            if subs is None:
                continue
            subs.discard(session)
            if not self._held(sid):
                self._schedule_release(stream)

    def drop(self, session: Subscriber) -> None:
        """The session is gone: forget everything it held."""
        self.unsubscribe(session, list(session.streams))
        session.out.clear()

    def _held(self, sid: str) -> bool:
        return bool(self._subs.get(sid)) or bool(self._zsubs.get(sid))

    def _schedule_release(self, stream: Stream) -> None:
        sid = stream.stream_id
        if sid in self._release_timers:
            return
        if self._linger <= 0:
            self._release(stream)
            return
        loop = self._loop or asyncio.get_running_loop()
        self._release_timers[sid] = loop.call_later(self._linger, self._release, stream)

    def _release(self, stream: Stream) -> None:
        sid = stream.stream_id
        self._release_timers.pop(sid, None)
        if self._held(sid):
            return  # someone came back
        self._subs.pop(sid, None)
        self._zsubs.pop(sid, None)
        self._streams.pop(sid, None)
        self._values.forget(sid)
        self.freshness.forget(sid)
        self._resnap.discard(sid)
        self.history.forget(sid)
        self.releases += 1
        self._bus.release(stream)

    def close(self) -> None:
        for timer in self._release_timers.values():
            timer.cancel()
        self._release_timers.clear()

    # -- delivery ------------------------------------------------------------------------

    def snapshot(self, stream_id: str) -> Message | None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.is_delta:
            return self._bus.snapshot(stream)  # the whole book, kept by the codec or a copy
        return self._values.snapshot(stream_id)

    def deliver(self, message: Message) -> None:
        """Fan a Message out to the local subscribers of its stream (the bus calls this)."""
        sid = message.stream_id
        subs = self._subs.get(sid)
        if subs is None:
            return  # not held here (any more)
        self.messages_in += 1
        values = self._values
        values.put(message)
        frame = message.frame
        if message.type == SNAPSHOT:  # the codec's own (after an upstream reset): with its epoch
            frame = self.snapshot(sid).frame  # type: ignore[union-attr]
        self.history.append(sid, message.epoch, message.seq, frame, time.monotonic())
        zsubs = self._zsubs.get(sid)
        if not subs and not zsubs:
            return
        resnap = bool(self._resnap) and sid in self._resnap
        if resnap:  # back to live: a fresh snapshot first
            self._resnap.discard(sid)
            frame = as_snapshot(message).frame
        if subs:
            self._fan_out(frame, subs)
        if zsubs:
            if resnap:
                zframe = values.deflater.frame(as_snapshot(message).payload)
            elif message.type == SNAPSHOT:
                zframe = values.frame_of(self.snapshot(sid))  # type: ignore[arg-type]
            else:
                zframe = values.deflated(sid)  # type: ignore[assignment]
            self._fan_out(zframe, zsubs)  # type: ignore[arg-type]
        if not self._flush_scheduled:
            self._schedule_flush()

    def _fan_out(self, frame: bytes, subs: set[Subscriber]) -> None:
        dirty = self._dirty
        for session in subs:
            out = session.out
            if not out:
                dirty.append(session)
            out.append(frame)
        self.deliveries += len(subs)

    def send(self, session: Subscriber, frame: bytes) -> None:
        """Queue one frame for one session behind what is already due for it."""
        out = session.out
        if not out:
            self._dirty.append(session)
        out.append(frame)
        if not self._flush_scheduled:
            self._schedule_flush()

    def send_payload(self, session: Subscriber, payload: bytes) -> None:
        self.send(session, ws_text_frame(payload))

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            try:
                session.flush()
            except Exception:  # one broken session must not stop the others' writes
                log.exception("flush failed")

    def reset(self, stream: Stream) -> None:
        """The stream's upstream state was lost: a joiner must wait for the fresh snapshot."""
        self._values.forget(stream.stream_id)

    def status(self, stream: Stream, reason: str | None, since: int) -> None:
        """The stream went stale for `reason`, or live again (None): tell every local holder
        (the bus calls this). Back to live, the next Message goes out as a snapshot."""
        sid = stream.stream_id
        subs = self._subs.get(sid)
        if subs is None or not self.freshness.update(sid, reason, since):
            return
        if reason is None:
            self._resnap.add(sid)
        else:
            self._resnap.discard(sid)
        log.info(
            "stream stale" if reason else "stream live again",
            extra={"stream": sid, "reason": reason, "since": since, "clients": len(subs)},
        )
        holders = subs | self._zsubs.get(sid, set())
        if holders:
            frame = ws_text_frame(status_payload(sid, reason, since))
            for session in holders:
                self.send(session, frame)

    def reject(self, stream: Stream, reason: str) -> None:
        """The exchange refused the stream: tell every local holder and drop it."""
        sid = stream.stream_id
        subs = self._subs.pop(sid, None) or set()
        subs |= self._zsubs.pop(sid, None) or set()
        self._streams.pop(sid, None)
        self._values.forget(sid)
        self.freshness.forget(sid)
        self._resnap.discard(sid)
        self.history.forget(sid)
        timer = self._release_timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        if subs:
            frame = ws_text_frame(
                error_reply(
                    UPSTREAM_REJECTED,
                    f"The exchange refused {stream.arg}; the subscription was removed",
                    args=[stream.arg],
                )
            )
            for session in subs:
                session.streams.discard(stream)
                self.send(session, frame)
        log.info(
            "stream rejected upstream",
            extra={"stream": stream.stream_id, "reason": reason, "clients": len(subs)},
        )

    # -- introspection -------------------------------------------------------------------

    @property
    def bus(self) -> Bus:
        return self._bus

    def last_kept(self, stream: Stream) -> tuple[str, int] | None:
        """(epoch, seq) of the newest Message this node's history has for the stream."""
        span = self.history.span(stream.stream_id)
        return None if span is None else (span[0], span[2])

    def holds(self, stream: Stream) -> bool:
        return stream.stream_id in self._subs

    def stats(self) -> dict[str, Any]:
        by_kind = dict.fromkeys(KINDS, 0)
        streams_by_kind = dict.fromkeys(KINDS, 0)
        deflated = 0
        for sid, subs in self._subs.items():
            kind = self._streams[sid].kind
            zsubs = len(self._zsubs.get(sid, ()))
            by_kind[kind] += len(subs) + zsubs
            streams_by_kind[kind] += 1
            deflated += zsubs
        return {
            "streams": len(self._subs),
            "streams_by_kind": streams_by_kind,
            "subscriptions": sum(by_kind.values()),
            "subscriptions_by_kind": by_kind,
            "lingering": len(self._release_timers),
            "stale_streams": len(self.freshness),
            "history": self.history.stats(),
            "messages_in": self.messages_in,
            "deliveries": self.deliveries,
            "releases": self.releases,
            "subscriptions_deflate": deflated,
            # compressed frames built: one per message of a stream a deflate client holds
            "deflated_frames": self._values.deflater.frames,
        }

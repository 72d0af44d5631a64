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

A client that cannot keep up (its transport says so: over the soft mark, or anything left
unwritten while it is behind) leaves the shared path for a Backlog of its own: each state stream
holds one place there, filled when the client drains with the stream's newest message (a delta
stream's fresh snapshot, when updates were skipped); events and replies keep their order and are
never dropped. Only those clients cost anything per message; the others keep the shared frames.

Clients that negotiated permessage-deflate are kept in sets of their own: a stream one of them
holds has each Message compressed once (the last-value cache builds and keeps the frame), and
that one compressed frame goes to all of them. Streams no such client holds are never compressed.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fastproxy.bus import Bus
from fastproxy.codec import Message, ws_text_frame
from fastproxy.freshness import FreshnessBoard, status_payload
from fastproxy.history import History, Position, decide
from fastproxy.latency import Histogram
from fastproxy.protocol import UPSTREAM_REJECTED, error_reply
from fastproxy.streams import DELTA_KINDS, KINDS, STATE_KINDS, Stream
from fastproxy.wire import SNAPSHOT, LastValues

log = logging.getLogger("fastproxy.hub")
_clock = time.perf_counter
_bisect = bisect.bisect_left


# A client that fell behind goes back to the shared path once its transport has held nothing
# unwritten for this long.
CATCH_UP_AFTER = 1.0


class Backlog:
    """What waits for one client that cannot keep up. Sans-I/O.

    Places in arrival order: a state stream holds one (its stream id, filled at drain time with
    the stream's newest state); every other frame (events, replies, snapshots) a place of its own.
    """

    __slots__ = ("_next", "event_bytes", "first_event_at", "places", "restarted", "skipped")

    def __init__(self) -> None:
        self.places: dict[str | int, bytes | None] = {}
        self.skipped: set[str] = set()  # state streams whose older messages were replaced
        self.restarted: set[str] = set()  # state streams that sent a snapshot while waiting
        self.first_event_at: float | None = None  # when the oldest waiting event arrived
        self.event_bytes = 0
        self._next = 0

    def __len__(self) -> int:
        return len(self.places)

    def add_state(self, stream_id: str, resync: bool = False) -> bool:
        """A new message of a state stream; True when it replaced one still waiting. `resync`:
        the message is a snapshot (the stream restarted), so the client must get one."""
        if resync:
            self.restarted.add(stream_id)
        if stream_id in self.places:
            self.skipped.add(stream_id)
            return True
        self.places[stream_id] = None
        return False

    def add_frame(self, frame: bytes, event_at: float | None = None) -> None:
        """A frame that must be delivered, in order (an event when `event_at` is given)."""
        self._next += 1
        self.places[self._next] = frame
        if event_at is not None:
            self.event_bytes += len(frame)
            if self.first_event_at is None:
                self.first_event_at = event_at

    def forget(self, stream_id: str) -> None:
        self.places.pop(stream_id, None)
        self.skipped.discard(stream_id)
        self.restarted.discard(stream_id)

    def take(self, current: Callable[[str, bool, bool], bytes | None]) -> list[bytes]:
        """Everything waiting, oldest first; `current(stream_id, skipped, restarted)` fills a
        state place."""
        frames: list[bytes] = []
        skipped, restarted = self.skipped, self.restarted
        for key, frame in self.places.items():
            if frame is None:
                frame = current(key, key in skipped, key in restarted)  # type: ignore[arg-type]
                if frame is None:
                    continue  # the stream was reset or left meanwhile
            frames.append(frame)
        self.places.clear()
        skipped.clear()
        restarted.clear()
        self.first_event_at = None
        self.event_bytes = 0
        return frames


class Subscriber(Protocol):
    """What the hub needs of a client session."""

    out: list[bytes]  # frames due for this client, flushed once per tick
    streams: set[Stream]
    deflate: bool  # gets the shared compressed frames (permessage-deflate was agreed)
    backlog: Backlog | None  # set while the client is behind (the hub's, not the session's)
    paused: bool  # the transport holds unwritten bytes: wait for it to drain
    resumed_at: float  # when the transport last finished writing what it held

    def flush(self) -> None: ...

    def caught_up(self) -> None:
        """The client is back on the shared path."""


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
        self._subs: dict[str, set[Subscriber]] = {}  # stream_id -> subscribers keeping up, plain
        self._behind: dict[str, set[Subscriber]] = {}  # stream_id -> subscribers with a Backlog
        self._behind_sessions: set[Subscriber] = set()
        self._drain_due: list[Subscriber] = []
        self._zsubs: dict[str, set[Subscriber]] = {}  # the same, getting the deflate frames
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
        # residence: a Message's arrival here -> the flush that wrote it to every local
        # subscriber keeping up and handed it to the backlogs due then, by kind
        self.residence: dict[str, Histogram] = {kind: Histogram() for kind in KINDS}
        self._residence_of: dict[str, Histogram] = {}  # stream_id -> its kind's histogram
        self._arrived_in: list[Histogram] = []  # per Message fanned out since the last flush
        self._arrived_at: list[float] = []
        self.flushes = 0  # session flushes: each is one socket write unless the session closed
        self.conflated = 0  # state messages replaced by a newer one for a client behind

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
            self._residence_of[sid] = self._residence_for(stream.kind)
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
                self._residence_of[sid] = self._residence_for(stream.kind)
                self._bus.acquire(stream)
            else:
                timer = self._release_timers.pop(sid, None)
                if timer is not None:
                    timer.cancel()
            if session.backlog is None:
                self._group(session).setdefault(sid, set()).add(session)
            else:
                self._behind.setdefault(sid, set()).add(session)
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
            if sid not in self._subs:
                continue  # not held here
            subs = self._group(session).get(sid)
            if subs is not None:
                subs.discard(session)
            if session.backlog is not None:
                session.backlog.forget(stream.stream_id)
                self._leave_behind(stream.stream_id, session)
            if not self._held(stream.stream_id):
                self._schedule_release(stream)

    def drop(self, session: Subscriber) -> None:
        """The session is gone: forget everything it held."""
        self.unsubscribe(session, list(session.streams))
        session.out.clear()
        if session.backlog is not None:
            self._behind_sessions.discard(session)
            session.backlog = None

    def _residence_for(self, kind: str) -> Histogram:
        histogram = self.residence.get(kind)
        if histogram is None:
            histogram = self.residence[kind] = Histogram()
        return histogram

    def _held(self, sid: str) -> bool:
        return bool(self._subs.get(sid) or self._zsubs.get(sid) or self._behind.get(sid))

    def _group(self, session: Subscriber) -> dict[str, set[Subscriber]]:
        """Where a session keeping up is held: with the plain or with the deflate clients."""
        return self._zsubs if session.deflate else self._subs

    def _leave_behind(self, sid: str, session: Subscriber) -> None:
        behind = self._behind.get(sid)
        if behind is not None:
            behind.discard(session)
            if not behind:
                del self._behind[sid]

    # -- clients that fell behind -----------------------------------------------------------

    def fall_behind(self, session: Subscriber) -> None:
        """The client cannot keep up: from now on its state streams are conflated."""
        if session.backlog is not None:
            return
        backlog = session.backlog = Backlog()
        self._behind_sessions.add(session)
        group = self._group(session)
        for stream in session.streams:
            sid = stream.stream_id
            subs = group.get(sid)
            if subs is not None:
                subs.discard(session)
            self._behind.setdefault(sid, set()).add(session)
        for frame in session.out:  # due this tick, not written yet: keep them first, in order
            backlog.add_frame(frame)
        session.out.clear()

    def drained(self, session: Subscriber) -> None:
        """The transport of a client behind has written everything it held."""
        backlog = session.backlog
        if backlog is None:
            return
        if backlog:
            self._drain_due.append(session)
            if not self._flush_scheduled:
                self._schedule_flush()
        elif time.monotonic() - session.resumed_at >= CATCH_UP_AFTER:
            self._catch_up(session)

    def _catch_up(self, session: Subscriber) -> None:
        self._behind_sessions.discard(session)
        session.backlog = None
        group = self._group(session)
        for stream in session.streams:
            sid = stream.stream_id
            self._leave_behind(sid, session)
            if sid in self._subs:
                group.setdefault(sid, set()).add(session)
        session.caught_up()

    def _drain(self, session: Subscriber) -> None:
        backlog = session.backlog
        if backlog is None or session.paused:
            return  # caught up or gone meanwhile; or resume_writing will call drained()
        if backlog:
            current = self._current_deflated if session.deflate else self._current_frame
            session.out.extend(backlog.take(current))
            session.flush()
            self.flushes += 1
        if (
            session.backlog is backlog
            and not session.paused
            and time.monotonic() - session.resumed_at >= CATCH_UP_AFTER
        ):
            self._catch_up(session)

    def _current_frame(self, sid: str, skipped: bool, restarted: bool) -> bytes | None:
        """What a client behind gets for a state stream: its newest message, complete state;
        a fresh snapshot instead when the stream's updates are deltas and some were skipped, or
        when a snapshot (a restart of the stream) was among the messages merged."""
        stream = self._streams.get(sid)
        if stream is None:
            return None
        last = self._values.last(sid)
        if last is None:
            return None
        if (skipped and stream.kind in DELTA_KINDS) or (restarted and last.type != SNAPSHOT):
            message = self.snapshot(sid)
        else:
            message = last
        return None if message is None else message.frame

    def _current_deflated(self, sid: str, skipped: bool, restarted: bool) -> bytes | None:
        """The same for a deflate client behind: the shared compressed frame of the newest
        message, or a compressed snapshot."""
        frame = self._current_frame(sid, skipped, restarted)
        last = self._values.last(sid)
        if frame is None or last is None:
            return frame
        if frame is last.frame:
            return self._values.deflated(sid)
        snapshot = self.snapshot(sid)
        return frame if snapshot is None else self._values.frame_of(snapshot)

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
        self._behind.pop(sid, None)
        self._streams.pop(sid, None)
        self._residence_of.pop(sid, None)
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
        # what goes out: this update, or a snapshot (the codec's own after an upstream reset,
        # with its epoch; or, back to live, a fresh one: for a book the whole book)
        sent = message
        if message.type == SNAPSHOT:
            sent = self.snapshot(sid) or message
        self.history.append(sid, message.epoch, message.seq, sent.frame, time.monotonic())
        zsubs = self._zsubs.get(sid)
        behind = self._behind.get(sid)
        if not subs and not zsubs and not behind:
            return
        self._arrived_in.append(self._residence_of[sid])
        self._arrived_at.append(_clock())
        if self._resnap and sid in self._resnap:
            self._resnap.discard(sid)
            sent = self.snapshot(sid) or sent
        frame = sent.frame
        if subs:
            self._fan_out(frame, subs)
        if zsubs:
            self._fan_out(self._deflated(message, sent), zsubs)
        if behind:
            self._deliver_behind(message, sent, behind)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _deflated(self, message: Message, sent: Message) -> bytes:
        """The compressed frame of what goes out for `message`, built once and shared."""
        if sent is message:
            return self._values.deflated(message.stream_id)  # type: ignore[return-value]
        return self._values.frame_of(sent)

    def _fan_out(self, frame: bytes, subs: set[Subscriber]) -> None:
        dirty = self._dirty
        for session in subs:
            out = session.out
            if not out:
                dirty.append(session)
            out.append(frame)
        self.deliveries += len(subs)

    def _deliver_behind(self, message: Message, sent: Message, behind: set[Subscriber]) -> None:
        sid, frame = message.stream_id, sent.frame
        zframe: bytes | None = None
        due = self._drain_due
        if self._streams[sid].kind in STATE_KINDS:
            resync = message.type == SNAPSHOT
            for session in behind:
                backlog = session.backlog
                if backlog.add_state(sid, resync):  # type: ignore[union-attr]
                    self.conflated += 1
                elif not session.paused and len(backlog) == 1:  # type: ignore[arg-type]
                    due.append(session)
        else:
            now = time.monotonic()
            for session in behind:
                backlog = session.backlog
                if session.deflate:
                    if zframe is None:
                        zframe = self._deflated(message, sent)
                    backlog.add_frame(zframe, now)  # type: ignore[union-attr]
                else:
                    backlog.add_frame(frame, now)  # type: ignore[union-attr]
                if not session.paused and len(backlog) == 1:  # type: ignore[arg-type]
                    due.append(session)
        self.deliveries += len(behind)

    def send(self, session: Subscriber, frame: bytes) -> None:
        """Queue one frame for one session behind what is already due for it."""
        backlog = session.backlog
        if backlog is not None:
            backlog.add_frame(frame)
            if not session.paused and len(backlog) == 1:
                self._drain_due.append(session)
            if not self._flush_scheduled:
                self._schedule_flush()
            return
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
        self.flushes += len(dirty)
        if self._drain_due:
            due, self._drain_due = self._drain_due, []
            for session in due:
                try:
                    self._drain(session)
                except Exception:
                    log.exception("flush failed")
        arrived_at = self._arrived_at
        if arrived_at:  # after the drains: a client behind that was due got its frames too
            written = _clock()
            for histogram, arrived in zip(self._arrived_in, arrived_at, strict=False):
                seconds = written - arrived  # Histogram.observe, inlined: this runs per Message
                histogram.counts[_bisect(histogram.bounds, seconds)] += 1
                histogram.total += seconds
            arrived_at.clear()
            self._arrived_in.clear()

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
        holders = subs | self._zsubs.get(sid, set()) | self._behind.get(sid, set())
        if holders:
            frame = ws_text_frame(status_payload(sid, reason, since))
            for session in holders:
                self.send(session, frame)

    def reject(self, stream: Stream, reason: str) -> None:
        """The exchange refused the stream: tell every local holder and drop it."""
        sid = stream.stream_id
        subs = self._subs.pop(sid, None) or set()
        subs |= self._zsubs.pop(sid, None) or set()
        subs |= self._behind.pop(sid, None) or set()
        self._streams.pop(sid, None)
        self._residence_of.pop(sid, None)
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
                if session.backlog is not None:
                    session.backlog.forget(sid)
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

    @property
    def clients_behind(self) -> int:
        return len(self._behind_sessions)

    def stats(self) -> dict[str, Any]:
        by_kind = dict.fromkeys(KINDS, 0)
        streams_by_kind = dict.fromkeys(KINDS, 0)
        deflated = 0
        for sid, subs in self._subs.items():
            kind = self._streams[sid].kind
            zsubs = len(self._zsubs.get(sid, ()))
            by_kind[kind] += len(subs) + zsubs + len(self._behind.get(sid, ()))
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
            "clients_conflating": len(self._behind_sessions),
            "conflated_messages": self.conflated,
        }

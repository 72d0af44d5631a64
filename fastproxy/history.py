"""History of recent Messages per stream, and the resume decision. Sans-I/O.

A client that reconnects names, per stream, the epoch and the last seq it got; if this node
still holds every Message after that seq in the same epoch, it gets them (replayed, then live)
instead of a snapshot, and so loses nothing across the reconnect.

`History` keeps one ring per stream of the frames delivered, bounded three ways, all
configurable: at most `max_messages` per stream, none older than `max_age` seconds, and all
rings together within `max_bytes` (the oldest Messages of the whole node go first). A ring holds
only consecutive seqs of one epoch: a jump or a new epoch starts it again, so a replay can never
span a hole.

Memory: each kept Message costs its frame's bytes plus `ENTRY_OVERHEAD` (the bytes object's
header, its ring slot, its arrival time), and each
stream with history `RING_OVERHEAD`; all of it is counted against `max_bytes` (the tests measure
what Python really allocates against this accounting).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

# Per kept frame, beyond its length: the bytes object's header (33), its ring slot (8), its
# arrival time (a float, 24, and its slot, 8), and the deques' block slack (measured).
ENTRY_OVERHEAD = 96
# Per stream with history: the ring, its two deques (a first block each) and its dict entry.
RING_OVERHEAD = 2304

# Defaults, sized for ~1,000 busy streams (the README says what they cost): 128 MiB at most,
# which at 10 Messages/s of ~500 bytes on each of 1,000 streams still holds ~20 s.
DEFAULT_MAX_MESSAGES = 1000
DEFAULT_MAX_AGE = 30.0
DEFAULT_MAX_BYTES = 128 * 1024 * 1024

_TRIM_EVERY = 0.25  # seconds between age trims on append
_TRIM_TO = 0.9  # over the byte cap, the oldest go until this share of it is left


class _Ring:
    __slots__ = ("epoch", "first_seq", "frames", "sid", "times")

    def __init__(self, sid: str, epoch: str) -> None:
        self.sid = sid
        self.epoch = epoch
        self.first_seq = 0  # seq of frames[0]
        self.frames: deque[bytes] = deque()
        self.times: deque[float] = deque()

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.frames) - 1


class History:
    """Bounded rings of recent frames, one per stream; see the module docstring."""

    def __init__(
        self,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_age: float = DEFAULT_MAX_AGE,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_messages < 0 or max_age < 0 or max_bytes < 0:
            raise ValueError("history bounds must be >= 0")
        self.max_messages = max_messages
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.enabled = max_messages > 0 and max_age > 0 and max_bytes > 0
        self._rings: dict[str, _Ring] = {}
        self.bytes = 0
        self.evicted = 0
        self._next_trim = 0.0

    # -- writing -------------------------------------------------------------------------

    def append(self, stream_id: str, epoch: str, seq: int, frame: bytes, now: float) -> None:
        """Keep the frame of a delivered Message (`now`: monotonic seconds). Once per Message
        on the hot path: the usual case is two appends and a few compares."""
        if not self.enabled:
            return
        ring = self._rings.get(stream_id)
        if ring is None:
            ring = self._rings[stream_id] = _Ring(stream_id, epoch)
            self.bytes += RING_OVERHEAD
        frames = ring.frames
        n = len(frames)
        if n and (seq != ring.first_seq + n or ring.epoch != epoch):
            if ring.epoch == epoch and seq < ring.first_seq + n:
                return  # already kept (a duplicate delivery)
            self._clear(ring)
            n = 0
        if not n:
            ring.first_seq = seq
            ring.epoch = epoch
        frames.append(frame)
        ring.times.append(now)
        self.bytes += len(frame) + ENTRY_OVERHEAD
        if n >= self.max_messages:
            self._pop_oldest(ring)
        if self.bytes > self.max_bytes or now >= self._next_trim:
            self.trim(now)

    def trim(self, now: float) -> None:
        """Drop what is past its age (checked a few times a second on append, and by `after`
        at every read) and, over the byte cap, the node's oldest Messages, down to 90% of it."""
        self._next_trim = now + _TRIM_EVERY
        horizon = now - self.max_age
        for ring in list(self._rings.values()):
            times = ring.times
            while times and times[0] < horizon:
                self._pop_oldest(ring)
                self.evicted += 1
            if not times:
                self._drop_ring(ring)
        if self.bytes <= self.max_bytes:
            return
        target = self.max_bytes * _TRIM_TO
        heap = [(r.times[0], i, r) for i, r in enumerate(self._rings.values())]
        heapq.heapify(heap)
        while heap and self.bytes > target:
            _, i, ring = heapq.heappop(heap)
            self._pop_oldest(ring)
            self.evicted += 1
            if ring.times:
                heapq.heappush(heap, (ring.times[0], i, ring))
            else:
                self._drop_ring(ring)

    def _pop_oldest(self, ring: _Ring) -> None:
        frame = ring.frames.popleft()
        ring.times.popleft()
        ring.first_seq += 1
        self.bytes -= len(frame) + ENTRY_OVERHEAD

    def _clear(self, ring: _Ring) -> None:
        while ring.frames:
            self._pop_oldest(ring)

    def forget(self, stream_id: str) -> None:
        """The stream is released here: its history can never continue."""
        ring = self._rings.get(stream_id)
        if ring is not None:
            self._clear(ring)
            self._drop_ring(ring)

    def _drop_ring(self, ring: _Ring) -> None:
        if self._rings.get(ring.sid) is ring:
            del self._rings[ring.sid]
            self.bytes -= RING_OVERHEAD

    @property
    def messages(self) -> int:
        return sum(len(r.frames) for r in self._rings.values())

    # -- reading -------------------------------------------------------------------------

    def after(self, stream_id: str, epoch: str, seq: int, now: float) -> list[bytes] | None:
        """The frames of every Message after `seq` in `epoch`, oldest first (empty when the
        client is up to date), or None when history cannot bridge the gap: another epoch, a
        seq this stream never reached, or Messages after it already dropped."""
        ring = self._rings.get(stream_id)
        if ring is None or ring.epoch != epoch or not ring.frames:
            return None
        if seq > ring.last_seq or seq + 1 < ring.first_seq:
            return None
        start = seq + 1 - ring.first_seq
        if start < len(ring.times) and ring.times[start] < now - self.max_age:
            return None  # past its age: as good as dropped
        frames = ring.frames
        return [frames[i] for i in range(start, len(frames))]

    def span(self, stream_id: str) -> tuple[str, int, int] | None:
        """(epoch, first seq, last seq) kept for the stream, or None."""
        ring = self._rings.get(stream_id)
        if ring is None or not ring.frames:
            return None
        return ring.epoch, ring.first_seq, ring.last_seq

    def stats(self) -> dict[str, int | float]:
        return {
            "streams": len(self._rings),
            "messages": self.messages,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "max_messages": self.max_messages,
            "max_age": self.max_age,
            "evicted": self.evicted,
        }


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client's copy of a stream stands: the epoch and the last seq it got."""

    epoch: str
    seq: int


@dataclass(slots=True)
class ResumeDecision:
    """For one stream: the frames to replay after the ack, or None for the snapshot path."""

    replay: list[bytes] | None

    @property
    def resumed(self) -> bool:
        return self.replay is not None


def decide(
    history: History,
    stream_id: str,
    position: Position | None,
    current_epoch: str | None,
    now: float,
) -> ResumeDecision:
    """Resume when the client's epoch is the stream's current one and every Message after its
    seq is still kept; anything else (no position, unknown or old epoch, history too short, a
    seq from the future) takes the normal path, a snapshot with the current epoch."""
    if position is None or current_epoch is None or position.epoch != current_epoch:
        return ResumeDecision(None)
    return ResumeDecision(history.after(stream_id, position.epoch, position.seq, now))


def splice(
    history: History,
    stream_id: str,
    position: Position,
    shared: list[tuple[int, bytes]] | None,
    now: float,
) -> list[bytes] | None:
    """A replay from shared history (the cluster's, fetched while live Messages kept arriving
    here) joined to this node's own: shared frames for seq+1..M, then this node's frames after
    M, so the client gets every Message once, and live ones follow. None when the two do not
    meet in one epoch (or the shared history cannot bridge): the client gets a snapshot."""
    if shared is None:
        return None
    if shared and shared[0][0] != position.seq + 1:
        return None
    last = shared[-1][0] if shared else position.seq
    local = history.after(stream_id, position.epoch, last, now)
    if local is None:
        return None
    return [frame for _, frame in shared] + local

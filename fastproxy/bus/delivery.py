"""The delivery rules every bus engine applies to what reaches the hub, with no I/O.

Per stream this node has a line: the last seq it delivered. A Message at or below it is a
duplicate and is dropped; one that skips ahead is delivered as a snapshot (every Message
carries the stream's complete current state, so a snapshot repairs any gap); the first
delivery after the stream is held, or after `rebase`, is a snapshot whatever its seq.
Delta streams (books) are the exception to "every Message carries the state": an update
cannot stand for the whole book, so there the snapshot is the engine's `state` of the stream
(the owner's codec, a follower's copy) at that same seq, and an update with no such state is
not delivered at all.
A line outlives `unhold` (an owner may go on publishing for other nodes, and numbering
continues), and ends with `forget`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastproxy.wire import SNAPSHOT, as_snapshot

if TYPE_CHECKING:
    from fastproxy.bus import Handler
    from fastproxy.streams import Stream
    from fastproxy.wire import Message


class _Line:
    __slots__ = ("delta", "held", "last", "resync", "ts")

    def __init__(self) -> None:
        self.held = False  # local clients hold the stream: deliveries go to the handler
        self.last: int | None = None  # last seq delivered (or accepted, when not held)
        self.ts = 0  # exchange ms of the last Message delivered (kept across rebase)
        self.resync = False  # the next delivery is a snapshot whatever its seq
        self.delta: Stream | None = None  # a delta stream's Stream (its updates are partial)


class Delivery:
    """Dedupe by seq, a jump delivered as a snapshot, then on to the handler (the hub)."""

    __slots__ = ("_handler", "_lines", "_state", "duplicates", "gaps")

    def __init__(
        self,
        handler: Handler | None = None,
        state: Callable[[Stream], Message | None] | None = None,
    ) -> None:
        self._handler = handler
        self._state = state  # a delta stream's whole state at its last seq (see above)
        self._lines: dict[str, _Line] = {}
        self.duplicates = 0
        self.gaps = 0

    def attach(self, handler: Handler) -> None:
        self._handler = handler

    def hold(self, stream_id: str, stream: Stream | None = None) -> None:
        """Local clients hold the stream; the hub has no state for it: resync. Give the
        `stream` of a delta stream (a book), whose snapshots come from `state`."""
        line = self._lines.get(stream_id)
        if line is None:
            line = self._lines[stream_id] = _Line()
        line.held = True
        line.resync = True
        if stream is not None and stream.is_delta:
            line.delta = stream

    def unhold(self, stream_id: str) -> None:
        """No local client holds it; the line stays so numbering is still checked."""
        line = self._lines.get(stream_id)
        if line is not None:
            line.held = False

    def forget(self, stream_id: str) -> None:
        self._lines.pop(stream_id, None)

    def rebase(self, stream_id: str) -> None:
        """A new seq line starts here (a new owner): the next delivery is a snapshot."""
        line = self._lines.get(stream_id)
        if line is not None:
            line.last = None
            line.resync = True

    def resync(self, stream_id: str) -> None:
        """The next delivery is a snapshot whatever its seq (a stored state being served)."""
        line = self._lines.get(stream_id)
        if line is not None:
            line.resync = True

    def last_seq(self, stream_id: str) -> int | None:
        line = self._lines.get(stream_id)
        return None if line is None else line.last

    def last_ts(self, stream_id: str) -> int:
        """Exchange ms of the newest Message delivered for the stream, in any seq line (0:
        none): state older than this is not news to the hub."""
        line = self._lines.get(stream_id)
        return 0 if line is None else line.ts

    def holds(self, stream_id: str) -> bool:
        line = self._lines.get(stream_id)
        return line is not None and line.held

    def deliver(self, message: Message) -> bool:
        """Apply the rules to one Message; True when it was new (and went on if held)."""
        line = self._lines.get(message.stream_id)
        if line is None:
            return False  # not a stream of this node (any more)
        last = line.last
        seq = message.seq
        if last is not None and seq <= last:
            self.duplicates += 1
            return False
        if line.resync or (last is not None and seq != last + 1):
            if line.delta is not None and message.type != SNAPSHOT:
                state = None if self._state is None else self._state(line.delta)
                if state is None or state.seq != seq:
                    return False  # a book's update cannot stand for the book
                message = state
            else:
                message = as_snapshot(message)
            if not line.resync:
                self.gaps += 1
            line.resync = False
        line.last = seq
        line.ts = message.ts
        if line.held and self._handler is not None:
            self._handler.deliver(message)
        return True

    def reset(self, stream: Stream) -> None:
        if self.holds(stream.stream_id) and self._handler is not None:
            self._handler.reset(stream)

    def status(self, stream: Stream, reason: str | None, since: int) -> None:
        """Freshness of a held stream goes on to the handler (the hub)."""
        if self.holds(stream.stream_id) and self._handler is not None:
            self._handler.status(stream, reason, since)

    def reject(self, stream: Stream, reason: str) -> None:
        """The stream is refused: its line ends and the handler is told."""
        self.forget(stream.stream_id)
        if self._handler is not None:
            self._handler.reject(stream, reason)

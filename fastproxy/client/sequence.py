"""Per-stream numbering checks on the client side, sans-I/O.

Every data message carries `seq`, +1 per message within an `epoch` (snapshots carry the epoch;
updates belong to the epoch of the snapshot before them). What a break means depends on the
stream: on an event stream (trades, liquidations) every message is news of its own, so a jump is
lost data; on a state stream (ticker, kline, book) every message is the state or builds on it,
and the server may skip ahead to the newest state for a slow reader (books get a new snapshot
then; their `updateId` is checked by the book itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    OK = "ok"  # deliver
    GAP = "gap"  # deliver, after telling the user that messages before it are missing
    DUPLICATE = "duplicate"  # already delivered: drop


@dataclass(slots=True)
class Position:
    """Where a stream stands: what a resume asks the server to continue after."""

    epoch: str | None
    seq: int


class SequenceCheck:
    """The numbering of one stream as this client has received it."""

    __slots__ = ("epoch", "event_stream", "gap_from", "seq")

    def __init__(self, event_stream: bool) -> None:
        self.event_stream = event_stream
        self.epoch: str | None = None
        self.seq: int | None = None
        self.gap_from: int | None = None  # the last seq before the most recent GAP

    def reset(self) -> None:
        """Forget the position: the next message starts the stream afresh (a new subscription
        the server could not resume, after the caller has reported the gap)."""
        self.epoch = None
        self.seq = None

    def position(self) -> Position | None:
        """The resume point, or None when nothing has been received (or no seq is known)."""
        if self.seq is None or self.epoch is None:
            return None
        return Position(self.epoch, self.seq)

    def check(self, kind: str, seq: int | None, epoch: str | None = None) -> Verdict:
        """Judge one data message (`kind` is its `type`) and advance past it unless it is a
        duplicate. `epoch` is the message's own (snapshots) or None (updates: same epoch)."""
        if seq is None:  # a server that does not number: nothing to check
            return Verdict.OK
        last = self.seq
        if last is None:
            self._advance(seq, epoch)
            return Verdict.OK
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            # The numbering restarted: the messages between are unknown to this client.
            self.gap_from = last
            self._advance(seq, epoch)
            return Verdict.GAP if self.event_stream else Verdict.OK
        if seq <= last:
            return Verdict.DUPLICATE
        verdict = Verdict.OK
        if seq != last + 1 and self.event_stream:
            self.gap_from = last
            verdict = Verdict.GAP
        self._advance(seq, epoch)
        return verdict

    def _advance(self, seq: int, epoch: str | None) -> None:
        self.seq = seq
        if epoch is not None:
            self.epoch = epoch

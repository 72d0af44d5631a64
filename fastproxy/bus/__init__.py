"""The bus: where Messages go between the node that owns an upstream topic and the hubs that
serve it. One contract, several engines: memory (one node owns every topic) and Redis
(cluster); every engine passes the same conformance suite (tests/bus/test_contract.py).

The parts, wired by fastproxy.app:

    feed ──Handler──► bus engine ──Handler──► hub
                      (Delivery: the rules)

`Handler` is the one interface Messages and stream events travel through, at both ends: the
feed hands its output to the engine's, and the engine hands the hub (which is a Handler) what
its clients should see. Every engine passes what reaches the hub through a `Delivery`, so the
delivery rules are the same on one node and in a cluster: each seq once, a jump in seq
delivered as a snapshot, a stream's first delivery after it is acquired a snapshot.

An engine starts and stops only its own connections; the feed is started and stopped by the
app, around the bus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fastproxy.bus.delivery import Delivery
from fastproxy.bus.memory import MemoryBus
from fastproxy.streams import Stream
from fastproxy.wire import Message


class Handler(Protocol):
    """Where a stream's Messages and events go: from the feed to the bus, from the bus to the
    hub."""

    def deliver(self, message: Message) -> None:
        """One Message of a stream, in seq order."""

    def reset(self, stream: Stream) -> None:
        """The stream's upstream state was lost; its next Message is a snapshot."""

    def reject(self, stream: Stream, reason: str) -> None:
        """The exchange refused the stream: it is dropped, and its holders must be told."""

    def status(self, stream: Stream, reason: str | None, since: int) -> None:
        """Freshness: the stream went stale for `reason`, or live again when it is None;
        `since` is epoch ms of when that began (fastproxy.freshness)."""


class Source(Protocol):
    """What an engine needs of the feed: where the node's own Messages come from."""

    @property
    def stream_count(self) -> int: ...

    def attach(self, handler: Handler) -> None:
        """The engine takes the feed's output (its Messages, resets, rejections)."""

    def add(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        """Subscribe upstream; the first Message is `seq + 1`, in `epoch` (None: a new one)."""

    def remove(self, stream: Stream) -> None: ...

    def renumber(self, stream: Stream) -> None:
        """Number `stream` under a new epoch from here, keeping its state, seq, subscription."""

    def seq(self, stream: Stream) -> int | None:
        """The last seq made for `stream`, None when it is not subscribed."""

    def snapshot(self, stream: Stream) -> Message | None:
        """The stream's state at its last seq (a book: the whole book); None when unknown."""

    def is_live(self, stream: Stream) -> bool:
        """The exchange confirmed `stream`'s topic and its connection is not stale."""


class Callbacks:
    """A Handler made of four functions (an engine's inputs from the feed)."""

    __slots__ = ("deliver", "reject", "reset", "status")

    def __init__(
        self,
        deliver: Callable[[Message], object],
        reset: Callable[[Stream], object],
        reject: Callable[[Stream, str], object],
        status: Callable[[Stream, str | None, int], object],
    ) -> None:
        self.deliver = deliver
        self.reset = reset
        self.reject = reject
        self.status = status


class Bus(Protocol):
    """The contract every engine keeps."""

    name: str

    def attach(self, handler: Handler) -> None:
        """Where Messages and events for the streams this node holds go (the hub)."""

    async def start(self) -> None:
        """Open the engine's own connections (not the feed's)."""

    async def stop(self) -> None:
        """Hand over what this node owns and close the engine's connections."""

    def acquire(self, stream: Stream) -> None:
        """This node's clients now hold `stream`; start delivering it (a snapshot first)."""

    def release(self, stream: Stream) -> None:
        """No client of this node holds `stream` any more."""

    def snapshot(self, stream: Stream) -> Message | None:
        """The current state of a delta stream (a whole book) as a snapshot Message at the seq
        of the last Message delivered for it, or None when there is none."""

    # True when `history_after` reads history shared by the cluster (resume on any node)
    shared_history: bool

    def ready(self, stream: Stream) -> bool:
        """This node receives every Message of `stream` from here on."""

    async def history_after(
        self, stream: Stream, epoch: str, seq: int
    ) -> list[tuple[int, bytes]] | None:
        """(seq, frame) of the stream's Messages after `seq` in `epoch` from shared history,
        or None when it cannot bridge the gap (or the engine keeps none)."""

    def status(self) -> dict[str, Any]:
        """For /stats and /health: at least `engine` and `healthy`."""

    @property
    def healthy(self) -> bool: ...


__all__ = ["Bus", "Callbacks", "Delivery", "Handler", "MemoryBus", "Source"]

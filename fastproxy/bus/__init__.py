"""The bus: where Messages go between the node that owns an upstream topic and the hubs that
serve it. One interface, two engines: memory (one node owns every topic) and Redis (cluster).

The hub and the feed do not know which engine runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fastproxy.codec import Message
from fastproxy.streams import Stream

DeliverFn = Callable[[Message], None]
ResetFn = Callable[[Stream], None]
RejectFn = Callable[[Stream, str], None]
# (stream, reason, since epoch ms): the stream went stale for `reason`, or live when it is None.
StatusFn = Callable[[Stream, str | None, int], None]


class Bus(Protocol):
    name: str

    def attach(
        self, deliver: DeliverFn, reset: ResetFn, reject: RejectFn, status: StatusFn | None = None
    ) -> None:
        """Where Messages and freshness changes for streams this node holds go (the hub)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def acquire(self, stream: Stream) -> None:
        """This node's clients now hold `stream`; start delivering it."""

    def release(self, stream: Stream) -> None:
        """No client of this node holds `stream` any more."""

    def status(self) -> dict[str, Any]: ...

    @property
    def healthy(self) -> bool: ...


from fastproxy.bus.memory import MemoryBus  # noqa: E402

__all__ = ["Bus", "DeliverFn", "MemoryBus", "RejectFn", "ResetFn", "StatusFn"]

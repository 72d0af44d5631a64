"""One node alone: it owns every topic, and its feed's Messages go straight to its hub."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastproxy.streams import Stream

if TYPE_CHECKING:
    from fastproxy.bus import DeliverFn, RejectFn, ResetFn, StatusFn
    from fastproxy.feed import Feed


class MemoryBus:
    name = "memory"

    def __init__(self, feed: Feed) -> None:
        self._feed = feed

    def attach(
        self, deliver: DeliverFn, reset: ResetFn, reject: RejectFn, status: StatusFn | None = None
    ) -> None:
        self._feed.attach(deliver, reset, reject, status)

    async def start(self) -> None:
        await self._feed.start()

    async def stop(self) -> None:
        await self._feed.stop()

    def acquire(self, stream: Stream) -> None:
        self._feed.add(stream)

    def release(self, stream: Stream) -> None:
        self._feed.remove(stream)

    def status(self) -> dict[str, Any]:
        return {"engine": self.name, "healthy": True, "streams_owned": self._feed.stream_count}

    @property
    def healthy(self) -> bool:
        return True

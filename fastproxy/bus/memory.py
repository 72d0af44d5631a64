"""One node alone: it owns every topic, and its feed's Messages go straight to its hub,
through the same delivery rules as a cluster's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastproxy.bus.delivery import Delivery

if TYPE_CHECKING:
    from fastproxy.bus import Handler, Source
    from fastproxy.streams import Stream
    from fastproxy.wire import Message


class MemoryBus:
    name = "memory"
    # one node: the hub's own history is all the history there is
    shared_history = False

    def __init__(self, feed: Source) -> None:
        self._feed = feed
        self._delivery = Delivery(state=feed.snapshot)
        feed.attach(self._delivery)

    def attach(self, handler: Handler) -> None:
        self._delivery.attach(handler)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def acquire(self, stream: Stream) -> None:
        self._delivery.hold(stream.stream_id, stream)
        self._feed.add(stream)

    def release(self, stream: Stream) -> None:
        # the feed drops the stream's codec: a later acquire starts a new numbering (epoch)
        self._delivery.forget(stream.stream_id)
        self._feed.remove(stream)

    def snapshot(self, stream: Stream) -> Message | None:
        return self._feed.snapshot(stream)

    def ready(self, stream: Stream) -> bool:
        return True

    async def history_after(
        self, stream: Stream, epoch: str, seq: int
    ) -> list[tuple[int, bytes]] | None:
        return None

    def status(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "healthy": True,
            "streams_owned": self._feed.stream_count,
            "duplicates_dropped": self._delivery.duplicates,
            "gaps": self._delivery.gaps,
        }

    @property
    def healthy(self) -> bool:
        return True

"""Stand-ins for the parts around a bus engine: a feed that ticks on demand and a hub that
records what reaches it. Shared by the conformance suite and the Redis engine's own tests."""

from __future__ import annotations

from typing import Any

import orjson

from fastproxy.codec import Message
from fastproxy.streams import Stream
from fastproxy.wire import new_epoch


class FakeFeed:
    """Stands in for the upstream feed: `tick()` emits one Message per owned stream."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self.epochs: dict[str, str] = {}
        self.streams: dict[str, Stream] = {}
        self.fresh: set[str] = set()
        self.adds: list[tuple[str, int]] = []
        self.removes: list[str] = []
        self.renumbered: list[str] = []
        self.handler: Any = None

    def attach(self, handler: Any) -> None:
        self.handler = handler

    async def start(self) -> None:
        raise AssertionError("a bus engine must not start the feed (the app does)")

    async def stop(self) -> None:
        raise AssertionError("a bus engine must not stop the feed (the app does)")

    @property
    def stream_count(self) -> int:
        return len(self.streams)

    def add(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        if stream.topic in self.streams:
            return
        self.streams[stream.topic] = stream
        self.seqs[stream.topic] = seq
        self.epochs[stream.topic] = epoch or new_epoch()
        self.fresh.add(stream.topic)
        self.adds.append((stream.stream_id, seq))

    def remove(self, stream: Stream) -> None:
        if self.streams.pop(stream.topic, None) is not None:
            self.seqs.pop(stream.topic)
            self.epochs.pop(stream.topic)
            self.fresh.discard(stream.topic)
            self.removes.append(stream.stream_id)

    def renumber(self, stream: Stream) -> None:
        if stream.topic in self.streams:
            self.epochs[stream.topic] = new_epoch()
            self.renumbered.append(stream.stream_id)

    def seq(self, stream: Stream) -> int | None:
        return self.seqs.get(stream.topic)

    def snapshot(self, stream: Stream) -> Message | None:
        return None  # keeps no state of its own (the engines ask this of delta streams only)

    def is_live(self, stream: Stream) -> bool:
        return stream.topic in self.streams

    @property
    def owned(self) -> set[str]:
        return {stream.stream_id for stream in self.streams.values()}

    def emit(self, stream: Stream, seq: int, mtype: str = "update") -> None:
        """One Message with a chosen seq, as a misbehaving upstream line might make it."""
        self.handler.deliver(make_message(stream, seq, mtype, self.epochs[stream.topic]))

    def tick(self) -> None:
        for topic, stream in list(self.streams.items()):
            seq = self.seqs[topic] + 1
            self.seqs[topic] = seq
            mtype = "snapshot" if topic in self.fresh else "update"
            self.fresh.discard(topic)
            self.handler.deliver(make_message(stream, seq, mtype, self.epochs[topic]))


def make_message(stream: Stream, seq: int, mtype: str = "update", epoch: str = "") -> Message:
    ts = 1_700_000_000_000 + seq
    payload = orjson.dumps(
        {
            "stream": stream.stream_id,
            "type": mtype,
            "data": {"n": seq},
            "timestamp": ts,
            "source": "mudrex",
            "seq": seq,
        }
    )
    return Message(stream.stream_id, seq, mtype, ts, payload, None, epoch)


class Recorder:
    """Stands in for the hub: what was delivered, per stream."""

    def __init__(self) -> None:
        self.got: dict[str, list[Message]] = {}
        self.resets: list[str] = []
        self.rejects: list[tuple[str, str]] = []
        self.statuses: list[tuple[str, str | None, int]] = []

    def deliver(self, message: Message) -> None:
        self.got.setdefault(message.stream_id, []).append(message)

    def reset(self, stream: Stream) -> None:
        self.resets.append(stream.stream_id)

    def reject(self, stream: Stream, reason: str) -> None:
        self.rejects.append((stream.stream_id, reason))

    def status(self, stream: Stream, reason: str | None, since: int) -> None:
        self.statuses.append((stream.stream_id, reason, since))

    def seqs(self, stream: Stream) -> list[int]:
        return [m.seq for m in self.got.get(stream.stream_id, [])]

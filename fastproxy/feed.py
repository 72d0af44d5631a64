"""The feed: upstream topics in, Messages out. It owns the upstream pool and one codec per
stream, and is the only place a Message is made (so `seq` is assigned exactly once). Its output
goes to one Handler (fastproxy.bus): the bus engine that decided which topics it serves.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from fastproxy.codec import RESYNC_REASONS, CodecError, Message, new_codec
from fastproxy.latency import Histogram
from fastproxy.streams import Stream, StreamError, stream_for_topic
from fastproxy.upstream import UpstreamPool, UpstreamSettings

if TYPE_CHECKING:
    from fastproxy.bus import Handler

log = logging.getLogger("fastproxy.feed")
_wall_clock = time.time

REASON_OLD = "upstream frames are {:.0f} s old"


class _Unattached:
    """Where output goes before a bus attaches: nowhere (nothing is subscribed yet)."""

    def deliver(self, message: Message) -> None:
        return None

    def reset(self, stream: Stream) -> None:
        return None

    def reject(self, stream: Stream, reason: str) -> None:
        return None

    def status(self, stream: Stream, reason: str | None, since: int) -> None:
        return None


class Feed:
    def __init__(self, settings: UpstreamSettings) -> None:
        self._codecs: dict[str, Any] = {}  # topic -> codec
        self._books: dict[str, Any] = {}  # topic -> codec, for codecs that may ask for a resync
        self._streams: dict[str, Stream] = {}  # topic -> stream
        self._handler: Handler = _Unattached()
        self.pool = UpstreamPool(
            settings,
            on_data=self._on_data,
            on_failed=self._on_failed,
            on_reset=self._on_reset,
            on_status=self._on_status,
        )
        self.messages_out = 0
        self.codec_errors = 0
        # exchange `ts` -> receipt here, by stream kind; topic -> its kind's histogram
        self.lag: dict[str, Histogram] = {}
        self._lag_of: dict[str, Histogram] = {}
        self.resyncs = dict.fromkeys(RESYNC_REASONS, 0)  # books rebuilt, by reason
        # Frame age: topics whose last frame was older than max_frame_age -> (reason, since);
        # stale to their clients until a fresh frame comes (and the pool has them live)
        self._max_age = settings.max_frame_age or float("inf")
        self._old: dict[str, tuple[str, int]] = {}
        self.old_frames = 0
        self._last_error_log = 0.0
        self._last_resync_log = 0.0

    def attach(self, handler: Handler) -> None:
        self._handler = handler

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def add(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        """Own `stream`: subscribe its topic upstream. `seq` and `epoch` continue a numbering
        (failover); with no epoch the numbering is a new one."""
        if stream.topic in self._streams:
            return
        self._streams[stream.topic] = stream
        codec = self._codecs[stream.topic] = new_codec(stream, seq, epoch)
        lag = self.lag.get(stream.kind)
        if lag is None:
            lag = self.lag[stream.kind] = Histogram()
        self._lag_of[stream.topic] = lag
        self.pool.subscribe([stream.topic])
        if stream.is_delta:
            self._books[stream.topic] = codec
            # removed and added back at once, the topic stayed subscribed upstream and would
            # send this new, empty book no snapshot: ask for one (a no-op for a new topic)
            self.pool.resubscribe(stream.topic)

    def remove(self, stream: Stream) -> None:
        if self._streams.pop(stream.topic, None) is None:
            return
        self._codecs.pop(stream.topic, None)
        self._lag_of.pop(stream.topic, None)
        self._books.pop(stream.topic, None)
        self._old.pop(stream.topic, None)
        self.pool.unsubscribe([stream.topic])

    def renumber(self, stream: Stream) -> None:
        """Number `stream` under a new epoch of its own from here, keeping its state, seq and
        upstream subscription (the node serves it outside the cluster's numbering)."""
        codec = self._codecs.get(stream.topic)
        if codec is not None:
            codec.renumber()

    def seq(self, stream: Stream) -> int | None:
        codec = self._codecs.get(stream.topic)
        return None if codec is None else codec.seq

    def snapshot(self, stream: Stream) -> Message | None:
        """The stream's current state as a snapshot Message (a book: the whole book), at the
        seq of the last Message delivered; None when there is none (yet, or while rebuilding)."""
        codec = self._codecs.get(stream.topic)
        return None if codec is None else codec.snapshot()

    def is_live(self, stream: Stream) -> bool:
        return (
            stream.topic in self._streams
            and self.pool.topic_state(stream.topic) == "live"
            and stream.topic not in self.pool.stale
            and stream.topic not in self._old
        )

    def freshness(self, stream: Stream) -> tuple[str, int] | None:
        """(reason, since epoch ms) while `stream`'s upstream makes it stale, else None."""
        return self.pool.stale.get(stream.topic) or self._old.get(stream.topic)

    def _on_status(self, topic: str, reason: str | None, since: int) -> None:
        stream = self._streams.get(topic)
        if stream is not None and not (reason is None and topic in self._old):
            self._handler.status(stream, reason, since)  # (live stays for fresh frames)

    def _aged(self, topic: str, lag: float, ts: int) -> None:
        """A frame `lag` s old by its exchange timestamp: the stream is stale from here."""
        self.old_frames += 1
        if topic in self._old:
            return
        entry = self._old[topic] = (REASON_OLD.format(lag), ts)
        stream = self._streams.get(topic)
        if stream is not None and topic not in self.pool.stale:
            self._handler.status(stream, *entry)
        log.warning("upstream frames old", extra={"topic": topic, "age": round(lag, 1)})

    def _fresh_again(self, topic: str) -> None:
        if self._old.pop(topic, None) is None:
            return
        stream = self._streams.get(topic)
        if stream is not None and topic not in self.pool.stale:
            self._handler.status(stream, None, int(_wall_clock() * 1000))

    def _on_data(self, topic: str, frame: dict) -> None:
        codec = self._codecs.get(topic)
        if codec is None:  # in flight when we unsubscribed
            return
        ts = frame.get("ts")
        if type(ts) is int:
            lag = _wall_clock() - ts * 0.001
            self._lag_of[topic].observe(lag if lag > 0.0 else 0.0)  # skewed clocks: 0
            # old data must not pass for live: told stale before this frame's Messages go out
            if lag > self._max_age:
                self._aged(topic, lag, ts)
            elif self._old:
                self._fresh_again(topic)
        try:
            messages = codec.feed(frame)
        except CodecError as exc:
            self.codec_errors += 1
            now = time.monotonic()
            if now - self._last_error_log > 10.0:  # a broken feed must not flood the log
                self._last_error_log = now
                log.warning(
                    "malformed upstream frame dropped",
                    extra={"topic": topic, "error": str(exc), "codec_errors": self.codec_errors},
                )
            if topic in self._books and codec.resync is not None:
                self._resync(topic, codec)
            return
        if topic in self._books and codec.resync is not None:
            self._resync(topic, codec)
        deliver = self._handler.deliver
        for message in messages:
            deliver(message)
        self.messages_out += len(messages)

    def _resync(self, topic: str, codec: Any) -> None:
        """A book could not be trusted: count why; if the codec dropped it, no joiner may get the
        old state, and the topic is subscribed again for a fresh exchange snapshot."""
        reason, again = codec.take_resync()
        self.resyncs[reason] = self.resyncs.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_resync_log > 10.0:
            self._last_resync_log = now
            log.info(
                "book resync",
                extra={"topic": topic, "reason": reason, "resubscribe": again},
            )
        if again:
            self._handler.reset(self._streams[topic])
            self.pool.resubscribe(topic)

    def _on_reset(self, topic: str) -> None:
        codec = self._codecs.get(topic)
        if codec is not None:
            codec.reset()
            self._handler.reset(self._streams[topic])

    def _on_failed(self, topic: str, reason: str) -> None:
        self._old.pop(topic, None)
        stream = self._streams.pop(topic, None)
        self._codecs.pop(topic, None)
        self._lag_of.pop(topic, None)
        self._books.pop(topic, None)
        if stream is None:
            try:
                stream = stream_for_topic(topic)
            except StreamError:
                return
        log.warning("upstream refused topic", extra={"topic": topic, "reason": reason})
        self._handler.reject(stream, reason)

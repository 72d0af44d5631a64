"""The wire layer: a Message (one update of one stream, serialized once), WebSocket frame
building and the snapshot rewrite. The codec makes Messages; the bus carries them; the hub
writes their frames. This module imports nothing of fastproxy, so all three can use it.

Numbering: within a stream's `epoch` (an opaque string) `seq` is unique and rises by one per
update. A new epoch starts whenever the numbering restarts (a codec created afresh on a node
after the stream was released and acquired again, or a cluster node serving it on its own); a
new owner that takes a stream over in a cluster continues the stored epoch, past the stored seq
(see fastproxy.bus.redis.roles.AHEAD_MAX), so its clients see one line.

`Message` here is the pure-Python class; the Cython codec has a twin with the same constructor
and fields (`fastproxy.codec.Message` is the one of the implementation in use).
"""

from __future__ import annotations

import os
import struct
import zlib

import orjson

SOURCE = "mudrex"
SNAPSHOT = "snapshot"
UPDATE = "update"


def new_epoch() -> str:
    """A fresh epoch: 12 hex digits, so two numberings of one stream never share one."""
    return os.urandom(6).hex()


class Message:
    """One update of one stream, serialized once: the same bytes go to every client and node.

    `frame` is the complete unmasked WebSocket text frame (header + payload), so fan-out never
    touches the payload again. Immutable by convention (slots, no setters used anywhere).
    """

    __slots__ = ("epoch", "frame", "payload", "seq", "stream_id", "ts", "type")

    stream_id: str
    seq: int
    type: str
    ts: int
    payload: bytes
    frame: bytes
    epoch: str

    def __init__(
        self,
        stream_id: str,
        seq: int,
        type: str,
        ts: int,
        payload: bytes,
        frame: bytes | None = None,
        epoch: str = "",
    ) -> None:
        self.stream_id = stream_id
        self.seq = seq
        self.type = type
        self.ts = ts
        self.payload = payload
        # A Message rebuilt from bus bytes may come without its frame; build it here once.
        self.frame = ws_text_frame(payload) if frame is None else frame
        self.epoch = epoch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.seq == other.seq
            and self.stream_id == other.stream_id
            and self.type == other.type
            and self.ts == other.ts
            and self.epoch == other.epoch
            and self.payload == other.payload
            and self.frame == other.frame
        )

    def __hash__(self) -> int:
        return hash((self.stream_id, self.seq, self.payload))

    def __repr__(self) -> str:
        return (
            f"Message({self.stream_id!r}, seq={self.seq}, type={self.type!r}, ts={self.ts}, "
            f"epoch={self.epoch!r}, {len(self.payload)} bytes)"
        )


_H16 = struct.Struct(">BBH")
_H64 = struct.Struct(">BBQ")


def ws_text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (server to client) holding `payload`."""
    return _frame(0x81, payload)


# permessage-deflate (RFC 7692). Every message is compressed on its own (the server agrees to
# server_no_context_takeover), so one compressed frame serves every client that negotiated it.
DEFLATE_LEVEL = 6
_DEFLATE_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with; RFC 7692 7.2.1 strips it


class Deflater:
    """Compresses one message at a time with no context carried from one to the next.

    One long-lived compressor, flushed with Z_FULL_FLUSH after each message: the flush resets the
    history, so each output is decodable by a fresh inflater, and the compressor's buffers are
    allocated once instead of once per message.
    """

    __slots__ = ("_compressor", "frames")

    def __init__(self, level: int = DEFLATE_LEVEL) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.frames = 0  # compressed frames built: one per message, however many clients

    def compress(self, payload: bytes) -> bytes:
        """The message's compressed bytes as they go into a frame (tail stripped)."""
        compressor = self._compressor
        data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
        return data[:-4]

    def frame(self, payload: bytes) -> bytes:
        """A final text frame with RSV1 set holding `payload` compressed."""
        self.frames += 1
        return _frame(0xC1, self.compress(payload))


class InflateError(ValueError):
    """A compressed message that does not inflate, or inflates past the size limit."""

    def __init__(self, reason: str, too_big: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_big = too_big


def inflate(data: bytes, max_size: int) -> bytes:
    """A client's compressed message (sent with no context takeover), inflated on its own."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        payload = inflater.decompress(data + _DEFLATE_TAIL, max_size + 1)
    except zlib.error as exc:
        raise InflateError(f"compressed data does not inflate: {exc}") from None
    if len(payload) > max_size or inflater.unconsumed_tail:
        raise InflateError("message too big", too_big=True)
    return payload


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 0x10000:
        return _H16.pack(first, 126, n) + payload
    return _H64.pack(first, 127, n) + payload


def envelope_prefix(stream_id: str) -> bytes:
    """`{"stream":<id>,"type":"` exactly as orjson writes it; the payload starts with this."""
    return b'{"stream":' + orjson.dumps(stream_id) + b',"type":"'


def epoch_suffix(epoch: str) -> bytes:
    """`,"epoch":"<epoch>"}`: how a snapshot payload ends (clients resume with it)."""
    return b',"epoch":' + orjson.dumps(epoch) + b"}"


def as_snapshot(message: Message) -> Message:
    """The same update marked `"type":"snapshot"` and carrying its `"epoch"` last: what a new
    subscriber gets first (and what a client names, with a seq, to resume).

    Every Message carries its stream's complete current state, so a late joiner's snapshot is
    the last Message with its type changed; seq, epoch, timestamp and data stay the same, so the
    next live Message is exactly seq + 1. The payload is patched in place of a re-serialization.
    A snapshot the codec made (after an upstream reset) only gets its epoch added.
    Works on either Message class and returns one of the same class.
    """
    payload = message.payload
    suffix = epoch_suffix(message.epoch)
    if message.type == SNAPSHOT:
        if payload.endswith(suffix):
            return message
        new = payload[:-1] + suffix
    else:
        prefix = envelope_prefix(message.stream_id)
        update = prefix + b'update"'
        if payload.startswith(update):
            new = prefix + b'snapshot"' + payload[len(update) : -1] + suffix
        else:  # not laid out by our codec (a foreign producer); take the slow, general way
            doc = orjson.loads(payload)
            doc["type"] = SNAPSHOT
            doc["epoch"] = message.epoch
            new = orjson.dumps(doc)
    return type(message)(
        message.stream_id,
        message.seq,
        SNAPSHOT,
        message.ts,
        new,
        ws_text_frame(new),
        message.epoch,
    )


class LastValues:
    """Per stream, the last Message and (built on first ask, once per Message) its snapshot and
    the compressed frames of both: the one last-value cache a node serves its joiners from."""

    __slots__ = ("_deflated", "_deflated_snapshots", "_last", "_snapshots", "deflater")

    def __init__(self, deflater: Deflater | None = None) -> None:
        self._last: dict[str, Message] = {}  # stream_id -> last Message
        self._snapshots: dict[str, Message] = {}  # stream_id -> as_snapshot(last)
        self._deflated: dict[str, bytes] = {}  # stream_id -> last Message, compressed frame
        # the same of its snapshot, with the snapshot it was made from
        self._deflated_snapshots: dict[str, tuple[Message, bytes]] = {}
        self.deflater = deflater or Deflater()

    def put(self, message: Message) -> None:
        sid = message.stream_id
        self._last[sid] = message
        self._snapshots.pop(sid, None)
        self._deflated.pop(sid, None)
        self._deflated_snapshots.pop(sid, None)

    def deflated(self, stream_id: str) -> bytes | None:
        """The last Message's compressed frame (built on the first ask, then shared)."""
        frame = self._deflated.get(stream_id)
        if frame is None:
            last = self._last.get(stream_id)
            if last is None:
                return None
            frame = self._deflated[stream_id] = self.deflater.frame(last.payload)
        return frame

    def frame_of(self, message: Message) -> bytes:
        """The compressed frame of a snapshot to send: the last one's is built once and kept;
        one made elsewhere (a book's whole-book snapshot from its codec) is compressed here."""
        sid = message.stream_id
        cached = self._deflated_snapshots.get(sid)
        if cached is not None and cached[0] is message:
            return cached[1]
        frame = self.deflater.frame(message.payload)
        if self._snapshots.get(sid) is message:
            self._deflated_snapshots[sid] = (message, frame)
        return frame

    def last(self, stream_id: str) -> Message | None:
        """The stream's last Message as delivered, or None when nothing is known."""
        return self._last.get(stream_id)

    def snapshot(self, stream_id: str) -> Message | None:
        """The stream's current state as a snapshot, or None when nothing is known."""
        snapshot = self._snapshots.get(stream_id)
        if snapshot is None:
            last = self._last.get(stream_id)
            if last is None:
                return None
            snapshot = self._snapshots[stream_id] = as_snapshot(last)
        return snapshot

    def forget(self, stream_id: str) -> None:
        self._last.pop(stream_id, None)
        self._snapshots.pop(stream_id, None)
        self._deflated.pop(stream_id, None)
        self._deflated_snapshots.pop(stream_id, None)

    def __len__(self) -> int:
        return len(self._last)

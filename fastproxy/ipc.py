"""The records the feed process and the workers of one machine exchange (sans-I/O).

One Unix stream socket per worker carries length-prefixed records: a little-endian u32 body
length, then the body, whose first byte is the record's kind. A Message travels as a fixed
header (type, seq, ts, the lengths of stream id and epoch) followed by the stream id, the
epoch and the complete WebSocket frame the feed built, so a worker fans out exactly the feed's
bytes and never re-serializes; the payload is the frame minus its 2, 4 or 10 byte header.

Control records (interest, reports, node snapshots) are small and rare: their bodies are JSON.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import orjson

_LEN = struct.Struct("<I")
_MSG = struct.Struct("<BBBBqq")  # kind, type code, sid length, epoch length, seq, ts

# feed -> worker
MESSAGE = ord("M")
RESET = ord("R")  # body: stream id
REJECT = ord("J")  # body: JSON [stream id, reason]
NODE = ord("N")  # body: JSON node snapshot (stats of every worker and of the feed)
SYNCED = ord("Y")  # body: JSON {"token": n, "bus": the feed-side engine's status}
STATUS = ord("F")  # body: JSON [stream id, stale reason or null, since ms] (freshness)
READY = ord("D")  # body: stream id; every Message of it reaches this worker from here on
HISTORY = ord("I")  # body: token, found, then (seq, frame) pairs: an answer to HISTORY_ASK
SYMBOLS = ord("L")  # body: JSON list of the exchange's symbols (the machine fetches it once)
# worker -> feed
HELLO = ord("H")  # body: JSON {"worker": id, "pid": pid}
ACQUIRE = ord("A")  # body: the stream's client arg
RELEASE = ord("U")  # body: the stream's client arg
REPORT = ord("T")  # body: JSON stats of the worker
SYNC = ord("S")  # body: JSON token; answered with SYNCED behind everything sent before it
HISTORY_ASK = ord("Q")  # body: JSON [token, stream arg, epoch, seq]: what came after seq

TYPES = ("update", "snapshot")
_TYPE_CODES = {name: code for code, name in enumerate(TYPES)}
MAX_RECORD = 64 * 1024 * 1024


class IPCError(ValueError):
    """Bytes that are not a record stream of ours: the link is broken, not the Message."""


def _record(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def encode_message(message: Any) -> bytes:
    """One Message as its record: its frame bytes as the feed built them."""
    sid = message.stream_id.encode()
    epoch = message.epoch.encode()
    header = _MSG.pack(
        MESSAGE, _TYPE_CODES[message.type], len(sid), len(epoch), message.seq, message.ts
    )
    frame = message.frame
    return _LEN.pack(_MSG.size + len(sid) + len(epoch) + len(frame)) + header + sid + epoch + frame


_HIST = struct.Struct("<BIB")  # kind, token, found
_HIST_ENTRY = struct.Struct("<qI")  # seq, frame length


def encode_history(token: int, entries: list[tuple[int, bytes]] | None) -> bytes:
    """The answer to a history question: the (seq, frame) pairs, or None (cannot bridge)."""
    parts = [_HIST.pack(HISTORY, token, entries is not None)]
    for seq, frame in entries or ():
        parts.append(_HIST_ENTRY.pack(seq, len(frame)))
        parts.append(frame)
    return _record(b"".join(parts))


def decode_history(body: memoryview) -> tuple[int, list[tuple[int, bytes]] | None]:
    _, token, found = _HIST.unpack_from(body)
    if not found:
        return token, None
    entries, offset = [], _HIST.size
    while offset < len(body):
        seq, length = _HIST_ENTRY.unpack_from(body, offset)
        offset += _HIST_ENTRY.size
        entries.append((seq, bytes(body[offset : offset + length])))
        offset += length
    return token, entries


def encode_text(kind: int, text: str) -> bytes:
    return _record(bytes((kind,)) + text.encode())


def encode_json(kind: int, obj: Any) -> bytes:
    return _record(bytes((kind,)) + orjson.dumps(obj))


def frame_payload(frame: bytes) -> bytes:
    """The payload of an unmasked server frame (its header is 2, 4 or 10 bytes long)."""
    length = frame[1] & 0x7F
    return frame[2 if length < 126 else 4 if length == 126 else 10 :]


class MessageFields:
    """A decoded Message record, before it becomes the codec's Message class."""

    __slots__ = ("epoch", "frame", "seq", "stream_id", "ts", "type")

    def __init__(self, body: memoryview) -> None:
        _, code, sid_len, epoch_len, self.seq, self.ts = _MSG.unpack_from(body)
        start = _MSG.size
        end = start + sid_len
        self.stream_id = bytes(body[start:end]).decode()
        self.epoch = bytes(body[end : end + epoch_len]).decode()
        self.type = TYPES[code]
        self.frame = bytes(body[end + epoch_len :])


class RecordReader:
    """Bytes in (any chunking), whole record bodies out: `feed(data)` yields a memoryview of
    each body (over immutable bytes, so it may be kept)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> Iterator[memoryview]:
        if self._rest:
            data = self._rest + data
            self._rest = b""
        view = memoryview(data)
        offset, end = 0, len(data)
        while end - offset >= 4:
            (length,) = _LEN.unpack_from(view, offset)
            if length == 0 or length > MAX_RECORD:
                raise IPCError(f"record of {length} bytes")
            if end - offset - 4 < length:
                break
            yield view[offset + 4 : offset + 4 + length]
            offset += 4 + length
        if offset < end:
            self._rest = data[offset:]


def decode_text(body: memoryview) -> str:
    return bytes(body[1:]).decode()


def decode_json(body: memoryview) -> Any:
    return orjson.loads(body[1:])


def dispatch(
    reader: RecordReader, data: bytes, handlers: dict[int, Callable[[memoryview], None]]
) -> None:
    """Feed `data` and call the handler of each whole record's kind (unknown kinds: IPCError)."""
    for body in reader.feed(data):
        handler = handlers.get(body[0])
        if handler is None:
            raise IPCError(f"unknown record kind {body[0]!r}")
        handler(body)

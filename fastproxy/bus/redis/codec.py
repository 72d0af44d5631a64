"""How the Redis engine writes a Message (and its control markers) to a channel and to a
stream's stored latest state: a fixed binary header, the epoch, then the payload (or a
marker's text). Rebuilding a Message needs no JSON parsing."""

from __future__ import annotations

import struct

from fastproxy.codec import Message, ws_text_frame

_HDR = struct.Struct(">BBqqB")  # kind, type, seq, ts, epoch length
KIND_MESSAGE = 0
KIND_RESET = 1  # the owner's upstream state was lost; the next Message is a snapshot
KIND_REJECT = 2  # the exchange refused the stream; body: the reason
KIND_HANDOVER = 3  # the owner gave the lease up while others hold the stream: elect now
KIND_BEAT = 4  # the owner is alive (sent on streams that published nothing for a while)
KIND_STATUS = 5  # the owner's upstream freshness changed; body: liveness.status_text
_TYPES = ("update", "snapshot")
_TYPE_CODES = {"update": 0, "snapshot": 1}


def encode_message(message: Message) -> bytes:
    """A Message as the channel carries it and the stored latest state keeps it."""
    epoch = message.epoch.encode()
    return (
        _HDR.pack(KIND_MESSAGE, _TYPE_CODES[message.type], message.seq, message.ts, len(epoch))
        + epoch
        + message.payload
    )


def decode_message(stream_id: str, data: bytes) -> Message:
    _, code, seq, ts, n = _HDR.unpack_from(data)
    start = _HDR.size + n
    payload = data[start:]
    epoch = data[_HDR.size : start].decode()
    return Message(stream_id, seq, _TYPES[code], ts, payload, ws_text_frame(payload), epoch)


def encode_marker(kind: int, text: str = "") -> bytes:
    return _HDR.pack(kind, 0, 0, 0, 0) + text.encode()


def marker_text(data: bytes) -> str:
    """The text a marker carries (a rejection's reason)."""
    return data[_HDR.size :].decode(errors="replace")

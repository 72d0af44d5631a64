"""What the two baselines share: the ticker-only slice of the client protocol and the Bybit
ticker merge, kept apart from fastproxy's own code so the baselines measure a different
implementation of the same job, not a second copy of the proxy.

Baseline messages are laid out like the proxy's (stream first, `seq` last) so the client
harness reads all three the same way.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import orjson

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_H16 = struct.Struct(">BBH")
_H64 = struct.Struct(">BBQ")


def stream_id(symbol: str) -> str:
    return f"mudrex.futures.ticker.{symbol}"


def symbol_of(arg: str) -> str | None:
    """`ticker:BTCUSDT` -> `BTCUSDT`; anything else is not served by a baseline."""
    kind, _, symbol = arg.partition(":")
    if kind != "ticker" or not symbol or ":" in symbol:
        return None
    return symbol.upper()


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def text_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final, unmasked frame (server to client)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 0x10000:
        return _H16.pack(0x80 | opcode, 126, n) + payload
    return _H64.pack(0x80 | opcode, 127, n) + payload


def subscribe_ack(accepted: list[str], rejected: list[str], req_id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "op": "subscribe",
        "success": bool(accepted),
        "args": accepted,
        "message": f"Subscribed to {len(accepted)} streams",
        "rejected": rejected or None,
    }
    if req_id is not None:
        reply["req_id"] = req_id
    return reply


class Ticker:
    """One Bybit ticker topic: the merged state and this stream's `seq`."""

    __slots__ = ("data", "seq", "stream", "timestamp")

    def __init__(self, symbol: str) -> None:
        self.stream = stream_id(symbol)
        self.data: dict[str, Any] = {}
        self.seq = 0
        self.timestamp = 0

    def apply(self, frame: dict[str, Any]) -> None:
        """Merge a Bybit snapshot or delta; a delta carries only the fields that changed."""
        if frame.get("type") == "snapshot":
            self.data = dict(frame["data"])
        else:
            self.data.update(frame["data"])
        self.timestamp = frame.get("ts", 0)
        self.seq += 1

    def message(self, kind: str = "update") -> dict[str, Any]:
        return {
            "stream": self.stream,
            "type": kind,
            "data": self.data,
            "timestamp": self.timestamp,
            "source": "mudrex",
            "seq": self.seq,
        }

    def payload(self, kind: str = "update") -> bytes:
        return orjson.dumps(self.message(kind))


def upstream_subscribe(symbols: list[str]) -> bytes:
    return orjson.dumps({"op": "subscribe", "args": [f"tickers.{s}" for s in symbols]})


def topic_symbol(topic: str) -> str | None:
    prefix, _, symbol = topic.partition(".")
    return symbol if prefix == "tickers" else None

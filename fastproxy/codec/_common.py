"""What both codec implementations share: the error type, the field tables, the snapshot
rewrite, and the pure-Python Message, frame builder and value rules.

The Cython twin (ext/_codec.pyx) imports the error type and the tables from here, so the two
implementations cannot drift apart on names or order; it re-implements Message, the frame
builder and the value rules in C, and tests/test_codec_diff.py pins those byte for byte.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Protocol

import orjson

INT64_MAX = 0x7FFFFFFFFFFFFFFF
SOURCE = "mudrex"
SNAPSHOT = "snapshot"
UPDATE = "update"


class CodecError(ValueError):
    """An upstream data frame the codec cannot use. The codec's state is unchanged."""


class Message:
    """One update of one stream, serialized once: the same bytes go to every client and node.

    `frame` is the complete unmasked WebSocket text frame (header + payload), so fan-out never
    touches the payload again. Immutable by convention (slots, no setters used anywhere).
    This is the pure-Python class; the Cython extension has a twin with read-only fields, and
    `fastproxy.codec.Message` is the one of the implementation in use.
    """

    __slots__ = ("frame", "payload", "seq", "stream_id", "ts", "type")

    stream_id: str
    seq: int
    type: str
    ts: int
    payload: bytes
    frame: bytes

    def __init__(
        self,
        stream_id: str,
        seq: int,
        type: str,
        ts: int,
        payload: bytes,
        frame: bytes | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.seq = seq
        self.type = type
        self.ts = ts
        self.payload = payload
        # A Message rebuilt from bus bytes may come without its frame; build it here once.
        self.frame = ws_text_frame(payload) if frame is None else frame

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.seq == other.seq
            and self.stream_id == other.stream_id
            and self.type == other.type
            and self.ts == other.ts
            and self.payload == other.payload
            and self.frame == other.frame
        )

    def __hash__(self) -> int:
        return hash((self.stream_id, self.seq, self.payload))

    def __repr__(self) -> str:
        return (
            f"Message({self.stream_id!r}, seq={self.seq}, type={self.type!r}, ts={self.ts}, "
            f"{len(self.payload)} bytes)"
        )


class Codec(Protocol):
    """What `new_codec` returns, in either implementation."""

    @property
    def stream(self) -> Any: ...

    @property
    def seq(self) -> int:
        """The last seq assigned (the start value until the first Message)."""
        ...

    def feed(self, frame: dict) -> list[Any]:
        """Apply one parsed Bybit data frame; the Messages it makes, seq +1 each."""
        ...

    def snapshot(self) -> Any:
        """The current state for a new subscriber, or None when nothing is known yet."""
        ...

    def reset(self) -> None:
        """Upstream state is gone; the next Message out is a snapshot."""
        ...


_H16 = struct.Struct(">BBH")
_H64 = struct.Struct(">BBQ")


def ws_text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (server to client) holding `payload`."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 0x10000:
        return _H16.pack(0x81, 126, n) + payload
    return _H64.pack(0x81, 127, n) + payload


def envelope_prefix(stream_id: str) -> bytes:
    """`{"stream":<id>,"type":"` exactly as orjson writes it; the payload starts with this."""
    return b'{"stream":' + orjson.dumps(stream_id) + b',"type":"'


def as_snapshot(message: Message) -> Message:
    """The same update marked `"type":"snapshot"`: what a new subscriber gets first.

    Every Message carries its stream's complete current state, so a late joiner's snapshot is
    the last Message with its type changed; seq, timestamp and data stay the same, so the next
    live Message is exactly seq + 1. The payload is patched in place of a re-serialization.
    """
    if message.type == SNAPSHOT:
        return message
    prefix = envelope_prefix(message.stream_id)
    payload = message.payload
    update = prefix + b'update"'
    if payload.startswith(update):
        new = prefix + b'snapshot"' + payload[len(update) :]
    else:  # not laid out by our codec (a foreign producer); take the slow, general way
        doc = orjson.loads(payload)
        doc["type"] = SNAPSHOT
        new = orjson.dumps(doc)
    # type(message): the Cython and pure Message classes each stay among themselves
    return type(message)(
        message.stream_id, message.seq, SNAPSHOT, message.ts, new, ws_text_frame(new)
    )


# -- tickers -------------------------------------------------------------------------------
# Output slots in output order. bid/ask are two slots each, nested on output.
TICKER_SYMBOL = 0
TICKER_PCT = 9  # change24hPercent, derived from price24hPcnt
TICKER_BID_PRICE = 11
TICKER_BID_SIZE = 12
TICKER_ASK_PRICE = 13
TICKER_ASK_SIZE = 14
TICKER_NSLOTS = 19

# (Bybit field, output key) by slot; bid/ask parts name the key inside the nested object.
TICKER_FIELDS: tuple[tuple[str, str], ...] = (
    ("symbol", "symbol"),
    ("lastPrice", "price"),
    ("markPrice", "markPrice"),
    ("indexPrice", "indexPrice"),
    ("highPrice24h", "high24h"),
    ("lowPrice24h", "low24h"),
    ("prevPrice24h", "prevPrice24h"),
    ("volume24h", "volume24h"),
    ("turnover24h", "turnover24h"),
    ("price24hPcnt", "change24hPercent"),
    ("tickDirection", "tickDirection"),
    ("bid1Price", "price"),
    ("bid1Size", "size"),
    ("ask1Price", "price"),
    ("ask1Size", "size"),
    ("openInterest", "openInterest"),
    ("openInterestValue", "openInterestValue"),
    ("fundingRate", "fundingRate"),
    ("nextFundingTime", "nextFundingTime"),
)
TICKER_SLOT: dict[str, int] = {bybit: slot for slot, (bybit, _) in enumerate(TICKER_FIELDS)}
assert len(TICKER_FIELDS) == TICKER_NSLOTS

KLINE_KEYS = (
    "symbol",
    "interval",
    "openTime",
    "closeTime",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "turnover",
    "confirmed",
)
TRADE_KEYS = ("id", "symbol", "price", "quantity", "side", "time", "isBlockTrade")
TRADE_SIDES = {"Buy": "buy", "Sell": "sell"}


# -- value rules (the Cython twin implements the same ones in C) ----------------------------


def check_str(value: Any, what: str) -> str:
    """An exchange string: exactly `str` and encodable as UTF-8 (no lone surrogates)."""
    if type(value) is not str:
        raise CodecError(f"{what} must be a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise CodecError(f"{what} is not valid UTF-8") from None
    return value


def check_ms(value: Any, what: str) -> int:
    """An exchange time or id number: exactly `int`, 0 <= value < 2**63."""
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise CodecError(f"{what} must be an integer in 0..2**63-1")
    return value


_DECIMAL_RE = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")


def percent_2dp(fraction: str) -> str | None:
    """`price24hPcnt` (a fraction) as a percentage with two decimals, rounded half up.

    Exact: the value is shifted two places and rounded on its decimal digits, never through a
    float. The accepted form is a plain ASCII decimal: an optional sign, digits with an optional
    fractional part, no exponent (`0.001455`, `-0.158315`, `5`, `.5`). `""` stays `""` (Bybit's
    "not applicable"). Anything else returns None and the caller leaves the field out, because
    a wrong percentage is worse than none. `-0.00` is written `0.00`.
    """
    if not fraction:
        return ""
    m = _DECIMAL_RE.fullmatch(fraction)
    if m is None:
        return None
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    if not whole and not frac:
        return None
    # value * 10**4, truncated, as a digit string; the fifth fractional digit decides rounding.
    digits = (whole + (frac + "0000")[:4]).lstrip("0")
    if len(frac) > 4 and frac[4] >= "5":
        kept = digits.rstrip("9")
        nines = len(digits) - len(kept)
        digits = (kept[:-1] + chr(ord(kept[-1]) + 1) if kept else "1") + "0" * nines
    if not digits:
        return "0.00"
    digits = digits.rjust(3, "0")
    return ("-" if sign == "-" else "") + digits[:-2] + "." + digits[-2:]

"""What both codec implementations share: the error type, every key table (which Bybit field
becomes which Mudrex key, in output order) and the value rules.

The pure codecs (fastproxy.codec.pure) and the Cython twin (ext/_codec.pyx) both build their
output from these tables, so the two cannot drift apart on names or order. The Cython twin
re-implements the cheap value checks in C and calls `check_utf8` here for anything that is not
ASCII, so both refuse exactly the same strings with the same error; tests/test_codec_diff.py
pins the output byte for byte. This module imports nothing of fastproxy.
"""

from __future__ import annotations

import re
from typing import Any

INT64_MAX = 0x7FFFFFFFFFFFFFFF


class CodecError(ValueError):
    """An upstream data frame the codec cannot use. The codec's state is unchanged."""


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

# -- klines --------------------------------------------------------------------------------
# A candle's data: the stream's symbol and interval, then these, in output order.
KLINE_TIMES: tuple[tuple[str, str], ...] = (("start", "openTime"), ("end", "closeTime"))
KLINE_VALUES: tuple[tuple[str, str], ...] = (
    ("open", "open"),
    ("high", "high"),
    ("low", "low"),
    ("close", "close"),
    ("volume", "volume"),
    ("turnover", "turnover"),
)
KLINE_CONFIRMED = ("confirm", "confirmed")

# -- trades --------------------------------------------------------------------------------
# One trade's object, in output order: id, symbol, price, quantity (strings), side, time, and
# isBlockTrade when the exchange says.
TRADE_ID = ("i", "id")
TRADE_SYMBOL = ("s", "symbol")
TRADE_VALUES: tuple[tuple[str, str], ...] = (("p", "price"), ("v", "quantity"))
TRADE_SIDE = ("S", "side")
TRADE_TIME = ("T", "time")
TRADE_BLOCK = ("BT", "isBlockTrade")
TRADE_SIDES = {"Buy": "buy", "Sell": "sell"}


# -- books and liquidations ---------------------------------------------------------------
# data keys of a book Message, in output order
BOOK_KEYS = ("symbol", "bids", "asks", "updateId", "time")
# one liquidation event, in output order
LIQUIDATION_KEYS = ("symbol", "side", "price", "quantity", "time")
LIQUIDATION_SIDES = {"Buy": "buy", "Sell": "sell"}

# Why a book was rebuilt (counted per reason in /stats and /metrics).
RESYNC_GAP = "gap"  # u jumped past last+1: a delta was lost
RESYNC_REPEAT = "repeat"  # u == last on a delta (depth 1 repeats its snapshot legitimately)
RESYNC_BACKWARD = "backward"  # u went back
RESYNC_RESTART = "restart"  # u == 1 while a book was held: the exchange restarted it
RESYNC_SNAPSHOT = "snapshot"  # an unannounced snapshot in the middle of the stream
RESYNC_CROSSED = "crossed"  # after a delta the best bid is at or above the best ask
RESYNC_OVERFLOW = "overflow"  # after a delta a side holds more than DEPTH levels
RESYNC_MALFORMED = "malformed"  # a frame of the topic could not be used
RESYNC_REASONS = (
    RESYNC_GAP,
    RESYNC_REPEAT,
    RESYNC_BACKWARD,
    RESYNC_RESTART,
    RESYNC_SNAPSHOT,
    RESYNC_CROSSED,
    RESYNC_OVERFLOW,
    RESYNC_MALFORMED,
)

# A price or size: ASCII digits with an optional fraction, nothing else (no sign, exponent,
# spaces, "inf" or "nan"). Sizes whose digits are all zero delete the level.
DECIMAL_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
# A level's price is ordered and matched by its exact value: (integer part, fraction scaled to
# PRICE_FRACTION digits), so "100.5" and "100.50" are one level and no float rounding enters.
# Both parts must fit 64 bits unsigned: at most PRICE_INT_DIGITS significant integer digits.
PRICE_INT_DIGITS = 19
PRICE_FRACTION = 18

# -- value rules (the Cython twin implements the same ones in C) ----------------------------


def check_str(value: Any, what: str) -> str:
    """An exchange string: exactly `str` and encodable as UTF-8 (no lone surrogates)."""
    if type(value) is not str:
        raise CodecError(f"{what} must be a string, got {type(value).__name__}")
    if not value.isascii():
        check_utf8(value, what)
    return value


def check_utf8(value: str, what: str) -> None:
    """A non-ASCII exchange string must encode as UTF-8 (a lone surrogate does not)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise CodecError(f"{what} is not valid UTF-8") from None


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

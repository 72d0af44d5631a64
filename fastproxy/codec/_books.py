"""Names and rules the book and liquidation codecs share, pure and Cython alike: the output keys,
the resync reasons and the decimal grammar of book levels.

The Cython twin (ext/_codec.pyx) imports these, so neither implementation can drift on a name.
"""

from __future__ import annotations

import re

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

"""Stream names: the client's args, the Bybit topics and the Mudrex stream ids, one mapping.

Sans-I/O. Everything that turns a name of one of the three forms into another goes through here.
"""

from __future__ import annotations

import re

TICKER = "ticker"
KLINE = "kline"
TRADE = "trade"
ORDERBOOK = "orderbook"
LIQUIDATION = "liquidation"
KINDS = (TICKER, KLINE, TRADE, ORDERBOOK, LIQUIDATION)

# State streams: every Message carries (or, for books, updates) the stream's current state, so a
# reader that falls behind can be given the newest state instead of every Message in between.
# Event streams (trades, liquidations): each Message is news of its own and none may be skipped.
STATE_KINDS = frozenset((TICKER, KLINE, ORDERBOOK))
# Delta streams: an update holds only what changed, so the newest state is not the last Message
# but the codec's snapshot (the whole book). Skipping an update breaks the reader's copy.
DELTA_KINDS = frozenset((ORDERBOOK,))

# Bybit linear book depths (1 is snapshot-only on the exchange).
DEPTHS = (1, 50, 200, 1000)

# What a slow reader's backlog may lose. Each message of a state stream is the stream's complete
# current state, so the newest replaces any older one still waiting for a client that cannot keep
# up (conflation). Event streams (trades, liquidations) are never conflated: every message counts.
STATE_KINDS = frozenset({TICKER, KLINE, "orderbook"})
# State streams whose updates are deltas on the last state: a client that missed some gets a fresh
# snapshot of the stream instead of the newest delta.
DELTA_KINDS = frozenset({"orderbook"})

# client interval -> Bybit interval code, in the order the protocol lists them
INTERVALS: dict[str, str] = {
    "1m": "1",
    "3m": "3",
    "5m": "5",
    "15m": "15",
    "30m": "30",
    "1h": "60",
    "2h": "120",
    "4h": "240",
    "6h": "360",
    "12h": "720",
    "1d": "D",
    "1w": "W",
    "1M": "M",
}
BYBIT_INTERVALS: dict[str, str] = {code: name for name, code in INTERVALS.items()}

# Perpetuals are [A-Z0-9]{2,30}; dated contracts add dashes (BTC-26DEC25).
_SYMBOL_RE = re.compile(r"[A-Z0-9]{2,30}|[A-Z0-9][A-Z0-9-]{1,28}[A-Z0-9]")

STREAM_PREFIX = "mudrex.futures."


class StreamError(ValueError):
    """A client arg or topic that names no stream; the message is safe to show a client."""


class Stream:
    """One downstream stream and its one upstream topic. Immutable, hashable, names precomputed."""

    __slots__ = (
        "_hash",
        "arg",
        "depth",
        "interval",
        "is_delta",
        "is_state",
        "kind",
        "stream_id",
        "symbol",
        "topic",
    )

    kind: str
    symbol: str
    interval: str | None
    depth: int | None
    arg: str
    stream_id: str
    topic: str
    is_state: bool  # a state stream (ticker, kline, orderbook), not an event stream
    is_delta: bool  # its updates are deltas: the current state is the codec's snapshot

    def __init__(
        self, kind: str, symbol: str, interval: str | None = None, depth: int | None = None
    ) -> None:
        if kind not in KINDS:
            raise StreamError(f"unknown stream kind {kind!r}")
        if (kind == KLINE) != (interval is not None):
            raise StreamError("an interval goes with kline streams only")
        if interval is not None and interval not in INTERVALS:
            raise StreamError(f"unknown interval {interval!r}")
        if (kind == ORDERBOOK) != (depth is not None):
            raise StreamError("a depth goes with orderbook streams only")
        if depth is not None and depth not in DEPTHS:
            raise StreamError(f"unknown depth {depth!r}")
        setattr_ = object.__setattr__
        setattr_(self, "kind", kind)
        setattr_(self, "symbol", symbol)
        setattr_(self, "interval", interval)
        setattr_(self, "depth", depth)
        setattr_(self, "is_state", kind in STATE_KINDS)
        setattr_(self, "is_delta", kind in DELTA_KINDS)
        if kind == TICKER:
            arg, stream_id, topic = (
                f"ticker:{symbol}",
                f"{STREAM_PREFIX}ticker.{symbol}",
                f"tickers.{symbol}",
            )
        elif kind == KLINE:
            arg = f"kline:{interval}:{symbol}"
            stream_id = f"{STREAM_PREFIX}kline.{interval}.{symbol}"
            topic = f"kline.{INTERVALS[interval]}.{symbol}"  # type: ignore[index]
        elif kind == ORDERBOOK:
            arg = f"orderbook:{depth}:{symbol}"
            stream_id = f"{STREAM_PREFIX}orderbook.{depth}.{symbol}"
            topic = f"orderbook.{depth}.{symbol}"
        elif kind == LIQUIDATION:
            arg, stream_id, topic = (
                f"liquidation:{symbol}",
                f"{STREAM_PREFIX}liquidation.{symbol}",
                f"allLiquidation.{symbol}",
            )
        else:
            arg, stream_id, topic = (
                f"trade:{symbol}",
                f"{STREAM_PREFIX}trade.{symbol}",
                f"publicTrade.{symbol}",
            )
        setattr_(self, "arg", arg)
        setattr_(self, "stream_id", stream_id)
        setattr_(self, "topic", topic)
        setattr_(self, "_hash", hash(stream_id))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Stream is immutable")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.stream_id == self.stream_id

    def __repr__(self) -> str:
        return f"Stream({self.arg!r})"

    def __reduce__(self) -> tuple:
        return (Stream, (self.kind, self.symbol, self.interval, self.depth))


def normalize_symbol(raw: str) -> str:
    """Upper-case and check a symbol; raise StreamError with a client-safe reason."""
    if "*" in raw or "?" in raw:
        raise StreamError("wildcards are not supported")
    symbol = raw.upper()
    if not _SYMBOL_RE.fullmatch(symbol):
        raise StreamError(
            "invalid symbol: 2 to 30 of A-Z and 0-9 (dated contracts may contain '-')"
        )
    return symbol


def parse_stream_arg(arg: str) -> Stream:
    """Parse a client arg: `ticker:SYM`, `kline:INTERVAL:SYM`, `trade:SYM`,
    `orderbook:DEPTH:SYM`, `liquidation:SYM`, `tickers.SYM`."""
    if not isinstance(arg, str):
        raise StreamError("stream names are strings")
    if arg.startswith("tickers."):  # legacy Bybit-style ticker name
        return Stream(TICKER, normalize_symbol(arg[len("tickers.") :]))
    parts = arg.split(":")
    kind = parts[0]
    if kind == TICKER and len(parts) == 2:
        return Stream(TICKER, normalize_symbol(parts[1]))
    if kind == TRADE and len(parts) == 2:
        return Stream(TRADE, normalize_symbol(parts[1]))
    if kind == KLINE and len(parts) == 3:
        interval = parts[1]
        if interval not in INTERVALS:
            raise StreamError(
                f"invalid kline interval {interval!r}; use one of {', '.join(INTERVALS)}"
            )
        return Stream(KLINE, normalize_symbol(parts[2]), interval)
    if kind == LIQUIDATION and len(parts) == 2:
        return Stream(LIQUIDATION, normalize_symbol(parts[1]))
    if kind == ORDERBOOK and len(parts) == 3:
        depth = parts[1]
        if depth not in _DEPTH_NAMES:
            raise StreamError(
                f"invalid orderbook depth {depth!r}; use one of {', '.join(map(str, DEPTHS))}"
            )
        return Stream(ORDERBOOK, normalize_symbol(parts[2]), depth=int(depth))
    raise StreamError(
        "invalid stream; use ticker:SYMBOL, kline:INTERVAL:SYMBOL, trade:SYMBOL, "
        "orderbook:DEPTH:SYMBOL or liquidation:SYMBOL"
    )


_DEPTH_NAMES = frozenset(str(depth) for depth in DEPTHS)


def stream_for_topic(topic: str) -> Stream:
    """The stream a Bybit linear topic feeds: `tickers.X`, `kline.60.X`, `publicTrade.X`,
    `orderbook.50.X`, `allLiquidation.X`."""
    head, _, rest = topic.partition(".")
    if head == "tickers" and rest:
        return Stream(TICKER, rest)
    if head == "publicTrade" and rest:
        return Stream(TRADE, rest)
    if head == "allLiquidation" and rest:
        return Stream(LIQUIDATION, rest)
    if head == "orderbook":
        depth, _, symbol = rest.partition(".")
        if depth in _DEPTH_NAMES and symbol:
            return Stream(ORDERBOOK, symbol, depth=int(depth))
    if head == "kline":
        code, _, symbol = rest.partition(".")
        interval = BYBIT_INTERVALS.get(code)
        if interval is not None and symbol:
            return Stream(KLINE, symbol, interval)
    raise StreamError(f"no stream for topic {topic!r}")

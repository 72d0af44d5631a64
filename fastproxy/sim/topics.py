"""Topic names the simulator serves, per category, validated against the instrument catalogue."""

from __future__ import annotations

from dataclasses import dataclass

from fastproxy.sim.instruments import Catalog

KLINE_INTERVALS = ("1", "3", "5", "15", "30", "60", "120", "240", "360", "720", "D", "W", "M")

BOOK_DEPTHS: dict[str, tuple[int, ...]] = {
    "linear": (1, 50, 200, 1000),
    "inverse": (1, 50, 200, 1000),
    "spot": (1, 50, 200, 1000),
    # option 1 and 50 are accepted by Bybit but never deliver anything
    "option": (1, 25, 50, 100),
}
SILENT_OPTION_DEPTHS = (1, 50)

TOPIC_KINDS: dict[str, tuple[str, ...]] = {
    "linear": ("tickers", "orderbook", "publicTrade", "kline", "allLiquidation"),
    "inverse": ("tickers", "orderbook", "publicTrade", "kline", "allLiquidation"),
    "spot": ("tickers", "orderbook", "publicTrade", "kline"),
    "option": ("tickers", "orderbook", "publicTrade"),
}


@dataclass(frozen=True)
class TopicRef:
    category: str
    topic: str
    kind: str
    # the contract, or for option trades the base coin (Bybit keys those by coin)
    symbol: str
    depth: int = 0
    interval: str = ""


def parse_topic(catalog: Catalog, category: str, topic: str) -> TopicRef | None:
    """Return the parsed topic, or None when Bybit would answer ``error:handler not found``.

    Matching is exact and case-sensitive, as on the real server.
    """
    kinds = TOPIC_KINDS.get(category)
    if kinds is None or not isinstance(topic, str):
        return None
    kind, dot, rest = topic.partition(".")
    if not dot or kind not in kinds:
        return None
    if kind == "orderbook":
        depth_text, dot, symbol = rest.partition(".")
        if not dot or not depth_text.isdigit() or depth_text != str(int(depth_text)):
            return None
        depth = int(depth_text)
        if depth not in BOOK_DEPTHS[category] or catalog.get(category, symbol) is None:
            return None
        return TopicRef(category, topic, kind, symbol, depth=depth)
    if kind == "kline":
        interval, dot, symbol = rest.partition(".")
        if not dot or interval not in KLINE_INTERVALS or catalog.get(category, symbol) is None:
            return None
        return TopicRef(category, topic, kind, symbol, interval=interval)
    if kind == "publicTrade" and category == "option":
        if rest not in catalog.option_base_coins():
            return None
        return TopicRef(category, topic, kind, rest)
    if catalog.get(category, rest) is None:
        return None
    return TopicRef(category, topic, kind, rest)

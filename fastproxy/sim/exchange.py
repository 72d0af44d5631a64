"""The exchange core: instruments, per-topic feeds, and which of them are live. Sans-I/O.

Only instruments with at least one live feed are stepped, so a simulator with 20 symbols costs
nothing for the symbols nobody listens to.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from fastproxy.sim.feeds import (
    BookFeed,
    Feed,
    KlineFeed,
    LiquidationFeed,
    SilentFeed,
    TickerFeed,
    TradeFeed,
)
from fastproxy.sim.instruments import Catalog
from fastproxy.sim.market import Instrument, ModelParams, StepEvents
from fastproxy.sim.topics import SILENT_OPTION_DEPTHS, TopicRef, parse_topic

FeedKey = tuple[str, str]


class Exchange:
    def __init__(
        self,
        catalog: Catalog,
        params: ModelParams,
        seed: int = 1,
        l1_heartbeat_ms: int = 3000,
    ) -> None:
        self.catalog = catalog
        self.params = params
        self.seed = seed
        self.l1_heartbeat_ms = l1_heartbeat_ms
        self.instruments: dict[FeedKey, Instrument] = {}
        self.feeds: dict[FeedKey, Feed] = {}
        self.live: dict[str, dict[FeedKey, Feed]] = defaultdict(dict)
        self._users: dict[FeedKey, int] = defaultdict(int)
        self._last_step_ms: int | None = None

    # -- lookup ----------------------------------------------------------------------------------

    def parse(self, category: str, topic: str) -> TopicRef | None:
        return parse_topic(self.catalog, category, topic)

    def instrument(self, category: str, symbol: str, now_ms: int) -> Instrument:
        key = (category, symbol)
        inst = self.instruments.get(key)
        if inst is None:
            spec = self.catalog.get(category, symbol)
            if spec is None:
                raise KeyError(f"unknown {category} symbol {symbol}")
            inst = Instrument(spec, self.seed, now_ms, self.params)
            self.instruments[key] = inst
        return inst

    def feed(self, ref: TopicRef, now_ms: int) -> Feed:
        key = (ref.category, ref.topic)
        feed = self.feeds.get(key)
        if feed is None:
            feed = self._make_feed(ref, now_ms)
            self.feeds[key] = feed
        return feed

    def _make_feed(self, ref: TopicRef, now_ms: int) -> Feed:
        if ref.kind == "publicTrade" and ref.category == "option":
            specs = self.catalog.options_of(ref.symbol)
            insts = [self.instrument("option", s.symbol, now_ms) for s in specs]
            return TradeFeed(ref, insts)
        inst = self.instrument(ref.category, ref.symbol, now_ms)
        if ref.kind == "tickers":
            return TickerFeed(ref, inst)
        if ref.kind == "orderbook":
            if ref.category == "option" and ref.depth in SILENT_OPTION_DEPTHS:
                return SilentFeed(ref, [inst])
            return BookFeed(ref, inst, self.seed, self.l1_heartbeat_ms)
        if ref.kind == "publicTrade":
            return TradeFeed(ref, [inst])
        if ref.kind == "kline":
            return KlineFeed(ref, inst, self.seed)
        if ref.kind == "allLiquidation":
            return LiquidationFeed(ref, inst)
        raise ValueError(f"no feed for {ref.topic}")

    def book_feeds(self) -> Iterator[BookFeed]:
        for feed in self.feeds.values():
            if isinstance(feed, BookFeed):
                yield feed

    # -- live set --------------------------------------------------------------------------------

    def activate(self, ref: TopicRef, now_ms: int) -> Feed:
        feed = self.feed(ref, now_ms)
        if not feed.active:
            for inst in feed.instruments:
                self._users[(inst.spec.category, inst.spec.symbol)] += 1
            feed.activate(now_ms)
            self.live[feed.schedule][(ref.category, ref.topic)] = feed
        return feed

    def deactivate(self, ref: TopicRef) -> None:
        key = (ref.category, ref.topic)
        feed = self.feeds.get(key)
        if feed is None or not feed.active:
            return
        feed.deactivate()
        self.live[feed.schedule].pop(key, None)
        for inst in feed.instruments:
            inst_key = (inst.spec.category, inst.spec.symbol)
            self._users[inst_key] -= 1
            if self._users[inst_key] <= 0:
                del self._users[inst_key]

    def live_instruments(self) -> list[Instrument]:
        return [self.instruments[key] for key in self._users]

    # -- time ------------------------------------------------------------------------------------

    def step(self, now_ms: int) -> None:
        """Advance every live instrument to ``now_ms`` and hand their events to live feeds."""
        last = self._last_step_ms
        self._last_step_ms = now_ms
        if last is None or now_ms <= last:
            return
        # a stalled loop must not produce a burst of market time
        dt_s = min((now_ms - last) / 1000.0, 1.0)
        for key in list(self._users):
            inst = self.instruments[key]
            self.route(inst, inst.step(now_ms, dt_s))

    def route(self, inst: Instrument, events: StepEvents) -> None:
        spec = inst.spec
        if events.fills:
            trade_topic = (
                f"publicTrade.{spec.base_coin}"
                if spec.category == "option"
                else f"publicTrade.{spec.symbol}"
            )
            feed = self.live["publicTrade"].get((spec.category, trade_topic))
            if isinstance(feed, TradeFeed):
                feed.add(inst, events.fills)
        if events.liquidations:
            feed = self.live["allLiquidation"].get((spec.category, f"allLiquidation.{spec.symbol}"))
            if isinstance(feed, LiquidationFeed):
                feed.add(events.liquidations)

    def tick(self, schedule: str, now_ms: int) -> list[tuple[Feed, list[bytes]]]:
        out: list[tuple[Feed, list[bytes]]] = []
        for feed in list(self.live.get(schedule, {}).values()):
            frames = feed.tick(now_ms)
            if frames:
                out.append((feed, frames))
        return out

    def schedules(self) -> list[str]:
        return [name for name, feeds in self.live.items() if feeds]

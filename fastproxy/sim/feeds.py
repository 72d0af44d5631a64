"""Per-topic publishers. Each turns instrument state into Bybit data frames, serialized once and
shared by every connection subscribed to the topic. Sans-I/O: the caller supplies the time and
delivers the bytes.
"""

from __future__ import annotations

import random
from operator import itemgetter
from typing import Any

from fastproxy.sim.book import Level, diff_window
from fastproxy.sim.jsonenc import dumps
from fastproxy.sim.market import Candle, Fill, Instrument, KlineSeries, Liquidation
from fastproxy.sim.topics import TopicRef

MAX_TRADES_PER_FRAME = 1024


class Feed:
    """Base publisher; ``schedule`` names the timer slot that ticks it."""

    schedule = "none"

    def __init__(self, ref: TopicRef, instruments: list[Instrument]) -> None:
        self.ref = ref
        self.topic = ref.topic
        self.instruments = instruments
        self.active = False

    def activate(self, now_ms: int) -> None:
        self.active = True

    def deactivate(self) -> None:
        self.active = False

    def snapshot_frames(self, now_ms: int) -> list[bytes]:
        """Frames a new subscriber gets right after its ack (none for event streams)."""
        return []

    def tick(self, now_ms: int) -> list[bytes]:
        return []

    def resend_snapshot(self) -> None:
        raise ValueError(f"{self.topic} has no snapshot to resend")


class SilentFeed(Feed):
    """Accepted but never delivering, like option orderbook.1 and orderbook.50 on Bybit."""


class TickerFeed(Feed):
    schedule = "tickers"

    def __init__(self, ref: TopicRef, instrument: Instrument) -> None:
        super().__init__(ref, [instrument])
        self.inst = instrument
        self.category = ref.category
        # linear/inverse send deltas; spot and option tickers are snapshot-only
        self.delta_style = ref.category in ("linear", "inverse")
        self.state: dict[str, str] = {}
        self.cs = 0
        self.seen_seq = -1
        self.force = False

    def activate(self, now_ms: int) -> None:
        super().activate(now_ms)
        self.state = self.inst.ticker_fields()
        self.cs = self.seen_seq = self.inst.seq
        self.force = False

    def _frame(self, kind: str, data: dict[str, str], now_ms: int) -> bytes:
        if self.category == "spot":
            frame: dict[str, Any] = {
                "topic": self.topic,
                "ts": now_ms,
                "type": kind,
                "cs": self.cs,
                "data": data,
            }
        elif self.category == "option":
            frame = {
                "id": f"{self.topic}-{self.cs}-{now_ms}",
                "topic": self.topic,
                "ts": now_ms,
                "data": data,
                "type": kind,
            }
        else:
            frame = {"topic": self.topic, "type": kind, "data": data, "cs": self.cs, "ts": now_ms}
        return dumps(frame)

    def snapshot_frames(self, now_ms: int) -> list[bytes]:
        # the snapshot is the last published state, so the next delta applies to it exactly
        return [self._frame("snapshot", self.state, now_ms)]

    def tick(self, now_ms: int) -> list[bytes]:
        inst = self.inst
        if inst.seq == self.seen_seq and not self.force:
            return []
        self.seen_seq = inst.seq
        current = inst.ticker_fields()
        if self.force or not self.delta_style:
            if current == self.state and not self.force:
                return []
            self.force = False
            self.state, self.cs = current, inst.seq
            return [self._frame("snapshot", current, now_ms)]
        previous = self.state
        delta = {"symbol": current["symbol"]}
        for key, value in current.items():
            if previous.get(key) != value:
                delta[key] = value
        if len(delta) == 1:
            return []
        self.state, self.cs = current, inst.seq
        return [self._frame("delta", delta, now_ms)]

    def resend_snapshot(self) -> None:
        self.force = True


class BookFeed(Feed):
    def __init__(
        self, ref: TopicRef, instrument: Instrument, seed: int, heartbeat_ms: int = 3000
    ) -> None:
        super().__init__(ref, [instrument])
        self.inst = instrument
        self.depth = ref.depth
        self.schedule = f"orderbook.{ref.depth}"
        self.category = ref.category
        self.heartbeat_ms = heartbeat_ms
        rng = random.Random(f"{seed}|{ref.category}|{ref.topic}")
        # update ids are per topic; start them high like a long-running exchange would
        self.u = rng.randrange(10**6, 3 * 10**8)
        self.snapshot_only = ref.depth == 1 and ref.category != "option"
        self.win_bids: dict[int, int] = {}
        self.win_asks: dict[int, int] = {}
        self.seq = 0
        self.cts = 0
        self.seen_version = -1
        self.last_sent_ms = 0
        self.pending_restart = False
        self.pending_snapshot = False
        self.skip_next = 0
        self.repeat_next = 0
        self.back_next = 0
        self.drop_next = 0
        self.cross_next = 0
        # u -> (bids, asks) as sent (or, for a dropped delta, as it would have been), for tests
        # that check a client's book against the exchange's at every update id; off by default
        self.truth: dict[int, tuple[list[list[str]], list[list[str]]]] | None = None

    # -- state -----------------------------------------------------------------------------------

    def _capture(self) -> None:
        book, inst = self.inst.book, self.inst
        self.win_bids = dict(book.top_bids(self.depth))
        self.win_asks = dict(book.top_asks(self.depth))
        self.seq, self.cts, self.seen_version = inst.seq, inst.engine_ms, book.version

    def _next_u(self) -> int:
        if self.repeat_next:
            self.repeat_next -= 1
            return self.u
        if self.back_next:
            self.back_next -= 1
            return self.u - 1
        step = 1 + self.skip_next
        self.skip_next = 0
        return self.u + step

    def activate(self, now_ms: int) -> None:
        super().activate(now_ms)
        self._capture()
        self.u += 1
        self.last_sent_ms = now_ms

    # -- frames ----------------------------------------------------------------------------------

    def _levels(self, levels: list[Level]) -> list[list[str]]:
        spec = self.inst.spec
        fp, fq = spec.fmt_price, spec.fmt_qty
        # a deleted level is a bare "0", as on Bybit, not "0.000"
        return [[fp(p), fq(s) if s else "0"] for p, s in levels]

    def _frame(self, kind: str, bids: list[Level], asks: list[Level], now_ms: int) -> bytes:
        data = {
            "s": self.inst.spec.symbol,
            "b": self._levels(bids),
            "a": self._levels(asks),
            "u": self.u,
            "seq": self.seq,
        }
        topic = self.topic
        if self.category == "option":
            frame: dict[str, Any] = {
                "topic": topic,
                "ts": now_ms,
                "type": kind,
                "id": f"{topic}-{self.seq}-{now_ms}",
                "data": data,
                "cts": self.cts,
            }
        elif self.category == "spot" or self.depth == 1:
            frame = {"topic": topic, "ts": now_ms, "type": kind, "data": data, "cts": self.cts}
        else:
            frame = {"topic": topic, "type": kind, "ts": now_ms, "data": data, "cts": self.cts}
        return dumps(frame)

    def _snapshot(self, now_ms: int) -> bytes:
        bids = sorted(self.win_bids.items(), reverse=True)
        asks = sorted(self.win_asks.items())
        return self._frame("snapshot", bids, asks, now_ms)

    def snapshot_frames(self, now_ms: int) -> list[bytes]:
        self._record()
        return [self._snapshot(now_ms)]

    def _record(self) -> None:
        if self.truth is not None:
            bids = self._levels(sorted(self.win_bids.items(), reverse=True))
            asks = self._levels(sorted(self.win_asks.items()))
            self.truth[self.u] = (bids, asks)

    def _crossed(self, now_ms: int) -> bytes:
        """A delta that crosses the book (a bid at the best ask); the book itself is unchanged."""
        self.u += 1
        self.last_sent_ms = now_ms
        best_ask = min(self.win_asks) if self.win_asks else (max(self.win_bids, default=1) + 1)
        frame = self._frame(
            "delta", [(best_ask, max(1, self.win_asks.get(best_ask, 1)))], [], now_ms
        )
        return frame

    def tick(self, now_ms: int) -> list[bytes]:
        if self.cross_next and not self.snapshot_only:
            self.cross_next -= 1
            return [self._crossed(now_ms)]
        if self.pending_restart:
            # a service restart: the book starts over at u=1 and clients must overwrite theirs
            self.pending_restart = self.pending_snapshot = False
            self._capture()
            self.u = 1
            self.last_sent_ms = now_ms
            self._record()
            return [self._snapshot(now_ms)]
        if self.pending_snapshot:
            self.pending_snapshot = False
            self._capture()
            self.u = self._next_u()
            self.last_sent_ms = now_ms
            self._record()
            return [self._snapshot(now_ms)]
        book = self.inst.book
        if book.version != self.seen_version:
            self.seen_version = book.version
            bids = book.top_bids(self.depth)
            asks = book.top_asks(self.depth)
            bid_diff = diff_window(self.win_bids, bids)
            ask_diff = diff_window(self.win_asks, asks)
            if bid_diff or ask_diff:
                for window, diff in ((self.win_bids, bid_diff), (self.win_asks, ask_diff)):
                    for price, size in diff:
                        if size:
                            window[price] = size
                        else:
                            del window[price]
                self.u = self._next_u()
                self.seq, self.cts = self.inst.seq, self.inst.engine_ms
                self.last_sent_ms = now_ms
                self._record()
                if self.snapshot_only:
                    return [self._snapshot(now_ms)]
                if self.drop_next:
                    self.drop_next -= 1
                    return []  # lost on the way: the book moved on, nobody hears of it
                bid_diff.sort(reverse=True)
                ask_diff.sort()
                return [self._frame("delta", bid_diff, ask_diff, now_ms)]
        if self.snapshot_only and now_ms - self.last_sent_ms >= self.heartbeat_ms:
            # Bybit repeats an unchanged L1 snapshot every 3 s with the same u
            self.last_sent_ms = now_ms
            return [self._snapshot(now_ms)]
        return []

    def resend_snapshot(self) -> None:
        self.pending_snapshot = True

    def restart(self) -> None:
        if self.active:
            self.pending_restart = True
        else:
            # activation adds one, so the first snapshot after a restart carries u=1
            self.u = 0


def _trade_row(category: str, inst: Instrument, fill: Fill) -> dict[str, Any]:
    spec = inst.spec
    side = "Buy" if fill.is_buy else "Sell"
    price, qty = spec.fmt_price(fill.price), spec.fmt_qty(fill.qty)
    if category == "spot":
        return {
            "i": fill.trade_id,
            "T": fill.ts,
            "p": price,
            "v": qty,
            "S": side,
            "seq": fill.seq,
            "s": spec.symbol,
            "BT": False,
            "RPI": False,
        }
    row: dict[str, Any] = {
        "T": fill.ts,
        "s": spec.symbol,
        "S": side,
        "v": qty,
        "p": price,
    }
    if category == "option":
        row.update(i=fill.trade_id, BT=False, RPI=False, seq=fill.seq)
        row.update(inst.option_trade_extras())
        return row
    row.update(L=fill.tick_direction, i=fill.trade_id, BT=False, RPI=False, seq=fill.seq)
    return row


class TradeFeed(Feed):
    schedule = "publicTrade"

    def __init__(self, ref: TopicRef, instruments: list[Instrument]) -> None:
        super().__init__(ref, instruments)
        self.category = ref.category
        self.pending: list[dict[str, Any]] = []

    def deactivate(self) -> None:
        super().deactivate()
        self.pending.clear()

    def add(self, inst: Instrument, fills: list[Fill]) -> None:
        if self.active:
            category = self.category
            self.pending.extend(_trade_row(category, inst, fill) for fill in fills)

    def _frame(self, rows: list[dict[str, Any]], now_ms: int) -> bytes:
        topic = self.topic
        if self.category == "spot":
            frame: dict[str, Any] = {"topic": topic, "ts": now_ms, "type": "snapshot", "data": rows}
        elif self.category == "option":
            frame = {
                "id": f"{topic}-{rows[-1]['seq']}-{now_ms}",
                "topic": topic,
                "ts": now_ms,
                "data": rows,
                "type": "snapshot",
            }
        else:
            frame = {"topic": topic, "type": "snapshot", "ts": now_ms, "data": rows}
        return dumps(frame)

    def tick(self, now_ms: int) -> list[bytes]:
        if not self.pending:
            return []
        rows, self.pending = self.pending, []
        # stable sort: rows of one match event keep their order and shared seq
        rows.sort(key=itemgetter("T"))
        return [
            self._frame(rows[i : i + MAX_TRADES_PER_FRAME], now_ms)
            for i in range(0, len(rows), MAX_TRADES_PER_FRAME)
        ]


class KlineFeed(Feed):
    schedule = "kline"

    def __init__(self, ref: TopicRef, instrument: Instrument, seed: int) -> None:
        super().__init__(ref, [instrument])
        self.inst = instrument
        self.interval = ref.interval
        self.rng = random.Random(f"{seed}|{ref.category}|{ref.topic}")
        self.series: KlineSeries | None = None
        self.sent_key: tuple[int, ...] | None = None

    def activate(self, now_ms: int) -> None:
        super().activate(now_ms)
        self.series = self.inst.kline(self.interval, now_ms)
        self.series.roll(now_ms)
        # candles that closed while nobody listened are history, not news
        self.series.closed.clear()
        self.sent_key = None

    def _frame(self, candles: list[Candle], now_ms: int) -> bytes:
        data = [self.inst.candle_data(c, self.interval) for c in candles]
        return dumps({"topic": self.topic, "data": data, "ts": now_ms, "type": "snapshot"})

    @staticmethod
    def _key(candle: Candle) -> tuple[int, ...]:
        return (
            candle.start,
            candle.close,
            candle.high,
            candle.low,
            candle.volume,
            candle.timestamp,
        )

    def snapshot_frames(self, now_ms: int) -> list[bytes]:
        assert self.series is not None
        return [self._frame([self.series.current], now_ms)]

    def tick(self, now_ms: int) -> list[bytes]:
        series = self.series
        if series is None:
            return []
        series.roll(now_ms)
        frames: list[bytes] = []
        if series.closed:
            closed, series.closed = series.closed, []
            for candle in closed[:-1]:
                frames.append(self._frame([candle], now_ms))
            if self.rng.random() < 0.5:
                # the closing candle and the new one in one frame, as some clients expect
                frames.append(self._frame([closed[-1], series.current], now_ms))
                self.sent_key = self._key(series.current)
            else:
                frames.append(self._frame([closed[-1]], now_ms))
                self.sent_key = None
                return frames
        key = self._key(series.current)
        if key != self.sent_key:
            self.sent_key = key
            frames.append(self._frame([series.current], now_ms))
        return frames

    def resend_snapshot(self) -> None:
        self.sent_key = None


class LiquidationFeed(Feed):
    schedule = "allLiquidation"

    def __init__(self, ref: TopicRef, instrument: Instrument) -> None:
        super().__init__(ref, [instrument])
        self.inst = instrument
        self.pending: list[Liquidation] = []

    def deactivate(self) -> None:
        super().deactivate()
        self.pending.clear()

    def add(self, events: list[Liquidation]) -> None:
        if self.active:
            self.pending.extend(events)

    def tick(self, now_ms: int) -> list[bytes]:
        if not self.pending:
            return []
        events, self.pending = sorted(self.pending, key=lambda e: e.ts), []
        spec = self.inst.spec
        rows = [
            {
                "T": e.ts,
                "s": spec.symbol,
                "S": e.side,
                "v": spec.fmt_qty(e.qty),
                "p": spec.fmt_price(e.price),
            }
            for e in events
        ]
        frame = {"topic": self.topic, "type": "snapshot", "ts": now_ms, "data": rows}
        return [dumps(frame)]

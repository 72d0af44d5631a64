"""The market model: one seeded random walk per instrument driving its book, trades, candles and
ticker statistics. No I/O and no clock of its own: callers pass the time in, so it is testable.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import uuid
from dataclasses import dataclass, field

from fastproxy.sim.book import OrderBook
from fastproxy.sim.instruments import UNDERLYING_PRICE, InstrumentSpec, fmt_fixed, trim

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
FUNDING_INTERVAL_MS = 8 * HOUR_MS
# 1970-01-05 was the first Monday after the epoch; Bybit's weekly candles open on Monday 00:00 UTC
_FIRST_MONDAY_MS = 4 * DAY_MS


@dataclass
class ModelParams:
    # hourly relative standard deviation of the mid price
    volatility: float = 0.01
    # taker orders per second per instrument
    trade_rate: float = 8.0
    # liquidation events per second per instrument
    liquidation_rate: float = 0.05
    # up to this many random level updates per step
    book_churn: int = 6
    # levels kept per side; must cover the deepest topic (1000)
    book_levels: int = 1050
    # 60 means a "1 minute" candle lasts one real second
    kline_time_scale: float = 1.0


@dataclass(slots=True)
class Fill:
    """One public trade row."""

    ts: int
    is_buy: bool
    price: int
    qty: int
    tick_direction: str
    trade_id: str
    seq: int


@dataclass(slots=True)
class Liquidation:
    ts: int
    side: str
    qty: int
    price: int


@dataclass
class StepEvents:
    fills: list[Fill] = field(default_factory=list)
    liquidations: list[Liquidation] = field(default_factory=list)


def candle_bounds(interval: str, ts: int, scale: float = 1.0) -> tuple[int, int]:
    """(start, next start) in ms of the candle holding ``ts``, aligned like Bybit's.

    With ``scale`` != 1 every candle is ``scale`` times shorter, on a fixed grid (calendar months
    become 30 days), so tests can watch candles close.
    """
    if scale == 1.0:
        if interval == "D":
            start = ts - ts % DAY_MS
            return start, start + DAY_MS
        if interval == "W":
            start = ts - (ts - _FIRST_MONDAY_MS) % WEEK_MS
            return start, start + WEEK_MS
        if interval == "M":
            moment = dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
            first = dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC)
            nxt = dt.datetime(
                moment.year + (moment.month == 12), moment.month % 12 + 1, 1, tzinfo=dt.UTC
            )
            return int(first.timestamp() * 1000), int(nxt.timestamp() * 1000)
        duration = int(interval) * MINUTE_MS
        start = ts - ts % duration
        return start, start + duration
    offset = 0
    if interval == "D":
        base = DAY_MS
    elif interval == "W":
        base, offset = WEEK_MS, int(_FIRST_MONDAY_MS / scale)
    elif interval == "M":
        base = 30 * DAY_MS
    else:
        base = int(interval) * MINUTE_MS
    duration = max(1, int(base / scale))
    start = ts - (ts - offset) % duration
    return start, start + duration


@dataclass(slots=True)
class Candle:
    start: int
    next_start: int
    open: int
    high: int
    low: int
    close: int
    volume: int = 0
    turnover: float = 0.0
    timestamp: int = 0
    confirm: bool = False


class KlineSeries:
    """Candles of one interval for one instrument, rolled by trades and by the clock."""

    def __init__(self, interval: str, scale: float, now_ms: int, price: int) -> None:
        self.interval = interval
        self.scale = scale
        start, nxt = candle_bounds(interval, now_ms, scale)
        self.current = Candle(start, nxt, price, price, price, price, timestamp=now_ms)
        # closed candles not yet published; the publisher drains this list
        self.closed: list[Candle] = []

    def roll(self, now_ms: int) -> None:
        current = self.current
        if now_ms < current.next_start:
            return
        current.confirm = True
        self.closed.append(current)
        if len(self.closed) > 16:
            del self.closed[0]
        start, nxt = candle_bounds(self.interval, now_ms, self.scale)
        price = current.close
        self.current = Candle(start, nxt, price, price, price, price, timestamp=start)

    def add(self, ts: int, price: int, qty: int, turnover: float) -> None:
        self.roll(ts)
        candle = self.current
        if price > candle.high:
            candle.high = price
        if price < candle.low:
            candle.low = price
        candle.close = price
        candle.volume += qty
        candle.turnover += turnover
        candle.timestamp = ts


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    limit, k, product = math.exp(-lam), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def _signed(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    # "-0.000000" reads as a sign bug in a client's diff; Bybit sends plain zero
    return "0" if float(text) == 0 else text


class Instrument:
    """State of one instrument. ``step`` advances it; everything else only reads."""

    def __init__(self, spec: InstrumentSpec, seed: int, now_ms: int, params: ModelParams) -> None:
        self.spec = spec
        self.params = params
        # str seeds hash with sha512, so this is stable across runs (unlike hash())
        rng = self.rng = random.Random(f"{seed}|{spec.category}|{spec.symbol}")
        self.is_inverse = spec.category == "inverse"
        self.ref_price = spec.price * (1 + rng.uniform(-0.02, 0.02))
        self.mid = self.ref_price
        self.level_mean = max(1.0, spec.level_size / float(spec.qty_step))
        self.book = OrderBook()
        self.spread = self._new_spread()
        best_bid, best_ask = self._inside()
        self.book.recenter(best_bid, best_ask, rng, self._level_size)
        self.book.maintain_depth(params.book_levels, rng, self._level_size)
        self.seq = rng.randrange(10**9, 9 * 10**10)
        self.engine_ms = now_ms
        self.last = best_bid if rng.random() < 0.5 else best_ask
        self.tick_direction = "ZeroPlusTick"
        last = self.last
        self.prev24 = max(1, round(last * (1 + rng.uniform(-0.04, 0.04))))
        self.high24 = max(last, self.prev24) + round(last * rng.uniform(0.001, 0.02))
        self.low24 = max(1, min(last, self.prev24) - round(last * rng.uniform(0.001, 0.02)))
        self.prev1h = max(1, round(last * (1 + rng.uniform(-0.006, 0.006))))
        self.prev1h_at = now_ms
        self.volume24 = int(self.level_mean * rng.uniform(20_000, 60_000))
        price = self.price_value(last)
        volume = spec.qty_value(self.volume24)
        self.turnover24 = volume / price if self.is_inverse else volume * price
        self.open_interest = int(self.level_mean * rng.uniform(5_000, 20_000))
        self.mark = self.mid * (1 + rng.gauss(0, 2e-5))
        self.index = self.mid * (1 + rng.gauss(0, 3e-5))
        self.funding_rate = rng.uniform(-0.0001, 0.0002) if spec.is_perpetual else 0.0
        # option-only state
        self.underlying = self.mid if spec.category != "option" else self._underlying_ref()
        self.iv = rng.uniform(0.35, 0.65)
        self.klines: dict[str, KlineSeries] = {}
        self.spot_trade_id = rng.randrange(2_200_000_000_000_000_000, 2_290_000_000_000_000_000)

    # -- helpers ---------------------------------------------------------------------------------

    def _underlying_ref(self) -> float:
        return UNDERLYING_PRICE.get(self.spec.base_coin, 100.0)

    def _level_size(self, depth: int) -> int:
        # deeper levels are larger on average, like a real book
        mean = self.level_mean * (1.0 + min(depth, 200) / 40.0)
        return max(1, int(self.rng.expovariate(1.0 / mean)))

    def _new_spread(self) -> int:
        roll = self.rng.random()
        return 1 if roll < 0.75 else (2 if roll < 0.93 else 3)

    def _inside(self) -> tuple[int, int]:
        mid_ticks = self.mid / self.spec.tick
        best_bid = max(1, math.floor(mid_ticks - self.spread / 2))
        return best_bid, best_bid + self.spread

    def price_value(self, ticks: int) -> float:
        return ticks * self.spec.tick

    def _turnover(self, price: int, qty: int) -> float:
        volume = self.spec.qty_value(qty)
        value = self.price_value(price)
        return volume / value if self.is_inverse else volume * value

    def kline(self, interval: str, now_ms: int) -> KlineSeries:
        series = self.klines.get(interval)
        if series is None:
            series = KlineSeries(interval, self.params.kline_time_scale, now_ms, self.last)
            self.klines[interval] = series
        return series

    def next_trade_id(self) -> str:
        if self.spec.category == "spot":
            self.spot_trade_id += 1
            return str(self.spot_trade_id)
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=5))

    # -- evolution -------------------------------------------------------------------------------

    def step(self, now_ms: int, dt_s: float) -> StepEvents:
        """Advance the model by ``dt_s`` seconds of market time ending at ``now_ms``."""
        rng, spec, params = self.rng, self.spec, self.params
        self.engine_ms = now_ms - rng.randint(1, 4)
        self.seq += rng.randint(1, 40)
        sigma = params.volatility * math.sqrt(max(dt_s, 1e-4) / 3600.0)
        # a slow pull towards the reference price keeps long soak runs in a realistic range
        pull = -math.log(self.mid / self.ref_price) * dt_s / 21_600.0
        self.mid = max(self.mid * math.exp(rng.gauss(pull, sigma)), spec.tick * 20)
        if spec.category == "option":
            self.underlying *= math.exp(rng.gauss(0, sigma))
            self.iv = min(max(self.iv + rng.gauss(0, 0.0005), 0.2), 1.5)
        if rng.random() < min(1.0, dt_s * 2):
            # spreads persist for a while, so a quiet market really leaves the inside alone
            self.spread = self._new_spread()
        best_bid, best_ask = self._inside()
        book = self.book
        book.recenter(best_bid, best_ask, rng, self._level_size)
        book.churn(rng.randint(0, params.book_churn), rng, self._level_size)

        events = StepEvents()
        for _ in range(_poisson(rng, params.trade_rate * dt_s)):
            is_buy = rng.random() < 0.5
            qty = max(1, int(rng.expovariate(1.0 / (self.level_mean * 0.4))))
            self._execute(is_buy, book.take(is_buy, qty), now_ms, events)
        # after cancels and sweeps, so every depth topic always has a full window to show
        book.maintain_depth(params.book_levels, rng, self._level_size)

        if rng.random() < min(1.0, dt_s * 6):
            self.mark = self.mid * (1 + rng.gauss(0, 2e-5))
        if rng.random() < min(1.0, dt_s * 6):
            self.index = self.mid * (1 + rng.gauss(0, 3e-5))
        if rng.random() < min(1.0, dt_s * 2):
            change = int(rng.gauss(0, self.level_mean * 2))
            self.open_interest = max(int(self.level_mean), self.open_interest + change)
        if spec.is_perpetual and rng.random() < min(1.0, dt_s * 0.5):
            self.funding_rate = min(max(self.funding_rate + rng.gauss(0, 2e-6), -0.005), 0.005)
        if spec.category in ("linear", "inverse") and rng.random() < params.liquidation_rate * dt_s:
            events.liquidations.append(self.make_liquidation(now_ms))
        if now_ms - self.prev1h_at >= HOUR_MS:
            self.prev1h, self.prev1h_at = self.last, now_ms
        for series in self.klines.values():
            series.roll(now_ms)
        return events

    def _execute(
        self, is_buy: bool, fills: list[tuple[int, int]], ts: int, out: StepEvents
    ) -> None:
        # one taker order is one match event: all its rows share a cross sequence number
        self.seq += 1
        for price, qty in fills:
            self.record_trade(is_buy, price, qty, ts, self.seq, out)

    def record_trade(
        self, is_buy: bool, price: int, qty: int, ts: int, seq: int, out: StepEvents
    ) -> None:
        if price > self.last:
            direction = "PlusTick"
        elif price < self.last:
            direction = "MinusTick"
        else:
            direction = (
                "ZeroPlusTick" if self.tick_direction.endswith("PlusTick") else "ZeroMinusTick"
            )
        self.tick_direction = direction
        self.last = price
        self.high24 = max(self.high24, price)
        self.low24 = min(self.low24, price)
        self.volume24 += qty
        turnover = self._turnover(price, qty)
        self.turnover24 += turnover
        for series in self.klines.values():
            series.add(ts, price, qty, turnover)
        out.fills.append(Fill(ts, is_buy, price, qty, direction, self.next_trade_id(), seq))

    def inject_trades(self, count: int, now_ms: int) -> StepEvents:
        """One taker order filled in ``count`` pieces at the inside, for split-frame tests."""
        events = StepEvents()
        self.seq += 1
        is_buy = self.rng.random() < 0.5
        inside = self.book.best_ask() if is_buy else self.book.best_bid()
        price = inside[0] if inside else self.last
        for _ in range(count):
            self.record_trade(is_buy, price, 1, now_ms, self.seq, events)
        return events

    def make_liquidation(self, now_ms: int) -> Liquidation:
        rng = self.rng
        side = "Buy" if rng.random() < 0.5 else "Sell"
        # a long (Buy) position is liquidated below the market, a short one above it
        offset = rng.uniform(0.002, 0.02) * (-1 if side == "Buy" else 1)
        price = max(1, round(self.last * (1 + offset)))
        qty = max(1, int(rng.expovariate(1.0 / (self.level_mean * 0.5))))
        return Liquidation(now_ms, side, qty, price)

    # -- views -----------------------------------------------------------------------------------

    def next_funding_ms(self) -> int:
        return (self.engine_ms // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS

    def ticker_fields(self) -> dict[str, str]:
        """The full ticker as Bybit snapshots it: every value a string, in Bybit's key order."""
        category = self.spec.category
        if category == "spot":
            return self._spot_ticker()
        if category == "option":
            return self._option_ticker()
        return self._contract_ticker()

    def _top(self) -> tuple[str, str, str, str]:
        spec, book = self.spec, self.book
        bid, ask = book.best_bid(), book.best_ask()
        return (
            spec.fmt_price(bid[0]) if bid else "",
            spec.fmt_qty(bid[1]) if bid else "",
            spec.fmt_price(ask[0]) if ask else "",
            spec.fmt_qty(ask[1]) if ask else "",
        )

    def _contract_ticker(self) -> dict[str, str]:
        spec = self.spec
        fp, fq, ff = spec.fmt_price, spec.fmt_qty, spec.fmt_float_price
        bid_p, bid_s, ask_p, ask_s = self._top()
        oi = spec.qty_value(self.open_interest)
        if self.is_inverse:
            oi_value = oi / self.mark
            volume, turnover = f"{spec.qty_value(self.volume24):.4f}", f"{self.turnover24:.8f}"
        else:
            oi_value = oi * self.mark
            volume, turnover = f"{spec.qty_value(self.volume24):.4f}", f"{self.turnover24:.4f}"
        fields = {
            "symbol": spec.symbol,
            "tickDirection": self.tick_direction,
            "price24hPcnt": _signed((self.last - self.prev24) / self.prev24, 6),
            "lastPrice": fp(self.last),
            "prevPrice24h": fp(self.prev24),
            "highPrice24h": fp(self.high24),
            "lowPrice24h": fp(self.low24),
            "prevPrice1h": fp(self.prev1h),
            "markPrice": ff(self.mark),
            "indexPrice": ff(self.index),
            "openInterest": fq(self.open_interest),
            "openInterestValue": f"{oi_value:.2f}",
            "turnover24h": turnover,
            "volume24h": volume,
        }
        if spec.is_perpetual:
            fields["fundingIntervalHour"] = "8"
            fields["fundingCap"] = "0.005"
        else:
            index = self.index
            basis = self.price_value(self.last) - index
            days = max((spec.delivery_time - self.engine_ms) / DAY_MS, 1.0)
            delivery = dt.datetime.fromtimestamp(spec.delivery_time / 1000, dt.UTC)
            fields["deliveryTime"] = delivery.strftime("%Y-%m-%dT%H:%M:%SZ")
            fields["basisRate"] = _signed(basis / index, 8)
            fields["deliveryFeeRate"] = "0"
            fields["predictedDeliveryPrice"] = fmt_fixed(0, spec.price_scale)
            fields["basis"] = _signed(basis, 2)
            fields["basisRateYear"] = _signed(basis / index * 365 / days, 8)
        if not self.is_inverse:
            half = spec.qty_scale
            fields["singleOpenInterest"] = f"{oi / 2:.{half}f}"
            fields["singleOpenInterestValue"] = f"{oi_value / 2:.2f}"
        if spec.is_perpetual:
            fields["nextFundingTime"] = str(self.next_funding_ms())
            fields["fundingRate"] = trim(f"{self.funding_rate:.8f}")
        else:
            fields["nextFundingTime"] = ""
            fields["fundingRate"] = ""
        fields["bid1Price"] = bid_p
        fields["bid1Size"] = bid_s
        fields["ask1Price"] = ask_p
        fields["ask1Size"] = ask_s
        if not self.is_inverse:
            fields["preOpenPrice"] = ""
            fields["preQty"] = ""
            fields["curPreListingPhase"] = ""
        return fields

    def _spot_ticker(self) -> dict[str, str]:
        spec = self.spec
        fp = spec.fmt_price
        return {
            "symbol": spec.symbol,
            "lastPrice": fp(self.last),
            "highPrice24h": fp(self.high24),
            "lowPrice24h": fp(self.low24),
            "prevPrice24h": fp(self.prev24),
            "volume24h": f"{spec.qty_value(self.volume24):.{spec.qty_scale}f}",
            "turnover24h": f"{self.turnover24:.8f}",
            "price24hPcnt": _signed((self.last - self.prev24) / self.prev24, 4),
            "usdIndexPrice": f"{self.index:.7f}",
        }

    def _option_ticker(self) -> dict[str, str]:
        spec = self.spec
        fp, fq = spec.fmt_price, spec.fmt_qty
        bid_p, bid_s, ask_p, ask_s = self._top()
        moneyness = math.log(self.underlying / spec.strike)
        call_delta = 1 / (1 + math.exp(-moneyness / max(self.iv * 0.5, 0.05)))
        delta = call_delta if spec.options_type == "Call" else call_delta - 1
        change = (self.last - self.prev24) / self.prev24
        return {
            "symbol": spec.symbol,
            "bidPrice": bid_p,
            "bidSize": bid_s,
            "bidIv": f"{self.iv - 0.01:.4f}",
            "askPrice": ask_p,
            "askSize": ask_s,
            "askIv": f"{self.iv + 0.01:.4f}",
            "lastPrice": fp(self.last),
            "highPrice24h": fp(self.high24),
            "lowPrice24h": fp(self.low24),
            "markPrice": f"{self.mark:.8f}",
            "indexPrice": f"{self.underlying * 0.9998:.8f}",
            "markPriceIv": f"{self.iv:.4f}",
            "underlyingPrice": f"{self.underlying:.8f}",
            "openInterest": fq(self.open_interest),
            "turnover24h": f"{self.turnover24 * self.underlying / max(self.mark, 1e-9):.8f}",
            "volume24h": fq(self.volume24),
            "totalVolume": str(self.volume24 // 100 + 1),
            "totalTurnover": str(int(self.turnover24) + 1),
            "delta": f"{delta:.8f}",
            "gamma": f"{abs(call_delta * (1 - call_delta)) / self.underlying:.8f}",
            "vega": f"{self.underlying * 0.002 * self.iv:.8f}",
            "theta": f"{-self.underlying * 0.0004 * self.iv:.8f}",
            "predictedDeliveryPrice": "0",
            "change24h": _signed(change, 7),
        }

    def option_trade_extras(self) -> dict[str, str]:
        return {
            "mP": f"{self.mark:.2f}",
            "iP": f"{self.underlying:.2f}",
            "mIv": f"{self.iv:.4f}",
            "iv": f"{self.iv + self.rng.uniform(-0.01, 0.01):.4f}",
        }

    def candle_data(self, candle: Candle, interval: str) -> dict[str, object]:
        spec = self.spec
        return {
            "start": candle.start,
            "end": candle.next_start - 1,
            "interval": interval,
            "open": trim(spec.fmt_price(candle.open)),
            "close": trim(spec.fmt_price(candle.close)),
            "high": trim(spec.fmt_price(candle.high)),
            "low": trim(spec.fmt_price(candle.low)),
            "volume": trim(spec.fmt_qty(candle.volume)),
            "turnover": trim(f"{candle.turnover:.4f}"),
            "confirm": candle.confirm,
            "timestamp": candle.timestamp,
        }

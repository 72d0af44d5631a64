"""Instrument catalogue of the simulator: the symbols of each category and their contract specs.

Tick sizes, lot steps and reference prices are close to the real Bybit contracts so that formatted
prices and sizes look like the real thing (same number of decimals), which is what parsers see.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

CATEGORIES = ("linear", "inverse", "spot", "option")

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
    )
}
_DATED_LINEAR = re.compile(r"^([A-Z0-9]+)-(\d{1,2})([A-Z]{3})(\d{2})$")
_DATED_INVERSE = re.compile(r"^([A-Z0-9]+)USD([FGHJKMNQUVXZ])(\d{2})$")
_OPTION = re.compile(r"^([A-Z0-9]+)-(\d{1,2})([A-Z]{3})(\d{2})-(\d+)-([CP])(?:-(USDT|USDC))?$")
_FUTURES_MONTH_CODES = "FGHJKMNQUVXZ"


def decimals(step: str) -> int:
    """Number of decimals of a step string such as ``"0.010"`` (3)."""
    return len(step.split(".", 1)[1]) if "." in step else 0


def step_units(step: str) -> int:
    """The step as an integer count of its own smallest decimal unit (``"0.010"`` -> 10)."""
    return int(step.replace(".", ""))


def fmt_fixed(units: int, scale: int) -> str:
    """Format an integer count of 10**-scale units as a fixed-point decimal string."""
    if scale == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**scale)
    return f"{sign}{whole}.{frac:0{scale}d}"


def trim(text: str) -> str:
    """Drop trailing fractional zeros, as Bybit's kline values come ("16677", "16649.5")."""
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    # a tiny negative value rounds to "-0", which no exchange prints
    return "0" if text in ("", "-0") else text


@dataclass(frozen=True)
class InstrumentSpec:
    category: str
    symbol: str
    base_coin: str
    quote_coin: str
    settle_coin: str
    contract_type: str
    tick_size: str
    qty_step: str
    price: float
    # typical resting size of one book level, in base units (contracts for inverse)
    level_size: float
    launch_time: int = 1_585_526_400_000
    delivery_time: int = 0
    options_type: str = ""
    strike: float = 0.0
    price_scale: int = field(init=False)
    qty_scale: int = field(init=False)
    tick: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "price_scale", decimals(self.tick_size))
        object.__setattr__(self, "qty_scale", decimals(self.qty_step))
        object.__setattr__(self, "tick", float(self.tick_size))

    @property
    def is_perpetual(self) -> bool:
        return self.contract_type in ("LinearPerpetual", "InversePerpetual")

    @property
    def is_dated(self) -> bool:
        return self.contract_type in ("LinearFutures", "InverseFutures")

    def fmt_price(self, ticks: int) -> str:
        return fmt_fixed(ticks * step_units(self.tick_size), self.price_scale)

    def fmt_qty(self, steps: int) -> str:
        return fmt_fixed(steps * step_units(self.qty_step), self.qty_scale)

    def fmt_float_price(self, value: float) -> str:
        return f"{value:.{self.price_scale}f}"

    def qty_value(self, steps: int) -> float:
        return steps * float(self.qty_step)


# symbol: (reference price, tick size, qty step, typical level size)
_LINEAR_TABLE: dict[str, tuple[float, str, str, float]] = {
    "BTCUSDT": (65000.0, "0.10", "0.001", 0.8),
    "ETHUSDT": (3400.0, "0.01", "0.01", 12.0),
    "SOLUSDT": (150.0, "0.010", "0.1", 150.0),
    "XRPUSDT": (2.5, "0.0001", "1", 9000.0),
    "DOGEUSDT": (0.2, "0.00001", "1", 60000.0),
    "BNBUSDT": (600.0, "0.10", "0.01", 20.0),
    "ADAUSDT": (0.7, "0.0001", "1", 20000.0),
    "AVAXUSDT": (30.0, "0.001", "0.1", 400.0),
    "LINKUSDT": (15.0, "0.001", "0.1", 800.0),
    "DOTUSDT": (6.0, "0.0001", "0.1", 2000.0),
    "LTCUSDT": (90.0, "0.01", "0.1", 120.0),
    "TRXUSDT": (0.25, "0.00001", "1", 50000.0),
    "SUIUSDT": (3.5, "0.0001", "10", 3000.0),
    "TONUSDT": (5.0, "0.0001", "0.1", 2000.0),
    "NEARUSDT": (5.0, "0.001", "0.1", 2000.0),
    "APTUSDT": (8.0, "0.0001", "0.01", 1200.0),
    "ARBUSDT": (0.8, "0.0001", "0.1", 15000.0),
    "OPUSDT": (1.8, "0.0001", "0.1", 6000.0),
    "1000PEPEUSDT": (0.012, "0.0000001", "100", 2_000_000.0),
    "WIFUSDT": (2.0, "0.0001", "1", 5000.0),
    "AAVEUSDT": (150.0, "0.01", "0.01", 60.0),
    "BCHUSDT": (400.0, "0.05", "0.01", 25.0),
}
DEFAULT_LINEAR_SYMBOLS: tuple[str, ...] = (*_LINEAR_TABLE, "BTC-26DEC25")

_INVERSE_TABLE: dict[str, tuple[float, str, str, float]] = {
    "BTCUSD": (65000.0, "0.50", "1", 20000.0),
    "ETHUSD": (3400.0, "0.05", "1", 8000.0),
    "XRPUSD": (2.5, "0.0001", "1", 3000.0),
    "SOLUSD": (150.0, "0.010", "1", 3000.0),
}
DEFAULT_INVERSE_SYMBOLS: tuple[str, ...] = (*_INVERSE_TABLE, "BTCUSDZ26")

_SPOT_TABLE: dict[str, tuple[float, str, str, float]] = {
    "BTCUSDT": (65000.0, "0.01", "0.000001", 0.3),
    "ETHUSDT": (3400.0, "0.01", "0.00001", 4.0),
    "SOLUSDT": (150.0, "0.01", "0.001", 60.0),
    "XRPUSDT": (2.5, "0.0001", "0.01", 4000.0),
    "DOGEUSDT": (0.2, "0.00001", "0.1", 30000.0),
    "BNBUSDT": (600.0, "0.1", "0.001", 5.0),
    "ADAUSDT": (0.7, "0.0001", "0.01", 8000.0),
    "LINKUSDT": (15.0, "0.01", "0.01", 300.0),
}
DEFAULT_SPOT_SYMBOLS: tuple[str, ...] = tuple(_SPOT_TABLE)

DEFAULT_OPTION_SYMBOLS: tuple[str, ...] = (
    "BTC-25JUN27-106000-C-USDT",
    "BTC-25JUN27-106000-P-USDT",
    "BTC-25JUN27-60000-P-USDT",
    "ETH-25JUN27-4000-C-USDT",
    "ETH-25JUN27-4000-P-USDT",
)
UNDERLYING_PRICE = {"BTC": 65000.0, "ETH": 3400.0, "SOL": 150.0, "XRP": 2.5}


def _delivery_ms(day: str, month: str, year: str) -> int:
    moment = dt.datetime(2000 + int(year), _MONTHS[month], int(day), 8, tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _last_friday_ms(year: int, month: int) -> int:
    day = dt.date(year + (month == 12), month % 12 + 1, 1) - dt.timedelta(days=1)
    while day.weekday() != 4:
        day -= dt.timedelta(days=1)
    return int(dt.datetime(day.year, day.month, day.day, 8, tzinfo=dt.UTC).timestamp() * 1000)


def _linear_spec(symbol: str) -> InstrumentSpec:
    dated = _DATED_LINEAR.match(symbol)
    if dated:
        base = dated.group(1)
        ref = _LINEAR_TABLE.get(f"{base}USDT")
        price = ref[0] if ref else UNDERLYING_PRICE.get(base, 1.0)
        tick = "0.50" if price >= 1000 else (ref[1] if ref else "0.0001")
        qty = ref[2] if ref else "0.1"
        size = ref[3] / 10 if ref else 100.0
        return InstrumentSpec(
            "linear",
            symbol,
            base,
            "USDT",
            "USDT",
            "LinearFutures",
            tick,
            qty,
            price,
            size,
            delivery_time=_delivery_ms(dated.group(2), dated.group(3), dated.group(4)),
        )
    # unknown names still get a plausible contract so that custom symbol lists just work
    price, tick, qty, size = _LINEAR_TABLE.get(symbol, (1.0, "0.0001", "0.1", 5000.0))
    quote = "USDC" if symbol.endswith("PERP") or symbol.endswith("USDC") else "USDT"
    base = symbol.removesuffix("PERP").removesuffix(quote)
    return InstrumentSpec(
        "linear", symbol, base or symbol, quote, quote, "LinearPerpetual", tick, qty, price, size
    )


def _inverse_spec(symbol: str) -> InstrumentSpec:
    dated = _DATED_INVERSE.match(symbol)
    if dated:
        base = dated.group(1)
        price, tick, qty, size = _INVERSE_TABLE.get(f"{base}USD", (1.0, "0.0001", "1", 1000.0))
        month = _FUTURES_MONTH_CODES.index(dated.group(2)) + 1
        return InstrumentSpec(
            "inverse",
            symbol,
            base,
            "USD",
            base,
            "InverseFutures",
            tick,
            qty,
            price,
            size / 4,
            delivery_time=_last_friday_ms(2000 + int(dated.group(3)), month),
        )
    price, tick, qty, size = _INVERSE_TABLE.get(symbol, (1.0, "0.0001", "1", 1000.0))
    base = symbol.removesuffix("USD") or symbol
    return InstrumentSpec(
        "inverse", symbol, base, "USD", base, "InversePerpetual", tick, qty, price, size
    )


def _spot_spec(symbol: str) -> InstrumentSpec:
    price, tick, qty, size = _SPOT_TABLE.get(symbol, (1.0, "0.0001", "0.01", 3000.0))
    quote = next((q for q in ("USDT", "USDC", "BTC", "EUR") if symbol.endswith(q)), "USDT")
    base = symbol.removesuffix(quote) or symbol
    return InstrumentSpec("spot", symbol, base, quote, quote, "Spot", tick, qty, price, size)


def _option_spec(symbol: str) -> InstrumentSpec:
    match = _OPTION.match(symbol)
    if not match:
        raise ValueError(f"not an option symbol: {symbol}")
    base, day, month, year, strike, kind, settle = match.groups()
    underlying = UNDERLYING_PRICE.get(base, 100.0)
    strike_value = float(strike)
    intrinsic = max(0.0, underlying - strike_value if kind == "C" else strike_value - underlying)
    premium = max(intrinsic + underlying * 0.06, underlying * 0.002)
    tick = "5" if underlying >= 10_000 else ("0.1" if underlying >= 100 else "0.0001")
    return InstrumentSpec(
        "option",
        symbol,
        base,
        settle or "USDC",
        settle or "USDC",
        "Option",
        tick,
        "0.01",
        premium,
        20.0,
        delivery_time=_delivery_ms(day, month, year),
        options_type="Call" if kind == "C" else "Put",
        strike=strike_value,
    )


_BUILDERS = {
    "linear": _linear_spec,
    "inverse": _inverse_spec,
    "spot": _spot_spec,
    "option": _option_spec,
}


class Catalog:
    """Symbols served per category, in a stable order (used for REST paging and status)."""

    def __init__(
        self,
        linear: Iterable[str] | None = None,
        inverse: Iterable[str] | None = None,
        spot: Iterable[str] | None = None,
        option: Iterable[str] | None = None,
    ) -> None:
        chosen = {
            "linear": DEFAULT_LINEAR_SYMBOLS if linear is None else tuple(linear),
            "inverse": DEFAULT_INVERSE_SYMBOLS if inverse is None else tuple(inverse),
            "spot": DEFAULT_SPOT_SYMBOLS if spot is None else tuple(spot),
            "option": DEFAULT_OPTION_SYMBOLS if option is None else tuple(option),
        }
        self._specs: dict[str, dict[str, InstrumentSpec]] = {}
        for category, symbols in chosen.items():
            specs: dict[str, InstrumentSpec] = {}
            for symbol in symbols:
                symbol = symbol.strip()
                if symbol and symbol not in specs:
                    specs[symbol] = _BUILDERS[category](symbol)
            self._specs[category] = specs

    def symbols(self, category: str) -> list[str]:
        return list(self._specs.get(category, {}))

    def get(self, category: str, symbol: str) -> InstrumentSpec | None:
        return self._specs.get(category, {}).get(symbol)

    def specs(self, category: str) -> list[InstrumentSpec]:
        return list(self._specs.get(category, {}).values())

    def option_base_coins(self) -> list[str]:
        return sorted({spec.base_coin for spec in self._specs["option"].values()})

    def options_of(self, base_coin: str) -> list[InstrumentSpec]:
        return [s for s in self._specs["option"].values() if s.base_coin == base_coin]

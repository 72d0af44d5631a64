"""Simulator configuration."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_book_intervals() -> dict[int, float]:
    # Bybit's push periods: L1 10 ms, L50 20 ms, L200 100 ms, L1000 200 ms; option 25/100.
    # A book cannot change faster than the market step, so L1 effectively follows market_interval.
    return {1: 0.02, 25: 0.02, 50: 0.02, 100: 0.1, 200: 0.1, 1000: 0.2}


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    # linear symbols; None serves the default list (about 20 perpetuals and one dated future)
    symbols: list[str] | None = None
    inverse_symbols: list[str] | None = None
    spot_symbols: list[str] | None = None
    option_symbols: list[str] | None = None
    seed: int = 1

    # publishing periods in seconds
    ticker_interval: float = 0.1
    market_interval: float = 0.02
    orderbook_intervals: dict[int, float] = field(default_factory=_default_book_intervals)
    kline_interval: float = 1.0
    liquidation_interval: float = 0.5
    # repeat period of an unchanged orderbook.1 snapshot (same u)
    l1_heartbeat: float = 3.0

    # market model
    volatility: float = 0.01
    trade_rate: float = 8.0
    liquidation_rate: float = 0.05
    # up to this many random level updates per book per market step (0 freezes a quiet book)
    book_churn: int = 6
    # 60 makes a 1-minute candle last one real second (candles become shorter, timestamps stay real)
    kline_time_scale: float = 1.0

    # connection behaviour
    idle_timeout: float = 600.0
    # a client that stops reading is cut once this much output is queued for it
    max_write_buffer: int = 64 * 1024 * 1024
    keep_earlier_args: bool = False
    snapshot_before_ack: bool = False
    max_args_per_request: int | None = None
    max_args_chars: int | None = None

    # per-IP handshake limits; None disables (Bybit: 500 per 5 minutes, 1000 concurrent)
    rate_limit: int | None = None
    rate_limit_window: float = 300.0
    max_connections_per_ip: int | None = None
    rate_limit_status: int = 429

    # faults applied at start, same syntax as the CLI's --fault (e.g. "half_dead", "refuse=502:3")
    faults: list[str] = field(default_factory=list)

"""``python -m fastproxy.sim`` / ``fastproxy sim``: run the Bybit simulator standalone."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import uvloop

from fastproxy.sim.config import SimConfig
from fastproxy.sim.faults import FAULT_HELP, parse_fault_spec
from fastproxy.sim.server import Simulator

log = logging.getLogger("fastproxy.sim")


def _symbols(text: str) -> list[str]:
    symbols = [s.strip() for s in text.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("expected a comma-separated symbol list")
    return symbols


def _fault(text: str) -> str:
    try:
        parse_fault_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastproxy sim",
        description="Bybit V5 public WebSocket simulator (linear, inverse, spot, option) with "
        "REST instruments-info and fault injection on one port.",
        epilog="faults (--fault NAME[=VALUE], also GET /_sim/fault?name=...):\n" + FAULT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9001, help="port, 0 = any free (default 9001)")
    parser.add_argument("--symbols", type=_symbols, help="linear symbols, comma separated")
    parser.add_argument("--seed", type=int, default=1, help="market random seed (default 1)")
    parser.add_argument(
        "--ticker-interval", type=float, default=0.1, help="ticker push period, s (default 0.1)"
    )
    parser.add_argument(
        "--market-interval",
        type=float,
        default=0.02,
        help="market step, s: tickers change at most this often (default 0.02)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        help="cut connections without client ping or data after this many s (default 600)",
    )
    parser.add_argument(
        "--kline-time-scale",
        type=float,
        default=1.0,
        help="make candles this many times shorter (60: a 1-minute candle lasts 1 s)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        help="refuse handshakes beyond this many per IP per --rate-limit-window",
    )
    parser.add_argument("--rate-limit-window", type=float, default=300.0, help="seconds")
    parser.add_argument(
        "--keep-earlier-args",
        action="store_true",
        help="on a failed subscribe, keep the args before the first bad one (default: strict)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        type=_fault,
        metavar="NAME[=VALUE]",
        help="apply a fault at start (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        host=args.host,
        port=args.port,
        symbols=args.symbols,
        seed=args.seed,
        ticker_interval=args.ticker_interval,
        market_interval=args.market_interval,
        idle_timeout=args.idle_timeout,
        kline_time_scale=args.kline_time_scale,
        rate_limit=args.rate_limit,
        rate_limit_window=args.rate_limit_window,
        keep_earlier_args=args.keep_earlier_args,
        faults=list(args.fault),
    )


async def serve(config: SimConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    sim = Simulator(config)
    await sim.start()
    log.info("bybit simulator listening on %s (REST %s)", sim.ws_url("linear"), sim.http_url)
    try:
        await stop.wait()
    finally:
        await sim.stop()
        log.info("bybit simulator stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        uvloop.run(serve(config_from_args(args)))
    except ValueError as exc:
        # a fault whose value is malformed (e.g. pong_delay=abc)
        print(f"fastproxy sim: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # typically the port is taken; say so plainly instead of a traceback
        print(f"fastproxy sim: {exc}", file=sys.stderr)
        return 1
    return 0

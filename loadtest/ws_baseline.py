"""Baseline (b): the same job written the usual way with the `websockets` library.

One `websockets` connection upstream; for each ticker frame the merged message is built once
as a dict, then every subscriber gets `await ws.send(json.dumps(message))`: one serialization,
one frame and one write per client per message, awaited in turn. That is what most Python
fan-out servers look like, and what the proxy's shared frames and corked writes replace.

It runs on the stock asyncio loop, as `asyncio.run(main())` in websockets' own examples does;
`--loop uvloop` runs the same code on uvloop, to tell the loop's share from the fan-out's.

    python -m loadtest.ws_baseline --port 9200 --upstream ws://127.0.0.1:9001/v5/public/linear \
        --symbols BTCUSDT,ETHUSDT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import Any

import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from loadtest.wire import Ticker, subscribe_ack, symbol_of, topic_symbol, upstream_subscribe


def dumps(obj: Any) -> str:
    # The stdlib, as usual; compact so the bytes match the other servers' layout.
    return json.dumps(obj, separators=(",", ":"))


class Fanout:
    def __init__(self, symbols: list[str]) -> None:
        self.tickers = {s: Ticker(s) for s in symbols}
        self.subs: dict[str, set[ServerConnection]] = {s: set() for s in symbols}

    async def handler(self, ws: ServerConnection) -> None:
        held: set[str] = set()
        try:
            async for text in ws:
                try:
                    request: dict[str, Any] = json.loads(text)
                except ValueError:
                    continue
                op = request.get("op")
                if op == "ping":
                    await ws.send(dumps({"op": "pong", "timestamp": int(time.time() * 1000)}))
                elif op == "subscribe":
                    await self.subscribe(ws, request, held)
        except ConnectionClosed:
            pass
        finally:
            for symbol in held:
                self.subs[symbol].discard(ws)

    async def subscribe(
        self, ws: ServerConnection, request: dict[str, Any], held: set[str]
    ) -> None:
        accepted, rejected, new = [], [], []
        for arg in request.get("args") or []:
            symbol = symbol_of(str(arg))
            if symbol is None or symbol not in self.tickers:
                rejected.append(str(arg))
                continue
            accepted.append(str(arg))
            if symbol not in held:
                new.append(symbol)
        await ws.send(dumps(subscribe_ack(accepted, rejected, request.get("req_id"))))
        for symbol in new:
            held.add(symbol)
            ticker = self.tickers[symbol]
            # Registered before the snapshot is sent: send() writes before it first yields, so
            # an update published while it drains is queued behind the snapshot, not skipped.
            self.subs[symbol].add(ws)
            if ticker.seq:
                await ws.send(dumps(ticker.message("snapshot")))

    async def upstream(self, url: str) -> None:
        async with connect(url, max_size=None, compression=None) as up:
            await up.send(upstream_subscribe(list(self.tickers)).decode())
            async for raw in up:
                frame = json.loads(raw)
                symbol = topic_symbol(frame.get("topic", ""))
                if symbol is None or symbol not in self.tickers:
                    continue
                ticker = self.tickers[symbol]
                ticker.apply(frame)
                message = ticker.message()
                for ws in list(self.subs[symbol]):
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(dumps(message))


async def run(host: str, port: int, upstream: str, symbols: list[str]) -> None:
    loop = asyncio.get_running_loop()
    fanout = Fanout(symbols)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(fanout.handler, host, port, max_size=2**16, compression=None):
        feed = loop.create_task(fanout.upstream(upstream))
        await asyncio.wait([loop.create_task(stop.wait()), feed], return_when="FIRST_COMPLETED")
        feed.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ws_baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="simulator WS URL")
    parser.add_argument("--symbols", required=True, help="comma-separated linear symbols")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    coro = run(args.host, args.port, args.upstream, symbols)
    if args.loop == "uvloop":
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()

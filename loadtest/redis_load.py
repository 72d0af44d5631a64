"""Redis commands a second that one machine costs, by how it runs its cores.

    python -m loadtest.redis_load --redis-url redis://127.0.0.1:6379/0 --streams 10

For each layout it starts the simulator and the proxy as subprocesses on 127.0.0.1 (a fresh
key prefix each), connects clients that hold every stream, lets it settle, then counts the
Redis server's commands (`INFO commandstats`, so the counts include every other client of
that Redis: use a private one) over a fixed window. Layouts:

- `nodes-1`: one single-process node (the baseline);
- `workers-2`: one node with `--workers 2` (the feed process is the machine's Redis client);
- `nodes-2`: two single-process nodes on the machine, what two cores cost without workers.

Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from redis import Redis
from websockets.asyncio.client import connect

from loadtest.fanout import SYMBOLS, _stop, _wait_port, _wait_ready, free_port

LAYOUTS = {"nodes-1": (1, 1), "workers-2": (1, 2), "nodes-2": (2, 1)}  # (nodes, workers)


def commandstats(redis: Redis) -> dict[str, int]:
    """Calls per command so far, plus the bytes Redis has sent (pub/sub fan-out shows there,
    not among the commands) and its connected clients."""
    stats = redis.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    info = redis.info("stats")
    calls["~net_output_bytes"] = int(info["total_net_output_bytes"])
    calls["~clients"] = int(redis.info("clients")["connected_clients"])
    return calls


async def _hold(ports: list[int], streams: list[str], clients: int, seconds: float) -> int:
    """`clients` connections spread over the nodes, each on every stream, for `seconds`."""
    got = 0

    async def one(port: int) -> None:
        nonlocal got
        async with connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": streams}).decode())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    async for _ in ws:
                        got += 1

    await asyncio.gather(*(one(ports[i % len(ports)]) for i in range(clients)))
    return got


def run_layout(
    name: str, redis_url: str, streams: int, clients: int, settle: float, window: float
) -> dict[str, Any]:
    nodes, workers = LAYOUTS[name]
    prefix = f"rl{uuid.uuid4().hex[:8]}"
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    redis = Redis.from_url(redis_url)
    logs = Path("loadtest/results") / f"redis-load-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(label: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{label}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    sim_port = free_port()
    symbols = ",".join(SYMBOLS[:streams])
    try:
        sim = spawn(
            "sim",
            [
                *(sys.executable, "-m", "fastproxy.sim", "--host", "127.0.0.1"),
                *("--port", str(sim_port), "--symbols", symbols, "--log-level", "WARNING"),
            ],
        )
        _wait_port(sim_port, sim, 30)
        extra = []
        for _ in range(nodes):
            port = free_port()
            argv = [
                *(sys.executable, "-m", "fastproxy", "--host", "127.0.0.1", "--port", str(port)),
                *("--bybit-ws-url", f"ws://127.0.0.1:{sim_port}/v5/public/linear"),
                *("--bybit-rest-url", f"http://127.0.0.1:{sim_port}", "--redis-url", url),
                *("--workers", str(workers), "--log-format", "text"),
            ]
            extra.append((port, spawn(f"{name}-{port}", argv)))
        for port, proc in extra:
            _wait_ready(port, proc, 60)
        args = [f"ticker:{s}" for s in SYMBOLS[:streams]]

        async def sample() -> tuple[dict[str, int], dict[str, int]]:
            await asyncio.sleep(settle)
            before = await asyncio.to_thread(commandstats, redis)
            await asyncio.sleep(window)
            return before, await asyncio.to_thread(commandstats, redis)

        async def measure() -> tuple[tuple[dict[str, int], dict[str, int]], int]:
            ports = [p for p, _ in extra]
            return await asyncio.gather(sample(), _hold(ports, args, clients, settle + window))

        (before, after), got = asyncio.run(measure())
    finally:
        for proc in reversed(procs):
            _stop(proc)
    for key in redis.scan_iter(f"{prefix}:*"):
        redis.delete(key)
    net_out = after.pop("~net_output_bytes") - before.pop("~net_output_bytes")
    redis_clients = after.pop("~clients") - 1  # not this script's own connection
    before.pop("~clients")
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    calls = {k: v for k, v in calls.items() if v > 0 and k not in ("info",)}
    total = sum(calls.values())
    return {
        "layout": name,
        "nodes": nodes,
        "workers": workers,
        "commands_per_s": round(total / window, 1),
        "redis_out_kib_per_s": round(net_out / window / 1024, 1),
        "redis_connections": redis_clients,
        "by_command": {k: round(v / window, 1) for k, v in sorted(calls.items())},
        "messages_received": got,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.redis_load", description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args(argv)
    for name in args.layouts.split(","):
        result = run_layout(
            name, args.redis_url, args.streams, args.clients, args.settle, args.window
        )
        by = ", ".join(f"{k} {v}" for k, v in result["by_command"].items())
        print(
            f"{name:<10} {result['commands_per_s']:>7} commands/s, "
            f"{result['redis_out_kib_per_s']:>7} KiB/s out of Redis, "
            f"{result['redis_connections']} connections  ({by})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

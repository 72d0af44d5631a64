"""Soak: the upstream pool against the simulator for 10 minutes with a fault every 30 s.

Opt-in (`--run-slow`). FASTPROXY_SOAK_SECONDS shortens or lengthens the run. At the end every
topic must be live and flowing, each held exactly once upstream, and the pool's tasks, sockets and
memory must be where they were after warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fastproxy.sim import SimConfig, Simulator
from fastproxy.upstream import UpstreamPool, UpstreamSettings

SOAK_SECONDS = float(os.environ.get("FASTPROXY_SOAK_SECONDS", "600"))
FAULT_EVERY = 30.0
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]
TOPICS = [
    f"{kind}.{symbol}"
    for symbol in SYMBOLS
    for kind in ("tickers", "orderbook.1", "orderbook.50", "publicTrade", "kline.1")
] + ["tickers.NOPEUSDT"]
GOOD = [t for t in TOPICS if "NOPE" not in t]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Counts:
    def __init__(self) -> None:
        self.frames: dict[str, int] = {}
        self.last_at: dict[str, float] = {}
        self.resets = 0
        self.failed: dict[str, str] = {}

    def on_data(self, topic: str, frame: dict[str, Any]) -> None:
        self.frames[topic] = self.frames.get(topic, 0) + 1
        self.last_at[topic] = time.monotonic()

    def on_failed(self, topic: str, reason: str) -> None:
        self.failed[topic] = reason

    def on_reset(self, topic: str) -> None:
        self.resets += 1


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_upstream_soak_with_faults() -> None:
    sim = Simulator(SimConfig(host="127.0.0.1", port=0, seed=3, ticker_interval=0.1))
    await sim.start()
    counts = Counts()
    settings = UpstreamSettings(
        url=sim.ws_url("linear"),
        ping_interval=2.0,
        pong_timeout=2.0,
        silence_timeout=6.0,
        max_topics_per_conn=6,
        backoff_base=0.3,
        backoff_cap=5.0,
        empty_conn_linger=5.0,
    )
    pool = UpstreamPool(
        settings, on_data=counts.on_data, on_failed=counts.on_failed, on_reset=counts.on_reset
    )
    await pool.start()
    loop = asyncio.get_running_loop()

    async def settle(what: str, timeout: float = 25.0) -> float:
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if all(pool.topic_state(t) == "live" for t in GOOD) and all(
                now - counts.last_at.get(t, 0.0) < 5.0 for t in GOOD
            ):
                return now - start
            assert now - start < timeout, f"not recovered {timeout} s after {what}"
            await asyncio.sleep(0.1)

    def churn() -> None:
        pool.unsubscribe(GOOD[:6])
        pool.subscribe(GOOD[:6])
        pool.unsubscribe(GOOD[6:9])

    async def half_dead() -> None:
        sim.set_half_dead(True)
        await asyncio.sleep(8.0)
        sim.set_half_dead(False)

    async def slow_pongs() -> None:
        sim.set_pong_delay(3.0)
        await asyncio.sleep(8.0)
        sim.set_pong_delay(0.0)

    async def refuse_and_drop(status: int) -> None:
        sim.refuse_handshakes(status, 4)
        sim.drop_all()

    async def chaos_order() -> None:
        sim.set_snapshot_before_ack(True)
        sim.drop_all()
        await asyncio.sleep(5.0)
        sim.set_snapshot_before_ack(False)

    async def drop() -> None:
        sim.drop_all()

    async def restart() -> None:
        sim.restart_books()

    async def do_churn() -> None:
        churn()
        await asyncio.sleep(1.0)
        pool.subscribe(GOOD[6:9])

    faults: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("drop_all", drop),
        ("half_dead", half_dead),
        ("refuse 502", lambda: refuse_and_drop(502)),
        ("slow pongs", slow_pongs),
        ("restart_books", restart),
        ("churn", do_churn),
        ("refuse 403", lambda: refuse_and_drop(403)),
        ("snapshot before ack", chaos_order),
    ]

    try:
        pool.subscribe(TOPICS)
        await settle("start")
        assert set(counts.failed) == {"tickers.NOPEUSDT"}
        await asyncio.sleep(2.0)
        gc.collect()
        base_tasks = len(asyncio.all_tasks(loop))
        base_fds = open_fds()
        base_rss = rss_bytes()
        base_conns = pool.status()["connections"]

        started = time.monotonic()
        recoveries: list[tuple[str, float]] = []
        index = 0
        while time.monotonic() - started < SOAK_SECONDS - FAULT_EVERY:
            name, fault = faults[index % len(faults)]
            index += 1
            cycle = time.monotonic()
            await fault()
            await asyncio.sleep(1.0)
            recoveries.append((name, await settle(name)))
            rest = FAULT_EVERY - (time.monotonic() - cycle)
            if rest > 0:
                await asyncio.sleep(rest)

        await settle("the last fault")
        await asyncio.sleep(settings.empty_conn_linger + 2.0)
        gc.collect()
        status = pool.status()
        assert status["topics"] == {"pending": 0, "live": len(GOOD), "failed": 1}, status
        assert sim.subscription_counts() == dict.fromkeys(GOOD, 1)
        assert status["connections"] == status["connected"] == base_conns
        assert sim.connection_count() == base_conns
        assert len(asyncio.all_tasks(loop)) <= base_tasks
        assert open_fds() <= base_fds + 2
        growth = rss_bytes() - base_rss
        assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
        for conn in pool.plan.conns:
            assert len(conn.requests) == 0 and not conn.has_todo
        assert status["reconnects"] >= index // 2
        slowest = max(recoveries, key=lambda r: r[1])
        print(f"soak: {index} faults, slowest recovery {slowest}, status {status}")
    finally:
        await pool.stop()
        await sim.stop()

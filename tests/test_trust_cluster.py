"""Freshness and resume in cluster mode: proxy processes on one Redis, the simulator, real
clients. Times are printed (run with -s); bounds are the contract's, generous for a busy box."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.proxyutil import running_sim
from tests.test_cluster import (  # noqa: F401 (shared_url is a fixture)
    BTC,
    Client,
    clients,
    proxies,
    shared_url,
    until,
)
from tests.test_resume import FAST_TRADES, cut_and_resume

KLINE = "mudrex.futures.kline.1h.BTCUSDT"
BOUND = 5.0


def first_status(client: Client, stream: str, state: str, after: float) -> float | None:
    for t, message in client.statuses:
        if t >= after and message["stream"] == stream and message["state"] == state:
            return t
    return None


async def test_owner_sigkill_followers_told_stale_within_bound_then_live_and_snapshot(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    # klines every 30 s: the quiet stream proves the owner's heartbeat, not its data, counts
    async with (
        running_sim(kline_interval=30.0) as sim,
        proxies(sim, shared_url(), 3) as nodes,
        clients(nodes, 1) as everyone,
    ):
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT", "kline:1h:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 20 for c in everyone), 60, "data everywhere")
        buses = [await n.bus() for n in nodes]
        [owner_index] = [i for i, b in enumerate(buses) if b["streams_owned"] == 2]
        followers = [c for i, c in enumerate(everyone) if i != owner_index]
        epoch = followers[0].of(BTC)[0]["epoch"]
        await asyncio.sleep(4.0)  # a quiet stream stays live on a healthy cluster
        assert all(c.statuses == [] for c in everyone)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await asyncio.to_thread(nodes[owner_index].kill)
        for stream in (BTC, KLINE):
            await until(
                lambda s=stream: all(first_status(c, s, "live", killed_at) for c in followers),
                60,
                f"{stream} live again",
            )
        for c in followers:
            for stream in (BTC, KLINE):
                stale_at = first_status(c, stream, "stale", killed_at)
                live_at = first_status(c, stream, "live", killed_at)
                assert stale_at is not None and live_at is not None and stale_at < live_at
                print(
                    f"\n{stream}: owner SIGKILL -> stale {stale_at - killed_at:.2f} s, "
                    f"live {live_at - killed_at:.2f} s"
                )
                assert stale_at - killed_at < BOUND
            stale = next(m for _, m in c.statuses if m["state"] == "stale")
            assert "stopped publishing" in stale["reason"]
            await until(lambda c=c: any(t > killed_at for t, _, _ in c.got), 30, "data again")
            after = [m for t, _, m in c.got if t > first_status(c, BTC, "live", killed_at)]
            assert after[0]["type"] == "snapshot"
            # the new owner continued the stored numbering: same epoch, seq past the old one
            assert after[0]["epoch"] == epoch
            before = [m for t, _, m in c.got if t < killed_at]
            assert after[0]["seq"] > before[-1]["seq"]


async def test_owner_upstream_silence_reaches_the_followers_clients(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    async with (
        running_sim() as sim,
        proxies(sim, shared_url(), 3) as nodes,
        clients(nodes[:2], 1) as everyone,
    ):
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 20 for c in everyone), 60, "data everywhere")
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        sim.set_half_dead(True)
        await until(
            lambda: all(first_status(c, BTC, "stale", frozen_at) for c in everyone),
            30,
            "stale on both nodes",
        )
        for c in everyone:
            print(
                f"\nexchange silent -> stale {first_status(c, BTC, 'stale', 0) - frozen_at:.2f} s"
            )
            assert first_status(c, BTC, "stale", 0) - frozen_at < BOUND
            assert "nothing received" in c.statuses[0][1]["reason"]
        # a node that did not hold the stream learns it is stale from what the owner stored
        joiner = await Client.open(nodes[2])
        try:
            await joiner.subscribe("ticker:BTCUSDT")
            await until(lambda: joiner.statuses, 15, "the joiner's status")
            assert joiner.statuses[0][1]["state"] == "stale"
            assert joiner.statuses[0][1]["since"] == everyone[0].statuses[0][1]["since"]
            sim.set_half_dead(False)
            await until(
                lambda: all(first_status(c, BTC, "live", frozen_at) for c in [*everyone, joiner]),
                60,
                "live",
            )
        finally:
            await joiner.close()


async def test_client_cut_for_2s_resumes_on_another_node(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    async with running_sim(**FAST_TRADES) as sim, proxies(sim, shared_url(), 2) as nodes:
        # cut from node 0, resumes on node 1 (where the witness holds the stream)
        await cut_and_resume(nodes[0], nodes[1])


async def test_client_cut_for_2s_resumes_on_a_node_that_did_not_hold_the_stream(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    async with running_sim(**FAST_TRADES) as sim, proxies(sim, shared_url(), 2) as nodes:
        # node 1 has never seen the stream: the replay comes from the history in Redis, while
        # live Messages keep arriving there during the fetch, and the two are joined
        try:
            await cut_and_resume(nodes[0], nodes[1], witness_on=nodes[0])
        except AssertionError:
            print(f"--- node :{nodes[1].port} log ---\n{nodes[1].tail(40)}")
            raise

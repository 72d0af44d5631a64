"""Order books and liquidations end to end: the real server, the simulator as the exchange, a real
client library. The client applies every update to its snapshot and must hold exactly the
simulator's book at every updateId, through each book fault the simulator's fault API offers."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import orjson

from fastproxy.sim import Simulator
from tests.proxyutil import (
    client,
    http_get,
    http_json,
    recv_data,
    running_proxy,
    running_sim,
    subscribe,
)

TOPIC = "orderbook.50.BTCUSDT"
STREAM = "mudrex.futures.orderbook.50.BTCUSDT"


class BookClient:
    """What a careful downstream client does: snapshot replaces, an update must follow."""

    def __init__(self, truth: dict[int, Any]) -> None:
        self.truth = truth
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.u: int | None = None
        self.seq: int | None = None
        self.snapshots: list[int] = []
        self.updates = 0

    def take(self, message: dict[str, Any]) -> None:
        data = message["data"]
        assert message["stream"] == STREAM
        if self.seq is not None:
            assert message["seq"] == self.seq + 1
        if message["type"] == "snapshot":
            self.bids = dict(map(tuple, data["bids"]))
            self.asks = dict(map(tuple, data["asks"]))
            self.snapshots.append(data["updateId"])
        else:
            assert message["type"] == "update"
            assert self.u is not None and data["updateId"] == self.u + 1
            for side, levels in ((self.bids, data["bids"]), (self.asks, data["asks"])):
                for price, size in levels:
                    if float(size) == 0:
                        side.pop(price, None)
                    else:
                        side[price] = size
            self.updates += 1
        self.u, self.seq = data["updateId"], message["seq"]
        bids, asks = self.truth[self.u]
        assert self.bids == dict(map(tuple, bids)), f"bids differ at u={self.u}"
        assert self.asks == dict(map(tuple, asks)), f"asks differ at u={self.u}"
        assert list(self.bids) == [p for p, _ in data["bids"]] or message["type"] == "update"


async def take(ws: Any, book: BookClient, count: int) -> None:
    for _ in range(count):
        book.take(await recv_data(ws, STREAM))


async def until_snapshot(ws: Any, book: BookClient, timeout: float = 15.0) -> None:
    """Read (and check) until a new snapshot arrives."""
    seen = len(book.snapshots)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(book.snapshots) == seen:
        book.take(await recv_data(ws, STREAM, max(0.1, deadline - loop.time())))


def sim_fault(sim: Simulator, query: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sim.http_url}/_sim/fault?{query}", timeout=10) as response:
        return orjson.loads(response.read())


async def test_the_client_book_is_the_exchange_book_through_every_fault() -> None:
    async with running_sim() as sim, running_proxy(sim) as app, client(app) as ws:
        truth = sim.record_books(TOPIC)
        ack = await subscribe(ws, "orderbook:50:BTCUSDT")
        assert ack["success"] is True and ack["args"] == ["orderbook:50:BTCUSDT"]
        book = BookClient(truth)
        await take(ws, book, 10)
        assert book.snapshots and book.updates >= 5
        assert 0 < len(book.bids) <= 50 and 0 < len(book.asks) <= 50

        faults = [
            ("skip_u", "gap"),
            ("drop_delta", "gap"),
            ("repeat_u", "repeat"),
            ("backward_u", "backward"),
            ("crossed_delta", "crossed"),
            ("resend_snapshot", "snapshot"),
        ]
        for name, _ in faults:
            answer = await asyncio.to_thread(sim_fault, sim, f"name={name}&topic={TOPIC}")
            assert answer["ok"] and answer["result"][name] == TOPIC, answer
            await until_snapshot(ws, book)
            await take(ws, book, 5)  # and the updates go on from the new snapshot
        answer = await asyncio.to_thread(sim_fault, sim, "name=restart_books")
        assert answer["result"] == {"books": 1}, answer
        await until_snapshot(ws, book)
        assert book.snapshots[-1] == 1  # the exchange restarted its book at u=1
        await take(ws, book, 5)

        # a late joiner gets the whole current book at once, then updates that follow from it
        async with client(app) as late:
            await subscribe(late, "orderbook:50:BTCUSDT")
            joiner = BookClient(truth)
            first = await recv_data(late, STREAM)
            assert first["type"] == "snapshot"
            joiner.take(first)
            await take(late, joiner, 5)
            assert joiner.updates == 5

        _, stats = await http_json(app, "/stats")
        resyncs = stats["feed"]["book_resyncs"]
        for _, reason in faults:
            assert resyncs[reason] >= 1, (reason, resyncs)
        assert resyncs["restart"] >= 1
        assert resyncs["gap"] >= 2
        status, body = await asyncio.to_thread(http_get, app, "/metrics")
        assert status == 200
        assert b'fastproxy_book_resyncs_total{reason="crossed"}' in body


async def test_depth_1_and_a_deep_book_stay_within_their_depth() -> None:
    async with running_sim() as sim, running_proxy(sim) as app, client(app) as ws:
        await subscribe(ws, "orderbook:1:ETHUSDT", "orderbook:200:ETHUSDT")
        l1 = await recv_data(ws, "mudrex.futures.orderbook.1.ETHUSDT")
        assert l1["type"] == "snapshot"
        assert len(l1["data"]["bids"]) == 1 and len(l1["data"]["asks"]) == 1
        deep = await recv_data(ws, "mudrex.futures.orderbook.200.ETHUSDT")
        assert deep["type"] == "snapshot"
        assert len(deep["data"]["bids"]) == 200 and len(deep["data"]["asks"]) == 200
        bids = [float(p) for p, _ in deep["data"]["bids"]]
        asks = [float(p) for p, _ in deep["data"]["asks"]]
        assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
        assert bids[0] < asks[0]
        for _ in range(5):  # depth 1: every message is complete
            m = await recv_data(ws, "mudrex.futures.orderbook.1.ETHUSDT")
            assert m["type"] == "snapshot" and len(m["data"]["bids"]) == 1


async def test_liquidations_arrive_as_events_in_exchange_order() -> None:
    async with running_sim(liquidation_rate=0.0) as sim, running_proxy(sim) as app:
        async with client(app) as ws:
            ack = await subscribe(ws, "liquidation:solusdt")
            assert ack["args"] == ["liquidation:solusdt"] and ack["success"] is True
            await asyncio.sleep(0.3)  # the upstream subscription is in place
            sim.inject_liquidation("SOLUSDT")
            sim.inject_liquidation("SOLUSDT")
            message = await recv_data(ws, "mudrex.futures.liquidation.SOLUSDT")
            assert message["type"] == "snapshot"
            events = message["data"]
            assert isinstance(events, list) and events
            for event in events:
                assert list(event) == ["symbol", "side", "price", "quantity", "time"]
                assert event["symbol"] == "SOLUSDT" and event["side"] in ("buy", "sell")
                assert float(event["price"]) > 0 and float(event["quantity"]) > 0
            times = [event["time"] for event in events]
            assert times == sorted(times)
            bad = await subscribe(ws, "liquidation:")
            assert bad["success"] is False

"""`--workers N` end to end: a real supervisor process with its workers on one port, the
simulator as the exchange, real WebSocket clients.

Which worker a client lands on is the kernel's choice (SO_REUSEPORT), so the tests open
enough clients that both workers serve some, and check that through the node's /stats, which
lists every worker's clients whichever worker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fastproxy.client import Client as FastClient
from fastproxy.client import Event
from fastproxy.sim import Simulator
from tests.conftest import free_port
from tests.proxyutil import running_sim
from tests.test_books_e2e import STREAM as BOOK_STREAM
from tests.test_books_e2e import TOPIC as BOOK_TOPIC
from tests.test_client import record_trades
from tests.test_cluster import Client, Proxy, shared_url, until, until_async  # noqa: F401
from tests.test_cluster_books import ARG as BOOK_ARG
from tests.test_cluster_books import checker, replay
from tests.test_cluster_bus import (  # noqa: F401 (a fixture)
    PrivateRedis,
    bus_url,
    private_redis,
)

BTC = "mudrex.futures.ticker.BTCUSDT"
ETH = "mudrex.futures.ticker.ETHUSDT"
CLIENTS = 16  # both workers get some: all on one has odds of 2 in 65536


class Node:
    """`python -m fastproxy --workers N` in its own process (the supervisor and its workers)."""

    def __init__(self, sim: Simulator, workers: int = 2, *extra: str) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="fastproxy-workers-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "fastproxy",
                "--workers", str(workers),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--bybit-ws-url", sim.ws_url("linear"),
                "--bybit-rest-url", sim.http_url,
                "--unsubscribe-linger", "0.5",
                "--log-format", "text",
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.workers = workers

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def get(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    async def stats(self) -> dict[str, Any]:
        return (await asyncio.to_thread(self.get, "/stats"))[1]

    async def wait_all_ready(self, timeout: float = 60.0) -> None:
        """Every worker up, linked and reporting."""

        async def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.tail()}")
            try:
                workers = (await self.stats())["workers"]
            except OSError:
                return False
            return len(workers) == self.workers and all(w["ready"] for w in workers)

        await until_async(ready, timeout, "every worker ready")

    async def worker_clients(self) -> dict[int, int]:
        return {w["pid"]: w["connected"] for w in (await self.stats())["workers"]}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
        return self.process.returncode

    def tail(self, lines: int = 40) -> str:
        with open(self.log.name, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")


@contextlib.asynccontextmanager
async def node_of(sim: Simulator, workers: int = 2, *extra: str) -> AsyncIterator[Node]:
    node = Node(sim, workers, *extra)
    try:
        await node.wait_all_ready()
        yield node
    except BaseException:
        print(f"--- node :{node.port} log ---\n{node.tail()}")
        raise
    finally:
        await asyncio.to_thread(node.stop)


async def open_clients(node: Node, count: int, *args: str) -> list[Client]:
    made = []
    for _ in range(count):
        ws = await connect(node.ws_url, max_size=2**22, ping_interval=None, open_timeout=30)
        client = Client(ws)
        if args:
            await client.subscribe(*args)
        made.append(client)
    return made


async def spread(node: Node, count: int) -> dict[int, int]:
    """Wait until the node counts `count` clients; their share per worker pid."""

    async def counted() -> bool:
        return sum((await node.worker_clients()).values()) == count

    await until_async(counted, 20, f"{count} clients counted")
    return await node.worker_clients()


async def close_all(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# -- the tests -------------------------------------------------------------------------------


async def test_two_workers_share_the_port_one_upstream_subscription_same_bytes() -> None:
    async with running_sim() as sim, node_of(sim) as node:
        clients = await open_clients(node, CLIENTS, "ticker:BTCUSDT", "ticker:ETHUSDT")
        try:
            share = await spread(node, CLIENTS)
            assert len(share) == 2 and all(share.values()), share
            await until(lambda: all(len(c.of(BTC)) >= 5 for c in clients), 20, "5 BTC each")
            # The machine subscribed each topic upstream once, whatever the workers hold.
            counts = sim.subscription_counts()
            assert counts.get("tickers.BTCUSDT") == 1 and counts.get("tickers.ETHUSDT") == 1
            stats = await node.stats()
            assert stats["upstream"]["topics"]["live"] == 2
            assert stats["hub"]["streams"] == 2
            assert stats["hub"]["subscriptions"] == 2 * CLIENTS
            # Every client on either worker got the same bytes for the same seq (a late
            # joiner's first one is that Message marked snapshot).
            for stream in (BTC, ETH):
                frames: dict[tuple[int, str], bytes] = {}
                for client in clients:
                    for _, raw, message in client.got:
                        if message["stream"] == stream:
                            key = (message["seq"], message["type"])
                            assert frames.setdefault(key, raw) == raw, (stream, key)
                    seqs = [m["seq"] for m in client.of(stream)]
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
                    assert client.of(stream)[0]["type"] == "snapshot"
        finally:
            await close_all(clients)


async def test_node_stats_and_metrics_whichever_worker_answers() -> None:
    async with running_sim() as sim, node_of(sim) as node:
        clients = await open_clients(node, CLIENTS, "ticker:BTCUSDT")
        try:
            await spread(node, CLIENTS)
            await until(lambda: all(c.of(BTC) for c in clients), 20, "data on every client")
            answered_by = set()
            last_sent = 0
            for _ in range(12):
                stats = await node.stats()
                answered_by.add(stats["worker"]["pid"])
                assert stats["connections"]["connected"] == CLIENTS
                assert stats["connections"]["messages_sent"] >= last_sent  # never backwards
                last_sent = stats["connections"]["messages_sent"]
                assert {w["pid"] for w in stats["workers"]} == set(await node.worker_clients())
                await asyncio.sleep(0.1)
            assert len(answered_by) == 2, "both workers answered /stats"
            status, health = await asyncio.to_thread(node.get, "/health")
            assert status == 200 and health["status"] == "healthy"
            assert health["connections"] == CLIENTS
            assert (await asyncio.to_thread(node.get, "/ready"))[0] == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics") as r:
                metrics = r.read().decode()
            assert f"fastproxy_clients {float(CLIENTS)}" in metrics
            assert 'fastproxy_worker_clients{worker="0"}' in metrics
            assert "fastproxy_workers 2.0" in metrics
        finally:
            await close_all(clients)


async def test_max_clients_total_holds_for_the_machine() -> None:
    async with running_sim() as sim, node_of(sim, 2, "--max-clients-total", "5") as node:
        clients = await open_clients(node, 12)
        try:
            await until(lambda: sum(1 for c in clients if c.task.done()) == 7, 20, "7 refused")
            refused = [c for c in clients if c.task.done()]
            assert all(c.ws.close_code == 4003 for c in refused)
            await until_async(lambda: _connected(node, 5), 10, "the node counts 5 clients")
            stats = await node.stats()
            assert stats["connections"]["drops"].get("connection_limit", 0) >= 1
        finally:
            await close_all(clients)


async def _connected(node: Node, count: int) -> bool:
    return (await node.stats())["connections"]["connected"] == count


async def test_a_killed_worker_is_replaced_and_its_clients_reconnect() -> None:
    async with running_sim() as sim, node_of(sim) as node:
        clients = await open_clients(node, CLIENTS, "ticker:BTCUSDT")
        try:
            share = await spread(node, CLIENTS)
            await until(lambda: all(c.of(BTC) for c in clients), 20, "data on every client")
            victim = next(pid for pid, count in share.items() if count)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: any(c.task.done() for c in clients), 10, "victims cut off")
            cut = [c for c in clients if c.task.done()]
            assert len(cut) == share[victim]
            last_seen = max(c.of(BTC)[-1]["seq"] for c in cut)

            async def replaced() -> bool:
                stats = await node.stats()
                pids = {w["pid"] for w in stats["workers"] if w["ready"]}
                return len(pids) == 2 and victim not in pids and stats["node"]["restarts"] == 1

            await until_async(replaced, 30, "a new worker in the dead one's place")
            again = await open_clients(node, len(cut), "ticker:BTCUSDT")
            clients += again
            await until(lambda: all(len(c.of(BTC)) >= 2 for c in again), 20, "data again")
            for client in again:
                # The stream stayed upstream (its seq line continues) and nothing is repeated.
                assert client.of(BTC)[0]["seq"] > last_seen
            assert sim.subscription_counts().get("tickers.BTCUSDT") == 1
            assert node.process.poll() is None
        finally:
            await close_all(clients)


async def test_sigterm_drains_every_worker_with_1001_and_exits_0() -> None:
    async with running_sim() as sim:
        node = Node(sim)
        try:
            await node.wait_all_ready()
            clients = await open_clients(node, CLIENTS, "ticker:BTCUSDT")
            share = await spread(node, CLIENTS)
            assert all(share.values()), share
            await until(lambda: all(c.of(BTC) for c in clients), 20, "data on every client")
            node.process.send_signal(signal.SIGTERM)
            await until(lambda: all(c.task.done() for c in clients), 20, "every client closed")
            assert [c.ws.close_code for c in clients] == [1001] * CLIENTS
            code = await asyncio.to_thread(node.process.wait, 20)
            assert code == 0, node.tail()
            for pid in share:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        finally:
            await asyncio.to_thread(node.stop)


async def test_workers_do_not_outlive_the_supervisor() -> None:
    """No worker serves without a feed: the supervisor killed, they close with 1001 and exit."""
    async with running_sim() as sim:
        node = Node(sim)
        try:
            await node.wait_all_ready()
            clients = await open_clients(node, CLIENTS, "ticker:BTCUSDT")
            share = await spread(node, CLIENTS)
            await until(lambda: all(c.of(BTC) for c in clients), 20, "data on every client")
            node.process.send_signal(signal.SIGKILL)
            await until(lambda: all(c.task.done() for c in clients), 20, "every client closed")
            assert [c.ws.close_code for c in clients] == [1001] * CLIENTS

            def gone(pid: int) -> bool:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return True
                return False

            await until(lambda: all(gone(pid) for pid in share), 20, "workers exited")
        finally:
            await asyncio.to_thread(node.stop)


async def test_a_worker_that_keeps_dying_stops_the_node_with_status_1() -> None:
    async with running_sim() as sim:
        node = Node(sim)
        try:
            await node.wait_all_ready()
            deadline = time.monotonic() + 120
            killed: set[int] = set()
            while node.process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, KeyError):
                    for worker in (await node.stats())["workers"]:
                        if worker["id"] == 0 and worker["pid"] not in killed:
                            killed.add(worker["pid"])
                            os.kill(worker["pid"], signal.SIGKILL)
                await asyncio.sleep(0.1)
            assert node.process.poll() == 1, node.tail()
            assert len(killed) == 5
            assert "worker keeps dying" in node.tail()
        finally:
            await asyncio.to_thread(node.stop)


async def test_reconnect_after_close_gets_a_snapshot_on_any_worker() -> None:
    """Clients come and go over both workers; each join is a snapshot of the live seq line."""
    async with running_sim() as sim, node_of(sim) as node:
        holder = (await open_clients(node, 1, "ticker:BTCUSDT"))[0]
        try:
            await until(lambda: len(holder.of(BTC)) >= 2, 20, "holder data")
            for _ in range(6):
                ws = await connect(node.ws_url, ping_interval=None)
                try:
                    await ws.send(
                        orjson.dumps({"op": "subscribe", "args": ["ticker:BTCUSDT"]}).decode()
                    )
                    first = None
                    while first is None:
                        message = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                        if message.get("stream") == BTC:
                            first = message
                    assert first["type"] == "snapshot"
                    assert first["seq"] >= holder.of(BTC)[0]["seq"]
                finally:
                    with contextlib.suppress(ConnectionClosed):
                        await ws.close()
        finally:
            await holder.close()


def tcp_peer_ports(pid: int) -> set[int]:
    """Remote ports of the TCP connections process `pid` holds (IPv4, from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[2].rpartition(":")[2], 16))
    return ports


async def test_with_redis_the_machine_is_one_node_and_one_redis_client(
    private_redis: PrivateRedis,  # noqa: F811
) -> None:
    """A `--workers 2` node and a single-process node in one cluster: one upstream
    subscription for the cluster, the same bytes everywhere, and the workers never talk to
    Redis (the supervisor is the machine's one client)."""
    url = bus_url(private_redis.url, "tw", 3)
    async with running_sim() as sim, node_of(sim, 2, "--redis-url", url) as node:
        other = Proxy(sim, url)
        try:
            await other.wait_ready()
            on_workers = await open_clients(node, CLIENTS, "ticker:BTCUSDT")
            on_other = Client(await connect(other.ws_url, ping_interval=None))
            await on_other.subscribe("ticker:BTCUSDT")
            clients = [*on_workers, on_other]
            try:
                share = await spread(node, CLIENTS)
                assert all(share.values()), share
                await until(lambda: all(len(c.of(BTC)) >= 5 for c in clients), 30, "data")
                assert sim.subscription_counts().get("tickers.BTCUSDT") == 1
                frames: dict[tuple[int, str], bytes] = {}
                for client in clients:
                    for _, raw, message in client.got:
                        key = (message["seq"], message["type"])
                        assert frames.setdefault(key, raw) == raw, key
                stats = await node.stats()
                assert stats["bus"]["engine"] == "local+redis"

                async def both_nodes_seen() -> bool:
                    # the node registry is read on the bus's next pass, and the figures reach
                    # the workers' /stats on their next report: wait for both, do not race them
                    return (await node.stats())["bus"]["nodes"] == 2

                await until_async(both_nodes_seen, 15, "the machine and the other node counted")
                assert private_redis.port in tcp_peer_ports(stats["node"]["pid"])
                for worker in share:
                    assert private_redis.port not in tcp_peer_ports(worker)
            finally:
                await close_all(clients)
        finally:
            other.stop()


@pytest.mark.parametrize("bus", ["alone", "redis"])
async def test_a_client_of_a_killed_worker_resumes_on_another_and_misses_no_trade(
    bus: str,
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    """The machine's history lives in the feed process (alone) or in Redis (a cluster), so a
    client whose worker was killed resumes on the worker it reconnects to and gets every trade
    exactly once, no gap."""
    extra = ["--redis-url", shared_url()] if bus == "redis" else []
    async with (
        running_sim(trade_rate=40.0) as sim,
        # the linger keeps the stream upstream while its only client is away (on a real node
        # other clients do that), so that there is something to resume
        node_of(sim, 2, "--unsubscribe-linger", "10", *extra) as node,
    ):
        sent = record_trades(sim, "BTCUSDT")
        received: list[str] = []
        gaps: list[Event] = []
        resumed_on: set[int] = set()
        async with FastClient(node.ws_url, backoff_base=0.05, backoff_cap=0.5) as client:
            await client.subscribe("trade:BTCUSDT")
            loop = asyncio.get_running_loop()
            kill_at = loop.time() + 1.5
            victim: int | None = None
            done_at: float | None = None
            async with asyncio.timeout(40):
                async for event in client:
                    if event.kind == "gap":
                        gaps.append(event)
                    if event.kind == "data" and event.arg == "trade:BTCUSDT":
                        received.extend(trade["id"] for trade in event.message["data"])
                    if victim is None and loop.time() >= kill_at:
                        share = await node.worker_clients()
                        victim = next(pid for pid, count in share.items() if count)
                        killed_at, before = loop.time(), len(received)
                        os.kill(victim, signal.SIGKILL)
                    if client.reconnects and done_at is None:
                        done_at = loop.time() + 2.0
                        back_after = loop.time() - killed_at
                    if done_at is not None and loop.time() > done_at:
                        break
            share = await node.worker_clients()
            resumed_on = {pid for pid, count in share.items() if count}
        assert victim is not None and client.reconnects >= 1
        assert victim not in resumed_on
        assert gaps == []
        # every trade the exchange sent between the client's first and last, exactly once
        first, last = sent.index(received[0]), sent.index(received[-1])
        assert received == sent[first : last + 1]
        assert len(received) > 100
        assert sim.subscription_counts().get("publicTrade.BTCUSDT") == 1
        print(
            f"worker killed: the client was back {back_after:.2f} s later on another worker; "
            f"{len(received)} trades, {before} before the kill, each once, no gap"
        )


async def test_book_joiners_on_every_worker_get_the_whole_book_at_once_and_keep_it() -> None:
    """Each worker keeps its own copy of the book: the first joiner on a worker is served the
    feed's whole book, later ones that worker's copy; every client's book stays the
    exchange's at every updateId."""
    async with running_sim() as sim, node_of(sim) as node:
        truth = sim.record_books(BOOK_TOPIC)
        clients: list[Client] = []
        try:
            for _ in range(CLIENTS):
                client = (await open_clients(node, 1, BOOK_ARG))[0]
                clients.append(client)
                # served at once (the exchange sends no snapshot on its own after the first)
                await until(lambda c=client: bool(c.of(BOOK_STREAM)), 10, "a joiner's book")
                opening = client.of(BOOK_STREAM)[0]
                assert opening["type"] == "snapshot"
                assert len(opening["data"]["bids"]) == 50 and len(opening["data"]["asks"]) == 50
            share = await spread(node, CLIENTS)
            assert len(share) == 2 and all(n >= 2 for n in share.values()), share
            await until(
                lambda: all(len(c.of(BOOK_STREAM)) >= 5 for c in clients), 20, "updates for all"
            )
            for client in clients:
                book = checker(truth)
                replay(book, client)
                assert book.updates >= 4 and len(book.snapshots) == 1
            assert sim.subscription_counts().get(BOOK_TOPIC) == 1
        finally:
            await close_all(clients)


async def test_the_machine_fetches_the_symbol_list_once_and_every_worker_checks_it() -> None:
    async with running_sim() as sim, node_of(sim) as node:

        async def known() -> bool:
            return (await node.stats())["catalogue"].get("known", False)

        await until_async(known, 20, "the symbol list known")
        sockets = [
            await connect(node.ws_url, ping_interval=None, open_timeout=30) for _ in range(CLIENTS)
        ]
        try:
            share = await spread(node, CLIENTS)
            assert all(share.values()), share
            for ws in sockets:  # refused by name on every worker: the list is there
                await ws.send(
                    orjson.dumps({"op": "subscribe", "args": ["ticker:NOSUCHUSDT"]}).decode()
                )
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                assert reply["success"] is False, reply
                assert "unknown symbol NOSUCHUSDT" in orjson.dumps(reply).decode(), reply
            # one fetch for the machine, not one per worker
            assert sim.http_requests["/v5/market/instruments-info"] == 1
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

"""Cluster mode end to end: several proxy processes on one Redis (or a 3-shard Redis Cluster),
the simulator as the exchange, real WebSocket clients.

Each test uses its own key and channel prefix, so it never sees another run's keys. Deadlines
are generous and nothing asserts exact timings: the machine may be small and busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from fastproxy.sim import Simulator
from fastproxy.streams import INTERVALS
from tests.conftest import free_port
from tests.proxyutil import running_sim
from tests.test_cluster_bus import (  # noqa: F401 (a fixture)
    PrivateRedis,
    delete_prefix,
    private_redis,
)

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "BNBUSDT", "ADAUSDT"]
BTC = "mudrex.futures.ticker.BTCUSDT"


# -- proxy processes ------------------------------------------------------------------------


class Proxy:
    """One `python -m fastproxy` node in its own process."""

    def __init__(self, sim: Simulator, redis_url: str, max_connections: int = 10) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="fastproxy-node-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "fastproxy",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--bybit-ws-url", sim.ws_url("linear"),
                "--bybit-rest-url", sim.http_url,
                "--redis-url", redis_url,
                "--redis-max-connections", str(max_connections),
                "--unsubscribe-linger", "0.5",
                "--log-format", "text",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

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

    async def http(self, path: str) -> tuple[int, Any]:
        return await asyncio.to_thread(self.get, path)

    async def bus(self) -> dict[str, Any]:
        return (await self.http("/stats"))[1]["bus"]

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if (await self.http("/ready"))[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"node not ready in {timeout} s:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()

    def tail(self, lines: int = 30) -> str:
        with open(self.log.name, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")


@contextlib.asynccontextmanager
async def proxies(
    sim: Simulator, redis_url: str, count: int, max_connections: int = 10
) -> AsyncIterator[list[Proxy]]:
    nodes = [Proxy(sim, redis_url, max_connections) for _ in range(count)]
    try:
        await asyncio.gather(*(node.wait_ready() for node in nodes))
        yield nodes
    except BaseException:
        for node in nodes:
            if node.process.poll() is None or node.process.returncode not in (0, -9):
                print(f"--- node :{node.port} log ---\n{node.tail()}")
        raise
    finally:
        await asyncio.gather(*(asyncio.to_thread(node.stop) for node in nodes))


# -- clients --------------------------------------------------------------------------------


class Client:
    """A WebSocket client that records every data message with its arrival time."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.got: list[tuple[float, bytes, dict[str, Any]]] = []
        self.statuses: list[tuple[float, dict[str, Any]]] = []  # freshness, with arrival time
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, node: Proxy) -> Client:
        ws = await connect(node.ws_url, max_size=2**22, ping_interval=None, open_timeout=30)
        return cls(ws)

    async def subscribe(self, *args: str) -> None:
        await self.ws.send(orjson.dumps({"op": "subscribe", "args": list(args)}).decode())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                message = orjson.loads(raw)
                if message.get("op") == "status":
                    self.statuses.append((loop.time(), message))
                elif "stream" in message:
                    self.got.append((loop.time(), raw, message))  # type: ignore[arg-type]

    def of(self, stream: str) -> list[dict[str, Any]]:
        return [m for _, _, m in self.got if m["stream"] == stream]

    def raw_of(self, stream: str) -> dict[int, bytes]:
        return {m["seq"]: raw for _, raw, m in self.got if m["stream"] == stream}

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def clients(nodes: list[Proxy], per_node: int) -> AsyncIterator[list[Client]]:
    made = await asyncio.gather(*(Client.open(n) for n in nodes for _ in range(per_node)))
    try:
        yield list(made)
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


# -- checks ---------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


async def until_async(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.2)


def assert_exactly_once(messages: list[dict[str, Any]]) -> None:
    """A first snapshot, then every seq once, in order, with no gap."""
    assert messages, "no data"
    assert messages[0]["type"] == "snapshot"
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert all(m["type"] == "update" for m in messages[1:]), "an unannounced snapshot"


def assert_no_duplicate_and_jumps_marked(messages: list[dict[str, Any]]) -> None:
    """Across failover or outage: never the same seq twice in a row, never a silent jump."""
    for prev, message in itertools.pairwise(messages):
        if message["seq"] != prev["seq"] + 1:
            assert message["type"] == "snapshot", (prev["seq"], message["seq"], message["type"])


def longest_silence(client: Client, stream: str, since: float) -> float:
    times = [t for t, _, m in client.got if m["stream"] == stream and t >= since]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def unique_url(base: str, **options: Any) -> str:
    query = "&".join(
        f"{k}={v}" for k, v in {"prefix": f"c{os.urandom(5).hex()}", **options}.items()
    )
    return f"{base}?{query}"


@pytest.fixture
async def shared_url(redis_url: str) -> AsyncIterator[Callable[..., str]]:
    """Unique bus URLs on the shared Redis; their keys are removed after the test."""
    made: list[str] = []

    def make(**options: Any) -> str:
        made.append(unique_url(redis_url, **options))
        return made[-1]

    yield make
    for url in made:
        await delete_prefix(redis_url, prefix_of(url))


def prefix_of(url: str) -> str:
    return url.split("prefix=", 1)[1].split("&", 1)[0]


def assert_same_bytes_everywhere(everyone: list[Client], stream: str) -> int:
    """Every seq that several clients received is the same bytes on all of them."""
    by_seq: dict[int, bytes] = {}
    shared = 0
    for c in everyone:
        for i, (seq, raw) in enumerate(c.raw_of(stream).items()):
            if i == 0:
                continue  # each client's first message is its own snapshot
            if seq in by_seq:
                assert by_seq[seq] == raw, f"seq {seq} differs between nodes"
                shared += 1
            else:
                by_seq[seq] = raw
    return shared


class SubscriptionWatch:
    """Samples the simulator's upstream subscription count for a topic in the background."""

    def __init__(self, sim: Simulator, topic: str) -> None:
        self.sim, self.topic = sim, topic
        self.samples: list[int] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append(self.sim.subscription_counts().get(self.topic, 0))
            await asyncio.sleep(0.05)

    def stop(self) -> list[int]:
        self.task.cancel()
        return self.samples


# -- tests ----------------------------------------------------------------------------------


async def test_three_nodes_one_upstream_subscription_every_message_once(
    redis_url: str, shared_url: Callable[..., str]
) -> None:
    url = shared_url()
    async with running_sim() as sim, proxies(sim, url, 3) as nodes, clients(nodes, 4) as everyone:
        watch = SubscriptionWatch(sim, "tickers.BTCUSDT")
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 60 for c in everyone), 60, "60 messages each")
        samples = watch.stop()
        # never more than one upstream subscription for the topic, in the whole cluster
        assert max(samples) == 1 and sim.subscription_counts()["tickers.BTCUSDT"] == 1
        for c in everyone:
            assert_exactly_once(c.of(BTC))
        assert assert_same_bytes_everywhere(everyone, BTC) > 100
        buses = [await n.bus() for n in nodes]
        assert sorted(b["streams_owned"] for b in buses) == [0, 0, 1]
        assert sorted(b["streams_following"] for b in buses) == [0, 1, 1]
        assert all(b["healthy"] and b["mode"] == "standalone" for b in buses)
        # the owner publishes once; the two followers, and nobody else, listen
        client = Redis.from_url(redis_url)
        try:
            channel = f"{prefix_of(url)}:{{{BTC}}}:ch"
            assert await client.pubsub_numsub(channel) == [(channel.encode(), 2)]
        finally:
            await client.aclose()


async def test_killed_owner_is_replaced_and_its_interest_expires(
    redis_url: str, shared_url: Callable[..., str]
) -> None:
    ttl = 3
    url = shared_url(ttl=ttl)
    async with running_sim() as sim, proxies(sim, url, 3) as nodes, clients(nodes, 3) as everyone:
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 20 for c in everyone), 60, "data everywhere")
        buses = [await n.bus() for n in nodes]
        [owner_index] = [i for i, b in enumerate(buses) if b["streams_owned"] == 1]
        owner, dead_id = nodes[owner_index], buses[owner_index]["node_id"]
        survivors = [n for n in nodes if n is not owner]
        watched = [c for i, c in enumerate(everyone) if i // 3 != owner_index]
        killed_at = asyncio.get_running_loop().time()
        await asyncio.to_thread(owner.kill)
        before = [len(c.of(BTC)) for c in watched]
        await until(
            lambda: all(len(c.of(BTC)) >= n + 30 for c, n in zip(watched, before, strict=True)),
            60,
            "survivors' clients continue",
        )
        for c in watched:
            messages = c.of(BTC)
            assert_no_duplicate_and_jumps_marked(messages)
            assert [m["seq"] for m in messages] == sorted({m["seq"] for m in messages})
            # the takeover came within the TTL (doubled: a busy machine is slow to notice)
            assert longest_silence(c, BTC, killed_at - 1) < ttl * 2 + 2
        await until(lambda: sim.subscription_counts().get("tickers.BTCUSDT") == 1, 30)
        # the dead node's interest and registration lapse by themselves: nobody cleaned up
        client = Redis.from_url(redis_url)
        try:
            prefix = prefix_of(url)
            interest = f"{prefix}:{{{BTC}}}:interest"

            async def dead_gone() -> bool:
                seconds, micros = await client.time()
                now = int(seconds) * 1000 + int(micros) // 1000
                live = set(await client.zrangebyscore(interest, now, "+inf"))
                nodes_live = set(await client.zrangebyscore(f"{prefix}:nodes", now, "+inf"))
                return dead_id.encode() not in live | nodes_live and len(live) == 2

            await until_async(dead_gone, ttl * 3, "dead node's interest to expire")
            owned = [(await n.bus())["streams_owned"] for n in survivors]
            assert sorted(owned) == [0, 1]
        finally:
            await client.aclose()


async def test_frozen_owner_wakes_without_reused_numbers(shared_url: Callable[..., str]) -> None:
    """An owner frozen (SIGSTOP) past its lease: on waking it must not serve its own clients
    what its upstream buffered meanwhile under numbers the new owner has given to other data."""
    ttl = 3
    url = shared_url(ttl=ttl)
    async with running_sim() as sim, proxies(sim, url, 3) as nodes, clients(nodes, 1) as everyone:
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 20 for c in everyone), 60, "data everywhere")
        buses = [await n.bus() for n in nodes]
        [owner_index] = [i for i, b in enumerate(buses) if b["streams_owned"] == 1]
        frozen, woken = nodes[owner_index], everyone[owner_index]
        others = [c for i, c in enumerate(everyone) if i != owner_index]
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            before = [len(c.of(BTC)) for c in others]
            await asyncio.sleep(ttl * 2)  # the lease lapses; a survivor takes over
            assert all(len(c.of(BTC)) > n for c, n in zip(others, before, strict=True))
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        woke_at = asyncio.get_running_loop().time()
        await until(
            lambda: len([t for t, _, m in woken.got if t >= woke_at]) >= 30,
            30,
            "the woken node's client served again",
        )
        await asyncio.sleep(0.5)  # the others' clients have what the woken one got
        served = {seq: raw for c in others for seq, raw in c.raw_of(BTC).items()}
        after = [(raw, m) for t, raw, m in woken.got if t >= woke_at and m["stream"] == BTC]
        reused = [
            m["seq"] for raw, m in after if m["type"] == "update" and served.get(m["seq"]) != raw
        ]
        assert not reused, f"{len(reused)} updates under numbers the cluster used for other data"
        seqs = [m["seq"] for m in woken.of(BTC)]
        assert seqs == sorted(set(seqs)), "numbering went backwards or repeated"
        assert_no_duplicate_and_jumps_marked(woken.of(BTC))
        assert (await frozen.bus())["lease_withheld"] > 0


async def test_redis_restart_mid_stream(private_redis: PrivateRedis) -> None:  # noqa: F811
    url = unique_url(private_redis.url, ttl=3)
    async with running_sim() as sim, proxies(sim, url, 3) as nodes, clients(nodes, 2) as everyone:
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 20 for c in everyone), 60, "data everywhere")
        started = asyncio.get_running_loop().time()
        private_redis.stop()

        async def all_degraded() -> bool:
            answers = [await n.http("/health") for n in nodes]
            return all(code == 503 and "redis" in body.get("reason", "") for code, body in answers)

        await until_async(all_degraded, 30, "every node to report Redis unreachable")
        counts = [len(c.of(BTC)) for c in everyone]
        await until(
            lambda: all(len(c.of(BTC)) >= n + 20 for c, n in zip(everyone, counts, strict=True)),
            30,
            "clients served during the outage",
        )
        private_redis.start()

        async def all_healthy() -> bool:
            codes = [(await n.http("/health"))[0] for n in nodes]
            return codes == [200] * len(nodes)

        await until_async(all_healthy, 30, "every node to rejoin")
        await until(lambda: sim.subscription_counts().get("tickers.BTCUSDT") == 1, 30, "one owner")
        watch = SubscriptionWatch(sim, "tickers.BTCUSDT")
        counts = [len(c.of(BTC)) for c in everyone]
        await until(
            lambda: all(len(c.of(BTC)) >= n + 30 for c, n in zip(everyone, counts, strict=True)),
            30,
            "clients served after the rejoin",
        )
        assert set(watch.stop()) == {1}
        buses = [await n.bus() for n in nodes]
        assert sorted(b["streams_owned"] for b in buses) == [0, 0, 1]
        for c in everyone:
            assert_no_duplicate_and_jumps_marked(c.of(BTC))
            # no client was left without data for long, through outage and rejoin
            assert longest_silence(c, BTC, started) < 10
            print(f"\nRedis restart: longest silence {longest_silence(c, BTC, started):.2f} s")
        from tests.test_cluster_faults import assert_one_numbering

        # what each node served alone was under an epoch of its own
        assert_one_numbering(everyone, BTC)


async def _fill_redis(admin: Redis) -> None:
    await admin.config_set("maxmemory", "1")  # below its use: every write is refused (OOM)


async def _unfill_redis(admin: Redis) -> None:
    await admin.config_set("maxmemory", "0")


async def _make_replica(admin: Redis) -> None:
    # a replica of a master that is not there: it serves reads, refuses writes with READONLY
    await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))


async def _make_primary(admin: Redis) -> None:
    await admin.execute_command("REPLICAOF", "NO", "ONE")


# fault name -> (start it, end it, what /health's reason names)
REFUSALS = {
    "full": (_fill_redis, _unfill_redis, "maxmemory"),
    "readonly": (_make_replica, _make_primary, "ReadOnlyError"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
async def test_a_refusing_redis_is_a_defined_state_and_recovers(
    private_redis: PrivateRedis,  # noqa: F811
    refusal: str,
) -> None:
    """Redis at maxmemory (noeviction), or turned into a read-only replica, refuses every bus
    write: each node says so in /health and serves its own clients under an epoch of its own,
    and the cluster comes back to one owner when Redis takes writes again."""
    from tests.test_cluster_faults import assert_one_numbering

    start_fault, end_fault, named = REFUSALS[refusal]
    url = unique_url(private_redis.url, ttl=3)
    admin = Redis.from_url(private_redis.url)
    async with running_sim() as sim, proxies(sim, url, 3) as nodes, clients(nodes, 1) as everyone:
        for c in everyone:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 20 for c in everyone), 60, "data everywhere")
        await start_fault(admin)
        try:

            async def all_degraded() -> bool:
                answers = [await n.http("/health") for n in nodes]
                return all(code == 503 and named in b.get("reason", "") for code, b in answers)

            await until_async(all_degraded, 30, "every node to report Redis refusing writes")
            counts = [len(c.of(BTC)) for c in everyone]
            await until(
                lambda: all(
                    len(c.of(BTC)) >= n + 20 for c, n in zip(everyone, counts, strict=True)
                ),
                30,
                "every node's clients served while Redis refuses writes",
            )
        finally:
            await end_fault(admin)
        try:

            async def all_healthy() -> bool:
                return [(await n.http("/health"))[0] for n in nodes] == [200] * len(nodes)

            await until_async(all_healthy, 30, "every node to rejoin")
            await until(lambda: sim.subscription_counts().get("tickers.BTCUSDT") == 1, 30)
            counts = [len(c.of(BTC)) for c in everyone]
            await until(
                lambda: all(
                    len(c.of(BTC)) >= n + 20 for c, n in zip(everyone, counts, strict=True)
                ),
                30,
                "clients served after the recovery",
            )
            buses = [await n.bus() for n in nodes]
            assert sorted(b["streams_owned"] for b in buses) == [0, 0, 1]
            for c in everyone:
                assert_no_duplicate_and_jumps_marked(c.of(BTC))
            assert_one_numbering(everyone, BTC)
        finally:
            await admin.aclose()


async def test_cluster_mode_refuses_an_evicting_redis(
    private_redis: PrivateRedis,  # noqa: F811
) -> None:
    admin = Redis.from_url(private_redis.url)
    try:
        await admin.config_set("maxmemory-policy", "allkeys-lru")
    finally:
        await admin.aclose()
    async with running_sim() as sim:
        node = Proxy(sim, unique_url(private_redis.url))
        try:
            code = await asyncio.to_thread(node.process.wait, 60)
            assert code == 1
            assert "maxmemory-policy is allkeys-lru" in node.tail()
        finally:
            node.stop()


async def test_burst_of_1000_clients_through_a_small_redis_pool(
    shared_url: Callable[..., str],
) -> None:
    url = shared_url()
    intervals = list(INTERVALS)
    async with (
        running_sim(ticker_interval=0.2) as sim,
        proxies(sim, url, 3, max_connections=10) as nodes,
    ):
        wanted: list[list[str]] = []
        opened = []
        for i in range(1000):
            symbol = SYMBOLS[i % len(SYMBOLS)]
            interval = intervals[(i // len(SYMBOLS)) % len(intervals)]
            wanted.append([f"ticker:{symbol}", f"trade:{symbol}", f"kline:{interval}:{symbol}"])
        sockets = [nodes[i % 3] for i in range(1000)]
        opened = await asyncio.gather(*(Client.open(node) for node in sockets))
        try:
            # every client subscribes at once: about 3 x 150 new streams hit the 3 buses together
            await asyncio.gather(
                *(c.subscribe(*args) for c, args in zip(opened, wanted, strict=True))
            )

            def streams_of(c: Client) -> set[str]:
                return {m["stream"] for _, _, m in c.got}

            def all_served() -> bool:
                return all(len(streams_of(c)) == 3 for c in opened)

            await until(all_served, 120, "every client to get data on all of its streams")
            counts = sim.subscription_counts()
            assert counts and max(counts.values()) == 1, counts
            for node in nodes:
                bus = await node.bus()
                assert bus["healthy"] and bus["redis_errors"] == 0, bus
        finally:
            await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)


# -- a real Redis Cluster -------------------------------------------------------------------


class RedisClusterProcesses:
    """Three cluster-enabled redis-servers on free ports, joined as a 3-shard cluster."""

    def __init__(self, shards: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="fastproxy-cluster-")
        self.ports = [free_port() for _ in range(shards)]
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        assert binary and cli, "redis-server and redis-cli are needed"
        for port in self.ports:
            workdir = os.path.join(self.dir, str(port))
            os.makedirs(workdir)
            command = [
                binary, "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", "nodes.conf", "--save", "",
                "--appendonly", "no", "--dir", workdir,
            ]  # fmt: skip
            self.processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            self._wait(lambda port=port: self._cli(port, "PING") == "PONG")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )  # fmt: skip
        for port in self.ports:
            self._wait(lambda port=port: "cluster_state:ok" in self._cli(port, "CLUSTER", "INFO"))

    def _cli(self, port: int, *args: str) -> str:
        result = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout.strip()

    def _wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "the Redis Cluster did not come up"
            time.sleep(0.1)

    def shard_subscribers(self, channel: str) -> dict[int, int]:
        """Per node port, how many connections are SSUBSCRIBEd to `channel` there."""
        counts = {}
        for port in self.ports:
            lines = self._cli(port, "PUBSUB", "SHARDNUMSUB", channel).splitlines()
            counts[port] = int(lines[1]) if len(lines) > 1 else 0
        return counts

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def test_redis_cluster_three_shards_exactly_once(
    redis_cluster: RedisClusterProcesses,
) -> None:
    # a plain URL of any one node: the bus asks the server and finds a cluster
    url = unique_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}/0")
    symbols = SYMBOLS[:5]
    streams = [f"mudrex.futures.ticker.{s}" for s in symbols]
    async with running_sim() as sim, proxies(sim, url, 3) as nodes, clients(nodes, 2) as everyone:
        for c in everyone:
            await c.subscribe(*(f"ticker:{s}" for s in symbols))
        await until(
            lambda: all(len(c.of(s)) >= 40 for c in everyone for s in streams),
            90,
            "40 messages of each stream on each client",
        )
        counts = sim.subscription_counts()
        assert all(counts[f"tickers.{s}"] == 1 for s in symbols), counts
        for c in everyone:
            for stream in streams:
                assert_exactly_once(c.of(stream))
        for stream in streams:
            assert assert_same_bytes_everywhere(everyone, stream) > 50
        buses = [await n.bus() for n in nodes]
        assert all(b["mode"] == "cluster" and b["healthy"] for b in buses), buses
        assert sum(b["streams_owned"] for b in buses) == len(symbols)
        # sharded pub/sub: each stream's channel lives on the one shard owning its slot, and
        # the streams spread over the shards, so more shards means more fan-out capacity
        prefix = prefix_of(url)
        shards_used = set()
        for stream in streams:
            subscribers = redis_cluster.shard_subscribers(f"{prefix}:{{{stream}}}:ch")
            on = [port for port, n in subscribers.items() if n]
            assert len(on) == 1, subscribers
            shards_used.add(on[0])
        assert len(shards_used) >= 2

"""The Redis bus against a real Redis with fake feeds: Lua scripts, interest counting under
concurrency, elections, snapshots, failover and outage, without sockets to any exchange.

Every test uses its own key and channel prefix, so runs (and other people's runs on the same
Redis) never see each other's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from fastproxy.bus.redis import lua
from fastproxy.bus.redis.codec import decode_message, encode_message
from fastproxy.bus.redis.options import parse_redis_url
from fastproxy.bus.redis.shell import FOLLOWER, LOCAL, OWNER, RedisBus
from fastproxy.config import Config
from fastproxy.streams import Stream, parse_stream_arg
from tests.bus.fakes import FakeFeed, Recorder, make_message
from tests.conftest import free_port

BTC = parse_stream_arg("ticker:BTCUSDT")
ETH = parse_stream_arg("ticker:ETHUSDT")


# -- fakes --------------------------------------------------------------------------------


class Node:
    def __init__(self, url: str, max_connections: int = 10, name: str = "") -> None:
        self.feed = FakeFeed()
        self.hub = Recorder()
        config = Config(redis_url=url, redis_max_connections=max_connections)
        self.bus = RedisBus(self.feed, config, node_id=name or None)  # type: ignore[arg-type]
        self.bus.attach(self.hub)


# -- helpers ------------------------------------------------------------------------------


def bus_url(base: str, prefix: str, ttl: float | None = None) -> str:
    url = f"{base}?prefix={prefix}"
    return url if ttl is None else f"{url}&ttl={ttl}"


async def delete_prefix(url: str, prefix: str) -> None:
    """Remove a test's keys from a shared Redis (stored seqs would otherwise stay a day)."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    name = f"t{os.urandom(5).hex()}"
    yield name
    await delete_prefix(redis_url, name)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def nodes(url: str, count: int, **kwargs: Any) -> AsyncIterator[list[Node]]:
    """`count` started bus nodes and a fake upstream ticking every 20 ms on each."""
    made = [Node(url, name=f"n{i}", **kwargs) for i in range(count)]
    for node in made:
        await node.bus.start()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.02)
            for node in made:
                node.feed.tick()

    task = asyncio.create_task(ticker())
    try:
        yield made
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for node in made:
            await node.bus.stop()


async def until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def owners(made: list[Node], stream: Stream) -> list[Node]:
    return [n for n in made if stream.topic in n.feed.streams]


def assert_exactly_once(seqs: list[int]) -> None:
    assert seqs, "nothing delivered"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def kill(node: Node) -> None:
    """As if the process died: no goodbye, nothing more from it, its keys left to expire."""
    node.feed.streams.clear()
    await node.bus._halt()
    await node.bus._drop_connections()


async def interest_members(redis: Redis, prefix: str, stream: Stream) -> set[bytes]:
    key = f"{prefix}:{{{stream.stream_id}}}:interest"
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return set(await redis.zrangebyscore(key, now_ms, "+inf"))


# -- pure parts -----------------------------------------------------------------------------


def test_url_options_are_split_off_and_the_rest_kept() -> None:
    url, options = parse_redis_url("redis://u:p@h:7000/3?prefix=abc&ttl=4&cluster=no&db=3")
    assert url == "redis://u:p@h:7000/3?db=3"
    assert (options.prefix, options.ttl, options.cluster) == ("abc", 4.0, False)
    url, options = parse_redis_url("redis://h:7000")
    assert url == "redis://h:7000"
    assert (options.prefix, options.ttl, options.cluster) == ("fp", 10.0, None)
    assert parse_redis_url("redis://h?cluster=yes")[1].cluster is True
    for bad in ("redis://h?ttl=0.5", "redis://h?prefix=a{b}", "redis://h?cluster=maybe"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_wire_form_round_trips_without_json() -> None:
    message = make_message(BTC, 41, "update", "3f2a9c01d4e5")
    back = decode_message(BTC.stream_id, encode_message(message))
    assert back == message
    assert back.frame == message.frame and back.epoch == "3f2a9c01d4e5"


# -- the Lua scripts ------------------------------------------------------------------------


class Scripts:
    def __init__(self, client: Redis, prefix: str, stream: Stream) -> None:
        self.client = client
        tag = f"{prefix}:{{{stream.stream_id}}}"
        self.keys = [f"{tag}:interest", f"{tag}:lease", f"{tag}:last"]
        self.channel = f"{tag}:ch"

    async def hold(self, node: str, ttl_ms: int = 5000, lease_ms: int = 5000) -> list[Any]:
        return await self.client.eval(lua.HOLD.body, 3, *self.keys, node, ttl_ms, lease_ms)

    async def leave(self, node: str, force: bool = False, marker: bytes = b"") -> list[Any]:
        return await self.client.eval(
            lua.LEAVE.body, 3, *self.keys, node, 5000, int(force), "PUBLISH", self.channel, marker
        )

    @property
    def hist(self) -> str:
        return self.keys[2].removesuffix(":last") + ":hist"

    async def publish(self, node: str, *pairs: Any, hist_len: int = 100) -> int:
        return await self.client.eval(
            lua.PUBLISH.body, 3, self.keys[1], self.keys[2], self.hist, node, "PUBLISH",
            self.channel, 86_400_000, hist_len, 30_000, 1_700_000_000_000, *pairs,
        )  # fmt: skip


async def test_interest_counts_stay_exact_under_concurrent_hold_and_leave(
    redis_url: str, prefix: str
) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(6)]
    try:
        scripts = [Scripts(c, prefix, BTC) for c in clients]
        rng = random.Random(7)
        holding: dict[str, bool] = {}

        async def churn(worker: int) -> None:
            s = scripts[worker % len(scripts)]
            for _ in range(60):
                node = f"node{rng.randrange(40)}"
                if rng.random() < 0.55:
                    holding[node] = True
                    await s.hold(node)
                else:
                    holding[node] = False
                    await s.leave(node)

        # 24 workers on 6 connections interleave freely; each node's last op decides
        await asyncio.gather(*(churn(w) for w in range(24)))
        expected = {n.encode() for n, held in holding.items() if held}
        assert await interest_members(clients[0], prefix, BTC) == expected
        _, _, count, _ = await scripts[0].hold("observer")
        assert count == len(expected) + 1
    finally:
        for c in clients:
            await c.aclose()


async def test_exactly_one_node_wins_a_contended_lease(redis_url: str, prefix: str) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(5)]
    try:
        for round_ in range(5):
            stream = Stream("ticker", f"LEASE{round_}USDT")
            scripts = [Scripts(c, prefix, stream) for c in clients]
            results = await asyncio.gather(*(scripts[i % 5].hold(f"node{i}") for i in range(30)))
            winners = {r[0] for r in results}
            assert len(winners) == 1
            winner = winners.pop().decode()
            assert sum(1 for i, r in enumerate(results) if r[0] == f"node{i}".encode()) == 1
            assert await clients[0].get(scripts[0].keys[1]) == winner.encode()
    finally:
        for c in clients:
            await c.aclose()


async def test_dead_node_interest_expires_with_no_cleanup(redis: Redis, prefix: str) -> None:
    s = Scripts(redis, prefix, BTC)
    await s.hold("alive", ttl_ms=60_000)
    await s.hold("dead", ttl_ms=300, lease_ms=300)
    assert await interest_members(redis, prefix, BTC) == {b"alive", b"dead"}
    await asyncio.sleep(0.5)
    # nobody removed "dead": its entry simply stopped counting, and its lease lapsed
    assert await interest_members(redis, prefix, BTC) == {b"alive"}
    owner, _, count, _ = await s.hold("alive", ttl_ms=60_000)
    assert (owner, count) == (b"alive", 1)


async def test_lease_is_kept_while_others_hold_and_released_by_the_last(
    redis: Redis, prefix: str
) -> None:
    s = Scripts(redis, prefix, BTC)
    assert (await s.hold("a"))[0] == b"a"
    assert (await s.hold("b"))[0] == b"a"
    assert await s.publish("a", "5", "e1", b"blob5") == 1
    # the owner's clients left, but b still holds the stream: a keeps owning it for b
    assert await s.leave("a") == [b"a", 1]
    assert await redis.get(s.keys[1]) == b"a"
    assert await s.leave("b") == [b"a", 0]
    assert await s.leave("a") == [b"", 0]
    assert await redis.get(s.keys[1]) is None
    # numbering survives, the stale state does not
    assert await redis.hgetall(s.keys[2]) == {b"seq": b"5", b"epoch": b"e1"}
    owner, seq, _, epoch = await s.hold("c")
    assert (owner, seq, epoch) == (b"c", b"5", b"e1")


async def test_publish_writes_the_history_stream_with_the_publish(
    redis: Redis, prefix: str
) -> None:
    s = Scripts(redis, prefix, BTC)
    await s.hold("a")
    assert await s.publish("a", "1", "e1", b"m1", "", "", b"beat", "2", "e1", b"m2") == 1
    assert await s.publish("a", "2", "e1", b"m2", "3", "e1", b"m3") == 1  # 2 again: kept once
    entries = await redis.xrange(s.hist)
    assert [(i, f[b"m"]) for i, f in entries] == [(b"0-1", b"m1"), (b"0-2", b"m2"), (b"0-3", b"m3")]
    assert all(f[b"t"] == b"1700000000000" for _, f in entries)
    assert 0 < await redis.pttl(s.hist) <= 30_000
    # a new numbering starts the history again: nothing of e1 can bridge into e2
    assert await s.publish("a", "1", "e2", b"n1") == 1
    assert [i for i, _ in await redis.xrange(s.hist)] == [b"0-1"]
    # capped: roughly the last hist_len entries stay (MAXLEN ~ trims whole nodes)
    for seq in range(2, 400):
        await s.publish("a", str(seq), "e2", b"n", hist_len=50)
    assert 50 <= await redis.xlen(s.hist) < 400
    assert await s.publish("b", "400", "e2", b"x") == 0  # fenced: no history written either
    assert (await redis.xrevrange(s.hist, count=1))[0][0] == b"0-399"


async def test_publish_is_fenced_by_the_lease(redis: Redis, prefix: str) -> None:
    s = Scripts(redis, prefix, BTC)
    await s.hold("a")
    pubsub = redis.pubsub()
    await pubsub.subscribe(s.channel)
    assert await s.publish("a", "1", "e1", b"one", "2", "e1", b"two", "", "", b"marker") == 1
    assert await s.publish("b", "3", "e2", b"three") == 0
    assert await redis.hgetall(s.keys[2]) == {b"seq": b"2", b"epoch": b"e1", b"msg": b"two"}
    got = []
    while len(got) < 3:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        if message is not None:
            got.append(message["data"])
    assert got == [b"one", b"two", b"marker"]
    assert await s.publish("a", "4", "e1", b"four", "-", "", b"reset") == 1
    assert await redis.hgetall(s.keys[2]) == {b"seq": b"4", b"epoch": b"e1"}
    await pubsub.aclose()


async def test_forced_leave_hands_over_with_a_marker(redis: Redis, prefix: str) -> None:
    s = Scripts(redis, prefix, BTC)
    await s.hold("a")
    await s.hold("b")
    pubsub = redis.pubsub()
    await pubsub.subscribe(s.channel)
    assert await s.leave("a", force=True, marker=b"bye") == [b"", 1]
    message = None
    while message is None:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message["data"] == b"bye"
    assert (await s.hold("b"))[0] == b"b"
    await pubsub.aclose()


# -- the bus with fake feeds ----------------------------------------------------------------


async def test_one_owner_and_every_node_gets_every_message_once(
    redis_url: str, prefix: str
) -> None:
    async with nodes(bus_url(redis_url, prefix), 3) as made:
        for node in made:
            node.bus.acquire(BTC)
        await until(lambda: all(len(n.hub.seqs(BTC)) >= 40 for n in made), what="messages")
        assert len(owners(made, BTC)) == 1
        roles = sorted(n.bus.role(BTC) for n in made)
        assert roles == [FOLLOWER, FOLLOWER, OWNER]
        by_seq: dict[int, bytes] = {}
        for node in made:
            got = node.hub.got[BTC.stream_id]
            assert_exactly_once([m.seq for m in got])
            assert got[0].type == "snapshot"
            for message in got[1:]:
                assert by_seq.setdefault(message.seq, message.payload) == message.payload
        assert all(n.bus.healthy for n in made)


async def test_late_joiner_gets_stored_state_then_continuous_seq(
    redis_url: str, prefix: str
) -> None:
    async with nodes(bus_url(redis_url, prefix), 2) as (a, b):
        a.bus.acquire(BTC)
        await until(lambda: len(a.hub.seqs(BTC)) >= 10)
        b.bus.acquire(BTC)
        await until(lambda: len(b.hub.seqs(BTC)) >= 10)
        first = b.hub.got[BTC.stream_id][0]
        assert first.type == "snapshot"
        assert first.seq > a.hub.seqs(BTC)[0]  # the stored state, not a restart
        assert_exactly_once(b.hub.seqs(BTC))


async def test_release_and_quick_reacquire_starts_with_a_snapshot(
    redis_url: str, prefix: str
) -> None:
    async with nodes(bus_url(redis_url, prefix), 2) as (a, b):
        a.bus.acquire(BTC)
        await until(lambda: a.bus.role(BTC) == OWNER)
        b.bus.acquire(BTC)
        await until(lambda: len(b.hub.seqs(BTC)) >= 5)
        for node in (a, b):  # both hubs' last client left and came back within one pass
            node.bus.release(BTC)
            node.bus.acquire(BTC)
            count = len(node.hub.seqs(BTC))
            await until(lambda n=node, k=count: len(n.hub.seqs(BTC)) >= k + 5)
            got = node.hub.got[BTC.stream_id]
            assert got[count].type == "snapshot"
            assert all(m.type == "update" for m in got[count + 1 :])
            assert_exactly_once([m.seq for m in got[count:]])


async def test_owner_keeps_stream_for_others_and_the_last_release_frees_it(
    redis_url: str, redis: Redis, prefix: str
) -> None:
    async with nodes(bus_url(redis_url, prefix), 2) as (a, b):
        a.bus.acquire(BTC)
        await until(lambda: a.bus.role(BTC) == OWNER)
        b.bus.acquire(BTC)
        await until(lambda: len(b.hub.seqs(BTC)) >= 5)
        a.bus.release(BTC)
        await asyncio.sleep(0.3)
        # b's clients still need it: a stays the owner, without clients of its own
        count = len(b.hub.seqs(BTC))
        await until(lambda: len(b.hub.seqs(BTC)) >= count + 10)
        assert a.bus.role(BTC) == OWNER and len(owners([a, b], BTC)) == 1
        b.bus.release(BTC)
        await until(lambda: not owners([a, b], BTC), what="upstream released")
        lease = f"{prefix}:{{{BTC.stream_id}}}:lease"
        assert await redis.get(lease) is None
        assert await interest_members(redis, prefix, BTC) == set()


async def test_burst_of_streams_through_a_small_pool_costs_few_round_trips(
    redis_url: str, prefix: str
) -> None:
    streams = [Stream("ticker", f"B{i:04d}USDT") for i in range(1000)]
    async with nodes(bus_url(redis_url, prefix), 3, max_connections=2) as made:
        calls = {"n": 0}
        for node in made:
            real = node.bus._execute

            async def counted(pipe: Any, real: Any = real) -> list[Any]:
                calls["n"] += 1
                return await real(pipe)

            node.bus._execute = counted  # type: ignore[method-assign]
        for node in made:
            for stream in streams:
                node.bus.acquire(stream)

        def settled() -> bool:
            return all(
                len(owners(made, s)) == 1 and all(n.hub.got.get(s.stream_id) for n in made)
                for s in streams
            )

        await until(settled, timeout=60, what="every stream owned once and delivered everywhere")
        # 3 nodes x 1000 streams: elections, snapshots and publishing in a handful of
        # pipelines per node, not thousands of round trips
        assert all(n.bus.redis_errors == 0 for n in made)
        assert calls["n"] < 400, calls


async def test_killed_owner_is_replaced_within_the_ttl(
    redis_url: str, redis: Redis, prefix: str
) -> None:
    ttl = 3.0
    async with nodes(bus_url(redis_url, prefix, ttl), 3) as made:
        for node in made:
            node.bus.acquire(BTC)
        await until(lambda: all(len(n.hub.seqs(BTC)) >= 10 for n in made))
        [owner] = owners(made, BTC)
        survivors = [n for n in made if n is not owner]
        await kill(owner)
        killed_at = time.monotonic()
        before = {id(n): len(n.hub.seqs(BTC)) for n in survivors}
        await until(lambda: len(owners(survivors, BTC)) == 1, timeout=ttl * 3, what="takeover")
        took = time.monotonic() - killed_at
        await until(lambda: all(len(n.hub.seqs(BTC)) >= before[id(n)] + 20 for n in survivors))
        assert took < ttl * 2  # ttl on a quiet machine; headroom for a noisy one
        for node in survivors:
            got = node.hub.got[BTC.stream_id]
            seqs = [m.seq for m in got]
            assert seqs == sorted(set(seqs)), "a duplicate or a step back"
            for prev, message in itertools.pairwise(got):
                if message.seq != prev.seq + 1:
                    assert message.type == "snapshot", "a jump must be marked as a snapshot"
        # the dead node's interest is gone without anyone removing it
        dead = owner.bus.node_id.encode()
        deadline = time.monotonic() + ttl * 2
        while dead in await interest_members(redis, prefix, BTC):
            assert time.monotonic() < deadline, "dead node still counted"
            await asyncio.sleep(0.1)
        assert await interest_members(redis, prefix, BTC) == {
            n.bus.node_id.encode() for n in survivors
        }


async def test_graceful_stop_hands_over_at_once(redis_url: str, prefix: str) -> None:
    async with nodes(bus_url(redis_url, prefix, 30), 2) as (a, b):
        a.bus.acquire(BTC)
        await until(lambda: a.bus.role(BTC) == OWNER)
        b.bus.acquire(BTC)
        await until(lambda: len(b.hub.seqs(BTC)) >= 5)
        epoch = a.feed.epochs[BTC.topic]
        await a.bus.stop()
        a.feed.streams.clear()
        # a 30 s TTL: only the handover marker can make this quick
        await until(lambda: b.bus.role(BTC) == OWNER, timeout=5, what="handover")
        count = len(b.hub.seqs(BTC))
        await until(lambda: len(b.hub.seqs(BTC)) >= count + 10)
        seqs = b.hub.seqs(BTC)
        assert seqs == sorted(set(seqs))
        # the new owner continued the stored numbering: the same seq line, the same epoch
        assert b.feed.epochs[BTC.topic] == epoch
        assert {m.epoch for m in b.hub.got[BTC.stream_id]} == {epoch}


async def test_a_node_subscribes_only_to_the_streams_its_clients_hold(
    redis_url: str, redis: Redis, prefix: str
) -> None:
    async with nodes(bus_url(redis_url, prefix), 3) as (a, b, c):
        a.bus.acquire(BTC)
        a.bus.acquire(ETH)
        b.bus.acquire(BTC)
        c.bus.acquire(ETH)
        await until(lambda: all(len(n.hub.got) == 2 - (n is not a) for n in (a, b, c)))
        await until(lambda: len(b.hub.seqs(BTC)) >= 10 and len(c.hub.seqs(ETH)) >= 10)
        assert set(b.hub.got) == {BTC.stream_id} and set(c.hub.got) == {ETH.stream_id}
        channels = [f"{prefix}:{{{s.stream_id}}}:ch" for s in (BTC, ETH)]
        # one owner per stream publishes; only the other holder of that stream listens
        assert [n for _, n in await redis.pubsub_numsub(*channels)] == [1, 1]
        b.bus.release(BTC)
        # b's clients left: b listens no more (if b owned BTC it keeps owning it for a, and
        # then a is the listener)
        expected = 1 if b.bus.role(BTC) == OWNER else 0

        async def settled() -> bool:
            return (await redis.pubsub_numsub(channels[0]))[0][1] == expected

        deadline = time.monotonic() + 10
        while not await settled():
            assert time.monotonic() < deadline, "b still subscribed to a stream it dropped"
            await asyncio.sleep(0.05)


async def test_interest_and_leases_stay_consistent_under_random_churn(
    redis_url: str, redis: Redis, prefix: str
) -> None:
    streams = [Stream("ticker", f"C{i}USDT") for i in range(8)]
    rng = random.Random(11)
    async with nodes(bus_url(redis_url, prefix), 4) as made:
        for _ in range(300):
            node, stream = rng.choice(made), rng.choice(streams)
            if rng.random() < 0.5:
                node.bus.acquire(stream)
            else:
                node.bus.release(stream)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.01)

        def holders(stream: Stream) -> set[bytes]:
            return {
                n.bus.node_id.encode()
                for n in made
                if (st := n.bus._states.get(stream.stream_id)) is not None and st.held
            }

        async def consistent() -> bool:
            for stream in streams:
                if await interest_members(redis, prefix, stream) != holders(stream):
                    return False
                owning = owners(made, stream)
                if holders(stream) and len(owning) != 1:
                    return False
                if not holders(stream) and owning:
                    return False
            return True

        deadline = time.monotonic() + 20
        while not await consistent():
            assert time.monotonic() < deadline, "interest or ownership never settled"
            await asyncio.sleep(0.1)
        for stream in streams:
            for node in made:
                if node.bus.node_id.encode() in holders(stream):
                    count = len(node.hub.seqs(stream))
                    await until(lambda n=node, s=stream, k=count: len(n.hub.seqs(s)) > k)


async def test_owner_reset_and_rejection_reach_every_holder(
    redis_url: str, redis: Redis, prefix: str
) -> None:
    async with nodes(bus_url(redis_url, prefix), 2) as (a, b):
        a.bus.acquire(BTC)
        await until(lambda: a.bus.role(BTC) == OWNER)
        b.bus.acquire(BTC)
        await until(lambda: len(b.hub.seqs(BTC)) >= 5)
        a.feed.handler.reset(BTC)  # the owner's upstream connection was re-established
        await until(lambda: b.hub.resets == [BTC.stream_id], what="reset relayed")
        # the exchange refuses the topic: the real feed drops it, then reports it
        a.feed.remove(BTC)
        a.feed.handler.reject(BTC, "topic unknown")
        await until(lambda: b.hub.rejects == [(BTC.stream_id, "topic unknown")])
        assert a.hub.rejects == [(BTC.stream_id, "topic unknown")]
        await until(lambda: not a.bus._states and not b.bus._states, what="stream forgotten")
        assert await redis.get(f"{prefix}:{{{BTC.stream_id}}}:lease") is None
        assert not owners([a, b], BTC)


# -- Redis outage ---------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own on a free port, to stop and start at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fastproxy-bus-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            assert time.monotonic() < deadline and self.process.poll() is None
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.cleanup()


async def test_outage_degrades_to_local_ownership_and_rejoins(
    private_redis: PrivateRedis, prefix: str
) -> None:
    async with nodes(bus_url(private_redis.url, prefix, 3), 3) as made:
        for node in made:
            node.bus.acquire(BTC)
        await until(lambda: all(len(n.hub.seqs(BTC)) >= 10 for n in made))
        private_redis.stop()
        await until(lambda: not any(n.bus.healthy for n in made), timeout=15, what="degraded")
        # every node serves its own clients from its own upstream subscription
        assert all(n.bus.role(BTC) == LOCAL for n in made)
        assert all("redis" in n.bus.status()["reason"] for n in made)
        counts = [len(n.hub.seqs(BTC)) for n in made]
        await until(
            lambda: all(len(n.hub.seqs(BTC)) >= c + 20 for n, c in zip(made, counts, strict=True))
        )
        private_redis.start()
        await until(lambda: all(n.bus.healthy for n in made), timeout=15, what="rejoined")
        await until(lambda: len(owners(made, BTC)) == 1, timeout=15, what="one owner again")
        counts = [len(n.hub.seqs(BTC)) for n in made]
        await until(
            lambda: all(len(n.hub.seqs(BTC)) >= c + 20 for n, c in zip(made, counts, strict=True))
        )
        assert len(owners(made, BTC)) == 1
        for node in made:
            got = node.hub.got[BTC.stream_id]
            for prev, message in itertools.pairwise(got):
                # a new seq line after the outage is announced by a snapshot, never silently
                if message.seq != prev.seq + 1:
                    assert message.type == "snapshot", (prev.seq, message.seq)


async def test_node_started_while_redis_is_down_serves_and_joins_later(
    private_redis: PrivateRedis, prefix: str
) -> None:
    private_redis.stop()
    async with nodes(bus_url(private_redis.url, prefix, 3), 2) as (a, b):
        assert not a.bus.healthy and a.bus.status()["reason"].startswith("redis unreachable")
        a.bus.acquire(BTC)
        b.bus.acquire(BTC)
        await until(lambda: len(a.hub.seqs(BTC)) >= 5 and len(b.hub.seqs(BTC)) >= 5)
        assert len(owners([a, b], BTC)) == 2  # each serves its own clients meanwhile
        private_redis.start()
        await until(lambda: a.bus.healthy and b.bus.healthy, timeout=15)
        await until(lambda: len(owners([a, b], BTC)) == 1, what="one owner after joining")
        counts = [len(a.hub.seqs(BTC)), len(b.hub.seqs(BTC))]
        await until(lambda: len(a.hub.seqs(BTC)) >= counts[0] + 10)
        await until(lambda: len(b.hub.seqs(BTC)) >= counts[1] + 10)
        assert a.bus.status()["reconnects"] >= 1

"""The Bus contract, one suite for every engine: what a hub sees must not depend on whether
the node runs alone or in a cluster.

Each engine runs with a fake feed (Messages made on demand, with any seq) and a recording hub.
Adding an engine is one entry in ENGINES: a factory that yields a started bus on a FakeFeed.
An engine may deliver asynchronously (the local one crosses a socket): `settle()` returns once
what the feed made so far has reached the hub; for the others it returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from fastproxy.bus import Bus, MemoryBus
from fastproxy.config import Config
from fastproxy.streams import parse_stream_arg
from tests.bus.fakes import FakeFeed, Recorder

BTC = parse_stream_arg("ticker:BTCUSDT")
ETH = parse_stream_arg("trade:ETHUSDT")


async def _at_once() -> None:
    return None


@dataclass
class Engine:
    bus: Bus
    feed: FakeFeed
    hub: Recorder
    settle: Callable[[], Awaitable[None]] = _at_once

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def owned(self, stream_id: str) -> None:
        """Wait until the engine has subscribed the feed to the stream."""
        await self.until(lambda: stream_id in self.feed.owned, f"{stream_id} owned")


@contextlib.asynccontextmanager
async def memory_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    feed = FakeFeed()
    bus = MemoryBus(feed)  # type: ignore[arg-type]
    yield Engine(bus, feed, Recorder())


@contextlib.asynccontextmanager
async def redis_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    from fastproxy.bus.redis.shell import RedisBus
    from tests.test_cluster_bus import delete_prefix

    base = request.getfixturevalue("redis_url")
    prefix = f"t{os.urandom(5).hex()}"
    feed = FakeFeed()
    bus = RedisBus(feed, Config(redis_url=f"{base}?prefix={prefix}&ttl=3"))  # type: ignore[arg-type]
    try:
        yield Engine(bus, feed, Recorder())
    finally:
        await delete_prefix(base, prefix)


@contextlib.asynccontextmanager
async def local_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """A worker's engine, and at the other end of its socket the feed process's local hub on
    the memory engine, as `--workers N` runs them."""
    import tempfile

    from fastproxy.bus.local import LocalBus, LocalHub

    feed = FakeFeed()
    with tempfile.TemporaryDirectory(prefix="fastproxy-local-") as tmp:
        local = LocalHub(MemoryBus(feed), os.path.join(tmp, "feed.sock"), linger=0)  # type: ignore[arg-type]
        await local.start()
        bus = LocalBus(local.path)
        try:
            yield Engine(bus, feed, Recorder(), bus.settled)
        finally:
            await local.stop()


ENGINES: dict[str, Callable[[pytest.FixtureRequest], Any]] = {
    "memory": memory_engine,
    "redis": redis_engine,
    "local": local_engine,
}


@pytest.fixture(params=list(ENGINES))
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with ENGINES[request.param](request) as made:
        made.bus.attach(made.hub)
        await made.bus.start()
        try:
            yield made
        finally:
            await made.bus.stop()


def kinds(hub: Recorder, stream_id: str) -> list[tuple[int, str]]:
    return [(m.seq, m.type) for m in hub.got.get(stream_id, [])]


async def test_status_names_the_engine(engine: Engine) -> None:
    status = engine.bus.status()
    assert status["engine"] == engine.bus.name
    assert status["healthy"] is True and engine.bus.healthy


async def test_acquire_delivers_a_snapshot_first_then_every_seq_once(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    for _ in range(4):
        engine.feed.tick()
    await engine.settle()
    assert kinds(engine.hub, BTC.stream_id) == [
        (1, "snapshot"),
        (2, "update"),
        (3, "update"),
        (4, "update"),
    ]


async def test_acquire_twice_is_one_subscription(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    engine.feed.tick()
    await engine.settle()
    assert engine.feed.adds == [(BTC.stream_id, 0)]
    assert kinds(engine.hub, BTC.stream_id) == [(1, "snapshot")]


async def test_duplicates_are_dropped(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    for seq in (1, 2, 2, 1, 3):
        engine.feed.emit(BTC, seq)
    await engine.settle()
    assert [seq for seq, _ in kinds(engine.hub, BTC.stream_id)] == [1, 2, 3]
    assert engine.bus.status()["duplicates_dropped"] == 2


async def test_a_jump_in_seq_is_delivered_as_a_snapshot(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    for seq in (1, 2, 7, 8):
        engine.feed.emit(BTC, seq)
    await engine.settle()
    assert kinds(engine.hub, BTC.stream_id) == [
        (1, "snapshot"),
        (2, "update"),
        (7, "snapshot"),  # the hub's state is whole again: a snapshot repairs the gap
        (8, "update"),
    ]
    assert engine.bus.status()["gaps"] == 1


async def test_streams_are_delivered_independently(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    engine.bus.acquire(ETH)
    await engine.owned(BTC.stream_id)
    await engine.owned(ETH.stream_id)
    engine.feed.tick()
    engine.feed.tick()
    await engine.settle()
    assert kinds(engine.hub, BTC.stream_id) == [(1, "snapshot"), (2, "update")]
    assert kinds(engine.hub, ETH.stream_id) == [(1, "snapshot"), (2, "update")]


async def test_reset_reaches_the_hub(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    engine.feed.tick()
    engine.feed.handler.reset(BTC)
    await engine.settle()
    assert engine.hub.resets == [BTC.stream_id]


async def test_reject_reaches_the_hub_and_ends_the_stream(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    engine.feed.tick()
    # the real feed drops a refused topic itself, then reports it
    engine.feed.remove(BTC)
    engine.feed.handler.reject(BTC, "topic unknown")
    await engine.settle()
    assert engine.hub.rejects == [(BTC.stream_id, "topic unknown")]
    engine.feed.add(BTC, 1)  # whatever still arrives for it is not delivered
    engine.feed.tick()
    await engine.settle()
    assert kinds(engine.hub, BTC.stream_id) == [(1, "snapshot")]


async def test_release_stops_delivery_and_frees_the_feed(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    engine.feed.tick()
    await engine.settle()
    engine.bus.release(BTC)
    engine.feed.tick()  # if the feed still has it, nothing reaches the hub
    await engine.settle()
    assert kinds(engine.hub, BTC.stream_id) == [(1, "snapshot")]
    await engine.until(lambda: BTC.stream_id not in engine.feed.owned, "upstream released")


async def test_reacquire_after_release_starts_with_a_snapshot(engine: Engine) -> None:
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    engine.feed.tick()
    engine.feed.tick()
    await engine.settle()
    engine.bus.release(BTC)
    await engine.until(lambda: BTC.stream_id not in engine.feed.owned, "upstream released")
    engine.bus.acquire(BTC)
    await engine.owned(BTC.stream_id)
    engine.feed.tick()
    engine.feed.tick()
    await engine.settle()
    got = kinds(engine.hub, BTC.stream_id)
    assert got[:2] == [(1, "snapshot"), (2, "update")]
    assert got[2][1] == "snapshot" and got[3] == (got[2][0] + 1, "update")


async def test_release_of_a_stream_never_held_is_harmless(engine: Engine) -> None:
    engine.bus.release(BTC)
    engine.bus.acquire(ETH)
    await engine.owned(ETH.stream_id)
    assert BTC.stream_id not in engine.feed.owned

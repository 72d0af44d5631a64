"""The local engine's own rules, beyond the contract: interest from several workers is one
subscription, a worker joining a held stream starts from the feed's last Message, and a worker
that goes away leaves its streams lingering. Real Unix sockets, in one process."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable

import pytest

from fastproxy.bus import MemoryBus
from fastproxy.bus.local import LocalBus, LocalHub
from fastproxy.streams import parse_stream_arg
from tests.bus.fakes import FakeFeed, Recorder

BTC = parse_stream_arg("ticker:BTCUSDT")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Machine:
    def __init__(self, local: LocalHub, feed: FakeFeed) -> None:
        self.local = local
        self.feed = feed
        self.workers: list[tuple[LocalBus, Recorder]] = []

    async def worker(self) -> tuple[LocalBus, Recorder]:
        bus, hub = LocalBus(self.local.path, len(self.workers)), Recorder()
        bus.attach(hub)
        await bus.start()
        self.workers.append((bus, hub))
        return bus, hub


@pytest.fixture
async def machine() -> AsyncIterator[Machine]:
    feed = FakeFeed()
    with tempfile.TemporaryDirectory(prefix="fastproxy-local-") as tmp:
        local = LocalHub(MemoryBus(feed), os.path.join(tmp, "feed.sock"), linger=0.3)  # type: ignore[arg-type]
        await local.start()
        made = Machine(local, feed)
        try:
            yield made
        finally:
            for bus, _ in made.workers:
                await bus.stop()
            await local.stop()


async def test_two_workers_one_subscription_the_same_frames(machine: Machine) -> None:
    (one, one_hub), (two, two_hub) = await machine.worker(), await machine.worker()
    one.acquire(BTC)
    two.acquire(BTC)
    await until(lambda: machine.local.figures()["streams"] == 1, "acquired")
    await one.settled()
    await two.settled()
    for _ in range(3):
        machine.feed.tick()
    await one.settled()
    await two.settled()
    assert machine.feed.adds == [(BTC.stream_id, 0)]
    assert [m.frame for m in one_hub.got[BTC.stream_id]] == [
        m.frame for m in two_hub.got[BTC.stream_id]
    ]
    assert [(m.seq, m.type) for m in one_hub.got[BTC.stream_id]] == [
        (1, "snapshot"),
        (2, "update"),
        (3, "update"),
    ]
    assert machine.local.records_out == 6  # one record per Message per worker
    one.release(BTC)
    await one.settled()
    assert BTC.stream_id in machine.feed.owned  # the other worker still holds it
    two.release(BTC)
    await until(lambda: BTC.stream_id not in machine.feed.owned, "released upstream")


async def test_a_late_worker_starts_from_the_feeds_last_message(machine: Machine) -> None:
    first, _ = await machine.worker()
    first.acquire(BTC)
    await until(lambda: BTC.stream_id in machine.feed.owned, "owned")
    await first.settled()
    for _ in range(5):
        machine.feed.tick()
    late, late_hub = await machine.worker()
    late.acquire(BTC)
    await late.settled()
    machine.feed.tick()
    await late.settled()
    got = [(m.seq, m.type) for m in late_hub.got[BTC.stream_id]]
    assert got == [(5, "snapshot"), (6, "update")]
    epochs = {m.epoch for m in late_hub.got[BTC.stream_id]}
    assert epochs == {machine.feed.epochs[BTC.topic]}


async def test_a_lost_worker_leaves_its_streams_lingering(machine: Machine) -> None:
    bus, _ = await machine.worker()
    bus.acquire(BTC)
    await until(lambda: BTC.stream_id in machine.feed.owned, "owned")
    link = bus._link
    assert link is not None and link.transport is not None
    link.transport.abort()  # as if the worker process died
    await until(lambda: machine.local.figures()["lingering"] == 1, "lingering")
    assert BTC.stream_id in machine.feed.owned
    await until(lambda: BTC.stream_id not in machine.feed.owned, "released after the linger")


async def test_ready_once_the_feed_delivers_the_stream_here(machine: Machine) -> None:
    bus, _ = await machine.worker()
    assert not bus.ready(BTC)
    bus.acquire(BTC)
    await bus.settled()
    assert bus.ready(BTC)
    bus.release(BTC)
    assert not bus.ready(BTC)


class _Rings:
    """Stands in for the history rings of the feed process: frames after a seq."""

    def __init__(self) -> None:
        self.kept: dict[str, list[tuple[str, int, bytes]]] = {}

    def append(self, sid: str, epoch: str, seq: int, frame: bytes, now: float) -> None:
        self.kept.setdefault(sid, []).append((epoch, seq, frame))

    def after(self, sid: str, epoch: str, seq: int, now: float) -> list[bytes] | None:
        kept = [(e, s, f) for e, s, f in self.kept.get(sid, []) if e == epoch]
        if not kept or kept[0][1] > seq + 1:
            return None
        return [f for _, s, f in kept if s > seq]

    def forget(self, sid: str) -> None:
        self.kept.pop(sid, None)


async def test_history_after_asks_the_feed_process(machine: Machine) -> None:
    machine.local.history = _Rings()
    holder, holder_hub = await machine.worker()
    holder.acquire(BTC)
    await until(lambda: BTC.stream_id in machine.feed.owned, "owned")
    await holder.settled()
    for _ in range(5):
        machine.feed.tick()
    await holder.settled()
    other, _ = await machine.worker()  # holds nothing: the history is the feed's
    epoch = machine.feed.epochs[BTC.topic]
    got = await other.history_after(BTC, epoch, 2)
    frames = {m.seq: m.frame for m in holder_hub.got[BTC.stream_id]}
    assert got == [(3, frames[3]), (4, frames[4]), (5, frames[5])]
    assert await other.history_after(BTC, "another-epoch", 2) is None

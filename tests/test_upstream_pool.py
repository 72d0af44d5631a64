"""The upstream pool against the Bybit simulator over real sockets.

Timing assertions are "within N s" with wide margins: the machine is shared and small.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
import pytest
import uvloop
from picows import WSMsgType
from picows.picows import _make_test_ws_frame

from fastproxy.sim import Simulator
from fastproxy.upstream import SymbolCatalogue, UpstreamPool, UpstreamSettings, default_rest_url
from fastproxy.upstream.catalogue import fetch_symbols
from fastproxy.upstream.connection import Runner
from tests import proxyutil

TICKERS = ["tickers.BTCUSDT", "tickers.ETHUSDT", "tickers.SOLUSDT", "tickers.XRPUSDT"]
MIXED = [
    "tickers.BTCUSDT",
    "orderbook.1.BTCUSDT",
    "orderbook.50.ETHUSDT",
    "publicTrade.SOLUSDT",
    "tickers.ETHUSDT",
    "tickers.XRPUSDT",
    "orderbook.1.SOLUSDT",
]


class Recorder:
    """Collects the pool's callbacks in order. A frame's `generation` is 1 + the resets its
    topic had before it: data after a reconnect has a higher one than data before."""

    def __init__(self) -> None:
        self.generations: dict[str, int] = {}
        self.events: list[tuple[str, str, Any]] = []
        self.frames: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.failed: list[tuple[str, str]] = []
        self.resets: list[str] = []

    def on_data(self, topic: str, frame: dict[str, Any]) -> None:
        generation = self.generations.get(topic, 1)
        self.frames.setdefault(topic, []).append((generation, frame))
        if len(self.frames[topic]) > 200:  # keep memory flat in long runs
            del self.frames[topic][:100]
        self.events.append(("data", topic, generation))
        if len(self.events) > 20000:
            del self.events[:10000]

    def on_failed(self, topic: str, reason: str) -> None:
        self.failed.append((topic, reason))
        self.events.append(("failed", topic, reason))

    def on_reset(self, topic: str) -> None:
        self.generations[topic] = self.generations.get(topic, 1) + 1
        self.resets.append(topic)
        self.events.append(("reset", topic, None))

    def count(self, topic: str) -> int:
        return len(self.frames.get(topic, ()))


def running_sim(**overrides: Any) -> AbstractAsyncContextManager[Simulator]:
    """The shared simulator fixture, at the pace these tests were written for."""
    return proxyutil.running_sim(**{"seed": 1, "ticker_interval": 0.1, **overrides})


@asynccontextmanager
async def running_pool(
    sim: Simulator, recorder: Recorder, **overrides: Any
) -> AsyncIterator[UpstreamPool]:
    options: dict[str, Any] = {
        "url": sim.ws_url("linear"),
        "ping_interval": 5.0,
        "pong_timeout": 5.0,
        "silence_timeout": 15.0,
        "backoff_base": 0.2,
        "backoff_cap": 2.0,
        "empty_conn_linger": 30.0,
    }
    options.update(overrides)
    pool = UpstreamPool(
        UpstreamSettings(**options),
        on_data=recorder.on_data,
        on_failed=recorder.on_failed,
        on_reset=recorder.on_reset,
    )
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()


async def wait_until(
    condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition"
) -> float:
    """Poll until `condition()` holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def all_live(pool: UpstreamPool, topics: list[str]) -> Callable[[], bool]:
    return lambda: all(pool.topic_state(t) == "live" for t in topics)


def upstream_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("fastproxy-upstream") and not t.done()
    ]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- subscribe / unsubscribe ----------------------------------------------------------------


async def test_subscribe_acks_data_and_unsubscribe() -> None:
    rec = Recorder()
    async with running_sim() as sim, running_pool(sim, rec) as pool:
        assert pool.is_up  # nothing needed yet
        pool.subscribe(MIXED)
        await wait_until(all_live(pool, MIXED), what="all topics live")
        await wait_until(lambda: all(rec.count(t) for t in MIXED), what="data on every topic")
        assert sim.subscription_counts() == dict.fromkeys(MIXED, 1)
        for topic in MIXED:
            generation, first = rec.frames[topic][0]
            assert generation >= 1 and first["topic"] == topic
            assert first.get("type") == "snapshot"
        status = pool.status()
        assert status["connections"] == 1 and status["connected"] == 1
        assert status["topics"] == {"pending": 0, "live": len(MIXED), "failed": 0}
        assert status["messages_in"] > 0 and status["last_message_age"] is not None
        assert status["down_since"] is None and pool.is_up

        pool.unsubscribe(["tickers.BTCUSDT", "orderbook.1.BTCUSDT"])
        assert pool.topic_state("tickers.BTCUSDT") is None
        before = rec.count("tickers.BTCUSDT")
        await wait_until(
            lambda: "tickers.BTCUSDT" not in sim.subscription_counts(), what="unsubscribed"
        )
        await asyncio.sleep(0.5)
        assert rec.count("tickers.BTCUSDT") == before  # nothing delivered after unsubscribe
        assert "orderbook.1.BTCUSDT" not in sim.subscription_counts()
        assert sim.subscription_counts()["tickers.ETHUSDT"] == 1

        pool.subscribe(["tickers.BTCUSDT"])  # subscribe works again, from a fresh snapshot
        await wait_until(lambda: rec.count("tickers.BTCUSDT") > before, what="data again")
        assert rec.frames["tickers.BTCUSDT"][before][1]["type"] == "snapshot"
        assert sim.subscription_counts()["tickers.BTCUSDT"] == 1
        assert rec.failed == [] and rec.resets == []
        assert pool.status()["disconnects"] == 0


async def test_subscribe_before_start_is_sent_on_start() -> None:
    rec = Recorder()
    async with running_sim() as sim:
        pool = UpstreamPool(
            UpstreamSettings(url=sim.ws_url("linear")),
            on_data=rec.on_data,
            on_failed=rec.on_failed,
            on_reset=rec.on_reset,
        )
        pool.subscribe(TICKERS[:2])
        assert pool.topic_state(TICKERS[0]) == "pending" and not pool.is_up
        await pool.start()
        try:
            await wait_until(all_live(pool, TICKERS[:2]), what="live after start")
        finally:
            await pool.stop()


async def test_limits_spread_topics_over_connections_each_topic_once() -> None:
    topics = [f"{kind}.{sym}" for kind in ("tickers", "publicTrade") for sym in
              ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")] + ["orderbook.1.BTCUSDT"]  # fmt: skip
    rec = Recorder()
    async with (
        running_sim() as sim,
        running_pool(sim, rec, max_topics_per_conn=3, batch_size=2) as pool,
    ):
        pool.subscribe(topics)
        await wait_until(all_live(pool, topics), what="all topics live")
        assert sim.subscription_counts() == dict.fromkeys(topics, 1)
        assert pool.status()["connections"] == 3
        await wait_until(lambda: sim.connection_count() == 3, what="three sockets")
        # room freed on one connection is used before a fourth is opened, once the exchange
        # confirmed the unsubscribe (until then the topic still counts against the limit)
        pool.unsubscribe(["tickers.BTCUSDT"])
        await wait_until(
            lambda: sum(len(c.topics) for c in pool.plan.conns) == len(topics) - 1,
            what="unsubscribe confirmed",
        )
        assert "tickers.BTCUSDT" not in sim.subscription_counts()
        pool.subscribe(["orderbook.1.ETHUSDT"])
        await wait_until(all_live(pool, ["orderbook.1.ETHUSDT"]), what="new topic live")
        assert pool.status()["connections"] == 3
        assert all(n == 1 for n in sim.subscription_counts().values())
        # while an unsubscribe is in flight its slot is still taken: a fourth connection
        pool.unsubscribe(["tickers.ETHUSDT"])
        pool.subscribe(["orderbook.1.XRPUSDT"])
        await wait_until(all_live(pool, ["orderbook.1.XRPUSDT"]), what="live")
        assert pool.status()["connections"] == 4
        assert all(n == 1 for n in sim.subscription_counts().values())


async def test_args_character_limit_opens_more_connections() -> None:
    topics = TICKERS  # 15 characters each, 18 with quotes and separator
    rec = Recorder()
    async with running_sim() as sim, running_pool(sim, rec, max_args_chars_per_conn=40) as pool:
        pool.subscribe(topics)
        await wait_until(all_live(pool, topics), what="all live")
        assert pool.status()["connections"] == 2
        assert sim.subscription_counts() == dict.fromkeys(topics, 1)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_earlier_args", [False, True])
async def test_unknown_symbol_fails_exactly_that_topic(keep_earlier_args: bool) -> None:
    topics = [
        "tickers.BTCUSDT",
        "tickers.ETHUSDT",
        "tickers.NOPEUSDT",
        "orderbook.50.SOLUSDT",
        "orderbook.50.NOPEUSDT",
        "tickers.XRPUSDT",
    ]
    good = [t for t in topics if "NOPE" not in t]
    rec = Recorder()
    async with (
        running_sim(keep_earlier_args=keep_earlier_args) as sim,
        running_pool(sim, rec) as pool,
    ):
        pool.subscribe(topics)
        await wait_until(all_live(pool, good), what="good topics live")
        await wait_until(lambda: len(rec.failed) == 2, what="two failures")
        assert sorted(t for t, _ in rec.failed) == ["orderbook.50.NOPEUSDT", "tickers.NOPEUSDT"]
        for topic, reason in rec.failed:
            assert reason == f"error:handler not found,topic:{topic}"
            assert pool.topic_state(topic) == "failed"
        assert pool.status()["topics"] == {"pending": 0, "live": len(good), "failed": 2}
        assert sim.subscription_counts() == dict.fromkeys(good, 1)
        await wait_until(lambda: all(rec.count(t) for t in good), what="data on good topics")
        # a failed topic can be asked for again, and fails again
        pool.subscribe(["tickers.NOPEUSDT"])
        assert pool.topic_state("tickers.NOPEUSDT") == "pending"
        await wait_until(lambda: len(rec.failed) == 3, what="third failure")
        pool.unsubscribe(["tickers.NOPEUSDT"])
        assert pool.topic_state("tickers.NOPEUSDT") is None


async def test_duplicate_subscribe_is_never_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastproxy.upstream")
    rec = Recorder()
    async with running_sim() as sim, running_pool(sim, rec, batch_size=3) as pool:
        pool.subscribe(TICKERS + TICKERS[:2])
        pool.subscribe(TICKERS)
        await asyncio.sleep(0)
        pool.subscribe(TICKERS)  # while the requests are in flight
        await wait_until(all_live(pool, TICKERS), what="live")
        pool.subscribe(TICKERS)  # while live
        # flapping: unsubscribe and subscribe again in the same tick and across ticks
        pool.unsubscribe(["tickers.BTCUSDT"])
        pool.subscribe(["tickers.BTCUSDT"])
        pool.unsubscribe(["tickers.ETHUSDT"])
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        pool.subscribe(["tickers.ETHUSDT"])
        for _ in range(5):
            pool.unsubscribe(["tickers.SOLUSDT"])
            await asyncio.sleep(0.005)
            pool.subscribe(["tickers.SOLUSDT"])
        await wait_until(all_live(pool, TICKERS), what="live after flapping", timeout=20)
        await asyncio.sleep(0.5)
        assert sim.subscription_counts() == dict.fromkeys(TICKERS, 1)
        assert rec.failed == []
        assert not [r for r in caplog.records if "already subscribed" in str(r.__dict__)]
        assert not [r for r in caplog.records if r.getMessage() == "upstream subscribe failed"]


async def test_snapshot_before_ack_chaos_is_handled() -> None:
    rec = Recorder()
    async with running_sim(snapshot_before_ack=True) as sim, running_pool(sim, rec) as pool:
        pool.subscribe([*MIXED, "tickers.NOPEUSDT"])
        await wait_until(all_live(pool, MIXED), what="live")
        await wait_until(lambda: len(rec.failed) == 1, what="unknown refused")
        await asyncio.sleep(0.3)
        assert sim.subscription_counts() == dict.fromkeys(MIXED, 1)


# -- faults ---------------------------------------------------------------------------------


async def test_drop_all_recovers_every_topic_with_fresh_snapshots() -> None:
    rec = Recorder()
    async with running_sim() as sim, running_pool(sim, rec, max_topics_per_conn=3) as pool:
        pool.subscribe(MIXED)
        await wait_until(all_live(pool, MIXED), what="live")
        await wait_until(lambda: all(rec.count(t) for t in MIXED), what="data everywhere")
        old = {t: rec.frames[t][-1][0] for t in MIXED}
        mark = len(rec.events)
        assert sim.drop_all() == 3
        took = await wait_until(
            lambda: all(
                any(e[0] == "data" and e[1] == t and e[2] > old[t] for e in rec.events[mark:])
                for t in MIXED
            ),
            timeout=10,
            what="new-generation data on every topic",
        )
        assert took < 3.0, f"recovery took {took:.2f} s"
        assert all(pool.topic_state(t) == "live" for t in MIXED)
        after = rec.events[mark:]
        for topic in MIXED:
            reset_at = after.index(("reset", topic, None))
            fresh = [
                i for i, e in enumerate(after) if e[:2] == ("data", topic) and e[2] > old[topic]
            ]
            assert fresh and reset_at < fresh[0]  # reset before the new connection's data
            first_new = next(f for g, f in rec.frames[topic] if g > old[topic])
            assert first_new.get("type") == "snapshot"
        assert sorted(rec.resets) == sorted(MIXED)
        status = pool.status()
        assert status["reconnects"] == 3 and status["connected"] == 3
        assert sim.subscription_counts() == dict.fromkeys(MIXED, 1)


async def test_half_dead_connection_is_detected_and_replaced() -> None:
    rec = Recorder()
    deadlines = {"ping_interval": 0.5, "pong_timeout": 0.5, "silence_timeout": 1.5}
    async with running_sim() as sim, running_pool(sim, rec, **deadlines) as pool:
        pool.subscribe(TICKERS)
        await wait_until(all_live(pool, TICKERS), what="live")
        sim.set_half_dead(True)
        took = await wait_until(
            lambda: pool.status()["dead_detected"] >= 1, timeout=15, what="dead detected"
        )
        # worst case is ping interval + pong timeout (or the silence deadline): about 1-1.5 s
        assert took < 5.0, f"detection took {took:.2f} s"
        assert set(rec.resets) == set(TICKERS)
        generation = max(g for t in TICKERS for g, _ in rec.frames[t])
        sim.set_half_dead(False)
        await wait_until(
            lambda: all(rec.frames[t][-1][0] > generation for t in TICKERS),
            timeout=15,
            what="fresh data after recovery",
        )
        assert all(pool.topic_state(t) == "live" for t in TICKERS)
        await wait_until(lambda: sim.connection_count() == 1, what="only one socket left")
        assert sim.subscription_counts() == dict.fromkeys(TICKERS, 1)


async def test_slow_pongs_within_the_deadline_keep_the_connection() -> None:
    rec = Recorder()
    deadlines = {"ping_interval": 0.3, "pong_timeout": 1.5, "silence_timeout": 5.0}
    async with running_sim() as sim, running_pool(sim, rec, **deadlines) as pool:
        pool.subscribe(TICKERS[:1])
        await wait_until(all_live(pool, TICKERS[:1]), what="live")
        sim.set_pong_delay(0.4)
        await asyncio.sleep(2.0)
        assert pool.status()["dead_detected"] == 0
        sim.set_pong_delay(3.0)
        await wait_until(lambda: pool.status()["dead_detected"] >= 1, timeout=15, what="dead")


async def test_handshake_refusals_back_off_without_a_busy_loop() -> None:
    rec = Recorder()
    async with running_sim() as sim:
        sim.refuse_handshakes(502)
        async with running_pool(sim, rec, backoff_base=0.1, backoff_cap=1.0) as pool:
            pool.subscribe(TICKERS[:2])
            await asyncio.sleep(3.0)
            attempts_502 = sim.handshake_attempts
            # exponential with full jitter to a 1 s cap: roughly 6-10 tries in 3 s; a busy loop
            # would make hundreds
            assert 2 <= attempts_502 <= 30, attempts_502
            assert not pool.is_up and pool.status()["down_since"] is not None
            assert pool.topic_state(TICKERS[0]) == "pending"
            sim.refuse_handshakes(403)
            await asyncio.sleep(2.0)
            attempts_403 = sim.handshake_attempts - attempts_502
            assert 1 <= attempts_403 <= 20, attempts_403
            await wait_until(
                lambda: pool.status()["connect_failures"] == sim.handshake_attempts,
                what="every refusal counted",
            )
            sim.refuse_handshakes(None)
            await wait_until(all_live(pool, TICKERS[:2]), timeout=15, what="live after refusals")
            assert pool.is_up and pool.status()["down_since"] is None
            assert rec.failed == []


async def test_connection_budget_caps_attempts_in_a_storm() -> None:
    rec = Recorder()
    async with running_sim() as sim:
        sim.refuse_handshakes(502)
        settings = {
            "backoff_base": 0.01,
            "backoff_cap": 0.02,
            "conn_budget": 4,
            "conn_budget_window": 60.0,
            "max_topics_per_conn": 1,
        }
        async with running_pool(sim, rec, **settings) as pool:
            pool.subscribe(TICKERS)  # four connections, all refused, tiny backoff
            await asyncio.sleep(2.0)
            assert sim.handshake_attempts == 4
            assert pool.status()["budget_used"] == 4
            assert pool.budget.waits > 0
            start = time.monotonic()
        assert time.monotonic() - start < 5.0  # stop is not held up by budget waits
        assert upstream_tasks() == []


async def test_callback_exceptions_are_contained() -> None:
    def broken(topic: str, frame: dict[str, Any]) -> None:
        raise RuntimeError("consumer bug")

    def broken_reset(topic: str) -> None:
        raise RuntimeError("consumer bug")

    async with running_sim() as sim:
        pool = UpstreamPool(
            UpstreamSettings(url=sim.ws_url("linear"), backoff_base=0.1),
            on_data=broken,
            on_failed=lambda t, r: None,
            on_reset=broken_reset,
        )
        await pool.start()
        try:
            pool.subscribe(TICKERS[:2])
            await wait_until(all_live(pool, TICKERS[:2]), what="live")
            await wait_until(lambda: pool.status()["callback_errors"] > 10, what="errors")
            assert pool.status()["disconnects"] == 0
            sim.drop_all()
            await wait_until(lambda: pool.status()["reconnects"] == 1, what="reconnect")
            await wait_until(all_live(pool, TICKERS[:2]), what="live again")
        finally:
            await pool.stop()


async def test_unsubscribing_the_last_topic_lingers_then_closes() -> None:
    rec = Recorder()
    async with running_sim() as sim, running_pool(sim, rec, empty_conn_linger=3.0) as pool:
        pool.subscribe(TICKERS[:2])
        await wait_until(all_live(pool, TICKERS[:2]), what="live")
        pool.unsubscribe([TICKERS[0]])
        await wait_until(lambda: TICKERS[0] not in sim.subscription_counts(), what="unsub")
        count = rec.count(TICKERS[1])
        await wait_until(lambda: rec.count(TICKERS[1]) > count + 2, what="the other flows")
        assert pool.topic_state(TICKERS[1]) == "live"

        pool.unsubscribe([TICKERS[1]])
        await wait_until(lambda: not sim.subscription_counts(), what="nothing subscribed")
        assert sim.connection_count() == 1  # kept for the linger
        assert pool.is_up and pool.status()["topics"]["live"] == 0
        pool.subscribe([TICKERS[2]])  # back within the linger: same socket
        await wait_until(all_live(pool, TICKERS[2:3]), what="live on the lingering socket")
        assert pool.status()["connect_attempts"] == 1

        pool.unsubscribe([TICKERS[2]])
        await wait_until(lambda: pool.status()["connections"] == 0, timeout=10, what="closed")
        await wait_until(lambda: sim.connection_count() == 0, what="socket gone")
        await wait_until(lambda: upstream_tasks() == [], what="task gone")
        assert pool.is_up and rec.resets == []

        pool.subscribe([TICKERS[3]])  # and a new connection when needed again
        await wait_until(all_live(pool, TICKERS[3:]), what="live on a new socket")
        assert pool.status()["connect_attempts"] == 2


async def test_stop_closes_everything() -> None:
    rec = Recorder()
    async with running_sim() as sim:
        async with running_pool(sim, rec, max_topics_per_conn=2) as pool:
            pool.subscribe(TICKERS)
            await wait_until(all_live(pool, TICKERS), what="live")
            assert len(upstream_tasks()) == 2
        assert upstream_tasks() == []
        assert pool.status()["connected"] == 0
        await wait_until(lambda: sim.connection_count() == 0, what="sim sees the sockets close")
        assert rec.resets == []  # a shutdown is not a reset


async def test_stop_while_connecting_to_a_dead_address() -> None:
    rec = Recorder()
    settings = UpstreamSettings(url=f"ws://127.0.0.1:{closed_port()}/v5/public/linear")
    pool = UpstreamPool(
        settings, on_data=rec.on_data, on_failed=rec.on_failed, on_reset=rec.on_reset
    )
    await pool.start()
    pool.subscribe(TICKERS[:1])
    await wait_until(lambda: pool.status()["connect_failures"] >= 1, what="refused")
    assert pool.status()["down_since"] is not None
    start = time.monotonic()
    await pool.stop()
    assert time.monotonic() - start < 3.0
    assert upstream_tasks() == []


def test_pool_on_uvloop() -> None:
    """The production loop: subscribe, drop, recover."""

    async def scenario() -> None:
        rec = Recorder()
        async with running_sim() as sim, running_pool(sim, rec) as pool:
            pool.subscribe(MIXED)
            await wait_until(all_live(pool, MIXED), what="live")
            await wait_until(lambda: all(rec.count(t) for t in MIXED), what="data everywhere")
            sim.drop_all()
            await wait_until(lambda: set(rec.resets) == set(MIXED), what="resets")
            await wait_until(
                lambda: all(rec.frames[t][-1][0] >= 2 for t in MIXED), what="new generation"
            )

    uvloop.run(scenario())


# -- catalogue ------------------------------------------------------------------------------


async def test_catalogue_pages_through_the_simulator() -> None:
    async with running_sim() as sim:
        assert default_rest_url(sim.ws_url("linear")) == sim.http_url
        full = await asyncio.to_thread(fetch_symbols, sim.http_url, "linear", timeout=10)
        paged = await asyncio.to_thread(
            fetch_symbols, sim.http_url, "linear", timeout=10, page_limit=3
        )
        assert paged == full and len(full) > 10
        catalogue = SymbolCatalogue(sim.http_url, page_limit=5, refresh_interval=0.2)
        assert catalogue.check("BTCUSDT") is None
        await catalogue.start()
        await catalogue.wait_first_attempt(30)
        try:
            assert catalogue.check("BTCUSDT") is True
            assert catalogue.check("ETHUSDT") is True
            assert catalogue.check("NOPEUSDT") is False
            status = catalogue.status()
            assert status["known"] and status["symbols"] == len(full)
            assert status["last_error"] is None
            await wait_until(lambda: catalogue.fetches >= 3, what="periodic refresh")
        finally:
            await catalogue.stop()


async def test_catalogue_falls_back_when_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastproxy.upstream.catalogue")
    catalogue = SymbolCatalogue(f"http://127.0.0.1:{closed_port()}", timeout=2.0)
    await catalogue.start()
    await catalogue.wait_first_attempt(30)
    try:
        assert catalogue.check("BTCUSDT") is None
        status = catalogue.status()
        assert not status["known"] and status["last_error"]
        assert any("falls back" in r.getMessage() for r in caplog.records)
    finally:
        await catalogue.stop()


async def test_catalogue_keeps_the_last_good_list() -> None:
    async with running_sim() as sim:
        catalogue = SymbolCatalogue(sim.http_url)
        await catalogue.start()
        await catalogue.wait_first_attempt(30)
        try:
            assert catalogue.check("BTCUSDT") is True
            catalogue.rest_url = f"http://127.0.0.1:{closed_port()}"
            assert await catalogue.refresh() is False
            assert catalogue.check("BTCUSDT") is True
            assert catalogue.check("NOPEUSDT") is False
            assert catalogue.status()["last_error"] and catalogue.status()["known"]
        finally:
            await catalogue.stop()


# -- the frame path of the listener, without a socket -----------------------------------------


def listener_for(topics: list[str]) -> tuple[Any, UpstreamPool, Recorder]:
    rec = Recorder()
    pool = UpstreamPool(
        UpstreamSettings(url="ws://127.0.0.1:1/v5/public/linear", max_frame_size=1000),
        on_data=rec.on_data,
        on_failed=rec.on_failed,
        on_reset=rec.on_reset,
    )
    pool.subscribe(topics)
    state = pool.plan.conns[0]
    state.opened(time.monotonic(), 7)
    runner = Runner(pool, state)
    return runner._make_listener(), pool, rec


def frame(payload: bytes, msg_type: WSMsgType = WSMsgType.TEXT, fin: bool = True) -> Any:
    return _make_test_ws_frame(msg_type, payload, fin, False)


def test_listener_parses_each_frame_once_and_routes_it() -> None:
    listener, pool, rec = listener_for(["tickers.BTCUSDT"])
    data = orjson.dumps({"topic": "tickers.BTCUSDT", "type": "snapshot", "data": {"a": "1"}})
    listener.on_ws_frame(None, frame(data))
    assert rec.frames["tickers.BTCUSDT"] == [(1, orjson.loads(data))]
    assert pool.topic_state("tickers.BTCUSDT") == "live" and pool.messages_in == 1
    listener.on_ws_frame(None, frame(b'{"topic":"tickers.ETHUSDT","data":{}}'))  # not ours
    listener.on_ws_frame(None, frame(b"not json"))
    listener.on_ws_frame(None, frame(b"[1]"))
    listener.on_ws_frame(None, frame(b"\x00\x01", WSMsgType.BINARY))
    assert pool.bad_frames == 2 and pool.messages_in == 1
    pong = b'{"success":true,"ret_msg":"pong","conn_id":"x","req_id":"","op":"ping"}'
    listener.on_ws_frame(None, frame(pong))
    assert listener.state.pongs == 1


def test_listener_reassembles_fragmented_messages() -> None:
    listener, pool, rec = listener_for(["tickers.BTCUSDT"])
    data = orjson.dumps({"topic": "tickers.BTCUSDT", "type": "snapshot", "data": {}})
    listener.on_ws_frame(None, frame(data[:10], fin=False))
    listener.on_ws_frame(None, frame(data[10:20], WSMsgType.CONTINUATION, fin=False))
    assert rec.count("tickers.BTCUSDT") == 0
    listener.on_ws_frame(None, frame(data[20:], WSMsgType.CONTINUATION))
    assert rec.count("tickers.BTCUSDT") == 1
    # an oversized fragmented message is dropped, not buffered without end
    listener.on_ws_frame(None, frame(b"{" + b" " * 900, fin=False))
    listener.on_ws_frame(None, frame(b" " * 200, WSMsgType.CONTINUATION, fin=False))
    listener.on_ws_frame(None, frame(b"}", WSMsgType.CONTINUATION))
    assert pool.bad_frames == 1 and rec.count("tickers.BTCUSDT") == 1

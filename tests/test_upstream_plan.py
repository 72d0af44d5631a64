"""Placement of topics on connections, the reconnect backoff and the connection budget; sans-I/O."""

from __future__ import annotations

import random
from typing import Any

import orjson

from fastproxy.upstream import default_rest_url
from fastproxy.upstream.plan import PoolPlan
from fastproxy.upstream.policy import Backoff, ConnectionBudget
from fastproxy.upstream.settings import UpstreamSettings

URL = "ws://127.0.0.1:1/v5/public/linear"


def plan(**overrides: Any) -> PoolPlan:
    return PoolPlan(UpstreamSettings(url=URL, **overrides))


def test_topics_fill_connections_up_to_the_topic_limit() -> None:
    p = plan(max_topics_per_conn=3)
    topics = [f"tickers.S{i}USDT" for i in range(8)]
    touched, rejected = p.subscribe(topics)
    assert rejected == []
    assert [len(c.topics) for c in p.conns] == [3, 3, 2]
    assert len(touched) == 3
    placed = [t for c in p.conns for t in c.topics]
    assert sorted(placed) == sorted(topics)  # each exactly once


def test_topics_respect_the_args_character_limit() -> None:
    p = plan(max_args_chars_per_conn=50)
    p.subscribe(["x" * 20, "y" * 20, "z" * 20])  # 23 chars each with quotes and comma
    assert [sorted(c.topics) for c in p.conns] == [["x" * 20, "y" * 20], ["z" * 20]]
    _, rejected = p.subscribe(["w" * 60])
    assert rejected and rejected[0][0] == "w" * 60


def test_subscribe_is_idempotent_and_ignores_junk() -> None:
    p = plan()
    p.subscribe(["tickers.BTCUSDT", "tickers.BTCUSDT", "", 5])  # type: ignore[list-item]
    touched, _ = p.subscribe(["tickers.BTCUSDT"])
    assert touched == []
    assert len(p.conns) == 1 and p.conns[0].wanted == 1


def test_freed_room_is_reused_before_opening_a_connection() -> None:
    p = plan(max_topics_per_conn=2)
    p.subscribe(["a", "b", "c"])
    assert len(p.conns) == 2
    p.unsubscribe(["a"], 1.0)  # not open: nothing in flight, the slot frees at once
    p.subscribe(["d"])
    assert len(p.conns) == 2
    assert p.where["d"] is p.conns[0]


def test_resubscribe_goes_back_to_the_connection_still_unsubscribing_it() -> None:
    p = plan(max_topics_per_conn=1)
    p.subscribe(["a"])
    conn = p.conns[0]
    conn.opened(0.0, 1)
    raw = conn.take_requests(0.0)
    conn.on_control({"success": True, "ret_msg": "", "req_id": orjson.loads(raw[0])["req_id"]}, 0.0)
    p.unsubscribe(["a"], 1.0)
    conn.take_requests(1.0)  # the unsubscribe is in flight
    p.subscribe(["a"])
    assert len(p.conns) == 1 and p.where["a"] is conn


def test_states_and_failed_topics() -> None:
    p = plan()
    p.subscribe(["a", "b"])
    conn = p.conns[0]
    assert p.topic_state("a") == "pending"
    assert p.topic_state("zzz") is None
    conn.want("a")
    conn._drop(conn.topics["b"])  # as the protocol does when the exchange refuses b
    assert p.refused(conn, "b", "error:handler not found,topic:b")
    assert not p.refused(conn, "b", "again")  # reported once
    assert p.topic_state("b") == "failed"
    assert p.counts() == {"pending": 1, "live": 0, "failed": 1}
    p.subscribe(["b"])  # a later subscribe tries again
    assert p.topic_state("b") == "pending"
    p.unsubscribe(["zzz"], 0.0)
    p.remember_failed("c", "x")
    p.unsubscribe(["c"], 0.0)
    assert p.topic_state("c") is None


def test_the_failed_record_is_bounded() -> None:
    p = plan()
    p.MAX_FAILED = 5
    for i in range(20):
        p.remember_failed(f"t{i}", "no")
    assert list(p.failed) == [f"t{i}" for i in range(15, 20)]


def test_retired_connections_take_nothing() -> None:
    p = plan()
    p.subscribe(["a"])
    conn = p.conns[0]
    p.unsubscribe(["a"], 0.0)
    p.retire(conn)
    p.subscribe(["b"])
    assert p.where["b"] is not conn and conn not in p.conns


# -- backoff and budget ----------------------------------------------------------------------


def test_backoff_grows_to_the_cap_with_full_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(7))
    ceilings = []
    delays = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        delays.append(backoff.next_delay())
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.ceiling() == 0.5
    for _ in range(5000):
        backoff.next_delay()
    assert backoff.ceiling() == 30.0


def test_budget_caps_attempts_in_a_sliding_window() -> None:
    budget = ConnectionBudget(3, 10.0)
    assert [budget.reserve(t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert budget.reserve(3.0) == 7.0  # the first attempt leaves the window at t=10
    assert budget.reserve(9.99) > 0
    assert budget.reserve(10.0) == 0.0
    assert budget.used(10.0) == 3
    assert budget.used(100.0) == 0


def test_budget_over_a_storm() -> None:
    budget = ConnectionBudget(500, 300.0)
    granted = []
    t = 0.0
    while t < 900.0:
        if budget.reserve(t) == 0.0:
            granted.append(t)
        t += 0.05
    for i, start in enumerate(granted):
        in_window = sum(1 for g in granted[i:] if g < start + 300.0)
        assert in_window <= 500


# -- REST URL ----------------------------------------------------------------------------------


def test_default_rest_url() -> None:
    assert default_rest_url("wss://stream.bybit.com/v5/public/linear") == "https://api.bybit.com"
    assert (
        default_rest_url("wss://stream-testnet.bybit.com/v5/public/linear")
        == "https://api-testnet.bybit.com"
    )
    assert default_rest_url("ws://127.0.0.1:9001/v5/public/linear") == "http://127.0.0.1:9001"
    assert default_rest_url("wss://relay.example:8443/v5/public/linear") == (
        "https://relay.example:8443"
    )

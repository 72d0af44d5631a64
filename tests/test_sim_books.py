"""The simulator's book faults, frame by frame (sans-I/O): each one does exactly what its name
says to the `u` chain and the book, and the truth log records the exchange's book per `u`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastproxy.sim.exchange import Exchange
from fastproxy.sim.faults import FAULT_NAMES, apply_fault, parse_fault_spec
from fastproxy.sim.feeds import BookFeed
from fastproxy.sim.instruments import Catalog
from fastproxy.sim.market import ModelParams

NOW = 1_786_659_827_683
TOPIC = "orderbook.50.BTCUSDT"


def make_feed() -> tuple[Exchange, BookFeed]:
    exchange = Exchange(Catalog(), ModelParams(book_churn=6, trade_rate=20.0), 3, 3000)
    ref = exchange.parse("linear", TOPIC)
    assert ref is not None
    feed = exchange.activate(ref, NOW)
    assert isinstance(feed, BookFeed)
    feed.truth = {}
    return exchange, feed


def frames(exchange: Exchange, feed: BookFeed, now: int) -> list[dict[str, Any]]:
    exchange.step(now)
    return [orjson.loads(f) for f in feed.tick(now)]


def next_frame(exchange: Exchange, feed: BookFeed, start: int) -> tuple[dict[str, Any], int]:
    now = start
    for _ in range(500):
        now += 20
        out = frames(exchange, feed, now)
        if out:
            return out[0], now
    raise AssertionError("the book never changed")


def test_faults_break_the_u_chain_as_named() -> None:
    exchange, feed = make_feed()
    (snapshot,) = [orjson.loads(f) for f in feed.snapshot_frames(NOW)]
    u = snapshot["data"]["u"]
    assert feed.truth[u][0] == snapshot["data"]["b"]
    frame, now = next_frame(exchange, feed, NOW)
    assert frame["type"] == "delta" and frame["data"]["u"] == u + 1
    assert u + 1 in feed.truth
    u += 1

    feed.back_next += 1  # backward_u
    frame, now = next_frame(exchange, feed, now)
    assert frame["data"]["u"] == u - 1
    u -= 1

    feed.cross_next += 1  # crossed_delta: a bid at the best ask, the book itself unchanged
    window_asks, truth = dict(feed.win_asks), dict(feed.truth)
    frame, now = next_frame(exchange, feed, now)
    assert frame["type"] == "delta" and frame["data"]["u"] == u + 1 and frame["data"]["a"] == []
    bid = float(frame["data"]["b"][0][0])
    assert bid >= min(float(p) for p, _ in feed.truth[u][1])
    assert feed.win_asks == window_asks and feed.truth == truth
    u += 1

    feed.drop_next += 1  # drop_delta: the book moves on, no frame, the truth knows
    before = set(feed.truth)
    now_before = now
    for _ in range(500):
        now += 20
        out = frames(exchange, feed, now)
        if set(feed.truth) != before:
            break
    assert out == [] and feed.u == u + 1 and u + 1 in feed.truth and now > now_before
    frame, now = next_frame(exchange, feed, now)
    assert frame["data"]["u"] == u + 2  # the next delta: one update id missing downstream


@pytest.mark.parametrize("name", ["backward_u", "drop_delta", "crossed_delta"])
def test_the_new_faults_are_in_the_fault_api(name: str) -> None:
    assert name in FAULT_NAMES
    assert parse_fault_spec(f"{name}={TOPIC}") == (name, {"value": TOPIC})
    calls: list[tuple[str, str]] = []

    class Target:
        def __getattr__(self, attr: str) -> Any:
            return lambda topic, category: calls.append((attr, topic))

    assert apply_fault(Target(), name, {"topic": TOPIC}) == {name: TOPIC, "category": "linear"}  # type: ignore[arg-type]
    assert calls == [(name, TOPIC)]

"""Order books and liquidations in the codec, both implementations.

The property test plays an exchange that keeps a true book and sends its changes through random
faults (lost, repeated and older update ids, u=1, mid-stream snapshots, crossed and unreadable
deltas). A client that applies every update to its snapshot must hold exactly the exchange's
book at every updateId it is told of, never see an update that does not follow from its last
message, and a late joiner's snapshot must be that same book. The Cython codec must produce the
same bytes as the pure one, and a follower's copy fed with the Messages the same snapshots.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastproxy.codec import (
    CY_CODECS,
    CYTHON_AVAILABLE,
    CYTHON_IMPORT_ERROR,
    PY_CODECS,
    RESYNC_REASONS,
    CodecError,
)
from fastproxy.streams import DELTA_KINDS, LIQUIDATION, ORDERBOOK, STATE_KINDS, parse_stream_arg

if not CYTHON_AVAILABLE and os.environ.get("FASTPROXY_REQUIRE_EXT") == "1":
    raise RuntimeError(f"FASTPROXY_REQUIRE_EXT=1 but {CYTHON_IMPORT_ERROR}")

IMPLS = [pytest.param(PY_CODECS, id="pure")]
if CY_CODECS is not None:
    IMPLS.append(pytest.param(CY_CODECS, id="cython"))

BOOK50 = parse_stream_arg("orderbook:50:BTCUSDT")
BOOK1 = parse_stream_arg("orderbook:1:BTCUSDT")
LIQ = parse_stream_arg("liquidation:ROSEUSDT")


def price(tick: int) -> str:
    return f"{tick // 10}.{tick % 10}"


def size(units: int) -> str:
    return "0" if units == 0 else f"{units}.250"


def frame(kind: str, u: int, bids: list, asks: list, ts: int = 1700000000000) -> dict[str, Any]:
    return {
        "topic": "orderbook.50.BTCUSDT",
        "type": kind,
        "ts": ts,
        "data": {"s": "BTCUSDT", "b": bids, "a": asks, "u": u, "seq": u * 7},
        "cts": ts - 2,
    }


def doc(message: Any) -> dict[str, Any]:
    return orjson.loads(message.payload)


def book_of(message: Any) -> tuple[dict[str, str], dict[str, str]]:
    data = doc(message)["data"]
    return dict(map(tuple, data["bids"])), dict(map(tuple, data["asks"]))


class Exchange:
    """A true book of at most 50 levels a side (bids 100.0-104.9, asks 105.0-109.9), its u, and
    the frames a Bybit topic would send about it, faults included."""

    def __init__(self) -> None:
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.u = 5000
        self.ts = 1700000000000

    def apply(self, changes: list[tuple[bool, int, int]]) -> tuple[list, list]:
        bids, asks = [], []
        for is_bid, tick, units in changes:
            p, s = price((1000 if is_bid else 1050) + tick), size(units)
            side = self.bids if is_bid else self.asks
            if units:
                side[p] = s
            else:
                side.pop(p, None)
            (bids if is_bid else asks).append([p, s])
        return bids, asks

    def _frame(self, kind: str, u: int, bids: list, asks: list) -> dict[str, Any]:
        self.ts += 20
        return frame(kind, u, bids, asks, self.ts)

    def snapshot(self, u: int | None = None) -> dict[str, Any]:
        self.u = self.u + 1 if u is None else u
        bids = sorted(([p, s] for p, s in self.bids.items()), key=lambda x: -float(x[0]))
        asks = sorted(([p, s] for p, s in self.asks.items()), key=lambda x: float(x[0]))
        return self._frame("snapshot", self.u, bids, asks)

    def delta(self, changes: list, u_step: int = 1) -> dict[str, Any]:
        bids, asks = self.apply(changes)
        self.u += u_step
        return self._frame("delta", self.u, bids, asks)


class Client:
    """A downstream client: applies updates to its snapshot, checks every rule it relies on."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.bids: dict[str, str] | None = None
        self.asks: dict[str, str] = {}
        self.u: int | None = None
        self.seq: int | None = None
        self.snapshots = 0

    def take(self, message: Any) -> None:
        d = doc(message)
        data = d["data"]
        assert list(data) == ["symbol", "bids", "asks", "updateId", "time"]
        assert data["symbol"] == "BTCUSDT"
        if self.seq is not None:
            assert d["seq"] == self.seq + 1
        if d["type"] == "snapshot":
            prices = [float(p) for p, _ in data["bids"]]
            assert prices == sorted(prices, reverse=True)
            prices = [float(p) for p, _ in data["asks"]]
            assert prices == sorted(prices)
            assert len(data["bids"]) <= self.depth and len(data["asks"]) <= self.depth
            self.bids, self.asks = book_of(message)
            self.snapshots += 1
        else:
            assert d["type"] == "update"
            assert self.bids is not None, "an update before any snapshot"
            assert data["updateId"] == self.u + 1, "an update that does not follow"
            for side, levels in ((self.bids, data["bids"]), (self.asks, data["asks"])):
                for p, s in levels:
                    if float(s) == 0:
                        side.pop(p, None)
                    else:
                        side[p] = s
        self.u, self.seq = data["updateId"], d["seq"]


changes = st.lists(
    st.tuples(st.booleans(), st.integers(0, 49), st.integers(0, 4)), min_size=1, max_size=12
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("delta"), changes),
        st.tuples(
            st.sampled_from(["lose", "repeat", "backward", "u1", "malformed", "crossed"]), changes
        ),
        st.tuples(st.sampled_from(["snapshot", "restart", "reset"]), st.just([])),
    ),
    max_size=40,
)


def run(codecs: dict[str, type], plan: list) -> tuple[list[bytes], list[str]]:
    """Drive one codec through `plan`; returns every frame it made and every resync reason."""
    exchange = Exchange()
    codec = codecs[ORDERBOOK](BOOK50)
    follower = codecs[ORDERBOOK](BOOK50)
    client = Client(50)
    out: list[bytes] = []
    reasons: list[str] = []
    sent = [0]  # the u of the last frame that reached the codec

    def send(upstream: dict[str, Any]) -> None:
        sent[0] = upstream["data"]["u"]
        try:
            messages = codec.feed(upstream)
        except CodecError:
            messages = []
        for message in messages:
            client.take(message)
            follower.follow(message)
            out.append(message.frame)
            # the client holds the exchange's book at the updateId it was told of
            assert client.u == exchange.u
            assert (client.bids, client.asks) == (exchange.bids, exchange.asks)
        if codec.resync is not None:
            reason, again = codec.take_resync()
            reasons.append(reason)
            if again:
                assert codec.snapshot() is None  # nobody may join a book being rebuilt
                send(exchange.snapshot())  # the resubscription's fresh snapshot
        snap = codec.snapshot()
        if snap is not None:
            assert book_of(snap) == (exchange.bids, exchange.asks)
            assert doc(snap)["data"]["updateId"] == client.u and snap.seq == client.seq
            assert follower.snapshot().payload == snap.payload

    send(exchange.snapshot())
    for kind, change in plan:
        if kind == "delta":
            send(exchange.delta(change))
        elif kind == "lose":
            exchange.delta(change)
        elif kind in ("repeat", "backward"):
            # the u of the last frame the codec saw, or the one before. (A repeat of a frame
            # that was lost on the way would look like that frame: no exchange client can tell,
            # Bybit sending no checksum, and the exchange never does it.)
            bids, asks = exchange.apply(change)
            u = sent[0] if kind == "repeat" else sent[0] - 1
            send(frame("delta", u, bids, asks))
        elif kind == "u1":  # the exchange restarted its numbering
            exchange.apply(change)
            exchange.u = 1
            send(frame("delta", 1, [], []))
        elif kind == "malformed":
            upstream = exchange.delta(change)
            upstream["data"]["b"].append(["1e3", "1"])
            send(upstream)
        elif kind == "crossed":
            if exchange.asks:  # a bid at the best ask, which the exchange's book does not have
                best_ask = min(exchange.asks, key=float)
                exchange.u += 1
                send(frame("delta", exchange.u, [[best_ask, "1.250"]], []))
        elif kind == "snapshot":
            send(exchange.snapshot())
        elif kind == "restart":
            send(exchange.snapshot(u=1))
        else:  # the upstream connection was lost: the next subscription starts with a snapshot
            codec.reset()
            assert codec.snapshot() is None
            send(exchange.snapshot())
    assert all(reason in RESYNC_REASONS for reason in reasons)
    return out, reasons


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_client_holds_the_exchange_book_through_every_fault_pure_and_cython_alike(
    plan: list,
) -> None:
    pure = run(PY_CODECS, plan)
    if CY_CODECS is not None:
        assert run(CY_CODECS, plan) == pure


# -- the rules one by one -----------------------------------------------------------------


def feed_all(codec: Any, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for f in frames:
        out += [doc(m) for m in codec.feed(f)]
    return out


@pytest.mark.parametrize("codecs", IMPLS)
def test_snapshot_and_update_contract(codecs: dict[str, type]) -> None:
    codec = codecs[ORDERBOOK](BOOK50)
    snap, update = feed_all(
        codec,
        [
            frame("snapshot", 10, [["100.5", "1"], ["100.9", "2"]], [["101.0", "3"]]),
            frame("delta", 11, [["100.9", "0"], ["100.7", "4"]], []),
        ],
    )
    assert snap == {
        "stream": "mudrex.futures.orderbook.50.BTCUSDT",
        "type": "snapshot",
        "data": {
            "symbol": "BTCUSDT",
            "bids": [["100.9", "2"], ["100.5", "1"]],
            "asks": [["101.0", "3"]],
            "updateId": 10,
            "time": 1699999999998,
        },
        "timestamp": 1700000000000,
        "source": "mudrex",
        "seq": 1,
    }
    assert update["type"] == "update" and update["seq"] == 2
    assert update["data"] == {
        "symbol": "BTCUSDT",
        "bids": [["100.9", "0"], ["100.7", "4"]],
        "asks": [],
        "updateId": 11,
        "time": 1699999999998,
    }
    late = doc(codec.snapshot())
    assert late["type"] == "snapshot" and late["seq"] == 2
    assert late["data"]["bids"] == [["100.7", "4"], ["100.5", "1"]]


@pytest.mark.parametrize("codecs", IMPLS)
@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (frame("delta", 12, [["100.1", "1"]], []), "gap"),
        (frame("delta", 10, [["100.1", "1"]], []), "repeat"),
        (frame("delta", 9, [["100.1", "1"]], []), "backward"),
        (frame("delta", 1, [["100.1", "1"]], []), "restart"),
        (frame("delta", 11, [["101.0", "1"]], []), "crossed"),
        (frame("delta", 11, [["100.1", "x"]], []), "malformed"),
        (frame("delta", 11, [["100.1", "-1"]], []), "malformed"),
        (frame("delta", 11, [["100.1", "1", "2"]], []), "malformed"),
        (frame("delta", 11, [["1" + "0" * 19, "1"]], []), "malformed"),
        (frame("delta", 11, [["1." + "0" * 19, "1"]], []), "malformed"),
        (frame("delta", 11, [["1e2", "1"]], []), "malformed"),
    ],
)
def test_an_untrusted_delta_drops_the_book_and_asks_for_a_resubscribe(
    codecs: dict[str, type], second: dict[str, Any], reason: str
) -> None:
    codec = codecs[ORDERBOOK](BOOK50)
    feed_all(codec, [frame("snapshot", 10, [["100.5", "1"]], [["101.0", "3"]])])
    try:
        assert codec.feed(second) == []
    except CodecError:
        assert reason == "malformed"
    assert codec.resync == reason
    assert codec.take_resync() == (reason, True)
    assert codec.resync is None
    assert codec.snapshot() is None
    # deltas of the old subscription are dropped until the fresh snapshot
    assert codec.feed(frame("delta", 11, [["100.2", "1"]], [])) == []
    (fresh,) = feed_all(codec, [frame("snapshot", 40, [["100.4", "1"]], [["101.0", "3"]])])
    assert fresh["type"] == "snapshot" and fresh["seq"] == 2 and codec.resync is None
    assert fresh["data"]["bids"] == [["100.4", "1"]]


@pytest.mark.parametrize("codecs", IMPLS)
@pytest.mark.parametrize(("u", "reason"), [(11, "snapshot"), (1, "restart")])
def test_a_mid_stream_snapshot_is_taken_and_counted(
    codecs: dict[str, type], u: int, reason: str
) -> None:
    codec = codecs[ORDERBOOK](BOOK50)
    feed_all(codec, [frame("snapshot", 10, [["100.5", "1"]], [["101.0", "3"]])])
    (snap,) = feed_all(codec, [frame("snapshot", u, [["100.6", "1"]], [])])
    assert snap["type"] == "snapshot" and snap["data"]["bids"] == [["100.6", "1"]]
    assert codec.take_resync() == (reason, False)
    (update,) = feed_all(codec, [frame("delta", u + 1, [], [["101.1", "1"]])])
    assert update["type"] == "update" and update["data"]["updateId"] == u + 1


@pytest.mark.parametrize("codecs", IMPLS)
def test_a_price_is_its_exact_value(codecs: dict[str, type]) -> None:
    codec = codecs[ORDERBOOK](BOOK50)
    big = "9" * 19 + "." + "9" * 18
    feed_all(codec, [frame("snapshot", 10, [["100.5", "1"], ["0100.49", "2"]], [[big, "1"]])])
    (update,) = feed_all(codec, [frame("delta", 11, [["100.50", "3"]], [[big, "0"]])])
    assert update["data"]["bids"] == [["100.50", "3"]]  # the exchange's string, as sent
    assert doc(codec.snapshot())["data"] == {
        "symbol": "BTCUSDT",
        "bids": [["100.50", "3"], ["0100.49", "2"]],  # one level for 100.5 and 100.50
        "asks": [],
        "updateId": 11,
        "time": 1699999999998,
    }


@pytest.mark.parametrize("codecs", IMPLS)
def test_never_more_than_depth_levels(codecs: dict[str, type]) -> None:
    stream = parse_stream_arg("orderbook:50:BTCUSDT")
    codec = codecs[ORDERBOOK](stream)
    bids = [[price(1000 + i), "1"] for i in range(60)]
    asks = [[price(2000 + i), "1"] for i in range(60)]
    (snap,) = feed_all(codec, [frame("snapshot", 10, bids[::-1], asks)])
    assert len(snap["data"]["bids"]) == 50 and len(snap["data"]["asks"]) == 50
    assert snap["data"]["bids"][0] == [price(1059), "1"]  # the best ones are kept
    assert snap["data"]["asks"][-1] == [price(2049), "1"]
    # a delta that adds a level without removing one would leave 51: not the exchange's book
    assert codec.feed(frame("delta", 11, [[price(1060), "1"]], [])) == []
    assert codec.take_resync() == ("overflow", True)


@pytest.mark.parametrize("codecs", IMPLS)
def test_depth_1_every_message_is_complete_and_a_repeated_u_is_a_heartbeat(
    codecs: dict[str, type],
) -> None:
    codec = codecs[ORDERBOOK](BOOK1)
    out = feed_all(
        codec,
        [
            frame("snapshot", 7, [["100.5", "1"]], [["101.0", "3"]]),
            frame("snapshot", 7, [["100.5", "1"]], [["101.0", "3"]]),
            frame("snapshot", 8, [["100.6", "2"]], [["101.0", "3"]]),
        ],
    )
    assert [m["type"] for m in out] == ["snapshot"] * 3
    assert [m["seq"] for m in out] == [1, 2, 3]
    assert [m["data"]["updateId"] for m in out] == [7, 7, 8]
    assert out[2]["data"]["bids"] == [["100.6", "2"]]
    assert codec.resync is None
    feed_all(codec, [frame("snapshot", 1, [["100.6", "2"]], [])])
    assert codec.take_resync() == ("restart", False)


@pytest.mark.parametrize("codecs", IMPLS)
def test_deltas_before_the_first_snapshot_are_dropped(codecs: dict[str, type]) -> None:
    codec = codecs[ORDERBOOK](BOOK50)
    assert codec.feed(frame("delta", 5, [["100.1", "1"]], [])) == []
    assert codec.resync is None and codec.snapshot() is None


@pytest.mark.parametrize("codecs", IMPLS)
def test_reset_waits_for_the_next_snapshot(codecs: dict[str, type]) -> None:
    codec = codecs[ORDERBOOK](BOOK50, 41)
    feed_all(codec, [frame("snapshot", 10, [["100.5", "1"]], [])])
    codec.reset()
    assert codec.snapshot() is None
    assert codec.feed(frame("delta", 11, [["100.1", "1"]], [])) == []
    (snap,) = feed_all(codec, [frame("snapshot", 12, [], [])])
    assert snap["seq"] == 43 and snap["data"]["bids"] == [] and codec.resync is None


@pytest.mark.parametrize("codecs", IMPLS)
def test_liquidations(codecs: dict[str, type]) -> None:
    codec = codecs[LIQUIDATION](LIQ)
    events = [
        {"T": 1739502302929, "s": "ROSEUSDT", "S": "Sell", "v": "20000", "p": "0.04499"},
        {"T": 1739502302930, "s": "ROSEUSDT", "S": "Buy", "v": "5", "p": "0.045"},
    ]
    upstream = {"topic": "allLiquidation.ROSEUSDT", "type": "snapshot", "ts": 1739502303204}
    first = doc(codec.feed({**upstream, "data": events[:1]})[0])
    assert first["type"] == "snapshot" and first["seq"] == 1
    second = doc(codec.feed({**upstream, "data": events})[0])
    assert second["stream"] == "mudrex.futures.liquidation.ROSEUSDT"
    assert second["data"] == [
        {"symbol": "ROSEUSDT", "side": "sell", "price": "0.04499", "quantity": "20000",
         "time": 1739502302929},
        {"symbol": "ROSEUSDT", "side": "buy", "price": "0.045", "quantity": "5",
         "time": 1739502302930},
    ]  # fmt: skip
    assert second["type"] == "update" and second["seq"] == 2
    assert second["timestamp"] == 1739502303204
    assert codec.feed({**upstream, "data": []}) == []
    with pytest.raises(CodecError):
        codec.feed({**upstream, "data": [{**events[0], "S": "Long"}]})
    assert codec.seq == 2
    assert doc(codec.snapshot())["type"] == "snapshot"


def test_stream_kinds_say_which_streams_are_state_and_which_are_deltas() -> None:
    assert sorted(STATE_KINDS) == ["kline", "orderbook", "ticker"]
    assert sorted(DELTA_KINDS) == ["orderbook"]
    assert BOOK50.is_state and BOOK50.is_delta and not LIQ.is_state
    assert parse_stream_arg("ticker:BTCUSDT").is_state
    assert not parse_stream_arg("trade:BTCUSDT").is_state

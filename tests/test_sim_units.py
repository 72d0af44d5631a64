"""Sans-I/O tests of the Bybit simulator: protocol, topics, book, market model, feeds, REST."""

from __future__ import annotations

import datetime as dt
import random
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.sim.book import OrderBook, diff_window
from fastproxy.sim.exchange import Exchange
from fastproxy.sim.faults import FAULT_HELP, FAULT_NAMES, apply_fault, parse_fault_spec
from fastproxy.sim.feeds import MAX_TRADES_PER_FRAME, BookFeed, KlineFeed, TickerFeed, TradeFeed
from fastproxy.sim.instruments import DEFAULT_LINEAR_SYMBOLS, Catalog, fmt_fixed, trim
from fastproxy.sim.jsonenc import go_dumps
from fastproxy.sim.market import Instrument, ModelParams, candle_bounds
from fastproxy.sim.rest import instruments_info
from fastproxy.sim.session import ConnIdFactory, ProtocolOptions, SessionProtocol
from fastproxy.sim.topics import parse_topic

NOW = 1_786_659_827_683  # 2026-08-13, the date of the reference ticker capture
CATALOG = Catalog()


def session(category: str = "linear", **options: object) -> SessionProtocol:
    return SessionProtocol(
        category,
        "d9tc7k421nl91l9k6obg-s09y",
        lambda c, t: parse_topic(CATALOG, c, t),
        ProtocolOptions(**options),  # type: ignore[arg-type]
    )


def send(proto: SessionProtocol, msg: object) -> tuple[bytes, dict]:
    raw = msg if isinstance(msg, bytes) else orjson.dumps(msg)
    reply = proto.handle(raw, NOW)
    return reply.frame, orjson.loads(reply.frame)


# -- JSON encoding ---------------------------------------------------------------------------


def test_go_dumps_escapes_html_like_go() -> None:
    assert go_dumps({"m": "args size >10 <a> & \u2028"}) == (
        b'{"m":"args size \\u003e10 \\u003ca\\u003e \\u0026 \\u2028"}'
    )
    assert orjson.loads(go_dumps({"m": "<&>"})) == {"m": "<&>"}


def test_fmt_helpers() -> None:
    assert fmt_fixed(6356160, 2) == "63561.60"
    assert fmt_fixed(-5, 3) == "-0.005"
    assert fmt_fixed(42, 0) == "42"
    assert trim("16677.000") == "16677"
    assert trim("16649.50") == "16649.5"
    assert trim("0.0000") == "0"
    assert trim("-0.00000000") == "0"


def test_conn_ids_are_xid_like_and_unique() -> None:
    make = ConnIdFactory()
    ids = {make() for _ in range(500)}
    assert len(ids) == 500
    for conn_id in ids:
        assert re.fullmatch(r"[0-9a-v]{20}-[0-9a-z]{4}", conn_id), conn_id


# -- topics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "tickers.BTCUSDT",
        "tickers.BTC-26DEC25",
        "orderbook.1.BTCUSDT",
        "orderbook.50.ETHUSDT",
        "orderbook.200.SOLUSDT",
        "orderbook.1000.XRPUSDT",
        "publicTrade.DOGEUSDT",
        "kline.1.BTCUSDT",
        "kline.D.BTCUSDT",
        "kline.W.BTCUSDT",
        "kline.M.BTCUSDT",
        "kline.720.BTCUSDT",
        "allLiquidation.BTCUSDT",
    ],
)
def test_valid_linear_topics(topic: str) -> None:
    assert parse_topic(CATALOG, "linear", topic) is not None


@pytest.mark.parametrize(
    "topic",
    [
        "tickers.NOPEUSDT",
        "tickers.btcusdt",
        "Tickers.BTCUSDT",
        "orderbook.25.BTCUSDT",
        "orderbook.30.BTCUSDT",
        "orderbook.500.BTCUSDT",
        "orderbook.050.BTCUSDT",
        "orderbook.BTCUSDT",
        "kline.2.BTCUSDT",
        "kline.d.BTCUSDT",
        "liquidation.BTCUSDT",
        "liquidations:BTCUSDT",
        "order",
        "position.BTCUSDT",
        "tickers",
        "",
    ],
)
def test_invalid_linear_topics(topic: str) -> None:
    assert parse_topic(CATALOG, "linear", topic) is None


def test_category_specific_topics() -> None:
    assert parse_topic(CATALOG, "inverse", "tickers.BTCUSD") is not None
    assert parse_topic(CATALOG, "inverse", "tickers.BTCUSDT") is None
    assert parse_topic(CATALOG, "spot", "allLiquidation.BTCUSDT") is None
    assert parse_topic(CATALOG, "spot", "orderbook.200.BTCUSDT") is not None
    assert parse_topic(CATALOG, "option", "orderbook.25.BTC-25JUN27-106000-P-USDT") is not None
    assert parse_topic(CATALOG, "option", "orderbook.200.BTC-25JUN27-106000-P-USDT") is None
    assert parse_topic(CATALOG, "option", "publicTrade.BTC") is not None


# -- protocol: linear ------------------------------------------------------------------------


def test_success_ack_exact_bytes_and_key_order() -> None:
    proto = session()
    raw, _ = send(proto, {"req_id": "probe-pp", "op": "subscribe", "args": ["tickers.BTCUSDT"]})
    assert raw == (
        b'{"success":true,"ret_msg":"","conn_id":"d9tc7k421nl91l9k6obg-s09y",'
        b'"req_id":"probe-pp","op":"subscribe"}'
    )


@pytest.mark.parametrize(("req_id", "echo"), [("abc", "abc"), (17, 17), (2.5, 2.5), (None, "")])
def test_req_id_echo(req_id: object, echo: object) -> None:
    msg: dict[str, object] = {"op": "subscribe", "args": ["tickers.BTCUSDT"]}
    if req_id is not None:
        msg["req_id"] = req_id
    _, reply = send(session(), msg)
    assert reply["req_id"] == echo
    assert type(reply["req_id"]) is type(echo)


def test_one_ack_for_many_args_and_subscribed_list() -> None:
    proto = session()
    args = ["tickers.BTCUSDT", "orderbook.50.BTCUSDT", "publicTrade.ETHUSDT", "kline.5.SOLUSDT"]
    reply = proto.handle(orjson.dumps({"op": "subscribe", "args": args}), NOW)
    assert reply.kind == "ack"
    assert [r.topic for r in reply.subscribed] == args
    assert list(proto.topics) == args


def test_handler_not_found_strict_mode_applies_nothing() -> None:
    proto = session()
    args = ["tickers.BTCUSDT", "orderbook.50.NOPEUSDT", "tickers.ETHUSDT"]
    reply = proto.handle(orjson.dumps({"req_id": "e1", "op": "subscribe", "args": args}), NOW)
    assert orjson.loads(reply.frame) == {
        "success": False,
        "ret_msg": "error:handler not found,topic:orderbook.50.NOPEUSDT",
        "conn_id": "d9tc7k421nl91l9k6obg-s09y",
        "req_id": "e1",
        "op": "subscribe",
    }
    assert reply.subscribed == []
    assert proto.topics == {}


def test_handler_not_found_keep_earlier_args() -> None:
    proto = session(keep_earlier_args=True)
    args = ["tickers.BTCUSDT", "kline.2.BTCUSDT", "tickers.ETHUSDT"]
    reply = proto.handle(orjson.dumps({"op": "subscribe", "args": args}), NOW)
    assert orjson.loads(reply.frame)["ret_msg"] == "error:handler not found,topic:kline.2.BTCUSDT"
    assert [r.topic for r in reply.subscribed] == ["tickers.BTCUSDT"]
    assert list(proto.topics) == ["tickers.BTCUSDT"]


def test_already_subscribed_rejects_whole_request_even_with_keep_mode() -> None:
    proto = session(keep_earlier_args=True)
    proto.handle(orjson.dumps({"op": "subscribe", "args": ["publicTrade.BTCUSDT"]}), NOW)
    args = ["tickers.SOLUSDT", "publicTrade.BTCUSDT", "publicTrade.ETHUSDT"]
    reply = proto.handle(orjson.dumps({"req_id": "e6", "op": "subscribe", "args": args}), NOW)
    body = orjson.loads(reply.frame)
    assert body["ret_msg"] == "error:already subscribed,topic:publicTrade.BTCUSDT"
    assert body["success"] is False
    assert reply.subscribed == []
    assert list(proto.topics) == ["publicTrade.BTCUSDT"]


def test_duplicate_within_one_request_is_already_subscribed() -> None:
    proto = session()
    args = ["tickers.BTCUSDT", "tickers.BTCUSDT"]
    _, body = send(proto, {"op": "subscribe", "args": args})
    assert body["ret_msg"] == "error:already subscribed,topic:tickers.BTCUSDT"
    assert proto.topics == {}


def test_html_escaped_topic_in_failure() -> None:
    raw, body = send(session(), {"op": "subscribe", "req_id": "a&b", "args": ["x<y>"]})
    assert b"\\u003c" in raw and b"\\u003e" in raw and b"\\u0026" in raw
    assert body["ret_msg"] == "error:handler not found,topic:x<y>"
    assert body["req_id"] == "a&b"


def test_unsubscribe() -> None:
    proto = session()
    send(proto, {"op": "subscribe", "args": ["tickers.BTCUSDT", "tickers.ETHUSDT"]})
    reply = proto.handle(
        orjson.dumps({"op": "unsubscribe", "req_id": "3", "args": ["tickers.BTCUSDT"]}), NOW
    )
    assert orjson.loads(reply.frame) == {
        "success": True,
        "ret_msg": "",
        "conn_id": "d9tc7k421nl91l9k6obg-s09y",
        "req_id": "3",
        "op": "unsubscribe",
    }
    assert [r.topic for r in reply.unsubscribed] == ["tickers.BTCUSDT"]
    assert list(proto.topics) == ["tickers.ETHUSDT"]
    # not subscribed: a quiet success; unknown: handler not found and nothing removed
    assert send(proto, {"op": "unsubscribe", "args": ["tickers.SOLUSDT"]})[1]["success"] is True
    _, body = send(proto, {"op": "unsubscribe", "args": ["tickers.ETHUSDT", "tickers.NOPE"]})
    assert body["ret_msg"] == "error:handler not found,topic:tickers.NOPE"
    assert list(proto.topics) == ["tickers.ETHUSDT"]


def test_pong_shapes() -> None:
    raw, _ = send(session(), {"op": "ping"})
    assert raw == (
        b'{"success":true,"ret_msg":"pong","conn_id":"d9tc7k421nl91l9k6obg-s09y",'
        b'"req_id":"","op":"ping"}'
    )
    _, body = send(session(), {"req_id": "p1", "op": "ping"})
    assert body["req_id"] == "p1" and body["op"] == "ping" and body["ret_msg"] == "pong"


@pytest.mark.parametrize("op", ["pong", "nope", "", "SUBSCRIBE"])
def test_invalid_op(op: str) -> None:
    _, body = send(session(), {"op": op, "req_id": "x"})
    assert body["success"] is False
    assert body["ret_msg"] == "error:invalid op"
    assert body["req_id"] == "x"


def test_missing_op_and_null_are_invalid_op() -> None:
    assert send(session(), {"args": []})[1]["ret_msg"] == "error:invalid op"
    assert send(session(), b"null")[1]["ret_msg"] == "error:invalid op"


@pytest.mark.parametrize(
    "raw",
    [
        b"hello",
        b"",
        b"[]",
        b'"subscribe"',
        b'{"op": "sub',
        b'{"op": 1}',
        b'{"op": "subscribe", "args": "tickers.BTCUSDT"}',
        b'{"op": "subscribe", "args": [{"op": "subscribe"}]}',
        b'{"op": "subscribe", "req_id": {"a": 1}, "args": []}',
        b"\xff\xfe",
    ],
)
def test_decode_errors(raw: bytes) -> None:
    proto = session()
    reply = proto.handle(raw, NOW)
    body = orjson.loads(reply.frame)
    assert body["success"] is False
    assert body["ret_msg"].startswith("Failed to decode incoming data:")
    assert body["req_id"] == "" and body["op"] == ""
    assert list(body) == ["success", "ret_msg", "conn_id", "req_id", "op"]
    assert proto.topics == {}


def test_args_per_request_and_chars_caps() -> None:
    proto = session(max_args_per_request=2)
    raw, body = send(proto, {"op": "subscribe", "args": ["tickers.BTCUSDT"] * 3})
    assert body["ret_msg"] == "args size >2" and b"\\u003e" in raw
    proto = session(max_args_chars=20)
    _, body = send(proto, {"op": "subscribe", "args": ["tickers.BTCUSDT", "tickers.ETHUSDT"]})
    assert body["success"] is False and proto.topics == {}


# -- protocol: other categories --------------------------------------------------------------


def test_spot_differences() -> None:
    proto = session("spot")
    raw, _ = send(proto, {"op": "subscribe", "args": ["tickers.BTCUSDT"]})
    assert raw == (
        b'{"success":true,"ret_msg":"subscribe","conn_id":"d9tc7k421nl91l9k6obg-s09y",'
        b'"op":"subscribe"}'
    )
    _, body = send(proto, {"op": "subscribe", "req_id": "10001", "args": ["kline.1.ETHUSDT"]})
    assert body["req_id"] == "10001" and body["ret_msg"] == "subscribe"
    raw, _ = send(proto, {"op": "ping"})
    assert raw == (
        b'{"success":true,"ret_msg":"pong","conn_id":"d9tc7k421nl91l9k6obg-s09y","op":"ping"}'
    )
    raw, _ = send(proto, {"op": "subscribe", "args": [f"tickers.X{i}" for i in range(11)]})
    assert raw == (
        b'{"success":false,"ret_msg":"args size \\u003e10",'
        b'"conn_id":"d9tc7k421nl91l9k6obg-s09y","op":"subscribe"}'
    )


def test_option_command_resp_and_pong() -> None:
    proto = session("option")
    sym = "BTC-25JUN27-106000-P-USDT"
    args = [f"tickers.{sym}", f"orderbook.25.{sym}", "tickers.NOPE"]
    _, body = send(proto, {"op": "subscribe", "args": args})
    assert body == {
        "success": False,
        "conn_id": "d9tc7k421nl91l9k6obg-s09y",
        "data": {"failTopics": ["tickers.NOPE"], "successTopics": args[:2]},
        "type": "COMMAND_RESP",
    }
    _, pong = send(proto, {"op": "ping"})
    assert list(pong) == ["args", "op"] and pong["op"] == "pong"
    assert pong["args"] == [str(NOW)]


# -- order book ------------------------------------------------------------------------------


def _sizes(depth: int) -> int:
    return depth + 1


def test_book_recenter_keeps_bid_below_ask() -> None:
    book, rng = OrderBook(), random.Random(3)
    book.recenter(100, 101, rng, _sizes)
    book.maintain_depth(50, rng, _sizes)
    for best_bid in (130, 90, 91, 200, 5):
        book.recenter(best_bid, best_bid + 1, rng, _sizes)
        book.maintain_depth(50, rng, _sizes)
        assert book.best_bid() is not None and book.best_ask() is not None
        assert book.best_bid()[0] == best_bid
        assert book.best_ask()[0] == best_bid + 1
        assert len(book.bids) >= 50 or book.bids[0] <= 1
        assert len(book.asks) >= 50


def test_diff_window_reconstructs() -> None:
    previous = {10: 1, 9: 2, 8: 3}
    current = [(11, 5), (10, 1), (9, 4)]
    diff = diff_window(previous, current)
    assert sorted(diff) == [(8, 0), (9, 4), (11, 5)]
    for price, size in diff:
        if size:
            previous[price] = size
        else:
            del previous[price]
    assert previous == dict(current)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 60))
def test_book_invariants_under_random_steps(seed: int, steps: int) -> None:
    spec = CATALOG.get("linear", "BTCUSDT")
    assert spec is not None
    params = ModelParams(trade_rate=50.0, book_levels=120)
    inst = Instrument(spec, seed, NOW, params)
    for i in range(steps):
        inst.step(NOW + 20 * (i + 1), 0.02)
        book = inst.book
        assert book.bids == sorted(book.bids) and len(set(book.bids)) == len(book.bids)
        assert book.asks == sorted(book.asks) and len(set(book.asks)) == len(book.asks)
        assert set(book.bids) == set(book.bid_sizes) and set(book.asks) == set(book.ask_sizes)
        assert all(s > 0 for s in book.bid_sizes.values())
        assert all(s > 0 for s in book.ask_sizes.values())
        assert book.bids[-1] < book.asks[0]
        assert len(book.bids) >= 120 and len(book.asks) >= 120


# -- market model ----------------------------------------------------------------------------


def test_candle_bounds_alignment() -> None:
    ts = int(dt.datetime(2026, 8, 13, 15, 47, 12, tzinfo=dt.UTC).timestamp() * 1000)
    start, nxt = candle_bounds("1", ts)
    assert start % 60_000 == 0 and nxt - start == 60_000 and start <= ts < nxt
    start, nxt = candle_bounds("240", ts)
    assert dt.datetime.fromtimestamp(start / 1000, dt.UTC).hour == 12
    start, nxt = candle_bounds("D", ts)
    assert dt.datetime.fromtimestamp(start / 1000, dt.UTC) == dt.datetime(
        2026, 8, 13, tzinfo=dt.UTC
    )
    start, nxt = candle_bounds("W", ts)
    monday = dt.datetime.fromtimestamp(start / 1000, dt.UTC)
    assert monday.weekday() == 0 and monday.hour == 0 and monday.date() == dt.date(2026, 8, 10)
    assert nxt - start == 7 * 86_400_000
    start, nxt = candle_bounds("M", ts)
    assert dt.datetime.fromtimestamp(start / 1000, dt.UTC) == dt.datetime(2026, 8, 1, tzinfo=dt.UTC)
    assert dt.datetime.fromtimestamp(nxt / 1000, dt.UTC) == dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
    dec = int(dt.datetime(2026, 12, 31, tzinfo=dt.UTC).timestamp() * 1000)
    assert candle_bounds("M", dec)[1] == int(
        dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp() * 1000
    )
    # compressed: a 1-minute candle lasts one second
    start, nxt = candle_bounds("1", ts, 60.0)
    assert nxt - start == 1000 and start % 1000 == 0


def test_ticker_fields_linear_perpetual_order_and_types() -> None:
    spec = CATALOG.get("linear", "BTCUSDT")
    assert spec is not None
    fields = Instrument(spec, 1, NOW, ModelParams()).ticker_fields()
    assert list(fields) == [
        "symbol", "tickDirection", "price24hPcnt", "lastPrice", "prevPrice24h", "highPrice24h",
        "lowPrice24h", "prevPrice1h", "markPrice", "indexPrice", "openInterest",
        "openInterestValue", "turnover24h", "volume24h", "fundingIntervalHour", "fundingCap",
        "singleOpenInterest", "singleOpenInterestValue", "nextFundingTime", "fundingRate",
        "bid1Price", "bid1Size", "ask1Price", "ask1Size", "preOpenPrice", "preQty",
        "curPreListingPhase",
    ]  # fmt: skip
    assert all(isinstance(v, str) for v in fields.values())
    assert re.fullmatch(r"\d+\.\d{2}", fields["lastPrice"])
    assert re.fullmatch(r"\d+\.\d{3}", fields["bid1Size"])
    assert int(fields["nextFundingTime"]) % (8 * 3_600_000) == 0
    assert float(fields["bid1Price"]) < float(fields["ask1Price"])
    assert float(fields["lowPrice24h"]) <= float(fields["lastPrice"])
    assert float(fields["lastPrice"]) <= float(fields["highPrice24h"])


def test_ticker_fields_dated_future() -> None:
    spec = CATALOG.get("linear", "BTC-26DEC25")
    assert spec is not None and spec.contract_type == "LinearFutures"
    fields = Instrument(spec, 1, NOW, ModelParams()).ticker_fields()
    assert fields["deliveryTime"] == "2025-12-26T08:00:00Z"
    assert fields["nextFundingTime"] == "" and fields["fundingRate"] == ""
    for key in ("basisRate", "basis", "basisRateYear", "deliveryFeeRate"):
        assert key in fields
    assert "fundingIntervalHour" not in fields


def test_24h_stats_follow_trades() -> None:
    spec = CATALOG.get("linear", "ETHUSDT")
    assert spec is not None
    inst = Instrument(spec, 7, NOW, ModelParams(trade_rate=200.0, volatility=0.2))
    volume = inst.volume24
    for i in range(300):
        inst.step(NOW + 20 * (i + 1), 0.02)
        assert inst.low24 <= inst.last <= inst.high24
    assert inst.volume24 > volume


# -- feeds -----------------------------------------------------------------------------------


def _exchange(**params: object) -> Exchange:
    return Exchange(Catalog(), ModelParams(**params), seed=5, l1_heartbeat_ms=3000)  # type: ignore[arg-type]


def test_ticker_feed_deltas_only_carry_changed_fields() -> None:
    ex = _exchange(trade_rate=30.0)
    ref = ex.parse("linear", "tickers.BTCUSDT")
    assert ref is not None
    feed = ex.activate(ref, NOW)
    assert isinstance(feed, TickerFeed)
    snap = orjson.loads(feed.snapshot_frames(NOW)[0])
    assert list(snap) == ["topic", "type", "data", "cs", "ts"]
    state, last_cs, deltas = dict(snap["data"]), snap["cs"], 0
    for i in range(1, 200):
        now = NOW + 20 * i
        ex.step(now)
        for raw in feed.tick(now) if i % 5 == 0 else []:
            frame = orjson.loads(raw)
            assert frame["type"] == "delta"
            assert frame["cs"] > last_cs
            last_cs = frame["cs"]
            data = frame["data"]
            assert data["symbol"] == "BTCUSDT" and len(data) > 1
            for key, value in data.items():
                if key != "symbol":
                    assert state[key] != value, key
            state.update(data)
            deltas += 1
        if i % 5 == 0:
            assert state == feed.inst.ticker_fields()
    assert deltas > 10


def test_book_feed_window_and_u() -> None:
    ex = _exchange(trade_rate=40.0, volatility=0.05)
    feeds = {}
    for depth in (1, 50, 200):
        ref = ex.parse("linear", f"orderbook.{depth}.SOLUSDT")
        assert ref is not None
        feeds[depth] = ex.activate(ref, NOW)
    books: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
    last_u: dict[int, int] = {}
    last_seq = 0
    for depth, feed in feeds.items():
        snap = orjson.loads(feed.snapshot_frames(NOW)[0])
        books[depth] = (dict(snap["data"]["b"]), dict(snap["data"]["a"]))
        last_u[depth] = snap["data"]["u"]
    for i in range(1, 150):
        now = NOW + 20 * i
        ex.step(now)
        for depth, feed in feeds.items():
            for raw in feed.tick(now):
                frame = orjson.loads(raw)
                data = frame["data"]
                assert data["u"] == last_u[depth] + 1
                last_u[depth] = data["u"]
                assert data["seq"] >= last_seq
                last_seq = data["seq"]
                bids, asks = books[depth]
                if frame["type"] == "snapshot":
                    assert depth == 1
                    bids, asks = dict(data["b"]), dict(data["a"])
                    books[depth] = (bids, asks)
                else:
                    assert data["b"] or data["a"]
                    assert [float(p) for p, _ in data["b"]] == sorted(
                        (float(p) for p, _ in data["b"]), reverse=True
                    )
                    for side, levels in ((bids, data["b"]), (asks, data["a"])):
                        for price, size in levels:
                            if size == "0":
                                del side[price]
                            else:
                                side[price] = size
                assert len(bids) <= depth and len(asks) <= depth
                assert max(map(float, bids)) < min(map(float, asks))
        # the client view equals the feed's view of the real book
        for depth, feed in feeds.items():
            assert isinstance(feed, BookFeed)
            bids, asks = books[depth]
            spec = feed.inst.spec
            assert bids == {spec.fmt_price(p): spec.fmt_qty(s) for p, s in feed.win_bids.items()}
            assert asks == {spec.fmt_price(p): spec.fmt_qty(s) for p, s in feed.win_asks.items()}


def test_l1_heartbeat_restart_skip_repeat() -> None:
    ex = _exchange()
    ref = ex.parse("linear", "orderbook.1.BTCUSDT")
    assert ref is not None
    feed = ex.activate(ref, NOW)
    assert isinstance(feed, BookFeed)
    u0 = orjson.loads(feed.snapshot_frames(NOW)[0])["data"]["u"]
    # book untouched: no frame until 3 s passed, then the same u again
    assert feed.tick(NOW + 1000) == []
    frames = feed.tick(NOW + 3000)
    assert len(frames) == 1 and orjson.loads(frames[0])["data"]["u"] == u0
    assert list(orjson.loads(frames[0])) == ["topic", "ts", "type", "data", "cts"]
    feed.skip_next += 1
    feed.resend_snapshot()
    assert orjson.loads(feed.tick(NOW + 3100)[0])["data"]["u"] == u0 + 2
    feed.repeat_next += 1
    feed.resend_snapshot()
    assert orjson.loads(feed.tick(NOW + 3200)[0])["data"]["u"] == u0 + 2
    feed.restart()
    frame = orjson.loads(feed.tick(NOW + 3300)[0])
    assert frame["type"] == "snapshot" and frame["data"]["u"] == 1


def test_trade_feed_splits_big_batches_sharing_seq() -> None:
    ex = _exchange()
    ref = ex.parse("linear", "publicTrade.BTCUSDT")
    assert ref is not None
    feed = ex.activate(ref, NOW)
    assert isinstance(feed, TradeFeed)
    inst = ex.instrument("linear", "BTCUSDT", NOW)
    ex.route(inst, inst.inject_trades(2500, NOW))
    frames = [orjson.loads(f) for f in feed.tick(NOW)]
    assert [len(f["data"]) for f in frames] == [MAX_TRADES_PER_FRAME, MAX_TRADES_PER_FRAME, 452]
    assert len({row["seq"] for f in frames for row in f["data"]}) == 1
    row = frames[0]["data"][0]
    assert list(row) == ["T", "s", "S", "v", "p", "L", "i", "BT", "RPI", "seq"]
    assert feed.tick(NOW) == []


def test_kline_feed_confirms_each_candle_once() -> None:
    ex = _exchange(kline_time_scale=60.0, trade_rate=30.0)
    ref = ex.parse("linear", "kline.1.BTCUSDT")
    assert ref is not None
    feed = ex.activate(ref, NOW)
    assert isinstance(feed, KlineFeed)
    confirms: dict[int, int] = {}
    two_element = 0
    for i in range(1, 400):
        now = NOW + 25 * i
        ex.step(now)
        for raw in feed.tick(now) if i % 4 == 0 else []:
            frame = orjson.loads(raw)
            assert list(frame) == ["topic", "data", "ts", "type"]
            two_element += len(frame["data"]) == 2
            for candle in frame["data"]:
                assert candle["end"] == candle["start"] + 999
                if candle["confirm"]:
                    confirms[candle["start"]] = confirms.get(candle["start"], 0) + 1
    assert len(confirms) >= 7
    assert set(confirms.values()) == {1}
    assert two_element >= 1


# -- REST ------------------------------------------------------------------------------------


def test_instruments_info_paging() -> None:
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        query = {"category": "linear", "limit": "5"}
        if cursor:
            query["cursor"] = cursor
        body = orjson.loads(instruments_info(CATALOG, query, NOW))
        assert body["retCode"] == 0 and body["retMsg"] == "OK"
        assert list(body) == ["retCode", "retMsg", "result", "retExtInfo", "time"]
        result = body["result"]
        assert result["category"] == "linear" and len(result["list"]) <= 5
        seen += [item["symbol"] for item in result["list"]]
        pages += 1
        cursor = result["nextPageCursor"]
        if not cursor:
            break
    assert seen == list(DEFAULT_LINEAR_SYMBOLS)
    assert pages == -(-len(DEFAULT_LINEAR_SYMBOLS) // 5)
    bad = orjson.loads(instruments_info(CATALOG, {"category": "nope"}, NOW))
    assert bad["retCode"] != 0
    item = orjson.loads(
        instruments_info(CATALOG, {"category": "linear", "symbol": "BTC-26DEC25"}, NOW)
    )
    assert item["result"]["list"][0]["contractType"] == "LinearFutures"


# -- faults ----------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        def record(*args: object) -> int:
            self.calls.append((name, args))
            return 0

        return record


def test_fault_specs() -> None:
    assert parse_fault_spec("refuse=502:3") == ("refuse", {"value": "502:3"})
    assert parse_fault_spec("half_dead") == ("half_dead", {})
    with pytest.raises(ValueError):
        parse_fault_spec("bogus=1")
    # every known fault name is documented in the help text
    documented = {line.split()[0].split("[")[0].split("=")[0] for line in FAULT_HELP.splitlines()}
    assert documented >= FAULT_NAMES
    rec = _Recorder()
    apply_fault(rec, "refuse", {"value": "429:2"})  # type: ignore[arg-type]
    apply_fault(rec, "refuse", {"status": "off"})  # type: ignore[arg-type]
    apply_fault(rec, "half_dead", {"on": "0"})  # type: ignore[arg-type]
    apply_fault(rec, "pong_delay", {"seconds": "1.5"})  # type: ignore[arg-type]
    apply_fault(rec, "skip_u", {"value": "orderbook.50.BTCUSDT"})  # type: ignore[arg-type]
    assert rec.calls == [
        ("refuse_handshakes", (429, 2)),
        ("refuse_handshakes", (None,)),
        ("set_half_dead", (False,)),
        ("set_pong_delay", (1.5,)),
        ("skip_u", ("orderbook.50.BTCUSDT", "linear")),
    ]
    with pytest.raises(ValueError):
        apply_fault(rec, "bogus", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        apply_fault(rec, "refuse", {"value": "200"})  # type: ignore[arg-type]

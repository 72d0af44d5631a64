"""Codec unit tests: real Bybit captures in, exact Mudrex bytes out, for both implementations."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy import codec as codec_pkg
from fastproxy.codec import (
    CY_CODECS,
    CYTHON_AVAILABLE,
    CYTHON_IMPORT_ERROR,
    IMPLEMENTATION,
    PY_CODECS,
    CodecError,
    Message,
    PyMessage,
    as_snapshot,
    cy_ws_text_frame,
    new_codec,
    percent_2dp,
    py_ws_text_frame,
    ws_text_frame,
)
from fastproxy.streams import Stream, stream_for_topic

if not CYTHON_AVAILABLE and os.environ.get("FASTPROXY_REQUIRE_EXT") == "1":
    raise RuntimeError(f"FASTPROXY_REQUIRE_EXT=1 but {CYTHON_IMPORT_ERROR}")

needs_ext = pytest.mark.skipif(
    not CYTHON_AVAILABLE,
    reason=f"{CYTHON_IMPORT_ERROR}; build it with `python setup.py build_ext --inplace`",
)
IMPLS = [
    pytest.param((PY_CODECS, py_ws_text_frame), id="python"),
    pytest.param((CY_CODECS, cy_ws_text_frame), id="cython", marks=needs_ext),
]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> tuple:
    return request.param


def make(impl: tuple, topic: str, seq: int = 0):
    stream = stream_for_topic(topic)
    return impl[0][stream.kind](stream, seq)


def frames(raw: bytes) -> dict:
    return orjson.loads(raw)


# -- real captures (docs/bybit-v5-public-ws.md, sections 5.1, 5.3, 5.4) -----------------------

BTC_SNAPSHOT = (
    b'{"topic":"tickers.BTCUSDT","type":"snapshot","data":{"symbol":"BTCUSDT",'
    b'"tickDirection":"ZeroPlusTick","price24hPcnt":"0.001455","lastPrice":"63561.60",'
    b'"prevPrice24h":"63469.20","highPrice24h":"63994.40","lowPrice24h":"62810.50",'
    b'"prevPrice1h":"63413.60","markPrice":"63560.80","indexPrice":"63585.51",'
    b'"openInterest":"59972.256","openInterestValue":"3811884569.16",'
    b'"turnover24h":"3515096831.9640","volume24h":"55362.9100","fundingIntervalHour":"8",'
    b'"fundingCap":"0.005","singleOpenInterest":"29986.128",'
    b'"singleOpenInterestValue":"1905942284.58","nextFundingTime":"1786665600000",'
    b'"fundingRate":"0.00005013","bid1Price":"63561.50","bid1Size":"1.760",'
    b'"ask1Price":"63561.60","ask1Size":"4.690","preOpenPrice":"","preQty":"",'
    b'"curPreListingPhase":""},"cs":764144442982,"ts":1786659827683}'
)
BTC_DELTA = (
    b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT",'
    b'"indexPrice":"63585.74"},"cs":764144450620,"ts":1786659827983}'
)
BTC_DELTA_MARK = (
    b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT",'
    b'"markPrice":"86716.30","indexPrice":"86756.70","openInterestValue":"5250990127.10",'
    b'"singleOpenInterestValue":"2625495106.91"},"cs":814547789569,"ts":1790134712383}'
)
XRP_DELTA = (
    b'{"topic":"tickers.XRPUSDT","type":"delta","data":{"symbol":"XRPUSDT",'
    b'"price24hPcnt":"0.028223","lastPrice":"3.3298","turnover24h":"1842288307.0604",'
    b'"volume24h":"587584171.0000","ask1Price":"3.3298","ask1Size":"1113"},'
    b'"cs":19371556274,"ts":1737718429132}'
)
AAVE_DELTA = (
    b'{"topic":"tickers.AAVEUSDT","type":"delta","data":{"symbol":"AAVEUSDT",'
    b'"bid1Price":"112.89","bid1Size":"2.12","ask1Price":"112.90","ask1Size":"5.02"},'
    b'"cs":78039939929,"ts":1709210212704}'
)
DATED_SNAPSHOT = (
    b'{"topic":"tickers.BTC-26DEC25","type":"snapshot","data":{"symbol":"BTC-26DEC25",'
    b'"tickDirection":"ZeroMinusTick","price24hPcnt":"0","lastPrice":"109401.50",'
    b'"prevPrice24h":"109401.50","highPrice24h":"109401.50","lowPrice24h":"109401.50",'
    b'"prevPrice1h":"109401.50","markPrice":"121144.63","indexPrice":"114132.51",'
    b'"openInterest":"6.622","openInterestValue":"802219.74","turnover24h":"0.0000",'
    b'"volume24h":"0.0000","deliveryTime":"2025-12-26T08:00:00Z","basisRate":"0.06129209",'
    b'"deliveryFeeRate":"0","predictedDeliveryPrice":"0.00","basis":"-4730.84",'
    b'"basisRateYear":"0.30655351","nextFundingTime":"","fundingRate":"",'
    b'"bid1Price":"111254.50","bid1Size":"0.176","ask1Price":"131001.00","ask1Size":"0.580"},'
    b'"cs":31337927919,"ts":1760409119857}'
)
TRADE_TESTNET = (
    b'{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1789470139409,"data":[{'
    b'"T":1789470139371,"s":"BTCUSDT","S":"Sell","v":"0.003","p":"77256.70","L":"MinusTick",'
    b'"i":"0e5ae7e6-811a-5884-98c9-6cb3aede1505","BT":false,"RPI":false,"seq":9685122331}]}'
)
TRADE_DOCS = (
    b'{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1672304486868,"data":[{'
    b'"T":1672304486865,"s":"BTCUSDT","S":"Buy","v":"0.001","p":"16578.50","L":"PlusTick",'
    b'"i":"20f43950-d8dd-5b31-9112-a178eb6023af","BT":false,"seq":1783284617}]}'
)
KLINE_DOCS = (
    b'{"topic":"kline.5.BTCUSDT","data":[{"start":1672324800000,"end":1672325099999,'
    b'"interval":"5","open":"16649.5","close":"16677","high":"16677","low":"16608",'
    b'"volume":"2.081","turnover":"34666.4005","confirm":false,"timestamp":1672324988882}],'
    b'"ts":1672324988882,"type":"snapshot"}'
)
KLINE_TESTNET = (
    b'{"topic":"kline.1.BTCUSDT","data":[{"start":1789470120000,"end":1789470179999,'
    b'"interval":"1","open":"77257.2","close":"77256.8","high":"77257.2","low":"77256.8",'
    b'"volume":"0.015","turnover":"1158.8555","confirm":false,"timestamp":1789470134641}],'
    b'"ts":1789470134641,"type":"snapshot"}'
)

BTC_SNAPSHOT_OUT = (
    b'{"stream":"mudrex.futures.ticker.BTCUSDT","type":"snapshot","data":{"symbol":"BTCUSDT",'
    b'"price":"63561.60","markPrice":"63560.80","indexPrice":"63585.51","high24h":"63994.40",'
    b'"low24h":"62810.50","prevPrice24h":"63469.20","volume24h":"55362.9100",'
    b'"turnover24h":"3515096831.9640","change24hPercent":"0.15","tickDirection":"ZeroPlusTick",'
    b'"bid":{"price":"63561.50","size":"1.760"},"ask":{"price":"63561.60","size":"4.690"},'
    b'"openInterest":"59972.256","openInterestValue":"3811884569.16",'
    b'"fundingRate":"0.00005013","nextFundingTime":"1786665600000"},'
    b'"timestamp":1786659827683,"source":"mudrex","seq":1}'
)


def parse_header(frame: bytes) -> tuple[int, int, int]:
    """(first byte, payload length, header length) of an unmasked server frame."""
    first, second = frame[0], frame[1]
    assert not second & 0x80, "server frames are never masked"
    n = second & 0x7F
    if n == 126:
        return first, struct.unpack(">H", frame[2:4])[0], 4
    if n == 127:
        return first, struct.unpack(">Q", frame[2:10])[0], 10
    return first, n, 2


def check_frame(message) -> dict:
    first, n, h = parse_header(message.frame)
    assert first == 0x81
    assert n == len(message.payload) and message.frame[h:] == message.payload
    doc = orjson.loads(message.payload)
    keys = ["stream", "type", "data", "timestamp", "source", "seq"]
    if "epoch" in doc:  # a snapshot as clients get it (as_snapshot) names its epoch last
        assert doc["type"] == "snapshot" and doc["epoch"] == message.epoch
        keys.append("epoch")
    assert list(doc) == keys
    assert doc["stream"] == message.stream_id and doc["type"] == message.type
    assert doc["seq"] == message.seq and doc["timestamp"] == message.ts
    assert doc["source"] == "mudrex"
    return doc


# -- tickers --------------------------------------------------------------------------------


def test_ticker_snapshot_exact_bytes(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT")
    [msg] = codec.feed(frames(BTC_SNAPSHOT))
    assert msg.payload == BTC_SNAPSHOT_OUT
    assert msg.frame == b"\x81\x7e" + struct.pack(">H", len(BTC_SNAPSHOT_OUT)) + BTC_SNAPSHOT_OUT
    assert (msg.stream_id, msg.seq, msg.type, msg.ts) == (
        "mudrex.futures.ticker.BTCUSDT",
        1,
        "snapshot",
        1786659827683,
    )
    assert codec.seq == 1


def test_ticker_delta_exact_bytes(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT")
    codec.feed(frames(BTC_SNAPSHOT))
    [msg] = codec.feed(frames(BTC_DELTA))
    expected = (
        BTC_SNAPSHOT_OUT.replace(b'"type":"snapshot"', b'"type":"update"')
        .replace(b'"indexPrice":"63585.51"', b'"indexPrice":"63585.74"')
        .replace(b"1786659827683", b"1786659827983")
        .replace(b'"seq":1}', b'"seq":2}')
    )
    assert msg.payload == expected
    assert (msg.type, msg.seq, msg.ts) == ("update", 2, 1786659827983)
    check_frame(msg)


def test_ticker_merges_every_delta_key(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT")
    codec.feed(frames(BTC_SNAPSHOT))
    codec.feed(frames(BTC_DELTA))
    [msg] = codec.feed(frames(BTC_DELTA_MARK))
    data = check_frame(msg)["data"]
    assert data["markPrice"] == "86716.30"
    assert data["indexPrice"] == "86756.70"
    assert data["openInterestValue"] == "5250990127.10"
    assert data["price"] == "63561.60"  # untouched fields keep their last value
    assert data["openInterest"] == "59972.256"
    assert "singleOpenInterestValue" not in data


def test_ticker_data_key_order(impl: tuple) -> None:
    codec = make(impl, "tickers.XRPUSDT")
    codec.feed(frames(XRP_DELTA))  # fields arrive before the rest and in Bybit's order
    [msg] = codec.feed(frames(BTC_SNAPSHOT.replace(b'"type":"snapshot"', b'"type":"delta"')))
    assert list(check_frame(msg)["data"]) == [
        "symbol",
        "price",
        "markPrice",
        "indexPrice",
        "high24h",
        "low24h",
        "prevPrice24h",
        "volume24h",
        "turnover24h",
        "change24hPercent",
        "tickDirection",
        "bid",
        "ask",
        "openInterest",
        "openInterestValue",
        "fundingRate",
        "nextFundingTime",
    ]


def test_ticker_delta_before_snapshot_invents_nothing(impl: tuple) -> None:
    codec = make(impl, "tickers.XRPUSDT")
    [msg] = codec.feed(frames(XRP_DELTA))
    assert msg.type == "snapshot"  # first message of the stream
    assert check_frame(msg)["data"] == {
        "symbol": "XRPUSDT",
        "price": "3.3298",
        "volume24h": "587584171.0000",
        "turnover24h": "1842288307.0604",
        "change24hPercent": "2.82",
        "ask": {"price": "3.3298", "size": "1113"},
    }


def test_ticker_half_known_bid(impl: tuple) -> None:
    codec = make(impl, "tickers.AAVEUSDT")
    frame = frames(AAVE_DELTA)
    del frame["data"]["bid1Size"], frame["data"]["ask1Price"]
    data = check_frame(codec.feed(frame)[0])["data"]
    assert data["bid"] == {"price": "112.89"}
    assert data["ask"] == {"size": "5.02"}
    frame = frames(AAVE_DELTA)
    data = check_frame(codec.feed(frame)[0])["data"]
    assert data["bid"] == {"price": "112.89", "size": "2.12"}
    assert list(data) == ["symbol", "bid", "ask"]


def test_ticker_dated_future_keeps_empty_strings(impl: tuple) -> None:
    codec = make(impl, "tickers.BTC-26DEC25")
    data = check_frame(codec.feed(frames(DATED_SNAPSHOT))[0])["data"]
    assert data["fundingRate"] == "" and data["nextFundingTime"] == ""
    assert data["change24hPercent"] == "0.00"
    assert data["symbol"] == "BTC-26DEC25"


def test_ticker_snapshot_frame_replaces_state(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT")
    codec.feed(frames(BTC_SNAPSHOT))
    codec.feed(frames(BTC_DELTA))
    fresh = frames(
        b'{"topic":"tickers.BTCUSDT","type":"snapshot","data":{"symbol":"BTCUSDT",'
        b'"lastPrice":"1.0"},"cs":1,"ts":1786659830000}'
    )
    [msg] = codec.feed(fresh)
    assert msg.type == "snapshot" and msg.seq == 3
    assert check_frame(msg)["data"] == {"symbol": "BTCUSDT", "price": "1.0"}
    [msg] = codec.feed(frames(BTC_DELTA))
    assert msg.type == "update"
    assert check_frame(msg)["data"] == {
        "symbol": "BTCUSDT",
        "price": "1.0",
        "indexPrice": "63585.74",
    }


@pytest.mark.parametrize(
    ("fraction", "percent"),
    [
        ("0.001455", "0.15"),
        ("-0.158315", "-15.83"),
        ("0", "0.00"),
        ("0.028223", "2.82"),
        ("0.00005", "0.01"),
        ("-0.00005", "-0.01"),
        ("0.000049999", "0.00"),
        ("-0.000049", "0.00"),  # no negative zero
        ("-0", "0.00"),
        ("0.99999", "100.00"),
        ("99.99995", "10000.00"),
        ("1", "100.00"),
        ("+0.5", "50.00"),
        ("5.", "500.00"),
        (".5", "50.00"),
        ("000.0125", "1.25"),
        ("0.0001", "0.01"),
        ("12345678901234567890.123456", "1234567890123456789012.35"),
        ("", ""),
    ],
)
def test_percent_rounding(impl: tuple, fraction: str, percent: str) -> None:
    assert percent_2dp(fraction) == percent
    codec = make(impl, "tickers.BTCUSDT")
    frame = {"topic": "tickers.BTCUSDT", "type": "snapshot", "ts": 1, "data": {}}
    frame["data"]["price24hPcnt"] = fraction
    assert check_frame(codec.feed(frame)[0])["data"]["change24hPercent"] == percent


@pytest.mark.parametrize(
    "fraction", ["abc", "NaN", "Infinity", "1e-3", " 0.1", "0.1 ", ".", "-", "+", "1.2.3", "\u0661"]
)
def test_percent_not_a_decimal_is_left_out(impl: tuple, fraction: str) -> None:
    assert percent_2dp(fraction) is None
    codec = make(impl, "tickers.BTCUSDT")
    codec.feed(frames(BTC_SNAPSHOT))
    frame = frames(BTC_DELTA)
    frame["data"]["price24hPcnt"] = fraction
    [msg] = codec.feed(frame)
    data = check_frame(msg)["data"]
    assert "change24hPercent" not in data  # the old value is stale, a guess would be wrong
    assert data["indexPrice"] == "63585.74"
    frame["data"]["price24hPcnt"] = "0.01"
    assert check_frame(codec.feed(frame)[0])["data"]["change24hPercent"] == "1.00"


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        lambda n, p: Decimal(n).scaleb(-p), st.integers(-(10**20), 10**20), st.integers(0, 12)
    )
)
def test_percent_matches_decimal(value: Decimal) -> None:
    text = format(value, "f")
    expected = (value * 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    if expected == 0:
        expected = abs(expected)
    assert percent_2dp(text) == format(expected, "f")


# -- klines ---------------------------------------------------------------------------------


def test_kline_exact_bytes(impl: tuple) -> None:
    codec = make(impl, "kline.5.BTCUSDT", seq=41)
    [msg] = codec.feed(frames(KLINE_DOCS))
    assert msg.payload == (
        b'{"stream":"mudrex.futures.kline.5m.BTCUSDT","type":"snapshot","data":{'
        b'"symbol":"BTCUSDT","interval":"5m","openTime":1672324800000,'
        b'"closeTime":1672325099999,"open":"16649.5","high":"16677","low":"16608",'
        b'"close":"16677","volume":"2.081","turnover":"34666.4005","confirmed":false},'
        b'"timestamp":1672324988882,"source":"mudrex","seq":42}'
    )
    check_frame(msg)
    [msg] = codec.feed(frames(KLINE_TESTNET.replace(b"kline.1.", b"kline.5.")))
    assert msg.type == "update" and msg.seq == 43


def test_kline_multi_candle_frame(impl: tuple) -> None:
    codec = make(impl, "kline.60.ETHUSDT")
    closing = {
        "start": 1000,
        "end": 1999,
        "interval": "60",
        "open": "1",
        "close": "2",
        "high": "3",
        "low": "0.5",
        "volume": "10",
        "turnover": "15",
        "confirm": True,
        "timestamp": 1999,
    }
    opening = dict(closing, start=2000, end=2999, open="2", close="2", confirm=False)
    msgs = codec.feed({"topic": "kline.60.ETHUSDT", "data": [closing, opening], "ts": 2001})
    assert [(m.seq, m.type, m.ts) for m in msgs] == [(1, "snapshot", 2001), (2, "update", 2001)]
    first, second = (check_frame(m)["data"] for m in msgs)
    assert (first["openTime"], first["confirmed"]) == (1000, True)
    assert (second["openTime"], second["confirmed"], second["interval"]) == (2000, False, "1h")
    snap = codec.snapshot()
    assert snap.seq == 2 and snap.type == "snapshot"
    assert check_frame(snap)["data"] == second


def test_kline_empty_frame_makes_nothing(impl: tuple) -> None:
    codec = make(impl, "kline.1.BTCUSDT")
    assert codec.feed({"topic": "kline.1.BTCUSDT", "data": [], "ts": 5}) == []
    assert codec.seq == 0 and codec.snapshot() is None


# -- trades ---------------------------------------------------------------------------------


def test_trade_exact_bytes(impl: tuple) -> None:
    codec = make(impl, "publicTrade.BTCUSDT")
    [msg] = codec.feed(frames(TRADE_TESTNET))
    assert msg.payload == (
        b'{"stream":"mudrex.futures.trade.BTCUSDT","type":"snapshot","data":[{'
        b'"id":"0e5ae7e6-811a-5884-98c9-6cb3aede1505","symbol":"BTCUSDT","price":"77256.70",'
        b'"quantity":"0.003","side":"sell","time":1789470139371,"isBlockTrade":false}],'
        b'"timestamp":1789470139409,"source":"mudrex","seq":1}'
    )
    [msg] = codec.feed(frames(TRADE_DOCS))
    assert msg.type == "update"
    assert check_frame(msg)["data"][0]["side"] == "buy"


def test_trade_batch_keeps_order_and_sides(impl: tuple) -> None:
    codec = make(impl, "publicTrade.ETHUSDT")
    trades = [
        {"T": 10 + n, "s": "ETHUSDT", "S": side, "v": f"{n}.5", "p": f"300{n}", "i": f"id-{n}"}
        for n, side in enumerate(["Buy", "Sell", "Sell", "Buy"])
    ]
    trades[2]["BT"] = True
    [msg] = codec.feed(
        {"topic": "publicTrade.ETHUSDT", "type": "snapshot", "ts": 99, "data": trades}
    )
    data = check_frame(msg)["data"]
    assert [t["id"] for t in data] == ["id-0", "id-1", "id-2", "id-3"]
    assert [t["side"] for t in data] == ["buy", "sell", "sell", "buy"]
    assert [t["time"] for t in data] == [10, 11, 12, 13]
    assert "isBlockTrade" not in data[0]  # BT not sent: not guessed
    assert data[2]["isBlockTrade"] is True
    assert list(data[2]) == ["id", "symbol", "price", "quantity", "side", "time", "isBlockTrade"]


def test_trade_symbol_defaults_to_stream(impl: tuple) -> None:
    codec = make(impl, "publicTrade.BTCUSDT")
    frame = frames(TRADE_DOCS)
    del frame["data"][0]["s"]
    assert check_frame(codec.feed(frame)[0])["data"][0]["symbol"] == "BTCUSDT"


def test_trade_big_batch_uses_64k_frames(impl: tuple) -> None:
    codec = make(impl, "publicTrade.BTCUSDT")
    frame = frames(TRADE_TESTNET)
    frame["data"] = frame["data"] * 1024  # Bybit's largest batch
    [msg] = codec.feed(frame)
    first, n, h = parse_header(msg.frame)
    assert (first, n, h) == (0x81, len(msg.payload), 10) and n > 65535
    assert len(check_frame(msg)["data"]) == 1024


# -- snapshot(), seq and reset --------------------------------------------------------------


def test_late_joiner_snapshot_then_next_seq(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT", seq=100)
    assert codec.snapshot() is None and codec.seq == 100
    codec.feed(frames(BTC_SNAPSHOT))
    [last] = codec.feed(frames(BTC_DELTA))
    snap = codec.snapshot()
    assert snap == codec.snapshot()  # the hub caches it (tests/test_hub.py)
    assert (snap.type, snap.seq, snap.ts) == ("snapshot", 102, last.ts)
    assert check_frame(snap)["data"] == check_frame(last)["data"]
    [nxt] = codec.feed(frames(BTC_DELTA_MARK))
    assert nxt.seq == snap.seq + 1 and nxt.type == "update"
    assert codec.snapshot().seq == nxt.seq


def test_trade_snapshot_is_last_batch(impl: tuple) -> None:
    codec = make(impl, "publicTrade.BTCUSDT")
    codec.feed(frames(TRADE_TESTNET))
    [last] = codec.feed(frames(TRADE_DOCS))
    snap = codec.snapshot()
    assert (snap.type, snap.seq) == ("snapshot", 2)
    assert (
        snap.payload
        == last.payload.replace(b'"type":"update"', b'"type":"snapshot"')[:-1]
        + b',"epoch":"%s"}' % last.epoch.encode()
    )


def test_reset_drops_state_and_keeps_numbering(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT")
    codec.feed(frames(BTC_SNAPSHOT))
    codec.feed(frames(BTC_DELTA))
    codec.reset()
    assert codec.snapshot() is None and codec.seq == 2
    [msg] = codec.feed(frames(BTC_DELTA))
    assert (msg.type, msg.seq) == ("snapshot", 3)
    assert check_frame(msg)["data"] == {"symbol": "BTCUSDT", "indexPrice": "63585.74"}
    assert codec.feed(frames(BTC_DELTA))[0].type == "update"


@pytest.mark.parametrize(
    ("topic", "raw"), [("kline.5.BTCUSDT", KLINE_DOCS), ("publicTrade.BTCUSDT", TRADE_DOCS)]
)
def test_reset_makes_next_message_a_snapshot(impl: tuple, topic: str, raw: bytes) -> None:
    codec = make(impl, topic)
    codec.feed(frames(raw))
    assert codec.feed(frames(raw))[0].type == "update"
    codec.reset()
    assert codec.snapshot() is None
    [msg] = codec.feed(frames(raw))
    assert (msg.type, msg.seq) == ("snapshot", 3)


def test_codec_refuses_other_kinds(impl: tuple) -> None:
    with pytest.raises(ValueError):
        impl[0]["ticker"](Stream("trade", "BTCUSDT"))


# -- malformed frames -----------------------------------------------------------------------

TICKER_OK = {"topic": "tickers.BTCUSDT", "type": "delta", "data": {"lastPrice": "1"}, "ts": 5}
KLINE_OK = frames(KLINE_DOCS)
TRADE_OK = frames(TRADE_DOCS)


def _with(base: dict, **changes: object) -> dict:
    frame = orjson.loads(orjson.dumps(base))
    for key, value in changes.items():
        if value is _DROP:
            del frame[key]
        else:
            frame[key] = value
    return frame


def _item(base: dict, **changes: object) -> dict:
    frame = orjson.loads(orjson.dumps(base))
    item = frame["data"][0]
    for key, value in changes.items():
        if value is _DROP:
            del item[key]
        else:
            item[key] = value
    return frame


_DROP = object()
BAD = {
    "tickers.BTCUSDT": [
        ["not", "a", "dict"],
        _with(TICKER_OK, data=_DROP),
        _with(TICKER_OK, ts=_DROP),
        _with(TICKER_OK, type=_DROP),
        _with(TICKER_OK, type="partial"),
        _with(TICKER_OK, data=[{"lastPrice": "1"}]),
        _with(TICKER_OK, ts="5"),
        _with(TICKER_OK, ts=5.0),
        _with(TICKER_OK, ts=True),
        _with(TICKER_OK, ts=-1),
        _with(TICKER_OK, ts=2**63),
        _with(TICKER_OK, data={"lastPrice": 1}),
        _with(TICKER_OK, data={"lastPrice": None}),
        _with(TICKER_OK, data={"bid1Size": 1.5}),
        _with(TICKER_OK, data={"price24hPcnt": 0.01}),
        _with(TICKER_OK, data={"symbol": ["BTCUSDT"]}),
        _with(TICKER_OK, data={"lastPrice": "\ud800"}),
        _with(TICKER_OK, data={"price24hPcnt": "0.1\udfff"}),
    ],
    "kline.5.BTCUSDT": [
        _with(KLINE_OK, data=_DROP),
        _with(KLINE_OK, data=KLINE_OK["data"][0]),
        _with(KLINE_OK, ts=_DROP),
        _with(KLINE_OK, data=[*KLINE_OK["data"], "candle"]),
        _item(KLINE_OK, close=_DROP),
        _item(KLINE_OK, start="1672324800000"),
        _item(KLINE_OK, end=None),
        _item(KLINE_OK, volume=2.081),
        _item(KLINE_OK, confirm="false"),
        _item(KLINE_OK, confirm=0),
        _item(KLINE_OK, open="\udc80"),
    ],
    "publicTrade.BTCUSDT": [
        _with(TRADE_OK, data={"p": "1"}),
        _with(TRADE_OK, ts=None),
        _with(TRADE_OK, data=[*TRADE_OK["data"], 7]),
        *(_item(TRADE_OK, **{key: _DROP}) for key in ("p", "v", "S", "T", "i")),
        _item(TRADE_OK, p=16578.5),
        _item(TRADE_OK, v=None),
        _item(TRADE_OK, S="BUY"),
        _item(TRADE_OK, S="buy"),
        _item(TRADE_OK, S=1),
        _item(TRADE_OK, T="1672304486865"),
        _item(TRADE_OK, i=20),
        _item(TRADE_OK, s=5),
        _item(TRADE_OK, BT="false"),
        _item(TRADE_OK, BT=0),
    ],
}
GOOD = {
    "tickers.BTCUSDT": frames(BTC_SNAPSHOT),
    "kline.5.BTCUSDT": KLINE_OK,
    "publicTrade.BTCUSDT": TRADE_OK,
}


@pytest.mark.parametrize(
    ("topic", "bad"),
    [(topic, bad) for topic, items in BAD.items() for bad in items],
    ids=[f"{topic.split('.')[0]}-{n}" for topic, items in BAD.items() for n in range(len(items))],
)
def test_malformed_frame_raises_and_changes_nothing(impl: tuple, topic: str, bad: object) -> None:
    codec = make(impl, topic)
    twin = make(impl, topic)
    first = codec.feed(GOOD[topic])
    twin.feed(GOOD[topic])
    snap = codec.snapshot()
    with pytest.raises(CodecError):
        codec.feed(bad)
    assert codec.seq == first[-1].seq
    assert codec.snapshot() == snap
    after, expected = codec.feed(GOOD[topic]), twin.feed(GOOD[topic])
    assert [m.payload for m in after] == [m.payload for m in expected]


def test_codec_error_is_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# -- frames and Messages --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_ws_text_frame(impl: tuple, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    frame = impl[1](payload)
    first, n, h = parse_header(frame)
    assert (first, n) == (0x81, size)
    assert h == (2 if size < 126 else 4 if size < 65536 else 10)
    assert frame[h:] == payload and len(frame) == h + size


def test_message_builds_its_frame() -> None:
    for cls in filter(None, (PyMessage, codec_pkg.CyMessage)):
        msg = cls("mudrex.futures.trade.X", 3, "update", 7, b"{}")
        assert msg.frame == b"\x81\x02{}"
        assert msg == cls("mudrex.futures.trade.X", 3, "update", 7, b"{}", b"\x81\x02{}")
        clone = pickle.loads(pickle.dumps(msg))
        assert clone == msg and type(clone) is cls
        assert "seq=3" in repr(msg)
        assert msg.epoch == ""
        dated = cls("mudrex.futures.trade.X", 3, "update", 7, b"{}", None, "e1")
        assert dated.epoch == "e1" and dated != msg
        assert pickle.loads(pickle.dumps(dated)).epoch == "e1"


def test_codec_numbers_within_an_epoch(impl: tuple) -> None:
    codec = make(impl, "publicTrade.BTCUSDT")
    other = make(impl, "publicTrade.BTCUSDT")
    assert isinstance(codec.epoch, str) and codec.epoch
    assert codec.epoch != other.epoch  # a new numbering, a new epoch
    first = codec.feed(frames(TRADE_TESTNET))[0]
    codec.reset()  # the numbering continues: same epoch
    second = codec.feed(frames(TRADE_DOCS))[0]
    assert first.epoch == second.epoch == codec.epoch
    assert (first.seq, second.seq) == (1, 2)
    assert codec.snapshot().epoch == codec.epoch
    stream = stream_for_topic("publicTrade.BTCUSDT")
    taken_over = impl[0][stream.kind](stream, 41, "stored-epoch")  # failover continues a line
    [msg] = taken_over.feed(frames(TRADE_DOCS))
    assert (msg.seq, msg.epoch, taken_over.epoch) == (42, "stored-epoch", "stored-epoch")
    assert as_snapshot(msg).epoch == "stored-epoch"


def test_as_snapshot_keeps_seq_and_data(impl: tuple) -> None:
    codec = make(impl, "tickers.BTCUSDT")
    codec.feed(frames(BTC_SNAPSHOT))
    [msg] = codec.feed(frames(BTC_DELTA))
    snap = as_snapshot(msg)
    assert type(snap) is type(msg)
    assert (snap.seq, snap.ts, snap.type) == (msg.seq, msg.ts, "snapshot")
    assert orjson.loads(snap.payload) == dict(
        orjson.loads(msg.payload), type="snapshot", epoch=msg.epoch
    )
    check_frame(snap)
    assert as_snapshot(snap) is snap


def test_as_snapshot_of_foreign_layout() -> None:
    payload = orjson.dumps({"type": "update", "stream": "s", "seq": 4, "data": {}})
    snap = as_snapshot(PyMessage("s", 4, "update", 1, payload, None, "e1"))
    assert orjson.loads(snap.payload)["type"] == "snapshot"
    assert orjson.loads(snap.payload)["epoch"] == "e1"


def test_new_codec_uses_selected_implementation() -> None:
    expected = (
        "cython" if CYTHON_AVAILABLE and os.environ.get("FASTPROXY_PURE") != "1" else "python"
    )
    assert expected == IMPLEMENTATION
    codecs = CY_CODECS if expected == "cython" else PY_CODECS
    for topic in ("tickers.BTCUSDT", "kline.1.BTCUSDT", "publicTrade.BTCUSDT"):
        stream = stream_for_topic(topic)
        codec = new_codec(stream, seq=9)
        assert type(codec) is codecs[stream.kind] and codec.stream is stream
        assert codec.seq == 9
    msg = new_codec(stream_for_topic("publicTrade.BTCUSDT")).feed(frames(TRADE_DOCS))[0]
    assert isinstance(msg, Message)
    assert ws_text_frame(b"ab") == b"\x81\x02ab"


@needs_ext
def test_extension_imports_on_its_own() -> None:
    code = "import fastproxy.codec._codec as ext; print(ext.TickerCodec.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "TickerCodec"


def test_fastproxy_pure_env_selects_python() -> None:
    code = (
        "from fastproxy.codec import IMPLEMENTATION, Message, PyMessage, new_codec;"
        "from fastproxy.codec.pure import PyTickerCodec;"
        "from fastproxy.streams import Stream;"
        "assert type(new_codec(Stream('ticker', 'BTCUSDT'))) is PyTickerCodec;"
        "assert Message is PyMessage;"
        "print(IMPLEMENTATION)"
    )
    env = dict(os.environ, FASTPROXY_PURE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "python"

"""Differential test: the Cython codec must match the pure one byte for byte, and must raise
CodecError on exactly the same frames. Hypothesis drives both through the same sequences of
frames (valid, odd and broken), resets and snapshot requests."""

from __future__ import annotations

import os

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastproxy.codec import (
    CY_CODECS,
    CYTHON_AVAILABLE,
    CYTHON_IMPORT_ERROR,
    PY_CODECS,
    CodecError,
    cy_ws_text_frame,
    py_ws_text_frame,
)
from fastproxy.codec.tables import TICKER_FIELDS
from fastproxy.streams import stream_for_topic

if not CYTHON_AVAILABLE and os.environ.get("FASTPROXY_REQUIRE_EXT") == "1":
    raise RuntimeError(f"FASTPROXY_REQUIRE_EXT=1 but {CYTHON_IMPORT_ERROR}")

pytestmark = pytest.mark.skipif(
    not CYTHON_AVAILABLE,
    reason=f"{CYTHON_IMPORT_ERROR}; build it with `python setup.py build_ext --inplace`",
)

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- values ---------------------------------------------------------------------------------

decimal_text = st.from_regex(r"-?[0-9]{1,7}(\.[0-9]{0,9})?", fullmatch=True)
surrogate_text = st.builds(
    lambda head, s: head + s,
    st.text(max_size=3),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
)
odd_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "NaN",
            "1e5",
            " 1",
            "\uff11",  # fullwidth digit one
            ".",
            "-",
            "+0.5",
            "0.00005",
            "-0.000049",
            "99.99995",
            '"quoted\\',
            "\x00\x1f\x7f",
            "é€😀",
            "\u2028",
        ]
    ),
    st.from_regex(r"[0-9]{30,120}\.[0-9]{0,40}", fullmatch=True),
    surrogate_text,
)
not_text = st.one_of(
    st.integers(),
    st.integers(min_value=2**63, max_value=2**80),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
# price24hPcnt: rounding edges (the fifth fractional digit near 5, runs of 9s that carry)
pct_text = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(["", "", "-", "+"]),
    st.from_regex(r"[09]{0,3}", fullmatch=True),
    st.sampled_from([".", ".", ""]),
    st.from_regex(r"[0-9]{0,2}[09]{0,3}[4569]?[0-9]{0,3}", fullmatch=True),
)
string_value = st.one_of(decimal_text, decimal_text, decimal_text, odd_text, not_text)
pct_value = st.one_of(pct_text, pct_text, pct_text, odd_text, not_text)
clean_value = decimal_text
ms = st.one_of(
    st.integers(0, 2**63 - 1),
    st.integers(1_600_000_000_000, 1_900_000_000_000),
    st.sampled_from([0, 2**63 - 1, 2**63, -1, 2**64, True, 1.5, "1700000000000", None]),
)
good_ms = st.integers(0, 2**63 - 1)


def _maybe_drop(draw: st.DrawFn, frame: dict, keys: tuple[str, ...], broken: bool) -> dict:
    if broken:
        for key in draw(st.lists(st.sampled_from(keys), max_size=len(keys), unique=True)):
            frame.pop(key, None)
    return frame


# -- frames ---------------------------------------------------------------------------------

TICKER_KEYS = [bybit for bybit, _ in TICKER_FIELDS] + ["prevPrice1h", "fundingCap", "cs", "x"]


@st.composite
def ticker_frame(draw: st.DrawFn) -> object:
    broken = draw(st.integers(0, 9)) == 0
    clean = not broken and draw(st.booleans())
    keys = draw(st.lists(st.sampled_from(TICKER_KEYS), unique=True, max_size=len(TICKER_KEYS)))
    data = {
        key: draw(
            (pct_text if clean else pct_value)
            if key == "price24hPcnt"
            else (clean_value if clean else string_value)
        )
        for key in keys
    }
    frame: dict = {
        "topic": "tickers.BTCUSDT",
        "type": draw(
            st.sampled_from(["delta"] * 6 + ["snapshot"] * 2 + ["Delta", "", None])
            if not clean
            else st.sampled_from(["delta"] * 5 + ["snapshot"])
        ),
        "data": data,
        "cs": draw(st.integers(0, 2**40)),
        "ts": draw(good_ms if clean else ms),
    }
    if broken:
        frame["data"] = draw(
            st.one_of(st.just(data), st.lists(st.just(data), max_size=1), not_text)
        )
        if draw(st.integers(0, 4)) == 0:
            return draw(st.one_of(not_text, st.lists(st.just(frame), max_size=1)))
    return _maybe_drop(draw, frame, ("type", "data", "ts"), broken)


@st.composite
def candle(draw: st.DrawFn, clean: bool) -> object:
    value = clean_value if clean else string_value
    item = {
        "start": draw(good_ms if clean else ms),
        "end": draw(good_ms if clean else ms),
        "interval": "5",
        "open": draw(value),
        "close": draw(value),
        "high": draw(value),
        "low": draw(value),
        "volume": draw(value),
        "turnover": draw(value),
        "confirm": draw(st.booleans() if clean else st.one_of(st.booleans(), not_text)),
        "timestamp": draw(good_ms),
    }
    if not clean and draw(st.integers(0, 5)) == 0:
        keys = draw(st.lists(st.sampled_from(sorted(item)), max_size=3, unique=True))
        for key in keys:
            del item[key]
    if not clean and draw(st.integers(0, 20)) == 0:
        return draw(not_text)
    return item


@st.composite
def kline_frame(draw: st.DrawFn) -> object:
    clean = draw(st.booleans())
    broken = not clean and draw(st.integers(0, 9)) == 0
    frame: dict = {
        "topic": "kline.5.BTCUSDT",
        "data": draw(st.lists(candle(clean), max_size=3)),
        "ts": draw(good_ms if clean else ms),
        "type": "snapshot",
    }
    if broken:
        frame["data"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=3), st.integers()), not_text)
        )
    return _maybe_drop(draw, frame, ("data", "ts", "type"), broken)


@st.composite
def trade(draw: st.DrawFn, clean: bool) -> object:
    value = clean_value if clean else string_value
    item: dict = {
        "T": draw(good_ms if clean else ms),
        "s": draw(
            st.sampled_from(["BTCUSDT", "ETHUSDT"]) if clean else st.one_of(value, st.none())
        ),
        "S": draw(
            st.sampled_from(["Buy", "Sell"])
            if clean
            else st.one_of(st.sampled_from(["Buy", "Sell", "buy", "SELL", ""]), not_text)
        ),
        "v": draw(value),
        "p": draw(value),
        "L": "PlusTick",
        "i": draw(st.uuids().map(str) if clean else st.one_of(st.uuids().map(str), value)),
        "BT": draw(st.booleans() if clean else st.one_of(st.booleans(), not_text)),
        "seq": draw(st.integers(0, 2**40)),
    }
    drop = ["s", "BT"] if clean else sorted(item)
    for key in draw(st.lists(st.sampled_from(drop), max_size=2, unique=True)):
        del item[key]
    if not clean and draw(st.integers(0, 20)) == 0:
        return draw(not_text)
    return item


@st.composite
def trade_frame(draw: st.DrawFn) -> object:
    clean = draw(st.booleans())
    broken = not clean and draw(st.integers(0, 9)) == 0
    frame: dict = {
        "topic": "publicTrade.BTCUSDT",
        "type": "snapshot",
        "ts": draw(good_ms if clean else ms),
        "data": draw(st.lists(trade(clean), max_size=5)),
    }
    if broken:
        frame["data"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=3), st.integers()), not_text)
        )
    return _maybe_drop(draw, frame, ("data", "ts"), broken)


def ops(frame_strategy: st.SearchStrategy) -> st.SearchStrategy:
    op = st.one_of(
        frame_strategy.map(lambda f: ("feed", f)),
        frame_strategy.map(lambda f: ("feed", f)),
        frame_strategy.map(lambda f: ("feed", f)),
        st.just(("reset", None)),
        st.just(("snapshot", None)),
    )
    return st.lists(op, min_size=1, max_size=20)


# -- the comparison -------------------------------------------------------------------------


def fields(message: object) -> tuple:
    return (
        message.stream_id,
        message.seq,
        message.type,
        message.ts,
        message.payload,
        message.frame,
        message.epoch,
    )


def outcome(codec: object, op: str, arg: object) -> object:
    if op == "reset":
        return codec.reset()
    if op == "snapshot":
        snap = codec.snapshot()
        return None if snap is None else fields(snap)
    try:
        return [fields(m) for m in codec.feed(arg)]
    except CodecError as exc:
        return f"CodecError: {exc}"  # the same refusal, with the same words


def run_both(topic: str, start_seq: int, script: list) -> None:
    stream = stream_for_topic(topic)
    pure = PY_CODECS[stream.kind](stream, start_seq, "e")
    cy = CY_CODECS[stream.kind](stream, start_seq, "e")
    for op, arg in script:
        expected = outcome(pure, op, arg)
        got = outcome(cy, op, arg)
        assert got == expected, (op, arg)
        if op == "feed":
            event("CodecError" if isinstance(expected, str) else f"{len(expected)} messages")
        assert cy.seq == pure.seq
        if isinstance(expected, list):
            for message in expected:
                doc = orjson.loads(message[4])
                assert doc["seq"] == message[1] and doc["stream"] == message[0]
                assert message[5] == py_ws_text_frame(message[4])


@SETTINGS
@given(ops(ticker_frame()), st.integers(0, 2**40))
def test_ticker_codecs_agree(script: list, start_seq: int) -> None:
    run_both("tickers.BTCUSDT", start_seq, script)


@SETTINGS
@given(ops(kline_frame()), st.integers(0, 2**40))
def test_kline_codecs_agree(script: list, start_seq: int) -> None:
    run_both("kline.5.BTCUSDT", start_seq, script)


@SETTINGS
@given(ops(trade_frame()), st.integers(0, 2**40))
def test_trade_codecs_agree(script: list, start_seq: int) -> None:
    run_both("publicTrade.BTCUSDT", start_seq, script)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(pct_value, decimal_text, st.from_regex(r"-?[0-9]{0,40}\.[0-9]{0,40}", fullmatch=True))
)
def test_percent_codecs_agree(fraction: object) -> None:
    frame = {
        "topic": "tickers.BTCUSDT",
        "type": "delta",
        "ts": 1,
        "data": {"price24hPcnt": fraction},
    }
    run_both("tickers.BTCUSDT", 0, [("feed", frame)])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.integers(0, 70_000).map(lambda n: b"z" * n))
def test_ws_text_frame_agrees(payload: bytes) -> None:
    assert cy_ws_text_frame(payload) == py_ws_text_frame(payload)


@pytest.mark.skipif(CY_CODECS is None, reason="the Cython codec is not built")
@pytest.mark.parametrize("kind", ["ticker", "orderbook"])
def test_renumber_keeps_state_and_seq_under_a_new_epoch(kind: str) -> None:
    """A node that serves a stream on its own renumbers it: same state and seq, a new epoch in
    the snapshot and the next Messages, in both implementations alike."""
    from fastproxy.streams import parse_stream_arg

    stream = parse_stream_arg("ticker:BTCUSDT" if kind == "ticker" else "orderbook:50:BTCUSDT")
    topic = stream.topic
    if kind == "ticker":
        first = {"topic": topic, "type": "snapshot", "ts": 1, "data": {"lastPrice": "1"}}
        second = {"topic": topic, "type": "delta", "ts": 2, "data": {"lastPrice": "2"}}
    else:
        book = {"s": "BTCUSDT", "b": [["1", "1"]], "a": [["2", "1"]], "u": 1, "seq": 1}
        first = {"topic": topic, "type": "snapshot", "ts": 1, "data": book, "cts": 1}
        second = {
            "topic": topic, "type": "delta", "ts": 2, "cts": 2,
            "data": {**book, "b": [["1", "2"]], "a": [], "u": 2, "seq": 2},
        }  # fmt: skip
    for codecs in (CY_CODECS, PY_CODECS):
        assert codecs is not None
        codec = codecs[stream.kind](stream, 5, "e0")
        codec.feed(first)
        before = codec.snapshot()
        codec.renumber()
        assert codec.epoch != "e0" and codec.seq == 6
        after = codec.snapshot()
        assert (after.seq, after.epoch) == (before.seq, codec.epoch)
        # the same state; a snapshot names its epoch
        assert after.payload == before.payload.replace(b'"e0"', f'"{codec.epoch}"'.encode())
        [message] = codec.feed(second)
        assert message.seq == 7 and message.epoch == codec.epoch

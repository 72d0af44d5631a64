import pickle

import pytest

from fastproxy.streams import INTERVALS, Stream, StreamError, parse_stream_arg, stream_for_topic


@pytest.mark.parametrize(
    ("arg", "stream_id", "topic"),
    [
        ("ticker:BTCUSDT", "mudrex.futures.ticker.BTCUSDT", "tickers.BTCUSDT"),
        ("ticker:btcusdt", "mudrex.futures.ticker.BTCUSDT", "tickers.BTCUSDT"),
        ("tickers.ethusdt", "mudrex.futures.ticker.ETHUSDT", "tickers.ETHUSDT"),
        ("kline:1h:BTCUSDT", "mudrex.futures.kline.1h.BTCUSDT", "kline.60.BTCUSDT"),
        ("kline:1M:BTCUSDT", "mudrex.futures.kline.1M.BTCUSDT", "kline.M.BTCUSDT"),
        ("kline:1m:BTCUSDT", "mudrex.futures.kline.1m.BTCUSDT", "kline.1.BTCUSDT"),
        ("trade:SOLUSDT", "mudrex.futures.trade.SOLUSDT", "publicTrade.SOLUSDT"),
        ("ticker:BTC-26DEC25", "mudrex.futures.ticker.BTC-26DEC25", "tickers.BTC-26DEC25"),
    ],
)
def test_names(arg: str, stream_id: str, topic: str) -> None:
    stream = parse_stream_arg(arg)
    assert stream.stream_id == stream_id
    assert stream.topic == topic
    assert stream_for_topic(topic) == stream
    assert parse_stream_arg(stream.arg) == stream


def test_every_interval_is_its_own_topic() -> None:
    topics = {parse_stream_arg(f"kline:{i}:BTCUSDT").topic for i in INTERVALS}
    assert len(topics) == 13


@pytest.mark.parametrize(
    "arg",
    [
        "ticker:",
        "ticker:B",
        "ticker:*",
        "ticker:BTC*",
        "kline:2m:BTCUSDT",
        "kline:1H:BTCUSDT",
        "kline:BTCUSDT",
        "orderbook:BTCUSDT",
        "ticker:BTC USDT",
        "ticker:-BTC",
        "ticker:" + "A" * 31,
        "trade:BTC:USDT",
        "",
    ],
)
def test_rejected(arg: str) -> None:
    with pytest.raises(StreamError):
        parse_stream_arg(arg)


def test_stream_is_immutable_hashable_and_picklable() -> None:
    stream = Stream("kline", "BTCUSDT", "1h")
    with pytest.raises(AttributeError):
        stream.symbol = "X"  # type: ignore[misc]
    assert {stream, Stream("kline", "BTCUSDT", "1h")} == {stream}
    assert pickle.loads(pickle.dumps(stream)) == stream


def test_unknown_topic() -> None:
    for topic in ("orderbook.25.BTCUSDT", "liquidation.BTCUSDT", "kline.7.BTCUSDT", "tickers."):
        with pytest.raises(StreamError):
            stream_for_topic(topic)

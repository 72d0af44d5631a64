"""Codec hot path: raw Bybit frame bytes -> Message (payload + WebSocket frame).

Every case measures `orjson.loads(raw)` + `codec.feed(frame)`, the work the proxy does per
upstream frame, for both implementations, next to the floor `orjson.dumps(orjson.loads(raw))`
(parse and re-serialize the same frame, nothing else).

    .venv/bin/pytest benchmarks/bench_codec.py --benchmark-columns=median,mean,stddev,rounds
"""

from __future__ import annotations

import orjson
import pytest

from fastproxy.codec import CY_CODECS, CYTHON_AVAILABLE, CYTHON_IMPORT_ERROR, PY_CODECS
from fastproxy.streams import stream_for_topic

TICKER_SNAPSHOT = (
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
# one changed field (the most common delta) and a busy one with a new price24hPcnt
TICKER_DELTA_1 = (
    b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT",'
    b'"indexPrice":"63585.74"},"cs":764144450620,"ts":1786659827983}'
)
TICKER_DELTA_6 = (
    b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT",'
    b'"price24hPcnt":"0.028223","lastPrice":"63562.1","turnover24h":"1842288307.0604",'
    b'"volume24h":"587584171.0000","ask1Price":"63562.2","ask1Size":"1113"},'
    b'"cs":19371556274,"ts":1737718429132}'
)
_TRADE = (
    '{{"T":{t},"s":"BTCUSDT","S":"{side}","v":"0.003","p":"7725{n}.70","L":"MinusTick",'
    '"i":"0e5ae7e6-811a-5884-98c9-6cb3aede15{n:02d}","BT":false,"RPI":false,"seq":9685122331}}'
)
TRADES_20 = (
    '{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1789470139409,"data":['
    + ",".join(
        _TRADE.format(t=1789470139371 + n, side="Buy" if n % 3 else "Sell", n=n) for n in range(20)
    )
    + "]}"
).encode()
TRADES_1 = (
    b'{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1789470139409,"data":[{'
    b'"T":1789470139371,"s":"BTCUSDT","S":"Sell","v":"0.003","p":"77256.70","L":"MinusTick",'
    b'"i":"0e5ae7e6-811a-5884-98c9-6cb3aede1505","BT":false,"RPI":false,"seq":9685122331}]}'
)
KLINE = (
    b'{"topic":"kline.1.BTCUSDT","data":[{"start":1789470120000,"end":1789470179999,'
    b'"interval":"1","open":"77257.2","close":"77256.8","high":"77257.2","low":"77256.8",'
    b'"volume":"0.015","turnover":"1158.8555","confirm":false,"timestamp":1789470134641}],'
    b'"ts":1789470134641,"type":"snapshot"}'
)

CASES = {
    "ticker_delta_1": ("tickers.BTCUSDT", TICKER_DELTA_1),
    "ticker_delta_6": ("tickers.BTCUSDT", TICKER_DELTA_6),
    "trade_1": ("publicTrade.BTCUSDT", TRADES_1),
    "trade_batch_20": ("publicTrade.BTCUSDT", TRADES_20),
    "kline": ("kline.1.BTCUSDT", KLINE),
}
IMPLS = [
    pytest.param(PY_CODECS, id="python"),
    pytest.param(
        CY_CODECS,
        id="cython",
        marks=pytest.mark.skipif(not CYTHON_AVAILABLE, reason=str(CYTHON_IMPORT_ERROR)),
    ),
]

loads = orjson.loads
dumps = orjson.dumps


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("codecs", IMPLS)
def test_codec(benchmark, codecs: dict, case: str) -> None:
    topic, raw = CASES[case]
    stream = stream_for_topic(topic)
    codec = codecs[stream.kind](stream)
    if stream.kind == "ticker":
        codec.feed(loads(TICKER_SNAPSHOT))  # deltas merge into a full ticker
    feed = codec.feed
    benchmark.group = case

    def run() -> list:
        return feed(loads(raw))

    [message] = benchmark(run)
    assert message.frame.endswith(message.payload)


@pytest.mark.parametrize("case", list(CASES))
def test_floor_loads_dumps(benchmark, case: str) -> None:
    raw = CASES[case][1]
    benchmark.group = case
    assert benchmark(lambda: dumps(loads(raw)))

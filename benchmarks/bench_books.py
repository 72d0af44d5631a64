"""Book codec hot path: raw Bybit orderbook frame bytes -> Message, both implementations.

- `book_delta_50`: a 50-level delta (25 bid and 25 ask levels: size changes, 5 removed and 5 new
  levels a side) applied to a 50-level book, then its update frame. Two such deltas alternate so
  the book keeps its shape; each run takes the next `u`, as the exchange sends them.
- `book_snapshot_200`: a 200-level snapshot (200 bids, 200 asks) replacing the book, then its
  snapshot frame.
- `book_joiner_200`: a late joiner's whole-book snapshot of a 200-level book, built on demand
  after a one-level delta (the delta's own cost included).

Every case measures `orjson.loads(raw)` + `codec.feed(frame)`, next to the floor
`orjson.dumps(orjson.loads(raw))`.

    .venv/bin/pytest benchmarks/bench_books.py --benchmark-columns=median,mean,stddev,rounds
"""

from __future__ import annotations

import itertools

import orjson
import pytest

from fastproxy.codec import CY_CODECS, CYTHON_AVAILABLE, CYTHON_IMPORT_ERROR, PY_CODECS
from fastproxy.streams import stream_for_topic

loads = orjson.loads
dumps = orjson.dumps


def _price(tick: int) -> str:
    return f"{tick // 10}.{tick % 10}"


def _frame(topic: str, kind: str, u: int, bids: list, asks: list) -> bytes:
    return dumps(
        {
            "topic": topic,
            "type": kind,
            "ts": 1790134712130,
            "data": {"s": "BTCUSDT", "b": bids, "a": asks, "u": u, "seq": 814547787693},
            "cts": 1790134712126,
        }
    )


def _book(depth: int) -> tuple[list, list]:
    # bids 86723.4 down, asks 86723.5 up, one tick apart
    bids = [[_price(867234 - i), f"{(i % 7) + 1}.{i:03d}"] for i in range(depth)]
    asks = [[_price(867235 + i), f"{(i % 5) + 1}.{i:03d}"] for i in range(depth)]
    return bids, asks


def _deltas() -> tuple[bytes, bytes]:
    """Two 50-level deltas of orderbook.50; the second undoes the first's removals."""
    bids, asks = _book(50)
    out = []
    for flip in (0, 1):
        b, a = [], []
        for i in range(20):  # size changes near the top
            b.append([bids[i][0], f"{flip + 2}.{i:03d}"])
            a.append([asks[i][0], f"{flip + 3}.{i:03d}"])
        for i in range(45, 50):  # five levels leave the window and five come back
            b.append([bids[i][0], "0" if flip == 0 else bids[i][1]])
            a.append([asks[i][0], "0" if flip == 0 else asks[i][1]])
        out.append(_frame("orderbook.50.BTCUSDT", "delta", 0, b, a))
    return out[0], out[1]


DELTA_A, DELTA_B = _deltas()
SNAPSHOT_50 = _frame("orderbook.50.BTCUSDT", "snapshot", 1000, *_book(50))
SNAPSHOT_200 = _frame("orderbook.200.BTCUSDT", "snapshot", 1000, *_book(200))
DELTA_1_200 = _frame("orderbook.200.BTCUSDT", "delta", 0, [[_price(867234), "9.999"]], [])

IMPLS = [
    pytest.param(PY_CODECS, id="python"),
    pytest.param(
        CY_CODECS,
        id="cython",
        marks=pytest.mark.skipif(not CYTHON_AVAILABLE, reason=str(CYTHON_IMPORT_ERROR)),
    ),
]


@pytest.mark.parametrize("codecs", IMPLS)
def test_book_delta_50(benchmark, codecs: dict) -> None:
    stream = stream_for_topic("orderbook.50.BTCUSDT")
    codec = codecs[stream.kind](stream)
    codec.feed(loads(SNAPSHOT_50))
    feed = codec.feed
    u = itertools.count(1001)
    raws = itertools.cycle((DELTA_A, DELTA_B))
    benchmark.group = "book_delta_50"

    def run() -> list:
        frame = loads(next(raws))
        frame["data"]["u"] = next(u)
        return feed(frame)

    [message] = benchmark(run)
    assert message.type == "update" and codec.resync is None
    assert len(orjson.loads(message.payload)["data"]["bids"]) == 25


@pytest.mark.parametrize("codecs", IMPLS)
def test_book_snapshot_200(benchmark, codecs: dict) -> None:
    stream = stream_for_topic("orderbook.200.BTCUSDT")
    codec = codecs[stream.kind](stream)
    feed = codec.feed
    benchmark.group = "book_snapshot_200"
    [message] = benchmark(lambda: feed(loads(SNAPSHOT_200)))
    assert len(orjson.loads(message.payload)["data"]["asks"]) == 200


@pytest.mark.parametrize("codecs", IMPLS)
def test_book_joiner_200(benchmark, codecs: dict) -> None:
    stream = stream_for_topic("orderbook.200.BTCUSDT")
    codec = codecs[stream.kind](stream)
    codec.feed(loads(SNAPSHOT_200))
    feed, snapshot = codec.feed, codec.snapshot
    u = itertools.count(1001)
    benchmark.group = "book_joiner_200"

    def run():
        frame = loads(DELTA_1_200)
        frame["data"]["u"] = next(u)
        feed(frame)
        return snapshot()

    message = benchmark(run)
    assert message.type == "snapshot" and len(orjson.loads(message.payload)["data"]["bids"]) == 200


@pytest.mark.parametrize(
    ("group", "raw"),
    [("book_delta_50", DELTA_A), ("book_snapshot_200", SNAPSHOT_200)],
)
def test_floor_loads_dumps(benchmark, group: str, raw: bytes) -> None:
    benchmark.group = group
    assert benchmark(lambda: dumps(loads(raw)))

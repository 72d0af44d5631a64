"""The Bybit simulator over real sockets, driven by a plain `websockets` client (and a raw one
where frame-level detail matters). Follows the conformance checklist (reference section 9).

Timing assertions are only ever "within N seconds" with wide margins: the CI box is a noisy
2-core machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fastproxy.sim import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent
TICKER_KEYS = [
    "symbol", "tickDirection", "price24hPcnt", "lastPrice", "prevPrice24h", "highPrice24h",
    "lowPrice24h", "prevPrice1h", "markPrice", "indexPrice", "openInterest", "openInterestValue",
    "turnover24h", "volume24h", "fundingIntervalHour", "fundingCap", "singleOpenInterest",
    "singleOpenInterestValue", "nextFundingTime", "fundingRate", "bid1Price", "bid1Size",
    "ask1Price", "ask1Size", "preOpenPrice", "preQty", "curPreListingPhase",
]  # fmt: skip
PRICE = re.compile(r"^\d+(\.\d+)?$")
CONN_ID = re.compile(r"^[0-9a-v]{20}-[0-9a-z]{4}$")

Frame = dict[str, Any]
MakeSim = Callable[..., Awaitable[Simulator]]


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def make(**overrides: Any) -> Simulator:
        sim = Simulator(SimConfig(host="127.0.0.1", port=0, **overrides))
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def sim(make_sim: MakeSim) -> Simulator:
    return await make_sim()


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> Client:
        ws = await connect(url, ping_interval=None, close_timeout=1, max_size=None, open_timeout=10)
        return cls(ws)

    async def close(self) -> None:
        await self.ws.close()

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    async def recv(self, timeout: float = 10.0) -> tuple[str, Frame]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), "server must send text frames only"
        frame = json.loads(raw)
        assert isinstance(frame, dict)
        return raw, frame

    async def until(self, pred: Callable[[Frame], bool], timeout: float = 10.0) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            _, frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if pred(frame):
                return frame

    async def reply(self, timeout: float = 10.0) -> tuple[str, Frame]:
        """Next non-data frame (ack, failure or pong)."""
        deadline = time.monotonic() + timeout
        while True:
            raw, frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if "topic" not in frame:
                return raw, frame

    async def command(self, msg: Any, timeout: float = 10.0) -> Frame:
        await self.send(msg)
        return (await self.reply(timeout))[1]

    async def collect(self, seconds: float) -> list[Frame]:
        frames: list[Frame] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frames.append((await self.recv(left))[1])
            except TimeoutError:
                break
        return frames


@pytest.fixture
async def client_factory() -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(url: str) -> Client:
        client = await Client.open(url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
            await asyncio.wait_for(client.close(), 3)


async def expect_abnormal_close(client: Client, timeout: float = 10.0) -> None:
    """The server vanished without a close frame: websockets reports 1006."""
    with pytest.raises(ConnectionClosed) as info:
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.wait_for(client.ws.recv(), max(0.01, deadline - time.monotonic()))
    assert info.value.rcvd is None
    assert client.ws.close_code == 1006


def http_get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body


async def aget(url: str) -> tuple[int, Any]:
    # urllib blocks; the simulator shares this event loop
    return await asyncio.to_thread(http_get, url)


async def refused_status(url: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        await connect(url, open_timeout=10)
    return info.value.response.status_code


class RawWS:
    """A minimal RFC 6455 client that exposes every frame, including control frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, path: str = "/v5/public/linear") -> RawWS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def frame(self, timeout: float) -> tuple[int, bytes]:
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        assert not b1 & 0x80, "server frames must not be masked"
        assert b0 & 0x80, "server sends unfragmented frames"
        size = b1 & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return b0 & 0x0F, await self.reader.readexactly(size)

    def close(self) -> None:
        self.writer.close()


def sub(*args: str, req_id: Any = None, op: str = "subscribe") -> Frame:
    msg: Frame = {"op": op, "args": list(args)}
    if req_id is not None:
        msg["req_id"] = req_id
    return msg


def ws_url_for(sim: Simulator, path: str) -> str:
    return f"ws://127.0.0.1:{sim.port}{path}"


# -- transport and commands ------------------------------------------------------------------


async def test_ack_precedes_snapshots_with_exact_shapes(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    topics = [
        "tickers.BTCUSDT",
        "orderbook.50.BTCUSDT",
        "orderbook.1.BTCUSDT",
        "kline.1.BTCUSDT",
        "publicTrade.BTCUSDT",
        "allLiquidation.BTCUSDT",
    ]
    await c.send(sub(*topics, req_id="probe-pp"))
    raw, _ = await c.recv()
    assert re.fullmatch(
        r'\{"success":true,"ret_msg":"","conn_id":"[0-9a-v]{20}-[0-9a-z]{4}",'
        r'"req_id":"probe-pp","op":"subscribe"\}',
        raw,
    ), raw
    snapshots: dict[str, Frame] = {}
    for _ in range(200):
        _, frame = await c.recv()
        assert "topic" in frame, "exactly one ack per request"
        if frame["type"] == "snapshot" and frame["topic"] not in snapshots:
            snapshots[frame["topic"]] = frame
        if {"tickers.BTCUSDT", "orderbook.50.BTCUSDT", "orderbook.1.BTCUSDT"} <= set(snapshots):
            break
    assert list(snapshots["tickers.BTCUSDT"]) == ["topic", "type", "data", "cs", "ts"]
    assert list(snapshots["orderbook.50.BTCUSDT"]) == ["topic", "type", "ts", "data", "cts"]
    assert list(snapshots["orderbook.1.BTCUSDT"]) == ["topic", "ts", "type", "data", "cts"]
    kline = await c.until(lambda f: f.get("topic") == "kline.1.BTCUSDT")
    assert list(kline) == ["topic", "data", "ts", "type"]


async def test_req_id_echo_forms(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    assert (await c.command(sub("tickers.BTCUSDT", req_id=42)))["req_id"] == 42
    assert (await c.command(sub("tickers.ETHUSDT")))["req_id"] == ""
    reply = await c.command(sub("tickers.SOLUSDT", req_id="tickers.SOLUSDT"))
    assert reply["req_id"] == "tickers.SOLUSDT"
    await c.send('{"op":"ping","req_id":"<&>"}')
    raw, _ = await c.reply()
    assert '"req_id":"\\u003c\\u0026\\u003e"' in raw


async def test_failures_never_close_the_socket(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    ack = await c.command(sub("publicTrade.BTCUSDT", "tickers.BTCUSDT", req_id="ok"))
    assert ack["success"] is True
    conn_id = ack["conn_id"]
    for topic in [
        "tickers.NOPEUSDT",
        "orderbook.50.btcusdt",
        "orderbook.30.BTCUSDT",
        "orderbook.500.BTCUSDT",
        "kline.2.BTCUSDT",
        "liquidation.BTCUSDT",
        "unknownTopic.BTCUSDT",
    ]:
        reply = await c.command(sub("tickers.ETHUSDT", topic, "tickers.SOLUSDT", req_id="e1"))
        assert reply == {
            "success": False,
            "ret_msg": f"error:handler not found,topic:{topic}",
            "conn_id": conn_id,
            "req_id": "e1",
            "op": "subscribe",
        }
    # strict mode: nothing of those requests was applied
    assert set(sim.subscription_counts()) == {"publicTrade.BTCUSDT", "tickers.BTCUSDT"}
    reply = await c.command(sub("tickers.ETHUSDT", "publicTrade.BTCUSDT", req_id="e6"))
    assert reply["ret_msg"] == "error:already subscribed,topic:publicTrade.BTCUSDT"
    assert "tickers.ETHUSDT" not in sim.subscription_counts()
    for op in ("pong", "nope"):
        reply = await c.command({"op": op})
        assert reply["success"] is False and reply["ret_msg"] == "error:invalid op"
    for bad in ("hello", '{"op":"subscribe","args":[{"op":"subscribe"}]}', "[1,2]"):
        reply = await c.command(bad)
        assert reply["ret_msg"].startswith("Failed to decode incoming data:")
        assert reply["req_id"] == "" and reply["op"] == "" and reply["success"] is False
    # the earlier subscription kept streaming and the socket still answers
    await c.until(lambda f: f.get("topic") == "tickers.BTCUSDT" and f["type"] == "delta")
    pong = await c.command({"op": "ping"})
    assert pong["ret_msg"] == "pong" and pong["conn_id"] == conn_id


async def test_pong_shape_and_conn_ids(sim: Simulator, client_factory) -> None:
    a = await client_factory(sim.ws_url("linear"))
    b = await client_factory(sim.ws_url("linear"))
    await a.send({"op": "ping"})
    raw, pong = await a.reply()
    assert re.fullmatch(
        r'\{"success":true,"ret_msg":"pong","conn_id":"[^"]+","req_id":"","op":"ping"\}', raw
    )
    pong2 = await a.command({"req_id": "p1", "op": "ping"})
    assert pong2["req_id"] == "p1" and pong2["conn_id"] == pong["conn_id"]
    other = await b.command({"op": "ping"})
    assert CONN_ID.match(pong["conn_id"]) and CONN_ID.match(other["conn_id"])
    assert other["conn_id"] != pong["conn_id"]


async def test_rfc6455_pings_answered_and_server_never_pings(make_sim: MakeSim) -> None:
    sim = await make_sim(idle_timeout=60.0)
    raw = await RawWS.open(sim.port)
    try:
        raw.send(0x9, b"are-you-there")
        opcode, payload = await raw.frame(10)
        assert (opcode, payload) == (0xA, b"are-you-there")
        # nothing subscribed and nothing asked: the server stays silent (no JSON or WS pings)
        with pytest.raises(TimeoutError):
            await raw.frame(2.5)
        raw.send(0x1, json.dumps(sub("tickers.BTCUSDT")).encode())
        deadline = time.monotonic() + 2.5
        count = 0
        while time.monotonic() < deadline:
            opcode, payload = await raw.frame(10)
            assert opcode == 0x1, f"unexpected opcode {opcode}"
            assert isinstance(json.loads(payload), dict)
            count += 1
        assert count > 5
    finally:
        raw.close()


async def test_idle_connection_is_cut_abruptly(make_sim: MakeSim, client_factory) -> None:
    sim = await make_sim(idle_timeout=1.0)
    pinger = await client_factory(sim.ws_url("linear"))

    async def keep_pinging() -> int:
        pongs = 0
        for _ in range(12):
            if (await pinger.command({"op": "ping"}))["ret_msg"] == "pong":
                pongs += 1
            await asyncio.sleep(0.25)
        return pongs

    pinging = asyncio.create_task(keep_pinging())
    streaming = await client_factory(sim.ws_url("linear"))
    await streaming.command(sub("tickers.BTCUSDT"))
    idle = await client_factory(sim.ws_url("linear"))
    await expect_abnormal_close(idle, timeout=15)
    # a client that pings, and one that is being pushed data, both stay up
    assert await asyncio.wait_for(pinging, 30) == 12
    frames = await streaming.collect(0.5)
    assert frames and all(f.get("topic") == "tickers.BTCUSDT" for f in frames)
    assert sim.connection_count() == 2


async def test_unknown_path_is_404_and_counted(sim: Simulator) -> None:
    assert await refused_status(ws_url_for(sim, "/v5/public/nope")) == 404
    assert await refused_status(ws_url_for(sim, "/v5/private")) == 404
    assert sim.handshake_attempts == 2


# -- data ------------------------------------------------------------------------------------


async def test_ticker_snapshot_then_changed_only_deltas(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("tickers.BTCUSDT"))
    snap = await c.until(lambda f: f.get("topic") == "tickers.BTCUSDT")
    assert snap["type"] == "snapshot"
    assert list(snap["data"]) == TICKER_KEYS
    assert all(isinstance(v, str) for v in snap["data"].values())
    assert snap["data"]["nextFundingTime"].isdigit()
    assert isinstance(snap["cs"], int) and isinstance(snap["ts"], int)
    state, cs, deltas = dict(snap["data"]), snap["cs"], 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        frame = await c.until(lambda f: f.get("topic") == "tickers.BTCUSDT")
        assert frame["type"] == "delta"
        assert list(frame) == ["topic", "type", "data", "cs", "ts"]
        assert frame["cs"] > cs
        cs = frame["cs"]
        data = frame["data"]
        assert next(iter(data)) == "symbol" and data["symbol"] == "BTCUSDT"
        assert len(data) >= 2
        for key, value in data.items():
            assert key in state and isinstance(value, str)
            if key != "symbol":
                assert state[key] != value, f"{key} did not change"
        state.update(data)
        deltas += 1
    assert deltas >= 5
    assert float(state["bid1Price"]) < float(state["ask1Price"])


async def test_dated_future_ticker(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("tickers.BTC-26DEC25"))
    snap = await c.until(lambda f: f.get("topic") == "tickers.BTC-26DEC25")
    data = snap["data"]
    assert data["deliveryTime"] == "2025-12-26T08:00:00Z"
    assert data["fundingRate"] == "" and data["nextFundingTime"] == ""


async def test_kline_candles_confirm_exactly_once(make_sim: MakeSim, client_factory) -> None:
    sim = await make_sim(kline_time_scale=60.0, trade_rate=30.0)
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("kline.1.BTCUSDT", "kline.3.ETHUSDT"))
    confirms: dict[tuple[str, int], int] = {}
    starts: set[tuple[str, int]] = set()
    for frame in await c.collect(4.5):
        assert frame["type"] == "snapshot" and list(frame) == ["topic", "data", "ts", "type"]
        assert 1 <= len(frame["data"]) <= 2
        for candle in frame["data"]:
            assert list(candle) == [
                "start", "end", "interval", "open", "close", "high", "low", "volume",
                "turnover", "confirm", "timestamp",
            ]  # fmt: skip
            duration = 1000 if frame["topic"].startswith("kline.1.") else 3000
            assert candle["start"] % duration == 0
            assert candle["end"] == candle["start"] + duration - 1
            assert candle["interval"] == frame["topic"].split(".")[1]
            assert isinstance(candle["confirm"], bool) and isinstance(candle["timestamp"], int)
            for key in ("open", "close", "high", "low", "volume", "turnover"):
                assert PRICE.match(candle[key]), candle
            assert float(candle["low"]) <= float(candle["close"]) <= float(candle["high"])
            key = (frame["topic"], candle["start"])
            starts.add(key)
            if candle["confirm"]:
                confirms[key] = confirms.get(key, 0) + 1
    closed_1m = [k for k in confirms if k[0] == "kline.1.BTCUSDT"]
    assert len(closed_1m) >= 2
    assert set(confirms.values()) == {1}


async def test_kline_real_time_alignment(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    topics = ["kline.1.BTCUSDT", "kline.60.BTCUSDT", "kline.D.BTCUSDT", "kline.W.BTCUSDT"]
    topics.append("kline.M.BTCUSDT")
    await c.command(sub(*topics))
    seen: dict[str, Frame] = {}
    while len(seen) < len(topics):
        frame = await c.until(lambda f: f.get("topic", "").startswith("kline."))
        seen.setdefault(frame["topic"], frame["data"][-1])
    assert seen["kline.1.BTCUSDT"]["start"] % 60_000 == 0
    assert seen["kline.60.BTCUSDT"]["start"] % 3_600_000 == 0
    assert seen["kline.D.BTCUSDT"]["start"] % 86_400_000 == 0
    week = seen["kline.W.BTCUSDT"]
    assert time.gmtime(week["start"] / 1000).tm_wday == 0
    assert week["end"] - week["start"] == 7 * 86_400_000 - 1
    month = time.gmtime(seen["kline.M.BTCUSDT"]["start"] / 1000)
    assert month.tm_mday == 1 and month.tm_hour == 0


async def test_public_trades_shape_and_split(make_sim: MakeSim, client_factory) -> None:
    # no organic trades, so the injected taker order is alone in its frames
    sim = await make_sim(trade_rate=0.0)
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("publicTrade.BTCUSDT"))
    sim.inject_trades("BTCUSDT", 2100)
    sizes: list[int] = []
    seqs: set[int] = set()
    while sum(sizes) < 2100:
        frame = await c.until(lambda f: f.get("topic") == "publicTrade.BTCUSDT")
        assert list(frame) == ["topic", "type", "ts", "data"] and frame["type"] == "snapshot"
        rows = frame["data"]
        assert 1 <= len(rows) <= 1024
        assert [r["T"] for r in rows] == sorted(r["T"] for r in rows)
        for row in rows:
            assert list(row) == ["T", "s", "S", "v", "p", "L", "i", "BT", "RPI", "seq"]
            assert row["S"] in ("Buy", "Sell") and row["s"] == "BTCUSDT"
            assert PRICE.match(row["p"]) and PRICE.match(row["v"])
            assert row["BT"] is False and row["RPI"] is False
            assert row["L"] in ("PlusTick", "ZeroPlusTick", "MinusTick", "ZeroMinusTick")
            uuid.UUID(row["i"])
        seqs |= {r["seq"] for r in rows}
        sizes.append(len(rows))
    assert sizes == [1024, 1024, 52]
    assert len(seqs) == 1, "frames of one split batch share seq"


async def test_orderbook_rules(make_sim: MakeSim, client_factory) -> None:
    sim = await make_sim(trade_rate=20.0, volatility=0.05)
    c = await client_factory(sim.ws_url("linear"))
    depths = (1, 50, 200)
    await c.command(sub(*(f"orderbook.{d}.ETHUSDT" for d in depths)))
    books: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
    last_u: dict[int, int] = {}
    last_seq = 0
    frames = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        frame = await c.until(lambda f: f.get("topic", "").startswith("orderbook."))
        depth = int(frame["topic"].split(".")[1])
        data = frame["data"]
        assert data["s"] == "ETHUSDT" and isinstance(data["u"], int)
        assert isinstance(data["seq"], int) and isinstance(frame["cts"], int)
        assert isinstance(frame["ts"], int)
        if depth in last_u:
            repeat = depth == 1 and data["u"] == last_u[depth]
            assert repeat or data["u"] == last_u[depth] + 1
        last_u[depth] = data["u"]
        if not (depth == 1 and frame["type"] == "snapshot" and frames and data["seq"] < last_seq):
            assert data["seq"] >= last_seq, "seq is shared and monotonic across depths"
            last_seq = data["seq"]
        if frame["type"] == "snapshot":
            bids, asks = dict(data["b"]), dict(data["a"])
            prices_b = [float(p) for p, _ in data["b"]]
            prices_a = [float(p) for p, _ in data["a"]]
            assert prices_b == sorted(prices_b, reverse=True) and prices_a == sorted(prices_a)
        else:
            assert depth != 1, "orderbook.1 is snapshot-only"
            assert data["b"] or data["a"]
            bids, asks = books[depth]
            for side, levels in ((bids, data["b"]), (asks, data["a"])):
                for price, size in levels:
                    assert PRICE.match(price) and PRICE.match(size)
                    if size == "0":
                        assert price in side, "deleting a level the client never had"
                        del side[price]
                    else:
                        side[price] = size
        books[depth] = (bids, asks)
        assert len(bids) <= depth and len(asks) <= depth
        assert all(float(s) > 0 for s in (*bids.values(), *asks.values()))
        assert max(map(float, bids)) < min(map(float, asks))
        frames += 1
    assert frames > 30
    # full windows: the book is deep enough to fill every depth
    assert len(books[200][0]) == 200 and len(books[50][1]) == 50
    assert len(books[1][0]) == 1


async def test_orderbook_1_repeats_unchanged_snapshot(make_sim: MakeSim, client_factory) -> None:
    sim = await make_sim(
        l1_heartbeat=0.5, volatility=0.0, trade_rate=0.0, book_churn=0, liquidation_rate=0.0
    )
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("orderbook.1.XRPUSDT"))
    frames = [f for f in await c.collect(3.0) if f.get("topic") == "orderbook.1.XRPUSDT"]
    assert all(f["type"] == "snapshot" for f in frames)
    repeats = 0
    for prev, frame in itertools.pairwise(frames):
        same = (prev["data"]["b"], prev["data"]["a"]) == (frame["data"]["b"], frame["data"]["a"])
        # an unchanged top of book is re-sent with the same u; a change moves u by one
        assert frame["data"]["u"] == prev["data"]["u"] + (0 if same else 1)
        repeats += same
    assert repeats >= 2


async def test_all_liquidation(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("allLiquidation.SOLUSDT"))
    sim.inject_liquidation("SOLUSDT")
    frame = await c.until(lambda f: f.get("topic") == "allLiquidation.SOLUSDT")
    assert list(frame) == ["topic", "type", "ts", "data"] and frame["type"] == "snapshot"
    assert frame["data"]
    for row in frame["data"]:
        assert list(row) == ["T", "s", "S", "v", "p"]
        assert isinstance(row["T"], int) and row["s"] == "SOLUSDT" and row["S"] in ("Buy", "Sell")
        assert PRICE.match(row["v"]) and PRICE.match(row["p"])


async def test_unsubscribe_stops_and_resubscribe_snapshots(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("tickers.BTCUSDT", "orderbook.50.BTCUSDT"))
    await c.until(lambda f: f.get("topic") == "orderbook.50.BTCUSDT" and f["type"] == "delta")
    await c.send(sub("orderbook.50.BTCUSDT", req_id="u1", op="unsubscribe"))
    while True:
        _, frame = await c.recv()
        if "topic" not in frame:
            assert frame == {
                "success": True,
                "ret_msg": "",
                "conn_id": frame["conn_id"],
                "req_id": "u1",
                "op": "unsubscribe",
            }
            break
    after = await c.collect(1.0)
    assert not [f for f in after if f.get("topic") == "orderbook.50.BTCUSDT"]
    assert [f for f in after if f.get("topic") == "tickers.BTCUSDT"]
    assert "orderbook.50.BTCUSDT" not in sim.subscription_counts()
    ack = await c.command(sub("orderbook.50.BTCUSDT", req_id="again"))
    assert ack["success"] is True
    first = await c.until(lambda f: f.get("topic") == "orderbook.50.BTCUSDT")
    assert first["type"] == "snapshot"


async def test_subscription_counts_across_connections(sim: Simulator, client_factory) -> None:
    a = await client_factory(sim.ws_url("linear"))
    b = await client_factory(sim.ws_url("linear"))
    s = await client_factory(sim.ws_url("spot"))
    await a.command(sub("tickers.BTCUSDT", "tickers.ETHUSDT"))
    await b.command(sub("tickers.BTCUSDT"))
    await s.command(sub("tickers.BTCUSDT"))
    assert sim.connection_count() == 3
    assert sim.subscription_counts() == {
        "tickers.BTCUSDT": 2,
        "tickers.ETHUSDT": 1,
        "spot:tickers.BTCUSDT": 1,
    }
    await a.close()
    for _ in range(100):
        if sim.connection_count() == 2:
            break
        await asyncio.sleep(0.05)
    assert sim.subscription_counts() == {"tickers.BTCUSDT": 1, "spot:tickers.BTCUSDT": 1}


# -- other categories ------------------------------------------------------------------------


async def test_inverse_like_linear(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("inverse"))
    ack = await c.command(sub("tickers.BTCUSD", "orderbook.50.BTCUSD"))
    assert ack["ret_msg"] == "" and ack["req_id"] == ""
    snap = await c.until(lambda f: f.get("topic") == "tickers.BTCUSD")
    assert "singleOpenInterest" not in snap["data"] and snap["data"]["bid1Size"].isdigit()
    delta = await c.until(lambda f: f.get("topic") == "tickers.BTCUSD")
    assert delta["type"] == "delta"
    reply = await c.command(sub("tickers.BTCUSDT"))
    assert reply["ret_msg"] == "error:handler not found,topic:tickers.BTCUSDT"


async def test_spot_differences(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("spot"))
    await c.send(sub("tickers.BTCUSDT", "orderbook.50.BTCUSDT", "publicTrade.BTCUSDT"))
    raw, ack = await c.reply()
    assert ack["ret_msg"] == "subscribe" and "req_id" not in ack
    pong = await c.command({"op": "ping"})
    assert "req_id" not in pong and pong["ret_msg"] == "pong"
    await c.send(sub(*(f"tickers.S{i}" for i in range(11))))
    raw, _ = await c.reply()
    assert '"ret_msg":"args size \\u003e10"' in raw
    ticker = await c.until(lambda f: f.get("topic") == "tickers.BTCUSDT")
    assert list(ticker) == ["topic", "ts", "type", "cs", "data"] and ticker["type"] == "snapshot"
    book = await c.until(lambda f: f.get("topic") == "orderbook.50.BTCUSDT")
    assert list(book) == ["topic", "ts", "type", "data", "cts"]
    trade = await c.until(lambda f: f.get("topic") == "publicTrade.BTCUSDT", timeout=15)
    assert list(trade) == ["topic", "ts", "type", "data"]
    assert list(trade["data"][0]) == ["i", "T", "p", "v", "S", "seq", "s", "BT", "RPI"]
    assert trade["data"][0]["i"].isdigit()


async def test_option_differences(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("option"))
    symbol = "BTC-25JUN27-106000-P-USDT"
    ack = await c.command(sub(f"tickers.{symbol}", f"orderbook.25.{symbol}"))
    assert ack["type"] == "COMMAND_RESP" and ack["success"] is True
    assert ack["data"] == {
        "failTopics": [],
        "successTopics": [f"tickers.{symbol}", f"orderbook.25.{symbol}"],
    }
    pong = await c.command({"op": "ping"})
    assert pong["op"] == "pong" and pong["args"][0].isdigit()
    book = await c.until(lambda f: f.get("topic") == f"orderbook.25.{symbol}")
    assert list(book) == ["topic", "ts", "type", "id", "data", "cts"]
    ticker = await c.until(lambda f: f.get("topic") == f"tickers.{symbol}")
    assert ticker["type"] == "snapshot" and "id" in ticker and "bidIv" in ticker["data"]


# -- REST ------------------------------------------------------------------------------------


async def test_rest_instruments_paging_over_http(sim: Simulator) -> None:
    symbols: list[str] = []
    cursor = ""
    while True:
        url = f"{sim.http_url}/v5/market/instruments-info?category=linear&limit=10"
        if cursor:
            url += f"&cursor={cursor}"
        status, body = await aget(url)
        assert status == 200 and body["retCode"] == 0 and body["retMsg"] == "OK"
        assert body["retExtInfo"] == {} and isinstance(body["time"], int)
        result = body["result"]
        assert result["category"] == "linear"
        for item in result["list"]:
            assert item["status"] == "Trading" and item["quoteCoin"] == "USDT"
            assert item["contractType"] in ("LinearPerpetual", "LinearFutures")
            assert item["baseCoin"] and item["priceFilter"]["tickSize"]
        symbols += [item["symbol"] for item in result["list"]]
        cursor = result["nextPageCursor"]
        if not cursor:
            break
    assert symbols == sim.catalog.symbols("linear")
    assert len(symbols) >= 20 and "BTCUSDT" in symbols and "BTC-26DEC25" in symbols
    status, body = await aget(f"{sim.http_url}/v5/market/instruments-info?category=linear")
    assert [i["symbol"] for i in body["result"]["list"]] == symbols
    assert body["result"]["nextPageCursor"] == ""
    status, body = await aget(f"{sim.http_url}/v5/market/time")
    assert status == 200 and body["result"]["timeSecond"].isdigit()
    status, _ = await aget(f"{sim.http_url}/nope")
    assert status == 404
    assert sim.handshake_attempts == 0


async def test_custom_symbols(make_sim: MakeSim, client_factory) -> None:
    sim = await make_sim(symbols=["BTCUSDT", "FOOUSDT"])
    _, body = await aget(f"{sim.http_url}/v5/market/instruments-info?category=linear")
    assert [i["symbol"] for i in body["result"]["list"]] == ["BTCUSDT", "FOOUSDT"]
    c = await client_factory(sim.ws_url("linear"))
    assert (await c.command(sub("tickers.FOOUSDT")))["success"] is True
    assert (await c.command(sub("tickers.ETHUSDT")))["success"] is False


# -- faults ----------------------------------------------------------------------------------


async def test_drop_all_and_fresh_reconnect(sim: Simulator, client_factory) -> None:
    a = await client_factory(sim.ws_url("linear"))
    b = await client_factory(sim.ws_url("linear"))
    await a.command(sub("tickers.BTCUSDT"))
    await b.command(sub("orderbook.50.BTCUSDT"))
    assert sim.drop_all() == 2
    await expect_abnormal_close(a)
    await expect_abnormal_close(b)
    c = await client_factory(sim.ws_url("linear"))
    assert sim.connection_count() == 1
    assert sim.subscription_counts() == {}
    await c.command(sub("tickers.BTCUSDT"))
    assert (await c.until(lambda f: "topic" in f))["type"] == "snapshot"
    status, body = await aget(f"{sim.http_url}/_sim/fault?name=drop_all")
    assert status == 200 and body["ok"] is True and body["result"] == {"dropped": 1}
    await expect_abnormal_close(c)


async def test_half_dead(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("tickers.BTCUSDT"))
    await c.until(lambda f: f.get("type") == "delta")
    sim.set_half_dead(True)
    await asyncio.sleep(0.3)  # frames already in flight
    await c.collect(0.2)
    await c.send({"op": "ping", "req_id": "lost"})
    assert await c.collect(1.2) == []
    waiter = await c.ws.ping()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiter, 1.0)
    assert sim.connection_count() == 1
    status, _ = await aget(f"{sim.http_url}/_sim/fault?name=half_dead&on=0")
    assert status == 200 and sim.half_dead is False
    await c.until(lambda f: f.get("topic") == "tickers.BTCUSDT")
    assert (await c.command({"op": "ping", "req_id": "back"}))["req_id"] == "back"


async def test_pong_delay(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    sim.set_pong_delay(1.0)
    started = time.monotonic()
    pong = await c.command({"op": "ping"}, timeout=10)
    assert pong["ret_msg"] == "pong"
    assert time.monotonic() - started >= 0.9
    started = time.monotonic()
    await asyncio.wait_for(await c.ws.ping(), 10)
    assert time.monotonic() - started >= 0.9
    sim.set_pong_delay(0)
    assert (await c.command({"op": "ping"}, timeout=5))["ret_msg"] == "pong"


async def test_refuse_handshakes(sim: Simulator, client_factory) -> None:
    url = sim.ws_url("linear")
    sim.refuse_handshakes(502)
    assert await refused_status(url) == 502
    assert await refused_status(url) == 502
    sim.refuse_handshakes(None)
    await client_factory(url)
    sim.refuse_handshakes(403, count=2)
    assert await refused_status(url) == 403
    assert await refused_status(url) == 403
    await client_factory(url)
    status, _ = await aget(f"{sim.http_url}/_sim/fault?name=refuse&status=429&count=1")
    assert status == 200
    assert await refused_status(url) == 429
    await client_factory(url)
    assert sim.handshake_attempts == 8
    status, body = await aget(f"{sim.http_url}/_sim/status")
    assert body["handshake_attempts"] == 8 and body["connections"] == 3


async def test_per_ip_rate_limit(make_sim: MakeSim, client_factory) -> None:
    sim = await make_sim(rate_limit=2, rate_limit_window=60.0)
    await client_factory(sim.ws_url("linear"))
    await client_factory(sim.ws_url("linear"))
    assert await refused_status(sim.ws_url("linear")) == 429
    assert sim.handshake_attempts == 3


async def test_restart_books_resnapshot_with_u1(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("orderbook.50.BTCUSDT", "orderbook.200.BTCUSDT"))
    await c.until(lambda f: f.get("topic") == "orderbook.50.BTCUSDT" and f["type"] == "delta")
    assert sim.restart_books() == 2
    # per topic: the restart snapshot has u=1 and the deltas continue from there
    expected: dict[str, int] = {}
    deltas_after: dict[str, int] = {}
    while len(deltas_after) < 2:
        frame = await c.until(lambda f: f.get("topic", "").startswith("orderbook."))
        topic = frame["topic"]
        if frame["type"] == "snapshot":
            assert frame["data"]["u"] == 1
            expected[topic] = 2
        elif topic in expected:
            assert frame["data"]["u"] == expected[topic]
            expected[topic] += 1
            deltas_after[topic] = deltas_after.get(topic, 0) + 1


async def test_skip_u_and_mid_stream_snapshots(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    topic = "orderbook.50.ETHUSDT"
    await c.command(sub(topic, "tickers.ETHUSDT"))
    prev = await c.until(lambda f: f.get("topic") == topic and f["type"] == "delta")
    sim.skip_u(topic)
    # frames built before the call may still be in flight; the first gap must be exactly one u
    last = prev["data"]["u"]
    while True:
        frame = await c.until(lambda f: f.get("topic") == topic)
        gap, last = frame["data"]["u"] - last, frame["data"]["u"]
        if gap != 1:
            assert gap == 2
            break
    sim.resend_snapshot(topic)
    snap = await c.until(lambda f: f.get("topic") == topic and f["type"] == "snapshot")
    assert len(snap["data"]["b"]) == 50
    sim.resend_snapshot("tickers.ETHUSDT")
    await c.until(lambda f: f.get("topic") == "tickers.ETHUSDT" and f["type"] == "snapshot")
    status, _ = await aget(f"{sim.http_url}/_sim/fault?name=skip_u&topic={topic}")
    assert status == 200
    status, body = await aget(f"{sim.http_url}/_sim/fault?name=skip_u&topic=tickers.ETHUSDT")
    assert status == 400 and body["ok"] is False


async def test_snapshot_before_ack_and_keep_earlier_args(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    sim.set_snapshot_before_ack(True)
    await c.send(sub("tickers.BTCUSDT"))
    _, first = await c.recv()
    assert first.get("topic") == "tickers.BTCUSDT" and first["type"] == "snapshot"
    assert (await c.reply())[1]["success"] is True
    status, _ = await aget(f"{sim.http_url}/_sim/fault?name=snapshot_before_ack&on=off")
    assert status == 200
    status, _ = await aget(f"{sim.http_url}/_sim/fault?name=keep_earlier_args&on=1")
    assert status == 200
    reply = await c.command(sub("tickers.ETHUSDT", "tickers.NOPE", "tickers.SOLUSDT"))
    assert reply["ret_msg"] == "error:handler not found,topic:tickers.NOPE"
    counts = sim.subscription_counts()
    assert "tickers.ETHUSDT" in counts and "tickers.SOLUSDT" not in counts


async def test_status_endpoint_and_bad_faults(sim: Simulator, client_factory) -> None:
    c = await client_factory(sim.ws_url("linear"))
    await c.command(sub("tickers.BTCUSDT", "publicTrade.BTCUSDT"))
    status, body = await aget(f"{sim.http_url}/_sim/status")
    assert status == 200
    assert body["connections"] == 1 and body["handshake_attempts"] == 1
    assert body["subscriptions"] == {"tickers.BTCUSDT": 1, "publicTrade.BTCUSDT": 1}
    for query in ("name=bogus", "name=pong_delay", "name=refuse&status=abc", ""):
        status, body = await aget(f"{sim.http_url}/_sim/fault?{query}")
        assert status == 400 and body["ok"] is False


async def test_faults_from_config(make_sim: MakeSim) -> None:
    sim = await make_sim(faults=["refuse=502:1", "pong_delay=0.5", "keep_earlier_args"])
    assert await refused_status(sim.ws_url("linear")) == 502
    assert sim.pong_delay == 0.5 and sim.options.keep_earlier_args is True
    async with connect(sim.ws_url("linear"), ping_interval=None, open_timeout=10):
        pass


# -- CLI -------------------------------------------------------------------------------------


async def test_cli_runs_and_stops_on_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastproxy.sim", "--host", "127.0.0.1", "--port", "0",
        "--seed", "7", "--symbols", "BTCUSDT,ETHUSDT", "--ticker-interval", "0.1",
        "--fault", "keep_earlier_args",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(ROOT),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, "simulator exited early"
            match = re.search(rb"(ws://127\.0\.0\.1:\d+/v5/public/linear)", line)
            if match:
                url = match.group(1).decode()
        assert url is not None
        client = await Client.open(url)
        assert (await client.command(sub("tickers.ETHUSDT")))["success"] is True
        assert (await client.until(lambda f: "topic" in f))["type"] == "snapshot"
        assert (await client.command(sub("tickers.SOLUSDT")))["success"] is False
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.ws.recv(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

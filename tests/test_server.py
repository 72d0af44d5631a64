"""The proxy end to end: a real picows server, the simulator as upstream, real client libraries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from fastproxy.sim.instruments import DEFAULT_LINEAR_SYMBOLS
from tests.proxyutil import (
    RawClient,
    client,
    http_json,
    recv,
    recv_data,
    running_proxy,
    running_sim,
    send,
    subscribe,
)

TICKER = "mudrex.futures.ticker.BTCUSDT"
TICKER_KEYS = [
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


async def test_ack_comes_before_data_and_first_message_is_a_full_snapshot() -> None:
    async with running_sim() as sim, running_proxy(sim) as app, client(app) as ws:
        ack = await subscribe(ws, "ticker:btcusdt", "kline:1h:BTCUSDT", "trade:BTCUSDT", req_id=9)
        assert ack == {
            "op": "subscribe",
            "success": True,
            "args": ["ticker:btcusdt", "kline:1h:BTCUSDT", "trade:BTCUSDT"],
            "message": "Subscribed to 3 streams",
            "rejected": None,
            "req_id": 9,
        }
        first = await recv_data(ws, TICKER)
        # a snapshot names its epoch last (clients resume with it); updates do not carry it
        assert list(first) == ["stream", "type", "data", "timestamp", "source", "seq", "epoch"]
        assert isinstance(first["epoch"], str) and first["epoch"]
        assert first["type"] == "snapshot" and first["source"] == "mudrex"
        assert list(first["data"]) == TICKER_KEYS
        assert set(first["data"]["bid"]) == {"price", "size"}
        update = await recv_data(ws, TICKER)
        assert update["type"] == "update" and update["seq"] == first["seq"] + 1
        assert list(update) == ["stream", "type", "data", "timestamp", "source", "seq"]
        assert list(update["data"]) == TICKER_KEYS  # every update is the complete ticker
        kline = await recv_data(ws, "mudrex.futures.kline.1h.BTCUSDT", timeout=20)
        assert kline["data"]["interval"] == "1h"
        assert list(kline["data"]) == [
            "symbol",
            "interval",
            "openTime",
            "closeTime",
            "open",
            "high",
            "low",
            "close",
            "volume",
            "turnover",
            "confirmed",
        ]


async def test_late_joiner_gets_snapshot_then_continuous_seq() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        async with client(app) as first, client(app) as late:
            await subscribe(first, "ticker:BTCUSDT")
            for _ in range(5):
                await recv_data(first, TICKER)
            await subscribe(late, "ticker:BTCUSDT")
            snapshot = await recv_data(late, TICKER)
            assert snapshot["type"] == "snapshot"
            following = [await recv_data(late, TICKER) for _ in range(5)]
            seqs = [snapshot["seq"]] + [m["seq"] for m in following]
            assert seqs == list(range(seqs[0], seqs[0] + 6))
            assert all(m["type"] == "update" for m in following)
            # the first client saw the same update under the same seq, byte for byte
            while True:
                message = await recv_data(first, TICKER)
                if message["seq"] >= following[0]["seq"]:
                    break
            assert message == following[0]


async def test_two_hundred_clients_get_identical_bytes() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        clients = [client(app, ping_interval=None) for _ in range(200)]
        sockets = [await c.__aenter__() for c in clients]
        try:
            await asyncio.gather(*(subscribe(ws, "ticker:ETHUSDT") for ws in sockets))

            async def collect(ws: Any) -> dict[int, bytes]:
                got: dict[int, bytes] = {}
                while len(got) < 40:
                    raw = await asyncio.wait_for(ws.recv(decode=False), 30)
                    got[orjson.loads(raw)["seq"]] = raw
                return got

            results = await asyncio.gather(*(collect(ws) for ws in sockets))
            common = set.intersection(*(set(r) for r in results))
            assert len(common) >= 20
            for seq in common:
                assert len({r[seq] for r in results}) == 1
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)


async def test_slow_reader_is_dropped_with_4008_and_others_keep_every_message() -> None:
    async with (
        running_sim(ticker_interval=0.01) as sim,
        running_proxy(sim, write_buffer_soft_limit=16384, write_buffer_hard_limit=65536) as app,
        client(app) as good,
    ):
        slow = await RawClient(app.port, rcvbuf=4096).connect()
        slow.send_text({"op": "subscribe", "args": [f"ticker:{s}" for s in SYMBOLS]})
        await subscribe(good, *(f"ticker:{s}" for s in SYMBOLS))
        last: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while app.server.drops.get("slow_client", 0) == 0:
            assert loop.time() < deadline, "the slow client was never dropped"
            message = await recv(good)
            if "seq" in message:
                stream, seq = message["stream"], message["seq"]
                if stream in last:
                    assert seq == last[stream] + 1, "a good client lost a message"
                last[stream] = seq
        for _ in range(50):  # the good client keeps going without a gap
            message = await recv(good)
            stream, seq = message["stream"], message["seq"]
            assert seq == last[stream] + 1
            last[stream] = seq
        assert await slow.read_until_close(30) == 4008
        slow.close()


SYMBOLS = [s for s in DEFAULT_LINEAR_SYMBOLS if "-" not in s]


async def test_protocol_errors_keep_the_connection_open() -> None:
    async with running_sim() as sim, running_proxy(sim) as app, client(app) as ws:
        cases: list[tuple[Any, str]] = [
            ("not json", "INVALID_JSON"),
            ("[1, 2]", "INVALID_JSON"),
            ('"subscribe"', "INVALID_JSON"),
            ("{}", "UNKNOWN_OP"),
            ('{"op": "dance"}', "UNKNOWN_OP"),
            ('{"op": "subscribe"}', "INVALID_ARGS"),
            ('{"op": "subscribe", "args": "ticker:BTCUSDT"}', "INVALID_ARGS"),
            ('{"op": "subscribe", "args": []}', "INVALID_ARGS"),
            ('{"op": "subscribe", "args": [1]}', "INVALID_ARGS"),
            (b"\x00\x01binary", "INVALID_JSON"),
        ]
        for frame, code in cases:
            await ws.send(frame)
            reply = await recv(ws)
            assert reply["op"] == "error" and reply["code"] == code, (frame, reply)
            assert "Traceback" not in reply["message"] and "Error" not in reply["message"]
        await send(ws, {"op": "ping", "req_id": "p"})
        pong = await recv(ws)
        assert pong["op"] == "pong" and pong["req_id"] == "p" and pong["timestamp"] > 1e12
        ack = await subscribe(ws, "kline:7m:BTCUSDT", "ticker:NOPEUSDT", "ticker:*")
        assert ack["success"] is False and ack["args"] == []
        reasons = {r["arg"]: r["reason"] for r in ack["rejected"]}
        assert "interval" in reasons["kline:7m:BTCUSDT"]
        assert "unknown symbol" in reasons["ticker:NOPEUSDT"]
        assert "wildcard" in reasons["ticker:*"]
        await send(ws, {"op": "unsubscribe", "args": ["ticker:BTCUSDT"]})
        reply = await recv(ws)
        assert reply["success"] is False
        assert reply["rejected"] == [{"arg": "ticker:BTCUSDT", "reason": "not subscribed"}]


async def test_upstream_rejection_reaches_the_client_when_the_catalogue_is_unknown() -> None:
    async with (
        running_sim() as sim,
        running_proxy(sim, bybit_rest_url="http://127.0.0.1:9") as app,
        client(app) as ws,
    ):
        ack = await subscribe(ws, "ticker:NOPEUSDT", "ticker:BTCUSDT")
        assert ack["args"] == ["ticker:NOPEUSDT", "ticker:BTCUSDT"]
        while True:
            message = await recv(ws, 20)
            if message.get("op") == "error":
                break
        assert message["code"] == "UPSTREAM_REJECTED"
        assert message["args"] == ["ticker:NOPEUSDT"]
        await recv_data(ws, TICKER)  # the good stream in the same request still flows
        await send(ws, {"op": "unsubscribe", "args": ["ticker:NOPEUSDT"]})
        while (reply := await recv(ws)).get("op") != "unsubscribe":
            pass
        assert reply["rejected"][0]["reason"] == "not subscribed"


async def test_subscription_and_connection_limits() -> None:
    async with (
        running_sim() as sim,
        running_proxy(sim, max_subscriptions_per_client=2, max_clients_total=2) as app,
    ):
        async with client(app) as a, client(app) as b:
            await send(a, {"op": "subscribe", "args": ["ticker:BTCUSDT"]})
            assert (await recv(a))["success"] is True
            reply = await subscribe(a, "ticker:ETHUSDT", "ticker:SOLUSDT")
            assert reply["op"] == "error" and reply["code"] == "LIMIT_EXCEEDED"
            stats = (await http_json(app, "/stats"))[1]
            assert stats["hub"]["subscriptions"] == 1  # nothing of the refused request
            third = await RawClient(app.port).connect()
            assert b" 101 " in third.status_line
            assert await third.read_until_close() == 4003
            third.close()
            del b


async def test_oversized_frame_is_closed_with_1009() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port).connect()
        raw.send_frame(0x1, b'{"op":"ping","pad":"' + b"x" * 70000 + b'"}')
        assert await raw.read_until_close() == 1009
        raw.close()


async def test_flooding_client_is_warned_once_a_second_then_closed_with_4029() -> None:
    async with running_sim() as sim, running_proxy(sim, max_message_rate_per_client=5) as app:
        raw = await RawClient(app.port).connect()
        warnings = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        code = None
        while loop.time() - start < 20:
            for _ in range(5):
                raw.send_text({"op": "ping"})
            await asyncio.sleep(0.1)
            while True:
                try:
                    opcode, payload = await raw.read_frame(0.01)
                except TimeoutError:
                    break
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big")
                    break
                if orjson.loads(payload).get("code") == "RATE_LIMIT_EXCEEDED":
                    warnings += 1
            if code is not None:
                break
        elapsed = loop.time() - start
        assert code == 4029
        assert elapsed >= 9.5
        assert warnings <= elapsed + 1  # at most one a second
        raw.close()


async def test_idle_client_is_closed_but_a_passive_one_answering_pings_stays() -> None:
    async with running_sim() as sim, running_proxy(sim, client_idle_timeout=2) as app:
        silent = await RawClient(app.port).connect()  # never answers the server's pings
        async with client(app, ping_interval=None) as passive:  # websockets answers pings
            await subscribe(passive, "ticker:BTCUSDT")
            code = await silent.read_until_close(15)
            assert code == 4000
            await asyncio.sleep(3)
            await recv_data(passive, TICKER)  # still served after more than the idle timeout
        silent.close()


async def test_browser_style_connection_header_is_accepted() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port, connection_header="keep-alive, Upgrade").connect()
        assert b" 101 " in raw.status_line
        raw.send_text({"op": "ping"})
        _, payload = await raw.read_frame()
        assert orjson.loads(payload)["op"] == "pong"
        raw.close()


async def test_http_endpoints() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        status, body = await http_json(app, "/")
        assert status == 200
        assert list(body) == ["name", "version", "websocket", "health", "ready", "metrics"]
        assert body["websocket"] == "/ws"
        status, body = await http_json(app, "/ready")
        assert (status, body) == (200, {"ok": True})
        async with client(app) as ws:
            await subscribe(ws, "ticker:BTCUSDT", "trade:BTCUSDT")
            await recv_data(ws, TICKER)
            status, body = await http_json(app, "/health")
            assert status == 200 and body["status"] == "healthy"
            assert body["connections"] == 1 and "upstream" in body and "bus" in body
            status, stats = await http_json(app, "/stats")
            assert {"connections", "upstream", "hub"} <= set(stats)
            assert stats["connections"]["messages_sent"] > 0
            assert stats["hub"]["subscriptions_by_kind"]["ticker"] == 1
            assert stats["hub"]["subscriptions_by_kind"]["trade"] == 1
            assert stats["pubsub"] == stats["hub"]  # the old name still reads the same
            status, text = await asyncio.to_thread(_get_text, app.port, "/metrics")
            assert status == 200 and "fastproxy_clients 1.0" in text
        status, _ = await http_json(app, "/nope")
        assert status == 404


async def test_health_degrades_when_upstream_is_down() -> None:
    async with running_sim() as sim, running_proxy(sim, upstream_down_threshold=0.5) as app:
        async with client(app) as ws:
            await subscribe(ws, "ticker:BTCUSDT")
            await recv_data(ws, TICKER)
            sim.refuse_handshakes(502)
            down_at = int(time.time() * 1000)
            sim.drop_all()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                status, body = await http_json(app, "/health")
                # degraded at once for the stale stream, then also for the upstream outage
                if status == 503 and "upstream down" in body["reason"]:
                    break
                assert loop.time() < deadline
                await asyncio.sleep(0.2)
            assert body["status"] == "degraded" and "1 streams stale" in body["reason"]
            sim.refuse_handshakes(None)
            # updates sent before the drop may still be queued; the outage is marked in the
            # stream by `status` messages, and what follows it starts with a snapshot
            while (await recv(ws, 30)).get("state") != "live":
                pass
            message = await recv_data(ws, TICKER, timeout=30)
            while message["type"] == "update" and message["timestamp"] < down_at:
                message = await recv_data(ws, TICKER, timeout=30)
            # after an upstream reset
            assert message["type"] == "snapshot", (message["seq"], message["timestamp"] - down_at)


async def test_last_client_leaving_releases_upstream_after_linger() -> None:
    async with running_sim() as sim, running_proxy(sim, unsubscribe_linger=1.0) as app:
        async with client(app) as ws:
            await subscribe(ws, "ticker:SOLUSDT")
            await recv_data(ws, "mudrex.futures.ticker.SOLUSDT")
            assert sim.subscription_counts().get("tickers.SOLUSDT") == 1
            await send(ws, {"op": "unsubscribe", "args": ["ticker:SOLUSDT"]})
            await asyncio.sleep(0.2)
            await subscribe(ws, "ticker:SOLUSDT")  # back within the linger: no churn
            await recv_data(ws, "mudrex.futures.ticker.SOLUSDT")
            await asyncio.sleep(1.5)
            assert sim.subscription_counts().get("tickers.SOLUSDT") == 1
            assert app.hub.releases == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while sim.subscription_counts().get("tickers.SOLUSDT", 0):
            assert loop.time() < deadline, "upstream topic never released"
            await asyncio.sleep(0.1)
        assert app.hub.releases == 1


async def test_client_frames_after_close_are_harmless() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        async with client(app) as ws:
            await subscribe(ws, "ticker:BTCUSDT")
        with pytest.raises(ConnectionClosed):
            await ws.send("{}")
        _, stats = await http_json(app, "/stats")
        assert stats["connections"]["connected"] == 0


def _get_text(port: int, path: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()

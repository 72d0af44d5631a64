"""Protocol abuse over real sockets: floods, subscribe churn, RFC 6455 and HTTP edge cases, log
noise, and a start-up whose symbol list does not answer."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastproxy import logs
from fastproxy.app import App
from fastproxy.config import Config
from tests.proxyutil import (
    RawClient,
    client,
    recv,
    recv_data,
    running_proxy,
    running_sim,
    send,
    subscribe,
)

TICKER = "mudrex.futures.ticker.BTCUSDT"
ROOT = Path(__file__).resolve().parent.parent


async def run_flooder(port: int, kind: str, seconds: float) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.flood",
        str(port),
        kind,
        str(seconds),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), seconds + 30)
    return orjson.loads(out.splitlines()[-1])


# -- 4. control frames count towards the rate limit --------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "pong"])
async def test_control_frame_flood_is_closed_4029_and_healthy_clients_are_served(
    kind: str,
) -> None:
    rate = 50
    async with (
        running_sim() as sim,
        running_proxy(sim, max_message_rate_per_client=rate) as app,
        client(app) as healthy,
    ):
        await subscribe(healthy, "ticker:BTCUSDT")
        await recv_data(healthy, TICKER)
        flooder = asyncio.get_running_loop().create_task(run_flooder(app.port, kind, 40))
        served = 0
        while not flooder.done():  # the healthy client keeps getting its data all along
            await recv_data(healthy, TICKER, timeout=10)
            served += 1
        result = flooder.result()
        assert result["close"] == 4029, result
        assert result["sent"] > 20 * rate * 10  # it really flooded
        # one pong per admitted frame at most: the bucket's burst plus its rate
        assert result["pongs"] <= rate * (result["elapsed"] + 2), result
        assert served >= 10
        assert app.server.drops.get("flooding") == 1
        await recv_data(healthy, TICKER)


async def test_a_close_frame_storm_ends_the_connection_with_no_error_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port).connect()
        close = (1000).to_bytes(2, "big")
        for _ in range(200):
            raw.send_frame(0x8, close)
        closes = 0
        try:
            while True:
                opcode, _ = await raw.read_frame(5)
                closes += opcode == 0x8
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        raw.close()
        # one close answered at most (the kernel may reset the connection before the client
        # reads it, since the storm behind it is never read); the session is gone at once
        assert closes <= 1
        assert app.server.sessions == set()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- 5. the work a client can cause ------------------------------------------------------------


def churn_args(count: int) -> list[str]:
    from tests.test_server import SYMBOLS

    return [f"ticker:{s}" for s in SYMBOLS[:count]]


async def test_subscribe_churn_is_refused_with_a_clear_error_and_nothing_is_dropped() -> None:
    async with (
        running_sim() as sim,
        running_proxy(
            sim,
            max_message_rate_per_client=100000,
            max_stream_change_rate_per_client=40,
            max_snapshot_rate_per_client=100000,
        ) as app,
        client(app) as ws,
    ):
        args = churn_args(10)
        loop = asyncio.get_running_loop()
        start = loop.time()
        changes = refused = 0
        retry_after = None
        for i in range(200):
            op = "subscribe" if i % 2 == 0 else "unsubscribe"
            await send(ws, {"op": op, "args": args, "req_id": i})
            while True:  # every request gets its own answer; data in between is skipped
                reply = await recv(ws)
                if reply.get("req_id") == i:
                    break
            if reply["op"] == "error":
                assert reply["code"] == "SUBSCRIPTION_RATE_EXCEEDED", reply
                assert reply["retry_after_ms"] > 0 and "a second" in reply["message"]
                assert reply["args"] == args
                refused += 1
                retry_after = reply["retry_after_ms"]
                if op == "subscribe":
                    break
            else:
                assert reply["success"] is True, reply
                changes += len(args)
        elapsed = loop.time() - start
        assert refused >= 1 and retry_after is not None
        # bursts of max(rate, MAX_SUBSCRIPTIONS_PER_CLIENT), then `rate` a second
        assert changes <= 100 + 40 * elapsed + len(args)
        await asyncio.sleep(retry_after / 1000 + 0.05)
        ack = await subscribe(ws, *args, req_id="again")
        assert ack["op"] == "subscribe" and ack["success"] is True, ack


async def test_unsubscribe_is_never_refused_and_snapshots_have_their_own_budget() -> None:
    async with (
        running_sim() as sim,
        running_proxy(
            sim,
            max_message_rate_per_client=100000,
            max_subscriptions_per_client=10,
            max_stream_change_rate_per_client=100000,
            max_snapshot_rate_per_client=10,
        ) as app,
        client(app) as ws,
    ):
        args = churn_args(10)
        assert (await subscribe(ws, *args, req_id=1))["success"] is True
        await send(ws, {"op": "unsubscribe", "args": args, "req_id": 2})
        while (reply := await recv(ws)).get("req_id") != 2:
            pass
        assert reply["op"] == "unsubscribe" and reply["success"] is True
        await send(ws, {"op": "subscribe", "args": args, "req_id": 3})
        while (reply := await recv(ws)).get("req_id") != 3:
            pass
        assert reply["code"] == "SUBSCRIPTION_RATE_EXCEEDED"
        assert "snapshot" in reply["message"]
        await asyncio.sleep(reply["retry_after_ms"] / 1000 + 0.05)
        assert (await subscribe(ws, *args, req_id=4))["success"] is True


# -- 6. RFC 6455 and HTTP ------------------------------------------------------------------------


async def read_close_code(raw: RawClient, timeout: float = 5) -> int | None:
    try:
        return await raw.read_until_close(timeout)
    finally:
        raw.close()


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | rsv | opcode, 0x80 | len(payload)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
async def test_reserved_bits_without_an_extension_close_1002(rsv: int) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port).connect()
        raw.writer.write(masked(0x1, b'{"op":"ping"}', rsv=rsv))
        assert await read_close_code(raw) == 1002


@pytest.mark.parametrize(
    "fragments",
    [
        [(0x1, True, b'{"op":"ping","x":"\xff"}')],
        [(0x1, False, b'{"op":"ping","x":"\xe2\x82'), (0x0, True, b'(xx"}')],  # bad across
        [(0x1, False, b'{"op":"ping","x":"\xed'), (0x0, True, b'\xa0\x80"}')],  # a surrogate
    ],
)
async def test_invalid_utf8_text_closes_1007(fragments: list[tuple[int, bool, bytes]]) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port).connect()
        for opcode, fin, payload in fragments:
            raw.writer.write(masked(opcode, payload, fin))
        assert await read_close_code(raw) == 1007


async def test_a_character_split_across_fragments_is_fine() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port).connect()
        raw.writer.write(masked(0x1, b'{"op":"ping","req_id":"\xe2\x82', fin=False))
        raw.writer.write(masked(0x0, b"\xac", fin=False))
        raw.writer.write(masked(0x9, b"interleaved ping"))  # control frames may interleave
        raw.writer.write(masked(0x0, b'"}'))
        replies = [await raw.read_frame(), await raw.read_frame()]
        raw.close()
        assert (0xA, b"interleaved ping") in replies
        text = [orjson.loads(p) for op, p in replies if op == 0x1]
        assert text[0]["op"] == "pong" and text[0]["req_id"] == "\u20ac"


@pytest.mark.parametrize(
    "frames",
    [
        [(0x0, True, b'{"op":"ping"}')],  # a continuation of nothing
        [(0x1, False, b'{"op":'), (0x1, True, b'{"op":"ping"}')],  # a new message mid-message
    ],
)
async def test_fragmentation_errors_close_1002(frames: list[tuple[int, bool, bytes]]) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port).connect()
        for opcode, fin, payload in frames:
            raw.writer.write(masked(opcode, payload, fin))
        assert await read_close_code(raw) == 1002


async def http_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0] else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def upgrade_request(version: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
    ]
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("version", ["8", "12", "14", None])
async def test_websocket_versions_other_than_13_get_426(version: str | None) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        status, headers, body = await http_exchange(app.port, upgrade_request(version))
        assert status == 426
        assert headers["sec-websocket-version"] == "13"
        assert "13" in orjson.loads(body)["error"]


@pytest.mark.parametrize(
    "request_line", ["POST /health HTTP/1.1", "HEAD / HTTP/1.1", "PUT /ws HTTP/1.1"]
)
async def test_other_methods_get_405_with_a_clean_body(request_line: str) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        request = f"{request_line}\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody".encode()
        status, headers, body = await http_exchange(app.port, request)
        assert status == 405
        assert headers["allow"] == "GET"
        assert headers["content-type"].startswith("application/json")
        assert orjson.loads(body) == {"error": "method not allowed; use GET"}


async def test_http_1_0_gets_a_clean_400() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        status, _, body = await http_exchange(app.port, b"GET /health HTTP/1.0\r\n\r\n")
        assert status == 400
        assert orjson.loads(body) == {"error": "HTTP/1.1 required"}
        status, _, body = await http_exchange(app.port, b"GET /health\r\n\r\n")
        assert status == 400 and b"b'" not in body
        # and a well-formed request still works on the same server
        status, _, body = await http_exchange(app.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and orjson.loads(body) == {"ok": True}


async def test_an_oversized_request_head_gets_431() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        status, _, body = await http_exchange(app.port, big)
        assert status == 431
        assert "too large" in orjson.loads(body)["error"]
        # an unfinished head that is already too big is answered without waiting for its end
        status, _, _ = await http_exchange(app.port, big[:-4])
        assert status == 431


@pytest.mark.parametrize(
    "token", [b"9223372036854775813", b"1000000000000000000000000000000", b"-2e-400", b"1.50"]
)
async def test_numeric_req_id_is_echoed_exactly(token: bytes) -> None:
    async with running_sim() as sim, running_proxy(sim) as app, client(app) as ws:
        await ws.send(b'{"op":"ping","req_id":' + token + b"}", text=True)
        reply = await asyncio.wait_for(ws.recv(decode=False), 10)
        assert b'"req_id":' + token + b"}" in reply
        await ws.send(b'{"op":"nope","req_id":' + token + b"}", text=True)
        reply = await asyncio.wait_for(ws.recv(decode=False), 10)
        assert b'"code":"UNKNOWN_OP"' in reply and b'"req_id":' + token in reply


# -- 7. a client's misbehaviour is logged at WARNING at most, rate-limited -----------------------


async def test_many_oversized_frames_log_a_few_warnings_with_a_suppressed_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "CLIENT_LOG_INTERVAL", 1.0)
    caplog.set_level(logging.INFO)
    async with running_sim() as sim, running_proxy(sim) as app:
        clients = [await RawClient(app.port).connect() for _ in range(100)]
        for raw in clients:
            raw.send_frame(0x1, b"x" * 70000)
        codes = await asyncio.gather(*(raw.read_until_close(20) for raw in clients))
        assert codes == [1009] * 100
        for raw in clients:
            raw.close()
        await asyncio.sleep(1.1)
        late = await RawClient(app.port).connect()
        late.send_frame(0x1, b"x" * 70000)
        assert await late.read_until_close(20) == 1009
        late.close()
    noisy = [r for r in caplog.records if r.name.startswith(("picows", "fastproxy"))]
    assert not [r for r in noisy if r.levelno > logging.WARNING]
    too_big = [r for r in noisy if "exceeding max allowed size" in r.getMessage()]
    assert 1 <= len(too_big) <= logs.CLIENT_LOG_BURST + 1
    assert too_big[-1].suppressed == 101 - len(too_big)  # type: ignore[attr-defined]


# -- 8. start-up does not wait for the symbol list -------------------------------------------------


async def test_start_listens_at_once_when_the_symbol_list_does_not_answer() -> None:
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    rest_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    async with running_sim() as sim:
        config = Config(
            host="127.0.0.1",
            port=0,
            bybit_ws_url=sim.ws_url("linear"),
            bybit_rest_url=rest_url,
            log_format="text",
        )
        app = App(config)
        try:
            await asyncio.wait_for(app.start(), 5)  # the list's fetch waits 10 s for an answer
            assert app.catalogue is not None and app.catalogue.check("BTCUSDT") is None
            async with client(app) as ws:  # served with the fallback: syntax checks only
                ack = await subscribe(ws, "ticker:BTCUSDT", "ticker:NOPEUSDT", "ticker:*")
                assert ack["args"] == ["ticker:BTCUSDT", "ticker:NOPEUSDT"]
                await recv_data(ws, TICKER)
        finally:
            await asyncio.wait_for(app.stop(), 5)
            silent.close()


async def test_the_symbol_list_arrives_in_the_background_after_a_stalled_first_fetch() -> None:
    from fastproxy.upstream import SymbolCatalogue

    answering = asyncio.Event()
    body = orjson.dumps(
        {
            "retCode": 0,
            "result": {"list": [{"symbol": "BTCUSDT", "status": "Trading"}], "nextPageCursor": ""},
        }
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if not answering.is_set():
            await asyncio.sleep(30)  # the first request is never answered in time
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    catalogue = SymbolCatalogue(f"http://127.0.0.1:{port}", timeout=1.0, retry_interval=0.2)
    try:
        await asyncio.wait_for(catalogue.start(), 0.5)  # returns without waiting for the fetch
        assert catalogue.check("BTCUSDT") is None
        assert await catalogue.wait_first_attempt(10) is False  # timed out: the fallback
        answering.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while catalogue.check("BTCUSDT") is None:
            assert loop.time() < deadline, "the list never arrived"
            await asyncio.sleep(0.05)
        assert catalogue.check("BTCUSDT") is True and catalogue.check("NOPEUSDT") is False
    finally:
        await asyncio.wait_for(catalogue.stop(), 5)
        server.close()

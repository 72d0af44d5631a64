"""Slow clients over real sockets: clients with small receive buffers that stop reading or read
slowly, against the real proxy and the simulator.

The only timing bound asserted is the one the proxy promises: a client that takes nothing is
closed with 4008 within FANOUT_CALLBACK_TIMEOUT + 2 s of the moment it stopped taking data (its
own receive buffer full: the proxy cannot see into that).
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import socket
import struct
import termios
import time
from typing import Any

import orjson
import pytest

from fastproxy.server import ClientSession
from fastproxy.streams import KINDS
from tests.proxyutil import (
    RawClient,
    client,
    http_get,
    http_json,
    recv,
    running_proxy,
    running_sim,
)

TIMEOUT = 2.0  # FANOUT_CALLBACK_TIMEOUT in these tests
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "BNBUSDT", "ADAUSDT"]
TICKER_KEYS = 17  # a complete ticker has every field


def received(raw: RawClient) -> int:
    """Bytes the client has taken from the network and not read: its receive queue plus what
    its stream reader holds."""
    sock = raw.writer.get_extra_info("socket")
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    return queued + len(raw.reader._buffer)


def session_of(app: Any, count: int) -> list[ClientSession]:
    return sorted(app.server.sessions, key=lambda s: s.connected_at)[:count]


async def read_messages(raw: RawClient, pause: float, until: float) -> tuple[list[Any], Any]:
    """Read one frame every `pause` s until `until` or a close; (messages, close code or None)."""
    loop = asyncio.get_running_loop()
    messages: list[Any] = []
    while loop.time() < until:
        await asyncio.sleep(pause)
        try:
            opcode, payload = await raw.read_frame(10)
        except (asyncio.IncompleteReadError, ConnectionError):
            return messages, "EOF"
        if opcode == 0x8:
            return messages, int.from_bytes(payload[:2], "big")
        if opcode == 0x1:
            messages.append((time.time(), orjson.loads(payload)))
    return messages, None


async def read_slowly_until_closed(app: Any, raw: RawClient, pause: float) -> tuple[list[Any], Any]:
    """Read slowly until the server closes the client, then at full speed: the client gets
    what was queued for it and then the close frame (messages, close code)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    messages: list[Any] = []
    while not app.server.drops.get("slow_client"):
        assert loop.time() < deadline, "never closed"
        more, code = await read_messages(raw, pause, loop.time() + 0.5)
        messages += more
        assert code is None, f"closed with {code} before the server said so"
    more, code = await read_messages(raw, 0, loop.time() + 10)
    return messages + more, code


@pytest.mark.parametrize(
    ("streams", "interval"),
    [(1, 0.1), (len(SYMBOLS), 0.01)],
    ids=["one-ticker-10-per-s", "seven-tickers-100-per-s"],
)
async def test_stalled_clients_are_closed_in_bound_and_release_their_memory(
    streams: int, interval: float
) -> None:
    args = [f"ticker:{s}" for s in SYMBOLS[:streams]]
    async with (
        running_sim(ticker_interval=interval, market_interval=min(0.02, interval)) as sim,
        running_proxy(sim, fanout_callback_timeout=TIMEOUT) as app,
        client(app) as healthy,
    ):
        config = app.config
        resumer = await RawClient(app.port, rcvbuf=4096).connect()
        silent = await RawClient(app.port, rcvbuf=4096).connect()
        stalled = (resumer, silent)
        for raw in stalled:
            raw.send_text({"op": "subscribe", "args": args})
            await raw.read_frame()  # the ack; then nothing
        await healthy.send(orjson.dumps({"op": "subscribe", "args": args}).decode())
        sessions = session_of(app, 2)
        loop = asyncio.get_running_loop()
        last_growth = [loop.time()] * 2
        sizes = [received(raw) for raw in stalled]
        seqs: dict[str, int] = {}
        peak = 0
        deadline = loop.time() + 60
        while app.server.drops.get("slow_client", 0) < 2:
            assert loop.time() < deadline, "the stalled clients were never closed"
            message = await recv(healthy)
            if "seq" in message:  # the healthy client misses nothing meanwhile
                stream = message["stream"]
                assert stream not in seqs or message["seq"] == seqs[stream] + 1
                seqs[stream] = message["seq"]
            for i, raw in enumerate(stalled):
                size = received(raw)
                if size > sizes[i]:
                    sizes[i], last_growth[i] = size, loop.time()
            for session in sessions:
                if not session.closed:
                    peak = max(peak, session.raw.get_write_buffer_size() + session.kernel_unsent())
        closed_at = loop.time()
        for grew in last_growth:
            # from the moment each stopped taking data, within the promised bound
            assert closed_at - grew <= TIMEOUT + 2.0 + 0.2, (closed_at - grew, sizes)
        # what it cost meanwhile: at most the soft mark in user space and about the low-water
        # mark in the kernel (plus one write of each)
        assert peak <= config.write_buffer_soft_limit + config.client_notsent_lowat + 65536, peak
        # one resumes reading at once: it reads what was queued and then the close code
        assert await resumer.read_until_close(10) == 4008
        # the other never does: after the close grace its socket is reset, not left lingering
        while app.server.resets < 1:
            assert loop.time() < closed_at + 10, "the unread socket was never reset"
            await asyncio.sleep(0.1)
        assert len(app.server.sessions) == 1
        for _ in range(20):
            message = await recv(healthy)
            stream = message["stream"]
            assert message["seq"] == seqs[stream] + 1
            seqs[stream] = message["seq"]
        for raw in stalled:
            raw.close()


async def test_slow_reader_on_a_200_per_second_ticker_stays_connected_and_fresh() -> None:
    async with (
        running_sim(ticker_interval=0.005, market_interval=0.005) as sim,
        running_proxy(sim, fanout_callback_timeout=TIMEOUT) as app,
    ):
        raw = await RawClient(app.port, rcvbuf=4096).connect()
        raw.send_text({"op": "subscribe", "args": ["ticker:BTCUSDT"]})
        await raw.read_frame()
        loop = asyncio.get_running_loop()
        start = loop.time()
        # about a fifth of what the stream sends
        messages, code = await read_messages(raw, 0.025, start + 12)
        assert code is None, f"closed with {code}"
        assert all(len(m["data"]) == TICKER_KEYS for _, m in messages)  # complete state
        seqs = [m["seq"] for _, m in messages]
        assert seqs == sorted(set(seqs))
        assert any(b - a > 1 for a, b in itertools.pairwise(seqs)), "never conflated"
        # after the backlog it met when it fell behind, what it reads is a few seconds old
        late = [now - m["timestamp"] / 1000 for now, m in messages[-40:]]
        assert max(late) < 3.0, late
        _, stats = await http_json(app, "/stats")
        slow = stats["connections"]["slow_clients"]
        assert slow["policy"] == "conflate" and slow["conflated_messages"] > 0
        assert slow["conflating"] == 1 == stats["hub"]["clients_conflating"]
        assert sum(slow["unread_bytes_kernel"].values()) == 1
        status, body = await asyncio.to_thread(http_get, app, "/metrics")
        text = body.decode()
        assert status == 200 and "fastproxy_clients_conflating 1.0" in text
        assert 'fastproxy_client_unread_bytes_bucket{le="+Inf",where="kernel"} 1.0' in text
        assert "fastproxy_conflated_messages_total" in text
        raw.close()


async def test_event_streams_are_never_conflated_and_undeliverable_events_close_4008() -> None:
    async with (
        running_sim(ticker_interval=0.005, market_interval=0.005, trade_rate=400.0) as sim,
        running_proxy(sim, fanout_callback_timeout=TIMEOUT) as app,
    ):
        raw = await RawClient(app.port, rcvbuf=4096).connect()
        raw.send_text({"op": "subscribe", "args": ["ticker:BTCUSDT", "trade:BTCUSDT"]})
        await raw.read_frame()
        asyncio.get_running_loop()
        # far slower than the trades come: they cannot all be delivered in time
        messages, code = await read_slowly_until_closed(app, raw, 0.05)
        assert code == 4008
        trades = [m["seq"] for _, m in messages if m.get("stream", "").endswith("trade.BTCUSDT")]
        tickers = [m["seq"] for _, m in messages if m.get("stream", "").endswith("ticker.BTCUSDT")]
        assert len(trades) > 10
        assert trades == list(range(trades[0], trades[0] + len(trades)))  # not one skipped
        assert any(b - a > 1 for a, b in itertools.pairwise(tickers))
        raw.close()


async def test_drop_policy_closes_a_slow_reader_without_conflating() -> None:
    async with (
        running_sim(ticker_interval=0.005, market_interval=0.005) as sim,
        running_proxy(
            sim,
            fanout_callback_timeout=TIMEOUT,
            slow_client_policy="drop",
            write_buffer_soft_limit=16384,
        ) as app,
    ):
        raw = await RawClient(app.port, rcvbuf=4096).connect()
        raw.send_text({"op": "subscribe", "args": ["ticker:BTCUSDT"]})
        await raw.read_frame()
        messages, code = await read_slowly_until_closed(app, raw, 0.025)
        assert code == 4008
        seqs = [m["seq"] for _, m in messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing conflated
        assert app.hub.conflated == 0
        raw.close()


@pytest.mark.skipif("orderbook" not in KINDS, reason="order book streams are not built yet")
async def test_book_client_conflated_gets_a_snapshot_then_valid_updates() -> None:
    async with (
        running_sim(ticker_interval=0.005, market_interval=0.005) as sim,
        running_proxy(sim, fanout_callback_timeout=TIMEOUT) as app,
    ):
        raw = await RawClient(app.port, rcvbuf=4096).connect()
        raw.send_text({"op": "subscribe", "args": ["orderbook:50:BTCUSDT"]})
        await raw.read_frame()
        loop = asyncio.get_running_loop()
        # 10 frames a second against the book's 50: behind whatever the machine's load
        messages, code = await read_messages(raw, 0.1, loop.time() + 8)
        assert code is None
        book = [m for _, m in messages if "seq" in m]
        assert book[0]["type"] == "snapshot"
        jumps = 0
        for previous, message in itertools.pairwise(book):
            if message["seq"] != previous["seq"] + 1:
                jumps += 1
                assert message["type"] == "snapshot", (
                    "a skipped book update must come as a snapshot"
                )
                assert message["seq"] > previous["seq"]
            else:
                assert message["type"] == "update"
        assert jumps > 0, "never conflated"
        raw.close()


async def test_socket_options_bound_the_kernel_share() -> None:
    async with running_sim() as sim, running_proxy(sim, client_sndbuf=65536) as app:
        raw = await RawClient(app.port).connect()
        raw.send_text({"op": "ping"})
        await raw.read_frame()
        (session,) = app.server.sessions
        sock = session.raw.get_extra_info("socket")
        lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert lowat == app.config.client_notsent_lowat > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 65536
        raw.close()

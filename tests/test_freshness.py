"""Freshness: stale/live per stream, from the upstream connection to the client's `status`.

The sans-I/O parts (the connection's probe and silence, the board, the message) are tested
directly; the rest runs the real proxy against the simulator, in process and as a separate
process that is frozen with SIGSTOP, and through a TCP relay that black-holes the connection.
Times are printed (run with -s to see them) and bounded generously: the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from fastproxy.freshness import FreshnessBoard, status_payload
from fastproxy.upstream import UpstreamPool, UpstreamSettings
from fastproxy.upstream.bybit_protocol import ConnectionState
from tests.conftest import free_port
from tests.proxyutil import (
    client,
    http_json,
    recv,
    running_proxy,
    running_sim,
    subscribe,
)

TICKER = "mudrex.futures.ticker.BTCUSDT"
URL = "ws://127.0.0.1:1/v5/public/linear"
# The contract's bound: a client is told `stale` within 5 s of the exchange going silent.
BOUND = 5.0


# -- sans-I/O ------------------------------------------------------------------------------


def test_status_message_is_the_contract_exactly() -> None:
    stale = orjson.loads(status_payload(TICKER, "upstream connection down; reconnecting", 1700))
    assert list(stale) == ["op", "stream", "state", "reason", "since"]
    assert stale == {
        "op": "status",
        "stream": TICKER,
        "state": "stale",
        "reason": "upstream connection down; reconnecting",
        "since": 1700,
    }
    live = orjson.loads(status_payload(TICKER, None, 1800))
    assert live["state"] == "live" and live["since"] == 1800 and live["reason"]


def test_board_reports_changes_only_and_keeps_the_first_since() -> None:
    board = FreshnessBoard()
    assert board.update("s", None, 1) is False  # live and was live: nothing to tell
    assert board.update("s", "silent", 10) is True
    assert board.update("s", "down", 20) is False  # still the same stale period
    assert board.stale("s") == ("silent", 10) and len(board) == 1
    assert board.update("s", None, 30) is True
    assert board.stale("s") is None and len(board) == 0


def _state(**overrides: Any) -> ConnectionState:
    values: dict[str, Any] = {"url": URL, "ping_interval": 20.0, "stale_after": 3.0}
    values.update(overrides)
    state = ConnectionState(UpstreamSettings(**values), 1)
    state.want("tickers.BTCUSDT")
    state.opened(100.0, 1)
    return state


def test_a_quiet_connection_is_probed_and_never_silent_while_it_answers() -> None:
    state = _state()
    t = 100.0
    pings = 0
    while t < 160.0:
        tick = state.poll(t)
        assert not tick.silent and tick.dead is None
        if tick.ping is not None:
            pings += 1
            # the exchange answers 50 ms later
            state.last_frame_at = t + 0.05
            state.on_control({"success": True, "ret_msg": "pong", "op": "ping"}, t + 0.05)
        t = max(state.next_wakeup(t), t + 0.001)
    assert not state.silent
    # a probe every stale_after / 2 of quiet: ~40 in 60 s, far fewer than ticker frames
    assert 30 <= pings <= 45


def test_silence_marks_the_connection_silent_within_stale_after() -> None:
    state = _state()
    silent_at = None
    t = 100.0
    while silent_at is None and t < 200.0:
        if state.poll(t).silent:
            silent_at = t
        t = max(state.next_wakeup(t), t + 0.001)
    assert silent_at is not None and 103.0 <= silent_at <= 103.0 + 1e-6
    assert state.poll(silent_at + 1).silent is False  # reported once
    state.opened(silent_at + 2, 2)
    assert state.silent is False


def test_pool_freshness_rules_without_a_socket() -> None:
    reports: list[tuple[str, str | None]] = []
    pool = UpstreamPool(
        UpstreamSettings(url=URL),
        on_data=lambda *a: None,
        on_failed=lambda *a: None,
        on_reset=lambda *a: None,
        on_status=lambda topic, reason, since: reports.append((topic, reason)),
    )
    pool.subscribe(["tickers.BTCUSDT"])
    conn = pool.plan.where["tickers.BTCUSDT"]
    assert reports == []  # a first connect is not an outage
    conn.opened(time.monotonic(), 1)
    pool.refresh(conn)
    assert reports == []  # a new topic waiting for its ack is not stale
    conn.accept_data("tickers.BTCUSDT", time.monotonic())
    pool.confirmed(conn)
    conn.closed(time.monotonic())
    pool.refresh(conn)
    assert reports == [("tickers.BTCUSDT", "upstream connection down; reconnecting")]
    pool.subscribe(["tickers.ETHUSDT"])  # a new topic on a lost connection is stale at once
    assert reports[-1] == ("tickers.ETHUSDT", "upstream connection down; reconnecting")
    conn.opened(time.monotonic(), 2)
    pool.refresh(conn)
    assert len(reports) == 2  # open again, but not confirmed yet: still stale
    conn.accept_data("tickers.BTCUSDT", time.monotonic())
    pool.confirmed(conn)
    assert reports[-1] == ("tickers.BTCUSDT", None)
    assert set(pool.stale) == {"tickers.ETHUSDT"}
    pool.unsubscribe(["tickers.ETHUSDT"])
    assert pool.stale == {} and pool.status()["stale_topics"] == 0


# -- end to end ------------------------------------------------------------------------------


class Recorder:
    """Every frame a client gets, with its arrival time (monotonic)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                self.frames.append((time.monotonic(), orjson.loads(raw)))

    def statuses(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.frames if m.get("op") == "status"]

    async def wait_for(self, predicate: Any, timeout: float, what: str) -> float:
        start = time.monotonic()
        seen = 0
        while True:
            for t, message in self.frames[seen:]:
                seen += 1
                if predicate(message):
                    return t
            if time.monotonic() - start > timeout:
                raise AssertionError(f"no {what} within {timeout} s; got {self.frames[-5:]}")
            await asyncio.sleep(0.02)

    def after(self, t: float) -> list[dict[str, Any]]:
        return [m for at, m in self.frames if at >= t]


def is_status(state: str) -> Any:
    return lambda m: m.get("op") == "status" and m.get("state") == state


def check_recovery_sequence(messages: list[dict[str, Any]], stream: str) -> None:
    """From the stale status on: stale, then live, then a snapshot, then updates +1 each."""
    mine = [m for m in messages if m.get("stream") == stream]
    kinds = [m.get("state") or m.get("type") for m in mine]
    first_live = kinds.index("live")
    assert kinds[0] == "stale" and "stale" not in kinds[1:], kinds[:8]
    assert kinds[first_live + 1] == "snapshot", kinds[: first_live + 3]
    seqs = [m["seq"] for m in mine[first_live + 1 :]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_simulator_frozen_with_sigstop_stale_within_bound_then_live_and_snapshot() -> None:
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "fastproxy.sim", "--port", str(port), "--ticker-interval", "0.05"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await _wait_port(port)

        class Remote:
            http_url = f"http://127.0.0.1:{port}"

            def ws_url(self, category: str) -> str:
                return f"ws://127.0.0.1:{port}/v5/public/{category}"

        async with running_proxy(Remote()) as app, client(app) as ws:  # type: ignore[arg-type]
            await subscribe(ws, "ticker:BTCUSDT")
            rec = Recorder(ws)
            await rec.wait_for(lambda m: m.get("type") == "update", 10, "an update")
            assert (await http_json(app, "/health"))[0] == 200
            stopped = time.monotonic()
            sim.send_signal(signal.SIGSTOP)
            stale_at = await rec.wait_for(is_status("stale"), 15, "stale")
            status, health = await http_json(app, "/health")
            stats = (await http_json(app, "/stats"))[1]
            metrics = (await asyncio.to_thread(_get, app.port, "/metrics")).decode()
            await asyncio.sleep(1.0)  # frozen a little longer (but less than the pong timeout)
            continued = time.monotonic()
            sim.send_signal(signal.SIGCONT)
            live_at = await rec.wait_for(is_status("live"), 15, "live")
            await rec.wait_for(lambda m: m.get("type") == "snapshot", 10, "the snapshot")
            await asyncio.sleep(0.5)
            print(
                f"\nSIGSTOP -> stale {stale_at - stopped:.2f} s; "
                f"SIGCONT -> live {live_at - continued:.2f} s"
            )
            assert stale_at - stopped < BOUND
            assert status == 503 and health["status"] == "degraded"
            assert health["stale_streams"] == 1 and "1 streams stale" in health["reason"]
            assert stats["hub"]["stale_streams"] == 1
            assert "fastproxy_stale_streams 1.0" in metrics
            stale = rec.statuses()[0][1]
            assert stale["stream"] == TICKER and "nothing received" in stale["reason"]
            # `since` is when the silence began: before the client was told, near the SIGSTOP
            wall_stop = time.time() - (time.monotonic() - stopped)
            assert wall_stop * 1000 - 1500 <= stale["since"] <= wall_stop * 1000 + 500
            check_recovery_sequence(rec.after(stale_at), TICKER)
            assert (await http_json(app, "/health"))[0] == 200
            assert (await http_json(app, "/stats"))[1]["hub"]["stale_streams"] == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            sim.send_signal(signal.SIGCONT)
        sim.terminate()
        sim.wait(10)


async def test_new_subscriber_to_a_stale_stream_is_told_right_after_the_ack() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        async with client(app) as first:
            await subscribe(first, "ticker:BTCUSDT")
            rec = Recorder(first)
            await rec.wait_for(lambda m: m.get("type") == "update", 10, "an update")
            sim.set_half_dead(True)
            await rec.wait_for(is_status("stale"), 15, "stale")
            async with client(app) as late:
                ack = await subscribe(late, "ticker:BTCUSDT")
                assert ack["success"] is True
                status = await recv(late)
                assert status["op"] == "status" and status["state"] == "stale"
                assert status["since"] == rec.statuses()[0][1]["since"]
                snapshot = await recv(late)  # the last known state, marked stale before it
                assert snapshot["type"] == "snapshot" and snapshot["stream"] == TICKER
                sim.set_half_dead(False)
                # the socket speaks again, or is replaced after the pong timeout: live again
                late_rec = Recorder(late)
                await late_rec.wait_for(is_status("live"), 30, "live")
                await late_rec.wait_for(lambda m: m.get("type") == "snapshot", 10, "snapshot")
                check_recovery_sequence([status, *late_rec.after(0)], TICKER)


async def test_a_quiet_stream_on_a_healthy_connection_is_not_stale() -> None:
    # klines every 30 s: the stream says nothing for longer than stale_after, many times over
    async with running_sim(kline_interval=30.0) as sim, running_proxy(sim) as app:
        async with client(app) as ws:
            await subscribe(ws, "kline:1h:BTCUSDT")
            rec = Recorder(ws)
            await asyncio.sleep(4 * 3.0)
            assert rec.statuses() == []
            assert (await http_json(app, "/health"))[0] == 200


# -- a black-holed connection ----------------------------------------------------------------


class BlackHoleRelay:
    """A TCP relay to the simulator that can black-hole the connections it carries: bytes are
    read and dropped both ways while every socket stays open, which is what a dead NAT entry
    or a pulled cable looks like from here (half-open). Later connections pass again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._live: list[dict[str, bool]] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hole(self) -> None:
        for conn in self._live:
            conn["holed"] = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        conn = {"holed": False}
        self._live.append(conn)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if not conn["holed"]:
                        dst.write(data)
                        await dst.drain()
            if not conn["holed"]:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[BlackHoleRelay]:
    relay = BlackHoleRelay(port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def test_black_holed_upstream_stale_within_bound_then_live_after_reconnect() -> None:
    async with running_sim() as sim, relay_to(sim.port) as relay:
        async with (
            running_proxy(sim, bybit_ws_url=f"ws://127.0.0.1:{relay.port}/v5/public/linear") as app,
            client(app) as ws,
        ):
            await subscribe(ws, "ticker:BTCUSDT", "trade:BTCUSDT")
            rec = Recorder(ws)
            await rec.wait_for(lambda m: m.get("type") == "update", 10, "an update")
            holed = time.monotonic()
            relay.hole()  # this connection is dead for good; the next one gets through
            stale_at = await rec.wait_for(is_status("stale"), 15, "stale")
            await asyncio.sleep(0.5)
            stale_streams = {m["stream"] for _, m in rec.statuses() if m["state"] == "stale"}
            live_at = await rec.wait_for(is_status("live"), 40, "live")
            await rec.wait_for(lambda m: m.get("type") == "snapshot", 10, "snapshot")
            print(
                f"\nblack hole -> stale {stale_at - holed:.2f} s; "
                f"live again {live_at - holed:.2f} s after it began (pong timeout + reconnect)"
            )
            assert stale_at - holed < BOUND
            assert stale_streams == {TICKER, "mudrex.futures.trade.BTCUSDT"}
            check_recovery_sequence(rec.after(stale_at), TICKER)


# -- helpers ---------------------------------------------------------------------------------


async def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"simulator did not listen on {port}")
            await asyncio.sleep(0.1)
        else:
            writer.close()
            return


def _get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read()


async def test_old_upstream_frames_mark_the_stream_stale_until_fresh_ones_come() -> None:
    """The exchange keeps sending, but its frames are stamped 8 s ago (a lagging exchange, a
    queue on the way): the data must not pass for live."""
    async with (
        running_sim() as sim,
        running_proxy(sim, upstream_max_frame_age=2.0) as app,
        client(app) as ws,
    ):
        await subscribe(ws, "ticker:BTCUSDT")
        rec = Recorder(ws)
        await rec.wait_for(lambda m: m.get("type") == "update", 10, "an update")
        assert rec.statuses() == []
        sim.set_frame_age(8.0)
        await rec.wait_for(is_status("stale"), 15, "stale")
        stale = rec.statuses()[0][1]
        assert stale["stream"] == TICKER
        assert "upstream frames are" in stale["reason"] and "s old" in stale["reason"]
        status, health = await http_json(app, "/health")
        assert status == 503 and health["stale_streams"] == 1
        metrics = (await asyncio.to_thread(_get, app.port, "/metrics")).decode()
        old = [line for line in metrics.splitlines() if line.startswith("fastproxy_upstream_old")]
        assert old and float(old[0].split()[-1]) > 0, old
        # stale while the frames stay old, though they keep coming
        count = len(rec.statuses())
        await asyncio.sleep(1.0)
        assert len(rec.statuses()) == count
        sim.set_frame_age(0.0)
        live_at = await rec.wait_for(is_status("live"), 15, "live")
        assert rec.statuses()[-1][1]["state"] == "live"
        await rec.wait_for(lambda m: m.get("type") == "update", 10, "updates again")
        assert (await http_json(app, "/health"))[0] == 200
        assert live_at > 0

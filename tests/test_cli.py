"""The command line, run as users run it: real processes, signals, the seed README's client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import orjson
import websockets

from tests.conftest import free_port

SEED_CLIENT = """
import asyncio, json, sys
import websockets

async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        await ws.send(json.dumps({
            "op": "subscribe",
            "args": ["ticker:BTCUSDT", "kline:1h:BTCUSDT", "trade:BTCUSDT"]
        }))
        seen = set()
        async for message in ws:
            data = json.loads(message)
            print(json.dumps(data), flush=True)
            if "stream" in data:
                seen.add(data["stream"])
            if len(seen) == 3:
                return

asyncio.run(main())
"""


def start_demo(port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LOG_FORMAT": "text"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastproxy",
            "--demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("proxy never became ready")


def test_demo_serves_the_seed_readme_client_unchanged() -> None:
    port = free_port()
    proc = start_demo(port)
    try:
        wait_ready(port, proc)
        result = subprocess.run(
            [sys.executable, "-c", SEED_CLIENT, f"ws://127.0.0.1:{port}/ws"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        messages = [orjson.loads(line) for line in result.stdout.splitlines()]
        assert messages[0]["op"] == "subscribe" and messages[0]["success"] is True
        streams = {m["stream"] for m in messages if "stream" in m}
        assert streams == {
            "mudrex.futures.ticker.BTCUSDT",
            "mudrex.futures.kline.1h.BTCUSDT",
            "mudrex.futures.trade.BTCUSDT",
        }
    finally:
        proc.terminate()
        proc.wait(15)


def test_sigterm_drains_clients_with_1001_and_exits_zero() -> None:
    port = free_port()
    proc = start_demo(port)
    try:
        wait_ready(port, proc)

        async def scenario() -> int | None:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send('{"op":"subscribe","args":["ticker:BTCUSDT"]}')
                await asyncio.wait_for(ws.recv(), 10)
                proc.send_signal(signal.SIGTERM)
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), 15)
                except websockets.ConnectionClosed as exc:
                    return exc.rcvd.code if exc.rcvd else None

        assert asyncio.run(scenario()) == 1001
        started = time.monotonic()
        assert proc.wait(12) == 0
        assert time.monotonic() - started < 11
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sim_command_serves_bybit_frames() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastproxy", "sim", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        async def scenario() -> dict:
            deadline = time.monotonic() + 30
            while True:
                try:
                    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v5/public/linear")
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    await asyncio.sleep(0.1)
            async with ws:
                await ws.send('{"op":"subscribe","args":["tickers.BTCUSDT"],"req_id":"x"}')
                ack = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                assert ack["success"] is True and ack["req_id"] == "x"
                return orjson.loads(await asyncio.wait_for(ws.recv(), 10))

        frame = asyncio.run(scenario())
        assert frame["topic"] == "tickers.BTCUSDT" and frame["type"] == "snapshot"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

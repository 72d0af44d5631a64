"""Slow clients against the proxy: how soon a stalled one is closed, what it costs meanwhile, how
fresh a slow reader's data stays, and what the clients that keep up see while it happens.

    python -m loadtest.slow stall --stalled 20 --streams 1 --rate 10
    python -m loadtest.slow stall --stalled 100 --streams 20 --rate 50
    python -m loadtest.slow reader --rate 200 --read-rate 50 --duration 20

`stall`: STALLED clients (small receive buffers) subscribe to the first STREAMS tickers at RATE
updates/s, read their acks and stop reading; a few healthy clients read everything. Reported:
seconds from the stall to each close (4008), the kernel's and the transport's unread bytes per
stalled client (the proxy's /stats, sampled), the healthy clients' latency (now - timestamp)
and lost messages, and how many of the proxy's sockets are left in FIN-WAIT-1 after the close
grace. `reader`: one client reads READ_RATE frames a second from a ticker at RATE/s; reported:
the age of what it reads (now - timestamp), seq jumps, whether it stayed connected.

The simulator and the proxy run as subprocesses (settings through the environment, e.g.
SLOW_CLIENT_POLICY=drop); every process stops before the command returns; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from loadtest.fanout import Scenario, Stack

# what a proxy without these statistics (an older version, for an A/B) is taken to report
NO_SLOW_STATS = {
    "policy": "drop",
    "resets": None,
    "conflated_messages": None,
    "unread_bytes_kernel_total": 0,
    "unread_bytes_user_total": 0,
}


class RawReader:
    """A WebSocket client on a bare socket with a small receive buffer, reading when told to."""

    def __init__(self, port: int, rcvbuf: int) -> None:
        self.port = port
        self.rcvbuf = rcvbuf
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def connect(self, args: list[str]) -> RawReader:
        sock = socket.socket()
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(
            sock=sock, limit=max(self.rcvbuf, 4096)
        )
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        payload = orjson.dumps({"op": "subscribe", "args": args})
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        length = len(payload)
        head = (
            bytes([0x81, 0x80 | length])
            if length < 126
            else (bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big"))
        )
        self.writer.write(head + mask + masked)
        return self

    async def frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.transport.abort()


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        return json.loads(response.read())


def _fin_wait(port: int) -> int:
    try:
        out = subprocess.run(
            ["ss", "-tanH", "state", "fin-wait-1", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return -1
    return len([line for line in out.splitlines() if line.strip()])


def _q(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    return {
        "p50": round(statistics.median(values), 3),
        "p99": round(values[min(len(values) - 1, int(0.99 * len(values)))], 3),
        "max": round(values[-1], 3),
    }


async def _healthy(client: RawReader, until: float, out: dict[str, Any]) -> None:
    last: dict[str, int] = {}
    while time.time() < until:
        try:
            opcode, payload = await client.frame(max(0.05, until - time.time()))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            break
        if opcode != 0x1:
            continue
        message = orjson.loads(payload)
        seq = message.get("seq")
        if seq is None:
            continue
        out["latency_ms"].append(time.time() * 1000 - message["timestamp"])
        stream = message["stream"]
        if stream in last and seq != last[stream] + 1:
            out["lost"] += max(0, seq - last[stream] - 1)
        last[stream] = seq


async def stall(args: argparse.Namespace) -> dict[str, Any]:
    scenario = Scenario("stall", args.stalled, args.streams, args.rate)
    streams = [f"ticker:{s}" for s in _symbols(args.streams)]
    with Stack(scenario, args.target, Path(args.out)) as stack:
        port = stack.port
        healthy = [await RawReader(port, 0).connect(streams) for _ in range(args.healthy)]
        stalled = [await RawReader(port, args.rcvbuf).connect(streams) for _ in range(args.stalled)]
        for client in stalled:
            await client.frame()  # the ack; from now on it reads nothing
        stalled_at = time.time()
        health: dict[str, Any] = {"latency_ms": [], "lost": 0}
        end = stalled_at + args.fanout_timeout + 10
        readers = [asyncio.ensure_future(_healthy(c, end, health)) for c in healthy]
        samples: list[dict[str, Any]] = []
        closed_after: list[float] = []
        base = _stats(port)["connections"]["drops"].get("slow_client", 0)
        while time.time() < end and len(closed_after) < args.stalled:
            await asyncio.sleep(0.25)
            stats = await asyncio.to_thread(_stats, port)
            slow = stats["connections"].get("slow_clients", NO_SLOW_STATS)
            dropped = stats["connections"]["drops"].get("slow_client", 0) - base
            closed_after += [round(time.time() - stalled_at, 2)] * (dropped - len(closed_after))
            waiting = args.stalled - dropped
            if waiting > 0:
                samples.append(
                    {
                        "kernel": (slow["unread_bytes_kernel_total"]) / (waiting + args.healthy),
                        "user": (slow["unread_bytes_user_total"]) / (waiting + args.healthy),
                    }
                )
        await asyncio.sleep(3.0)  # past the close grace
        fin_wait = _fin_wait(port)
        await asyncio.gather(*readers)
        final = await asyncio.to_thread(_stats, port)
        for client in healthy + stalled:
            client.close()
    return {
        "stalled": args.stalled,
        "streams": args.streams,
        "rate": args.rate,
        "policy": final["connections"].get("slow_clients", NO_SLOW_STATS)["policy"],
        "closed": len(closed_after),
        "seconds_to_close": _q(closed_after),
        "kernel_bytes_per_stalled_client_max": round(
            max((s["kernel"] for s in samples), default=0)
        ),
        "user_bytes_per_stalled_client_max": round(max((s["user"] for s in samples), default=0)),
        "fin_wait_1_after_grace": fin_wait,
        "resets": final["connections"].get("slow_clients", NO_SLOW_STATS)["resets"],
        "healthy_latency_ms": _q(health["latency_ms"]),
        "healthy_lost": health["lost"],
        "healthy_messages": len(health["latency_ms"]),
    }


async def reader(args: argparse.Namespace) -> dict[str, Any]:
    scenario = Scenario("reader", 1, 1, args.rate)
    with Stack(scenario, args.target, Path(args.out)) as stack:
        client = await RawReader(stack.port, args.rcvbuf).connect(["ticker:BTCUSDT"])
        start = time.time()
        ages: list[tuple[float, float]] = []
        jumps = 0
        first = last = None
        code = None
        pause = 1.0 / args.read_rate
        while time.time() - start < args.duration:
            await asyncio.sleep(pause)
            try:
                opcode, payload = await client.frame()
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                code = "EOF"
                break
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
                break
            message = orjson.loads(payload)
            if "seq" not in message:
                continue
            ages.append((time.time() - start, time.time() - message["timestamp"] / 1000))
            if last is not None and message["seq"] != last + 1:
                jumps += 1
            last = message["seq"]
            first = last if first is None else first
        stats = _stats(stack.port)["connections"].get("slow_clients", NO_SLOW_STATS)
        client.close()
    half = args.duration / 2
    return {
        "rate": args.rate,
        "read_rate": args.read_rate,
        "policy": stats["policy"],
        "closed": code,
        "messages": len(ages),
        "seq_jumps": jumps,
        "upstream_rate_seen": round((last - first) / args.duration, 1) if first else 0,
        "age_s_all": _q([a for _, a in ages]),
        "age_s_second_half": _q([a for t, a in ages if t >= half]),
        "conflated_messages": stats["conflated_messages"],
    }


def _symbols(count: int) -> list[str]:
    from loadtest.fanout import SYMBOLS

    return SYMBOLS[:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.slow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("stall", help="stalled clients: time to close, memory meanwhile")
    one.add_argument("--stalled", type=int, default=20)
    one.add_argument("--healthy", type=int, default=5)
    one.add_argument("--streams", type=int, default=1)
    one.add_argument("--rate", type=float, default=10.0)
    two = sub.add_parser("reader", help="a slow reader: how old its data is")
    two.add_argument("--rate", type=float, default=200.0)
    two.add_argument("--read-rate", type=float, default=50.0)
    two.add_argument("--duration", type=float, default=20.0)
    for p in (one, two):
        p.add_argument("--rcvbuf", type=int, default=4096, help="the slow clients' SO_RCVBUF")
        p.add_argument("--out", default="/tmp/fastproxy-slow")
        p.add_argument(
            "--target",
            default="proxy",
            help="proxy, or proxy-NAME=TREE: the proxy from another tree",
        )
    args = parser.parse_args(argv)
    args.fanout_timeout = float(os.environ.get("FANOUT_CALLBACK_TIMEOUT", "5"))
    run = stall if args.command == "stall" else reader
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()

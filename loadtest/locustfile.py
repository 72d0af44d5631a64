"""Locust users for fastproxy: each opens /ws, subscribes, and streams until the test ends.

    make demo        # the proxy on :8000 with the bundled simulator upstream
    .venv/bin/locust -f loadtest/locustfile.py --headless --processes 2 -u 1000 -r 100 -t 60s \
        --host ws://127.0.0.1:8000 --streams ticker:BTCUSDT,ticker:ETHUSDT

What shows up in locust's table and CSV (request type `WS`):
- `connect`: TCP connect plus the WebSocket handshake, ms;
- `subscribe`: the subscribe request to its ack, ms (a refused arg is a failure);
- one row per stream (`mudrex.futures.ticker.BTCUSDT`...): every data message, its response
  time the delivery latency now - `timestamp` (exchange time, so it includes the upstream hop;
  meaningful when the exchange or simulator clock is this machine's), its length the payload;
- `ping`: the `{"op":"ping"}` sent every --ping-interval seconds to its pong, ms;
- `seq gap`: a failure per gap in a stream's `seq` (the count of missing messages in the text).

Options (flags or environment): --streams / FASTPROXY_STREAMS (comma-separated client args,
default ticker:BTCUSDT), --ping-interval / FASTPROXY_PING_INTERVAL (seconds, default 30).

The WebSocket client is the small one below, on gevent's patched sockets: one greenlet per user
blocked in recv costs a few KiB, and a message costs a frame parse and two bytes.find calls,
so one locust process holds several hundred streaming users and `--processes` adds cores.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from locust import User, constant, events, task

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_DATA = b'{"stream":"'
_TS = b',"timestamp":'
_SEQ = b',"seq":'
_H16 = struct.Struct(">H")
_H64 = struct.Struct(">Q")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--streams",
        type=str,
        env_var="FASTPROXY_STREAMS",
        default="ticker:BTCUSDT",
        help="comma-separated streams each user subscribes to",
    )
    parser.add_argument(
        "--ping-interval",
        type=float,
        env_var="FASTPROXY_PING_INTERVAL",
        default=30.0,
        help="seconds between each user's {op: ping}",
    )


class WSClosed(Exception):
    """The server closed the connection (code in the message) or the socket ended."""


class SeqGap(Exception):
    pass


class Refused(Exception):
    pass


class WSConnection:
    """A minimal RFC 6455 client: text frames out (masked), any frame in, ping answered."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
        path = parts.path if parts.path not in ("", "/") else "/ws"
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buf = bytearray()
        self.pos = 0
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk or len(self.buf) > 16384:
                raise WSClosed("handshake: connection closed")
            self.buf += chunk
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end])
        self.pos = end
        if not head.startswith(b"HTTP/1.1 101"):
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            raise WSClosed(f"handshake refused: {status}")
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        if accept not in head:
            raise WSClosed("handshake: bad Sec-WebSocket-Accept")
        self.fragments: bytearray | None = None

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 0x10000:
            header = bytes((0x80 | opcode, 0x80 | 126)) + _H16.pack(n)
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + _H64.pack(n)
        mask = os.urandom(4)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )
        self.sock.sendall(header + mask + masked)

    def _parse(self) -> tuple[int, bytes] | None:
        buf, pos = self.buf, self.pos
        if len(buf) - pos < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        n = b1 & 0x7F
        start = pos + 2
        if n == 126:
            if len(buf) - pos < 4:
                return None
            n = _H16.unpack_from(buf, start)[0]
            start += 2
        elif n == 127:
            if len(buf) - pos < 10:
                return None
            n = _H64.unpack_from(buf, start)[0]
            start += 8
        if len(buf) < start + n:
            return None
        self.pos = start + n
        return b0, bytes(buf[start : start + n])

    def recv(self) -> tuple[int, bytes]:
        """The next message (opcode, payload); pings are answered, fragments joined."""
        while True:
            frame = self._parse()
            if frame is None:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise WSClosed("connection closed")
                if self.pos:
                    del self.buf[: self.pos]
                    self.pos = 0
                self.buf += chunk
                continue
            b0, payload = frame
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.send(payload, 0xA)
                continue
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close(code)
                raise WSClosed(f"closed by server: {code} {payload[2:].decode(errors='replace')}")
            if opcode == 0xA:
                continue
            if not b0 & 0x80:  # a fragment: keep it until the final one
                if opcode:
                    self.fragments = bytearray(payload)
                elif self.fragments is not None:
                    self.fragments += payload
                continue
            if opcode == 0 and self.fragments is not None:
                payload, self.fragments = bytes(self.fragments + payload), None
                opcode = 0x1
            return opcode, payload

    def close(self, code: int = 1000) -> None:
        with contextlib.suppress(OSError):
            self.send(code.to_bytes(2, "big"), 0x8)
        self.sock.close()


class FastproxyUser(User):
    """One client: connect, subscribe, then read until the test stops it."""

    wait_time = constant(1)  # before reconnecting, when the server closed the connection
    host = "ws://127.0.0.1:8000"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        streams = getattr(options, "streams", None) or os.environ.get(
            "FASTPROXY_STREAMS", "ticker:BTCUSDT"
        )
        self.streams = [s.strip() for s in streams.split(",") if s.strip()]
        self.ping_interval = float(getattr(options, "ping_interval", 30.0) or 30.0)
        self.conn: WSConnection | None = None

    def on_stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _fire(
        self,
        name: str,
        started: float,
        length: int = 0,
        exception: Exception | None = None,
        response_time: float | None = None,
    ) -> None:
        if response_time is None:
            response_time = (time.perf_counter() - started) * 1000.0
        events.request.fire(
            request_type="WS",
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context={},
        )

    @task
    def stream(self) -> None:
        started = time.perf_counter()
        try:
            conn = self.conn = WSConnection(self.host or "", timeout=10.0)
        except (OSError, WSClosed) as exc:
            self._fire("connect", started, exception=exc)
            return
        self._fire("connect", started)
        try:
            self._subscribe(conn)
            self._read(conn)
        except (OSError, WSClosed) as exc:
            self._fire("disconnected", time.perf_counter(), exception=exc, response_time=0.0)
        finally:
            conn.sock.close()
            self.conn = None

    def _subscribe(self, conn: WSConnection) -> None:
        started = time.perf_counter()
        conn.send(orjson.dumps({"op": "subscribe", "args": self.streams}))
        conn.sock.settimeout(10.0)
        while True:
            _, payload = conn.recv()
            if payload.startswith(b'{"op":"subscribe"'):
                ack = orjson.loads(payload)
                refused = ack.get("rejected")
                self._fire(
                    "subscribe",
                    started,
                    len(payload),
                    Refused(f"rejected: {refused}") if refused or not ack.get("success") else None,
                )
                return

    def _read(self, conn: WSConnection) -> None:
        last: dict[bytes, int] = {}
        interval = self.ping_interval
        next_ping = time.monotonic() + interval
        ping_sent = 0.0
        ping = orjson.dumps({"op": "ping"})
        fire = events.request.fire
        while True:
            now = time.monotonic()
            if now >= next_ping:
                conn.send(ping)
                ping_sent = time.perf_counter()
                next_ping = now + interval
            conn.sock.settimeout(max(0.01, next_ping - now))
            try:
                _, payload = conn.recv()
            except TimeoutError:
                continue
            if not payload.startswith(_DATA):
                if payload.startswith(b'{"op":"pong"') and ping_sent:
                    self._fire("ping", ping_sent, len(payload))
                    ping_sent = 0.0
                elif payload.startswith(b'{"op":"error"'):
                    reply = orjson.loads(payload)
                    self._fire(
                        "error",
                        time.perf_counter(),
                        exception=Refused(reply.get("code")),
                        response_time=0.0,
                    )
                continue
            i = payload.rfind(_TS) + 13
            latency = time.time() * 1000.0 - int(payload[i : payload.index(b",", i)])
            i = payload.rfind(_SEQ) + 7
            end = payload.find(b",", i)  # a snapshot names its "epoch" after seq
            seq = int(payload[i : end if end > 0 else -1])
            sid = payload[11 : payload.index(b'"', 11)]
            prev = last.get(sid)
            last[sid] = seq
            if prev is not None and seq > prev + 1:
                fire(
                    request_type="WS",
                    name="seq gap",
                    response_time=0.0,
                    response_length=0,
                    exception=SeqGap(f"{seq - prev - 1} missing on {sid.decode()}"),
                    context={},
                )
            fire(
                request_type="WS",
                name=sid.decode(),
                response_time=max(0.0, latency),
                response_length=len(payload),
                exception=None,
                context={},
            )

"""Helpers for tests that run the real proxy against the simulator over real sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from fastproxy.app import App
from fastproxy.config import Config
from fastproxy.sim import SimConfig, Simulator


@asynccontextmanager
async def running_sim(**overrides: Any) -> AsyncIterator[Simulator]:
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "ticker_interval": 0.05}
    options.update(overrides)
    sim = Simulator(SimConfig(**options))
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def running_proxy(sim: Simulator, **overrides: Any) -> AsyncIterator[App]:
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "bybit_ws_url": sim.ws_url("linear"),
        "bybit_rest_url": sim.http_url,
        "unsubscribe_linger": 0.5,
        "log_format": "text",
    }
    options.update(overrides)
    app = App(Config(**options))
    await app.start()
    # The symbol list loads in the background; tests expect to start with its first answer.
    assert app.catalogue is not None
    await app.catalogue.wait_first_attempt(30)
    try:
        yield app
    finally:
        await app.stop()


def ws_url(app: App) -> str:
    return f"ws://127.0.0.1:{app.port}/ws"


def client(app: App, **kwargs: Any) -> Any:
    kwargs.setdefault("max_size", 2**22)
    # websockets stops reading when its queue is full, and then cannot see our close reply:
    # closing would wait out its 10 s close_timeout.
    kwargs.setdefault("max_queue", None)
    return connect(ws_url(app), **kwargs)


async def recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send(ws: ClientConnection, obj: Any) -> None:
    await ws.send(orjson.dumps(obj).decode())


async def subscribe(ws: ClientConnection, *args: str, req_id: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"op": "subscribe", "args": list(args)}
    if req_id is not None:
        request["req_id"] = req_id
    await send(ws, request)
    return await recv(ws)


async def recv_data(ws: ClientConnection, stream: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next data message of `stream`, skipping others (and `status` messages)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await recv(ws, max(0.01, deadline - loop.time()))
        if message.get("stream") == stream and "op" not in message:
            return message


def http_get(app: App, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def http_json(app: App, path: str) -> tuple[int, Any]:
    status, body = await asyncio.to_thread(http_get, app, path)
    return status, orjson.loads(body)


class RawClient:
    """A WebSocket client on a bare socket: it reads only when told to, and never answers pings
    unless told to. For slow-reader and idle tests that a polite library cannot act out."""

    def __init__(
        self, port: int, connection_header: str = "Upgrade", rcvbuf: int = 0, extensions: str = ""
    ) -> None:
        self.port = port
        self.connection_header = connection_header
        self.rcvbuf = rcvbuf
        self.extensions = extensions  # a Sec-WebSocket-Extensions offer, sent when not empty
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.status_line = b""
        self.head = b""  # the server's response head

    async def connect(self) -> RawClient:
        sock = socket.socket()
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        limit = 2**16 if not self.rcvbuf else self.rcvbuf
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=limit)
        key = base64.b64encode(os.urandom(16)).decode()
        offer = f"Sec-WebSocket-Extensions: {self.extensions}\r\n" if self.extensions else ""
        self.writer.write(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: {self.connection_header}\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{offer}\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        self.status_line = head.split(b"\r\n", 1)[0]
        self.head = head
        return self

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        mask = os.urandom(4)
        header = bytearray([(0x80 if fin else 0) | rsv | opcode])
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 65536:
            header.append(0x80 | 126)
            header += length.to_bytes(2, "big")
        else:
            header.append(0x80 | 127)
            header += length.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(bytes(header) + mask + masked)

    def send_text(self, obj: Any) -> None:
        self.send_frame(0x1, orjson.dumps(obj))

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        first, payload = await self.read_raw_frame(timeout)
        return first & 0x0F, payload

    async def read_raw_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """(the frame's first byte: FIN, RSV bits and opcode; its payload as sent)."""
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        first, length = head[0], head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return first, await self.reader.readexactly(length)

    async def read_until_close(self, timeout: float = 30.0) -> int | None:
        """Read frames until a close frame (its code) or EOF (None)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                opcode, payload = await self.read_frame(max(0.01, deadline - loop.time()))
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.writer.transport.abort()


class TcpRelay:
    """A TCP relay on loopback between a node and its Redis, to act out a bad link: every chunk
    can be held back `delay` seconds (each direction, order kept), or the link cut (every
    connection closed, new ones closed at once) until `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.delay = 0.0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, query: str = "") -> str:
        return f"redis://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def cut_link(self) -> None:
        self.cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut = False
        self.delay = 0.0

    async def stop(self) -> None:
        self.cut_link()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, (writer, up_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(chunk)
                await dst.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await src.read(65536)
                queue.put_nowait((loop.time() + self.delay, chunk))
                if not chunk:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            for writer in both:
                writer.transport.abort()
                self._writers.discard(writer)

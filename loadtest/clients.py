"""The fan-out benchmark's client side: one process holding many picows connections (or, with
`client="websockets"`, many `websockets` connections, which offer permessage-deflate unless
told not to: the compression scenario's clients).

Per message it does only what the numbers need: find `"timestamp":` and `"seq":` with
bytes.rfind (no JSON parse), check seq is +1 on the stream, and count the delivery latency
into a histogram (0.1 ms bins). The stream id is the payload's first field, so it is a slice.
Every server under test writes data messages as `{"stream":"...", ..., "timestamp":T,
"source":"mudrex","seq":N}` (a snapshot adds `,"epoch":"E"` after seq).

A worker may hold slow readers (`WorkerSpec.slow`): picows clients with a 2 KiB receive buffer
that read for 5 ms every 250 ms, so they take less than a ticker sends; they are counted apart,
and the healthy clients' figures exclude them.

A worker runs in its own process (see fanout.py) and talks to its parent over a Pipe:
it connects and subscribes, reports `ready`, waits for the measuring window (wall-clock start
and end), counts deliveries inside it, then reports `final` and closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

# Latency histogram: 0.1 ms bins up to 10 s, then 10 ms bins up to 120 s (an overloaded
# baseline runs that late); anything later lands in the last bin.
FINE_BINS = 100_000
COARSE_MS = 10.0
HIST_BINS = FINE_BINS + 11_000


def bin_upper_ms(slot: int) -> float:
    """The upper edge of a histogram bin, ms."""
    if slot < FINE_BINS:
        return (slot + 1) / 10.0
    return FINE_BINS / 10.0 + (slot - FINE_BINS + 1) * COARSE_MS


_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_DATA = b'{"stream":"'
_TS = b',"timestamp":'
_SEQ = b',"seq":'


@dataclass
class WorkerSpec:
    url: str
    clients: int
    streams: list[str]
    # connects a second from this worker; 0: as fast as `concurrency` in-flight handshakes allow
    connect_rate: float = 0.0
    concurrency: int = 100
    ready_timeout: float = 60.0
    read_buffer: int = 4096
    client: str = "picows"  # or "websockets"
    compression: bool = True  # websockets clients: offer permessage-deflate
    slow: int = 0  # of `clients`, how many are slow readers (picows only)


SLOW_RCVBUF = 2048
SLOW_READ_EVERY = 0.25  # s
SLOW_READ_FOR = 0.005  # s


class Tally:
    """Everything one worker counts; the probes write into it directly to keep the path short."""

    __slots__ = (
        "closing",
        "connect_ms",
        "connected",
        "count",
        "disconnects",
        "dup",
        "errors",
        "failed",
        "hist",
        "lost",
        "max_ms",
        "measuring",
        "slow",
        "spans",
        "streams",
        "subscribed",
    )

    def __init__(self, streams: int, slow: bool = False) -> None:
        self.streams = streams
        self.slow = slow
        self.measuring = False
        self.count = 0
        self.hist = [0] * (HIST_BINS + 1)
        self.max_ms = 0.0
        self.lost = 0
        self.dup = 0
        self.connected = 0
        self.failed = 0
        self.subscribed = 0
        self.disconnects = 0
        self.closing = False
        self.errors: list[str] = []
        self.connect_ms: list[float] = []  # connect start to the last stream's first message
        # stream -> [first, last] seq inside the window, from one probe: the upstream rate
        self.spans: dict[bytes, list[int]] = {}


class Probe(WSListener):
    # Slots: attributes of a subclass of picows' extension type otherwise take CPython's
    # generic (slow) lookup, and this runs for every message.
    __slots__ = ("last", "request", "spans", "started", "tally", "transport")

    def __init__(self, tally: Tally, request: bytes, started: float) -> None:
        super().__init__()
        self.tally = tally
        self.request = request
        self.started = started
        self.last: dict[bytes, int] = {}
        self.transport: WSTransport | None = None
        self.spans = not tally.connected  # the worker's first connection notes the spans

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.tally.connected += 1
        if self.tally.slow:
            raw = transport.underlying_transport
            sock = raw.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            raw.pause_reading()
        transport.send(_TEXT, self.request)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if not payload.startswith(_DATA):  # the rare case: not a data message
            msg_type = frame.msg_type
            if msg_type == _TEXT:
                self._control(payload)
            elif msg_type == _CLOSE:
                transport.disconnect()
            return
        self.data(payload)

    def data(self, payload: bytes) -> None:
        i = payload.rfind(_SEQ) + 7
        end = payload.find(b",", i)  # a snapshot names its "epoch" after seq
        seq = int(payload[i : end if end > 0 else -1])
        sid = payload[11 : payload.index(b'"', 11)]
        tally = self.tally
        last = self.last
        prev = last.get(sid)
        last[sid] = seq
        if prev is None:
            if len(last) == tally.streams:
                tally.subscribed += 1
                tally.connect_ms.append((time.perf_counter() - self.started) * 1000.0)
        elif seq != prev + 1:
            if seq > prev:
                tally.lost += seq - prev - 1
            else:
                tally.dup += 1
        if not tally.measuring:
            return
        i = payload.rfind(_TS) + 13
        latency = time.time() * 1000.0 - int(payload[i : payload.index(b",", i)])
        tally.count += 1
        if latency > tally.max_ms:
            tally.max_ms = latency
        slot = int(latency * 10.0)
        if slot >= FINE_BINS:
            slot = min(HIST_BINS, FINE_BINS + int((latency - 10_000.0) / COARSE_MS))
        elif slot < 0:
            slot = 0
        tally.hist[slot] += 1
        if self.spans:
            span = tally.spans.get(sid)
            if span is None:
                tally.spans[sid] = [seq, seq]
            else:
                span[1] = seq

    def _control(self, payload: bytes) -> None:
        try:
            reply = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if reply.get("op") == "error" and len(self.tally.errors) < 20:
            self.tally.errors.append(str(reply.get("code")))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.tally.closing:
            self.tally.disconnects += 1


class WebsocketsProbe:
    """The same counting over a `websockets` connection (the library inflates for us)."""

    __slots__ = ("last", "request", "spans", "started", "tally", "task", "ws")

    data = Probe.data
    _control = Probe._control

    def __init__(self, tally: Tally, request: bytes, started: float) -> None:
        self.tally = tally
        self.request = request
        self.started = started
        self.last: dict[bytes, int] = {}
        self.spans = not tally.connected
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.ws is not None and self.task is not None and not self.task.done()

    async def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self.ws:
                payload = raw if isinstance(raw, bytes) else raw.encode()
                if payload.startswith(_DATA):
                    self.data(payload)
                else:
                    self._control(payload)
        except ConnectionClosed:
            pass
        if not self.tally.closing:
            self.tally.disconnects += 1


async def _connect_websockets(
    spec: WorkerSpec, tally: Tally, request: bytes, probes: list[Any]
) -> None:
    from websockets.asyncio.client import connect

    started = time.perf_counter()
    probe = WebsocketsProbe(tally, request, started)
    try:
        probe.ws = await connect(
            spec.url,
            compression="deflate" if spec.compression else None,
            open_timeout=30,
            ping_interval=None,
            max_size=None,
            max_queue=None,
        )
    except Exception as exc:
        tally.failed += 1
        if len(tally.errors) < 20:
            tally.errors.append(f"connect: {type(exc).__name__}: {exc}")
        return
    tally.connected += 1
    await probe.ws.send(request.decode())
    probe.task = asyncio.get_running_loop().create_task(probe.run())
    probes.append(probe)


async def _connect(spec: WorkerSpec, tally: Tally, request: bytes, probes: list[Probe]) -> None:
    started = time.perf_counter()
    try:
        _, probe = await ws_connect(
            lambda: Probe(tally, request, started),
            spec.url,
            websocket_handshake_timeout=30,
            read_buffer_init_size=spec.read_buffer,
        )
    except Exception as exc:
        tally.failed += 1
        if len(tally.errors) < 20:
            tally.errors.append(f"connect: {type(exc).__name__}: {exc}")
        return
    if not isinstance(probe, Probe):  # picows gave back something else: count, never crash
        tally.failed += 1
        if len(tally.errors) < 20:
            tally.errors.append(f"connect: got a {type(probe).__name__}, not a Probe")
        return
    probes.append(probe)


async def _connect_all(
    spec: WorkerSpec, healthy: Tally, probes: list[Any], slow: Tally | None = None
) -> None:
    loop = asyncio.get_running_loop()
    request = orjson.dumps({"op": "subscribe", "args": spec.streams})
    connect = _connect_websockets if spec.client == "websockets" else _connect

    def tally_of(n: int) -> Tally:
        return slow if slow is not None and n < spec.slow else healthy

    tasks: list[asyncio.Task[None]] = []
    if spec.connect_rate > 0:
        start = loop.time()
        for n in range(spec.clients):
            delay = start + n / spec.connect_rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(connect(spec, tally_of(n), request, probes)))
    else:
        gate = asyncio.Semaphore(spec.concurrency)

        async def gated(tally: Tally) -> None:
            async with gate:
                await connect(spec, tally, request, probes)

        tasks = [loop.create_task(gated(tally_of(n))) for n in range(spec.clients)]
    await asyncio.gather(*tasks)


async def _recv(conn: Connection) -> Any:
    # The pipe is blocking; a thread keeps the loop (and the probes) running meanwhile.
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def run_worker(conn: Connection, spec: WorkerSpec) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally(len(spec.streams))
    slow = Tally(len(spec.streams), slow=True)
    probes: list[Any] = []
    await _connect_all(spec, tally, probes, slow)
    reader = loop.create_task(_slow_reads(probes)) if spec.slow else None
    deadline = loop.time() + spec.ready_timeout
    while (
        tally.subscribed + tally.failed + slow.subscribed + slow.failed < spec.clients
        and loop.time() < deadline
    ):
        await asyncio.sleep(0.05)
    conn.send(
        {
            "connected": tally.connected + slow.connected,
            "failed": tally.failed + slow.failed,
            "subscribed": tally.subscribed + slow.subscribed,
            "connect_ms": tally.connect_ms,
            "errors": tally.errors,
        }
    )
    command = await _recv(conn)
    if command[0] == "measure":
        t0, t1 = command[1], command[2]
        await asyncio.sleep(max(0.0, t0 - time.time()))
        tally.measuring = slow.measuring = True
        await asyncio.sleep(max(0.0, t1 - time.time()))
        tally.measuring = slow.measuring = False
    tally.closing = slow.closing = True
    if reader is not None:
        reader.cancel()
    conn.send(
        {
            "count": tally.count,
            "hist": tally.hist,
            "max_ms": tally.max_ms,
            "lost": tally.lost,
            "dup": tally.dup,
            "disconnects": tally.disconnects,
            "connected_at_end": sum(1 for p in probes if _connected(p) and not p.tally.slow),
            "spans": {k.decode(): v for k, v in tally.spans.items()},
            "errors": tally.errors + slow.errors,
            "slow": {
                "clients": spec.slow,
                "count": slow.count,
                "lost": slow.lost,  # skipped by conflation: a slow reader gets the newest
                "disconnects": slow.disconnects,
                "connected_at_end": sum(1 for p in probes if _connected(p) and p.tally.slow),
            },
        }
    )
    closing = []
    for probe in probes:
        if isinstance(probe, WebsocketsProbe):
            if probe.task is not None:
                probe.task.cancel()
            closing.append(asyncio.wait_for(probe.ws.close(), 2.0))
        elif probe.transport is not None:
            with contextlib.suppress(Exception):
                probe.transport.disconnect()
    if closing:
        await asyncio.gather(*closing, return_exceptions=True)
    await asyncio.sleep(0.2)


async def _slow_reads(probes: list[Any]) -> None:
    """Let each slow reader read for a moment now and then: less than the stream sends."""
    loop = asyncio.get_running_loop()
    slow = [p for p in probes if isinstance(p, Probe) and p.tally.slow]
    while True:
        await asyncio.sleep(SLOW_READ_EVERY)
        for probe in slow:
            transport = probe.transport
            if transport is None or transport.is_disconnected:
                continue
            raw = transport.underlying_transport
            if not raw.is_closing():
                raw.resume_reading()
                loop.call_later(SLOW_READ_FOR, _pause, raw)


def _pause(raw: Any) -> None:
    if not raw.is_closing():
        raw.pause_reading()


def _connected(probe: Any) -> bool:
    if isinstance(probe, WebsocketsProbe):
        return probe.connected
    return probe.transport is not None and not probe.transport.is_disconnected


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Process entry point."""
    uvloop.run(run_worker(conn, spec))
    conn.close()

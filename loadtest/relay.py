"""Baseline (a), the floor: a bare uvloop relay.

One picows connection upstream to the simulator; each ticker frame is merged and serialized
once into a complete downstream frame, which is appended to every subscriber's pending list;
each client with something pending gets one `write` per loop tick. Downstream is a plain
asyncio.Protocol with just enough WebSocket and client protocol to pass the harness: the
handshake, subscribe (ticker args only), the ping op, ping and close frames. No limits, no
back-pressure, no logging: whatever the proxy costs beyond this is the price of its features.

    python -m loadtest.relay --port 9100 --upstream ws://127.0.0.1:9001/v5/public/linear \
        --symbols BTCUSDT,ETHUSDT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from loadtest.wire import (
    Ticker,
    accept_key,
    subscribe_ack,
    symbol_of,
    text_frame,
    topic_symbol,
    upstream_subscribe,
)

_HANDSHAKE_LIMIT = 8192


def _unmask(mask: bytes, payload: bytes) -> bytes:
    # XOR as one big integer: client frames are tiny and rare, this keeps it out of a loop.
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class Relay:
    def __init__(self, symbols: list[str]) -> None:
        self.tickers = {s: Ticker(s) for s in symbols}
        self.subs: dict[str, set[Downstream]] = {s: set() for s in symbols}
        self.dirty: list[Downstream] = []
        self.flush_scheduled = False
        self.loop = asyncio.get_running_loop()

    def publish(self, symbol: str, frame: bytes) -> None:
        dirty = self.dirty
        for client in self.subs[symbol]:
            out = client.out
            if not out:
                dirty.append(client)
            out.append(frame)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def send(self, client: Downstream, frame: bytes) -> None:
        if not client.out:
            self.dirty.append(client)
        client.out.append(frame)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            out = client.out
            if client.transport is None or client.transport.is_closing():
                out.clear()
                continue
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()


class Downstream(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.out: list[bytes] = []
        self.symbols: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for symbol in self.symbols:
            self.relay.subs[symbol].discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _HANDSHAKE_LIMIT and self.transport is not None:
                    self.transport.close()
                return
            head, self.buf = bytes(self.buf[:end]), self.buf[end + 4 :]
            if not self._upgrade(head):
                return
        self._frames()

    def _upgrade(self, head: bytes) -> bool:
        assert self.transport is not None
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if not key:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return False
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        self.upgraded = True
        return True

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
            pos = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + 4 + length:
                return
            mask = bytes(buf[pos : pos + 4])
            payload = _unmask(mask, bytes(buf[pos + 4 : pos + 4 + length]))
            del buf[: pos + 4 + length]
            self._frame(opcode, payload)
            if self.transport is None:
                return

    def _frame(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == 0x1:
            self._request(payload)
        elif opcode == 0x9:
            self.relay.send(self, text_frame(payload, opcode=0xA))
        elif opcode == 0x8:
            self.transport.write(text_frame(payload[:2], opcode=0x8))
            self.transport.close()

    def _request(self, payload: bytes) -> None:
        relay = self.relay
        try:
            request: dict[str, Any] = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        op = request.get("op")
        if op == "ping":
            pong = {"op": "pong", "timestamp": int(time.time() * 1000)}
            relay.send(self, text_frame(orjson.dumps(pong)))
            return
        if op != "subscribe":
            return
        accepted, rejected, new = [], [], []
        for arg in request.get("args") or []:
            symbol = symbol_of(str(arg))
            if symbol is None or symbol not in relay.tickers:
                rejected.append(str(arg))
                continue
            accepted.append(str(arg))
            if symbol not in self.symbols:
                new.append(symbol)
        ack = subscribe_ack(accepted, rejected, request.get("req_id"))
        relay.send(self, text_frame(orjson.dumps(ack)))
        for symbol in new:
            self.symbols.add(symbol)
            relay.subs[symbol].add(self)
            ticker = relay.tickers[symbol]
            if ticker.seq:  # the current state first, so the next update is seq + 1
                relay.send(self, text_frame(ticker.payload("snapshot")))


class Upstream(WSListener):
    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay
        self.lost = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(WSMsgType.TEXT, upstream_subscribe(list(self.relay.tickers)))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        symbol = topic_symbol(message.get("topic", ""))
        if symbol is None:
            return
        relay = self.relay
        ticker = relay.tickers.get(symbol)
        if ticker is None:
            return
        ticker.apply(message)
        relay.publish(symbol, text_frame(ticker.payload()))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def serve(host: str, port: int, upstream: str, symbols: list[str], backlog: int) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(symbols)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Downstream(relay), host, port, backlog=backlog)
    transport, listener = await ws_connect(lambda: Upstream(relay), upstream)
    assert isinstance(listener, Upstream)
    # A lost upstream ends the relay: the harness then counts disconnects, not a quiet stream.
    await asyncio.wait(
        [loop.create_task(stop.wait()), listener.lost], return_when=asyncio.FIRST_COMPLETED
    )
    transport.disconnect()
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="simulator WS URL")
    parser.add_argument("--symbols", required=True, help="comma-separated linear symbols")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (as the proxy)")
    args = parser.parse_args(argv)
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    uvloop.run(serve(args.host, args.port, args.upstream, symbols, args.backlog))


if __name__ == "__main__":
    main()

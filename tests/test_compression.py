"""permessage-deflate (RFC 7692): negotiated per client, each message compressed once and shared.

End to end through the real server: the `websockets` client (which offers deflate by default),
and a bare-socket client that reads the frames as sent, with and without an offer.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import orjson
import pytest

from fastproxy.handshake import negotiate_deflate
from fastproxy.hub import Hub
from fastproxy.streams import parse_stream_arg
from fastproxy.wire import Deflater, InflateError, LastValues, Message, inflate, ws_text_frame
from tests.proxyutil import (
    RawClient,
    client,
    http_json,
    recv_data,
    running_proxy,
    running_sim,
    subscribe,
)
from tests.test_hub import FakeBus, FakeSession

TICKER = "mudrex.futures.ticker.BTCUSDT"
OFFER = "permessage-deflate; client_max_window_bits"
TAIL = b"\x00\x00\xff\xff"


def fresh_inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + TAIL)


# -- negotiation (no sockets) ------------------------------------------------------------------


ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("offers", "accepted"),
    [
        ("permessage-deflate", True),
        (OFFER, True),
        ("permessage-deflate; client_no_context_takeover", True),
        ("permessage-deflate; server_no_context_takeover; server_max_window_bits=15", True),
        # an offer we cannot honour is skipped for the next one
        ("permessage-deflate; server_max_window_bits=10, permessage-deflate", True),
        ("x-webkit-deflate-frame, permessage-deflate", True),
        ("permessage-deflate; client_max_window_bits=10", True),
        ("permessage-deflate; server_max_window_bits=9", False),
        ("permessage-deflate; foo=1", False),
        ("permessage-deflate; client_max_window_bits=16", False),
        ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", False),
        ("permessage-deflate; server_no_context_takeover=1", False),
        ("x-webkit-deflate-frame", False),
        ("", False),
    ],
)
def test_negotiation(offers: str, accepted: bool) -> None:
    agreement = negotiate_deflate(offers)
    if not accepted:
        assert agreement is None
    else:
        # both sides without context takeover, always: shared frames out, no inflater state in
        assert agreement is not None and agreement.header == ANSWER


def test_each_message_inflates_alone_with_a_fresh_inflater() -> None:
    deflater = Deflater()
    payloads = [orjson.dumps({"stream": TICKER, "seq": n, "price": "63902.10"}) for n in range(20)]
    for payload in payloads:
        frame = deflater.frame(payload)
        assert frame[0] == 0xC1  # FIN, RSV1, text
        assert fresh_inflate(frame[2:]) == payload  # no context from the messages before it
    assert deflater.frames == 20


def test_inflate_refuses_garbage_and_bombs() -> None:
    with pytest.raises(InflateError) as garbage:
        inflate(b"\xff\xff\xff\xff", 1024)
    assert not garbage.value.too_big
    bomb = Deflater().compress(b" " * 100_000)
    with pytest.raises(InflateError) as big:
        inflate(bomb, 64 * 1024)
    assert big.value.too_big
    assert inflate(Deflater().compress(b"x" * 1000), 1000) == b"x" * 1000


def test_the_hub_compresses_each_message_once_for_all_deflate_clients() -> None:
    loop = asyncio.new_event_loop()
    try:
        hub = Hub(FakeBus(), loop=loop)
        stream = parse_stream_arg("ticker:BTCUSDT")
        plain = [FakeSession() for _ in range(3)]
        deflate = [FakeSession(deflate=True) for _ in range(50)]
        for session in plain + deflate:
            hub.subscribe(session, [stream])
        for seq in range(1, 11):
            payload = orjson.dumps({"stream": TICKER, "type": "update", "seq": seq})
            hub.deliver(Message(TICKER, seq, "update", 0, payload, ws_text_frame(payload)))
            for session in plain:
                assert session.out[-1] == ws_text_frame(payload)
            first = deflate[0].out[-1]
            assert first[0] == 0xC1 and fresh_inflate(first[2:]) == payload
            # the same bytes object: built once, shared
            assert all(session.out[-1] is first for session in deflate)
        assert hub.stats()["deflated_frames"] == 10
        assert hub.stats()["deliveries"] == 10 * 53
        # a stream no deflate client holds is never compressed
        only_plain = parse_stream_arg("ticker:ETHUSDT")
        hub.subscribe(plain[0], [only_plain])
        eth = "mudrex.futures.ticker.ETHUSDT"
        payload = orjson.dumps({"stream": eth, "type": "update", "seq": 1})
        hub.deliver(Message(eth, 1, "update", 0, payload, ws_text_frame(payload)))
        assert hub.stats()["deflated_frames"] == 10
    finally:
        loop.close()


def test_a_deflate_joiner_gets_the_compressed_snapshot_built_once() -> None:
    values = LastValues()
    payload = orjson.dumps({"stream": TICKER, "type": "update", "seq": 7})
    values.put(Message(TICKER, 7, "update", 0, payload, ws_text_frame(payload)))
    snapshot = values.snapshot(TICKER)
    assert snapshot is not None
    frame = values.frame_of(snapshot)
    assert frame is values.frame_of(values.snapshot(TICKER))  # type: ignore[arg-type]
    assert orjson.loads(fresh_inflate(frame[2:]))["type"] == "snapshot"
    assert values.deflater.frames == 1


# -- end to end ----------------------------------------------------------------------------------


async def read_data(raw: RawClient, stream: str) -> tuple[int, bytes]:
    """The next data frame of `stream` as sent: (first byte, payload as on the wire)."""
    while True:
        first, data = await raw.read_raw_frame()
        payload = fresh_inflate(data) if first & 0x40 else data
        if orjson.loads(payload).get("stream") == stream:
            return first, data


@pytest.mark.parametrize(
    ("arg", "stream"),
    [
        ("ticker:BTCUSDT", TICKER),
        ("orderbook:50:BTCUSDT", "mudrex.futures.orderbook.50.BTCUSDT"),  # whole-book snapshots
    ],
)
async def test_deflate_and_plain_clients_get_the_same_json(arg: str, stream: str) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        zipped = await RawClient(app.port, extensions=OFFER).connect()
        plain = await RawClient(app.port).connect()
        try:
            assert ANSWER.encode() in zipped.head
            assert b"sec-websocket-extensions" not in plain.head.lower()
            for raw in (zipped, plain):
                raw.send_text({"op": "subscribe", "args": [arg]})
            got: dict[str, dict[int, bytes]] = {"zipped": {}, "plain": {}}
            for name, raw in (("zipped", zipped), ("plain", plain)):
                while len(got[name]) < 25:
                    first, data = await read_data(raw, stream)
                    if name == "zipped":
                        assert first == 0xC1, hex(first)
                        payload = fresh_inflate(data)
                        assert len(data) < len(payload) * 0.9
                    else:
                        assert first == 0x81, hex(first)
                        payload = data
                    message = orjson.loads(payload)
                    if message["type"] == "update":  # joiners' snapshots come at different seqs
                        got[name][message["seq"]] = payload
            common = set(got["zipped"]) & set(got["plain"])
            assert len(common) >= 10
            for seq in common:
                assert got["zipped"][seq] == got["plain"][seq]  # byte-identical after inflating
        finally:
            zipped.close()
            plain.close()


async def test_websockets_clients_share_one_compressed_frame_per_message() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        clients = [client(app, ping_interval=None) for _ in range(30)]
        sockets = [await c.__aenter__() for c in clients]
        try:
            for ws in sockets:
                extensions = ws.protocol.extensions
                assert [e.name for e in extensions] == ["permessage-deflate"]
            await asyncio.gather(*(subscribe(ws, "ticker:ETHUSDT") for ws in sockets))

            async def collect(ws: Any) -> dict[int, bytes]:
                got: dict[int, bytes] = {}
                while len(got) < 15:
                    raw = await asyncio.wait_for(ws.recv(decode=False), 30)
                    got[orjson.loads(raw)["seq"]] = raw
                return got

            results = await asyncio.gather(*(collect(ws) for ws in sockets))
            common = set.intersection(*(set(r) for r in results))
            assert len(common) >= 5
            for seq in common:
                assert len({r[seq] for r in results}) == 1
            _, stats = await http_json(app, "/stats")
            hub = stats["hub"]
            assert hub["subscriptions_deflate"] == 30
            # one compressed frame per message (and one per snapshot built), not one per client
            assert 0 < hub["deflated_frames"] <= hub["messages_in"] + 2, hub
            assert hub["deliveries"] >= 30 * 15
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)


async def test_compressed_requests_are_inflated() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        # the client's offer did not ask for client_no_context_takeover; our answer does
        raw = await RawClient(app.port, extensions=OFFER).connect()
        try:
            assert ANSWER.encode() in raw.head
            for n, arg in enumerate(("ticker:BTCUSDT", "ticker:ETHUSDT")):
                request = orjson.dumps({"op": "subscribe", "args": [arg], "req_id": n})
                raw.send_frame(0x1, Deflater().compress(request), rsv=0x40)
                while True:
                    first, data = await raw.read_raw_frame()
                    reply = orjson.loads(fresh_inflate(data) if first & 0x40 else data)
                    if reply.get("op") == "subscribe":
                        break
                assert reply["success"] and reply["req_id"] == n, reply
            # a compressed message in two fragments: RSV1 on the first only
            data = Deflater().compress(orjson.dumps({"op": "ping", "req_id": 9}))
            raw.send_frame(0x1, data[:5], fin=False, rsv=0x40)
            raw.send_frame(0x0, data[5:])
            while True:
                first, data = await raw.read_raw_frame()
                reply = orjson.loads(fresh_inflate(data) if first & 0x40 else data)
                if reply.get("op") == "pong":
                    break
            assert reply["req_id"] == 9
        finally:
            raw.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([(0x1, True, 0x40, b"\xff\xff\xff\xff")], 1002),  # does not inflate
        ([(0x9, True, 0x40, b"")], 1002),  # RSV1 on a control frame
        ([(0x1, False, 0x40, b"\x01"), (0x0, True, 0x40, b"\x02")], 1002),  # on a continuation
        ([(0x1, True, 0x40, Deflater().compress(b" " * 200_000))], 1009),  # inflates too big
    ],
)
async def test_bad_compressed_frames_close(
    frames: list[tuple[int, bool, int, bytes]], code: int
) -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        raw = await RawClient(app.port, extensions=OFFER).connect()
        try:
            for opcode, fin, rsv, payload in frames:
                raw.send_frame(opcode, payload, fin=fin, rsv=rsv)
            assert await raw.read_until_close() == code
        finally:
            raw.close()


async def test_compression_off_serves_plain_frames_to_a_client_that_offers_it() -> None:
    async with running_sim() as sim, running_proxy(sim, compression=False) as app:
        async with client(app) as ws:
            assert ws.protocol.extensions == []
            assert (await subscribe(ws, "ticker:BTCUSDT"))["success"]
            assert (await recv_data(ws, TICKER))["type"] == "snapshot"
        raw = await RawClient(app.port, extensions=OFFER).connect()
        try:
            assert b"sec-websocket-extensions" not in raw.head.lower()
            raw.send_frame(0x1, b'{"op":"ping"}', rsv=0x40)
            assert await raw.read_until_close() == 1002  # RSV1 with nothing negotiated
        finally:
            raw.close()
        _, stats = await http_json(app, "/stats")
        assert stats["hub"]["deflated_frames"] == 0


def frames_of(writes: list[bytes]) -> list[tuple[int, bytes]]:
    """(first byte, payload inflated when RSV1 is set) of every frame written."""
    result = []
    for data in writes:
        pos = 0
        while pos < len(data):
            first, length, pos = data[pos], data[pos + 1] & 0x7F, pos + 2
            if length == 126:
                length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
            payload = data[pos : pos + length]
            result.append((first, fresh_inflate(payload) if first & 0x40 else payload))
            pos += length
    return result


async def test_a_deflate_client_behind_gets_compressed_conflated_frames_then_catches_up() -> None:
    from tests.test_hub import SNAPSHOT, TICKER, TRADE, behind, delta, drain, feed, new_codec, trade
    from tests.test_hub import tick as hub_tick

    hub = Hub(FakeBus(), linger=0)
    tickers, trades = new_codec(TICKER), new_codec(TRADE)
    plain, zipped = FakeSession(), FakeSession(deflate=True)
    for session in (plain, zipped):
        hub.subscribe(session, [TICKER, TRADE])
    feed(tickers, SNAPSHOT, hub)
    await hub_tick()
    for session in (plain, zipped):
        behind(hub, session)
    for i in range(4):
        feed(tickers, delta(f"10{i}.0", 2000 + i), hub)
        feed(trades, trade(i), hub)
    for session in (plain, zipped):
        drain(hub, session)
    await hub_tick()
    plain_frames, zipped_frames = frames_of(plain.writes), frames_of(zipped.writes)
    assert [f for f, _ in zipped_frames] == [0xC1] * len(plain_frames)
    assert [p for _, p in zipped_frames] == [p for _, p in plain_frames]  # the same JSON
    # back on the shared path once its transport stays drained: the shared compressed frame
    zipped.resumed_at = 0.0
    hub.drained(zipped)
    assert zipped.backlog is None
    before = hub.stats()["deflated_frames"]
    feed(tickers, delta("200.0", 3000), hub)
    await hub_tick()
    first, payload = frames_of(zipped.writes)[-1]
    assert first == 0xC1 and orjson.loads(payload)["data"]["price"] == "200.0"
    assert hub.stats()["deflated_frames"] == before + 1

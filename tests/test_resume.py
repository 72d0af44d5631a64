"""Resume after a reconnect, one node, end to end: a real proxy, the simulator, real clients.

A witness client stays connected the whole time and sees every seq; the client that is cut
must end up with exactly the witness's seqs, each once, in order.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from tests.proxyutil import client, recv, running_proxy, running_sim, send, ws_url

TRADE = "mudrex.futures.trade.BTCUSDT"
ARG = "trade:BTCUSDT"
# ~50 trade Messages a second: a market step every 20 ms, nearly every one with a fill
FAST_TRADES = {"trade_rate": 400.0, "market_interval": 0.02}


class Reader:
    """Every data message of one stream a client receives, in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = orjson.loads(raw)
                if message.get("stream") == TRADE and "op" not in message:
                    self.messages.append(message)
        except Exception:
            pass

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages]

    async def until_seq(self, seq: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.messages or self.messages[-1]["seq"] < seq:
            assert time.monotonic() < deadline, f"seq {seq} not reached: {self.seqs[-3:]}"
            await asyncio.sleep(0.02)


async def subscribe_resuming(ws: Any, epoch: str, seq: int) -> dict[str, Any]:
    await send(
        ws, {"op": "subscribe", "args": [ARG], "resume": {ARG: {"epoch": epoch, "seq": seq}}}
    )
    return await recv(ws)


async def cut_and_resume(left: Any, back: Any, cut: float = 2.0, witness_on: Any = None) -> None:
    """A client reads on `left`, is cut for `cut` seconds and resumes on `back`; compare it
    with a witness that never left, on `witness_on` (default `back`, which then holds the
    stream; on `left`, `back` holds nothing and the resume reads the cluster's history)."""
    async with client(witness_on or back) as witness_ws:
        await send(witness_ws, {"op": "subscribe", "args": [ARG]})
        assert (await recv(witness_ws))["success"] is True
        witness = Reader(witness_ws)
        ws = await client(left).__aenter__()
        await send(ws, {"op": "subscribe", "args": [ARG]})
        await recv(ws)
        before = Reader(ws)
        await asyncio.sleep(1.0)
        snapshot = before.messages[0]
        assert snapshot["type"] == "snapshot" and isinstance(snapshot["epoch"], str)
        ws.transport.abort()  # cut: no close handshake, like a dropped mobile link
        await before.task
        last = before.messages[-1]["seq"]
        await asyncio.sleep(cut)
        async with client(back) as again:
            started = time.monotonic()
            ack = await subscribe_resuming(again, snapshot["epoch"], last)
            assert ack["success"] is True and ack["resumed"] == [ARG]
            after = Reader(again)
            await asyncio.sleep(1.0)
            target = after.messages[-1]["seq"]
            await witness.until_seq(target)
            missed = target - last
            print(
                f"\ncut {cut:.0f} s: resumed after seq {last}, {missed} Messages by "
                f"{time.monotonic() - started:.2f} s, stream rate "
                f"{len(witness.messages) / (cut + 3):.0f}/s"
            )
            assert all(m["type"] == "update" for m in after.messages)
            got = before.seqs + [s for s in after.seqs if s <= target]
            expected = [s for s in witness.seqs if before.seqs[0] <= s <= target]
            assert got == expected  # every seq exactly once, in order
            assert got == list(range(got[0], got[-1] + 1))
            assert missed >= 50  # 2 s of a ~50/s stream were bridged


async def test_client_cut_for_2s_resumes_every_seq_exactly_once_on_the_same_node() -> None:
    async with running_sim(**FAST_TRADES) as sim, running_proxy(sim, unsubscribe_linger=5.0) as app:
        await cut_and_resume(app, app)


async def test_resume_with_nobody_else_holding_the_stream_within_the_linger() -> None:
    async with running_sim(**FAST_TRADES) as sim, running_proxy(sim, unsubscribe_linger=5.0) as app:
        async with client(app) as ws:
            await send(ws, {"op": "subscribe", "args": [ARG]})
            await recv(ws)
            reader = Reader(ws)
            await asyncio.sleep(0.5)
        await reader.task
        epoch, last = reader.messages[0]["epoch"], reader.messages[-1]["seq"]
        await asyncio.sleep(2.0)  # nobody holds it; it lingers and history keeps recording
        async with client(app) as ws:
            ack = await subscribe_resuming(ws, epoch, last)
            assert ack["resumed"] == [ARG]
            after = Reader(ws)
            await asyncio.sleep(0.5)
            assert after.seqs[0] == last + 1
            assert after.seqs == list(range(last + 1, last + 1 + len(after.seqs)))


async def test_a_stale_epoch_or_a_too_old_seq_gets_a_snapshot_with_the_current_epoch() -> None:
    async with (
        running_sim(**FAST_TRADES) as sim,
        running_proxy(sim, history_max_messages=20) as app,
        client(app) as holder,
    ):
        await send(holder, {"op": "subscribe", "args": [ARG]})
        await recv(holder)
        reader = Reader(holder)
        await asyncio.sleep(1.5)  # more than 20 Messages
        epoch, last = reader.messages[0]["epoch"], reader.messages[-1]["seq"]
        for position in ({"epoch": "0" * 12, "seq": last}, {"epoch": epoch, "seq": 1}):
            async with client(app) as ws:
                await send(ws, {"op": "subscribe", "args": [ARG], "resume": {ARG: position}})
                ack = await recv(ws)
                assert ack["success"] is True and ack["resumed"] == []
                first = await recv(ws)
                assert first["type"] == "snapshot" and first["epoch"] == epoch
                following = await recv(ws)
                assert following["seq"] == first["seq"] + 1


async def test_the_readme_client_example_resumes_across_a_cut() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = next(b for b in readme.split("```python")[1:] if "async def follow" in b)
    code = code.split("```")[0].replace('asyncio.run(follow("ws://127.0.0.1:8000/ws", print))', "")
    example: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), example)
    got: list[dict[str, Any]] = []
    async with running_sim(**FAST_TRADES) as sim, running_proxy(sim, unsubscribe_linger=5) as app:
        task = asyncio.create_task(example["follow"](ws_url(app), got.append))
        try:
            await until(lambda: len(got) >= 20)
            for session in list(app.server.sessions):  # the network drops every client
                session.transport.disconnect(graceful=False)
            cut_at = len(got)
            await until(lambda: len(got) >= cut_at + 60)
        finally:
            task.cancel()
    seqs = [m["seq"] for m in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing lost, nothing twice
    assert [m["type"] for m in got].count("snapshot") == 1  # resumed, not restarted


async def until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)

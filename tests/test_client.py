"""fastproxy.client end to end: the real proxy and simulator over real sockets, a forwarding TCP
proxy that cuts the line, and small scripted picows servers for close codes and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from fastproxy.app import App
from fastproxy.client import (
    AuthError,
    Book,
    Client,
    ConnectionLimitError,
    Event,
    SubscribeError,
)
from fastproxy.config import Config
from fastproxy.sim import Simulator
from tests.conftest import free_port
from tests.proxyutil import (
    client,
    http_json,
    recv,
    recv_data,
    running_proxy,
    running_sim,
    send,
    subscribe,
    ws_url,
)
from tests.test_client_core import ack
from tests.test_cluster_bus import delete_prefix

TRADE = "trade:BTCUSDT"
TICKER = "ticker:BTCUSDT"
BOOK = "orderbook:50:BTCUSDT"


def fast_client(url: str, **kwargs: Any) -> Client:
    kwargs.setdefault("backoff_base", 0.05)
    kwargs.setdefault("backoff_cap", 0.5)
    kwargs.setdefault("request_timeout", 10.0)
    return Client(url, **kwargs)


async def next_event(
    client_: Client, match: Callable[[Event], bool], timeout: float = 10.0
) -> tuple[Event, list[Event]]:
    """The first event that matches, and every event before it."""
    seen: list[Event] = []

    async def scan() -> Event:
        async for event in client_:
            if match(event):
                return event
            seen.append(event)
        raise AssertionError(f"the client ended; saw {[(e.kind, e.arg) for e in seen]}")

    try:
        return await asyncio.wait_for(scan(), timeout), seen
    except TimeoutError:
        raise AssertionError(
            f"no matching event in {timeout} s; saw {[(e.kind, e.arg) for e in seen][-20:]}"
        ) from None


def is_data(arg: str) -> Callable[[Event], bool]:
    return lambda e: e.kind == "data" and e.arg == arg


# -- what the server on this main supports -------------------------------------------------


async def probe(app: App) -> dict[str, bool]:
    """Server features the client builds on, seen from the wire: `epoch` on snapshots,
    `resumed` in a resuming subscribe's ack, stale-stream accounting."""
    features = {"epoch": False, "resumed": False, "status": False}
    async with client(app) as ws:
        await send(
            ws,
            {
                "op": "subscribe",
                "args": [TICKER],
                "resume": {TICKER: {"epoch": "no-such-epoch", "seq": 1}},
            },
        )
        ack = await recv(ws)
        features["resumed"] = "resumed" in ack
        snapshot = await recv_data(ws, "mudrex.futures.ticker.BTCUSDT")
        features["epoch"] = "epoch" in snapshot
    _, stats = await http_json(app, "/stats")
    features["status"] = "stale" in orjson.dumps(stats).decode()
    return features


def require(features: dict[str, bool], *names: str) -> None:
    missing = [name for name in names if not features[name]]
    if missing:
        pytest.skip(f"the server on this main does not support {', '.join(missing)} yet")


# -- data, state, seq ----------------------------------------------------------------------


async def test_ticker_and_trade_data_flow_with_seq_plus_one_and_the_state_is_kept() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        async with fast_client(ws_url(app)) as c:
            assert await c.subscribe("ticker:btcusdt", TRADE) == ["ticker:btcusdt", TRADE]
            seqs: dict[str, list[int]] = {"ticker:btcusdt": [], TRADE: []}
            kinds: set[str] = set()
            last_ticker: Any = None
            async with asyncio.timeout(15):
                async for event in c:
                    kinds.add(event.kind)
                    if event.kind == "data":
                        assert event.message["stream"].startswith("mudrex.futures.")
                        seqs[event.arg].append(event.message["seq"])  # type: ignore[index]
                        if event.arg == "ticker:btcusdt":
                            last_ticker = event.message["data"]
                    if min(len(s) for s in seqs.values()) >= 5:
                        break
            # the state is that of the latest message received: drain what is queued (taking
            # a queued event does not wait, so nothing new arrives meanwhile)
            while c.pending:
                event = await anext(c)
                if event.arg == "ticker:btcusdt":
                    last_ticker = event.message["data"]
            assert c.state(TICKER) == last_ticker
            assert kinds == {"data"}
            for values in seqs.values():
                assert values == list(range(values[0], values[0] + len(values)))
            assert c.state("ticker:BTCUSDT")["symbol"] == "BTCUSDT"
            with pytest.raises(ValueError, match="event stream"):
                c.state(TRADE)
            assert c.freshness(TICKER) == "live"


async def test_a_reader_that_falls_behind_stops_reading_and_loses_nothing() -> None:
    async with running_sim(trade_rate=40.0) as sim, running_proxy(sim) as app:
        async with fast_client(ws_url(app), max_queue=10) as c:
            await c.subscribe(TICKER, TRADE)
            await asyncio.sleep(3.0)  # ~60 ticker and ~100 trade messages were sent meanwhile
            assert 10 <= c.pending <= 40
            seqs: list[int] = []
            async with asyncio.timeout(15):
                async for event in c:
                    assert event.kind == "data"
                    if event.arg == TRADE:
                        seqs.append(event.message["seq"])
                    if len(seqs) >= 60:
                        break
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert c.reconnects == 0


async def test_bad_and_refused_args_raise_clear_errors() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        async with fast_client(ws_url(app)) as c:
            with pytest.raises(ValueError, match="invalid stream"):
                await c.subscribe("candles:BTCUSDT")
            with pytest.raises(SubscribeError, match="NOPEUSDT") as refused:
                await c.subscribe(TICKER, "trade:NOPEUSDT")
            assert refused.value.rejected[0]["arg"] == "trade:NOPEUSDT"
            assert c.subscriptions == [TICKER]
            event, _ = await next_event(c, is_data(TICKER))
            assert event.message["type"] == "snapshot"


async def test_unsubscribe_stops_a_stream() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        async with fast_client(ws_url(app)) as c:
            await c.subscribe(TICKER, TRADE)
            await next_event(c, is_data(TRADE))
            await c.unsubscribe(TRADE)
            assert c.subscriptions == [TICKER]
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.5
            tickers = 0
            async for event in c:
                assert event.arg == TICKER, event  # nothing of TRADE once unsubscribe returned
                tickers += 1
                if loop.time() > until:
                    break
            assert tickers > 5


# -- reconnects ----------------------------------------------------------------------------


async def test_a_server_restart_gives_gap_then_a_snapshot_for_every_stream() -> None:
    """The node goes away (1001) and comes back empty: nothing can be resumed, so each stream
    gets a `gap`, then its new snapshot; nothing silent."""
    port = free_port()
    async with running_sim() as sim:
        app = App(
            Config(
                host="127.0.0.1",
                port=port,
                bybit_ws_url=sim.ws_url("linear"),
                bybit_rest_url=sim.http_url,
                log_format="text",
            )
        )
        await app.start()
        try:
            async with fast_client(f"ws://127.0.0.1:{port}/ws") as c:
                await c.subscribe(TICKER, TRADE)
                await next_event(c, is_data(TRADE))
                await next_event(c, is_data(TICKER))
                await app.stop()
                app = App(app.config)
                await app.start()
                reconnected, before = await next_event(c, lambda e: e.kind == "reconnected")
                stale = {e.arg for e in before if e.kind == "status"}
                assert stale == {TICKER, TRADE}
                assert all(e.message["state"] == "stale" for e in before if e.kind == "status")
                assert "resumed" not in reconnected.message or not reconnected.message["resumed"]
                order: dict[str, list[str]] = {TICKER: [], TRADE: []}
                async with asyncio.timeout(15):
                    async for event in c:
                        if event.arg in order and event.kind in ("gap", "data"):
                            kind = event.kind
                            if kind == "data":
                                kind = event.message["type"]
                            order[event.arg].append(kind)
                        if all(len(v) >= 2 for v in order.values()):
                            break
                for arg, kinds in order.items():
                    assert kinds[:2] == ["gap", "snapshot"], (arg, kinds)
                assert c.reconnects == 1
                assert c.freshness(TICKER) == c.freshness(TRADE) == "live"
        finally:
            await app.stop()


async def test_pings_from_the_server_are_answered() -> None:
    """A client that sends nothing itself stays connected past the idle timeout: the server's
    pings are answered."""
    # idle after 3 s; the server pings a client quiet for 1 s
    async with running_sim() as sim, running_proxy(sim, client_idle_timeout=3) as app:
        async with fast_client(ws_url(app), ping_interval=3600) as c:
            await c.subscribe(TICKER)
            loop = asyncio.get_running_loop()
            until = loop.time() + 6.5
            async for event in c:
                assert event.kind == "data"
                if loop.time() > until:
                    break
            assert c.reconnects == 0 and c.connected


# -- close codes and refusals, from small scripted servers -----------------------------------


class ScriptedListener(WSListener):  # type: ignore[misc]
    def __init__(self, server: ScriptedServer) -> None:
        super().__init__()
        self.server = server
        self.index = server.connections
        server.connections += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        request = orjson.loads(frame.get_payload_as_bytes())
        self.server.requests.append(request)
        if request.get("op") != "subscribe":
            return
        transport.send(WSMsgType.TEXT, orjson.dumps(ack(request)))
        for arg in request["args"]:
            self.server.seq += 1
            message = {
                "stream": f"mudrex.futures.ticker.{arg.split(':')[1]}",
                "type": "snapshot",
                "data": {"price": str(self.server.seq)},
                "timestamp": 1,
                "source": "mudrex",
                "seq": self.server.seq,
                "epoch": f"E{self.index}",
            }
            transport.send(WSMsgType.TEXT, orjson.dumps(message))
        if self.index == 0 and self.server.close_code is not None:
            transport.send_close(self.server.close_code, b"scripted")
            transport.disconnect()


class ScriptedServer:
    def __init__(self, close_code: int | None = None, http_status: int | None = None) -> None:
        self.close_code = close_code
        self.http_status = http_status
        self.connections = 0
        self.seq = 0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def route(self, request: WSUpgradeRequest) -> Any:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.http_status is not None:
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(self.http_status, b"no"), None
            )
        return ScriptedListener(self)


@asynccontextmanager
async def scripted(server: ScriptedServer) -> AsyncIterator[str]:
    listening = await ws_create_server(server.route, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{listening.sockets[0].getsockname()[1]}/ws"
    finally:
        listening.close()


@pytest.mark.parametrize("code", [4008, 4029, 1001, 4000])
async def test_close_codes_that_mean_try_again_reconnect(code: int) -> None:
    server = ScriptedServer(close_code=code)
    async with scripted(server) as url, fast_client(url) as c:
        await c.subscribe(TICKER)
        first, _ = await next_event(c, is_data(TICKER))
        assert first.message["epoch"] == "E0"
        reconnected, _ = await next_event(c, lambda e: e.kind == "reconnected")
        assert reconnected.message["args"] == [TICKER]
        gap, _ = await next_event(c, lambda e: e.kind == "gap")
        assert gap.arg == TICKER  # the scripted server never resumes
        again, _ = await next_event(c, is_data(TICKER))
        assert again.message["epoch"] == "E1"
        # the reconnect asked to resume where the stream stood
        assert server.requests[-1]["resume"] == {TICKER: {"epoch": "E0", "seq": 1}}


async def test_close_4003_raises_a_clear_error() -> None:
    server = ScriptedServer(close_code=4003)
    async with scripted(server) as url, fast_client(url) as c:
        await c.subscribe(TICKER)
        with pytest.raises(ConnectionLimitError, match="4003"):
            async for _ in c:
                pass
        with pytest.raises(ConnectionLimitError):
            await c.subscribe(TRADE)
    assert server.connections == 1  # no retry


async def test_4003_from_the_real_server_raises() -> None:
    async with running_sim() as sim, running_proxy(sim, max_clients_total=1) as app:
        async with client(app) as first:
            await subscribe(first, TICKER)
            # closed at once: raised by `async with` or by the first call after it
            with pytest.raises(ConnectionLimitError, match="connection limit"):
                async with fast_client(ws_url(app)) as c:
                    await c.subscribe(TICKER)
                    async for _ in c:
                        pass


@pytest.mark.parametrize("status", [401, 403])
async def test_http_401_and_403_raise_auth_error(status: int) -> None:
    server = ScriptedServer(http_status=status)
    async with scripted(server) as url:
        with pytest.raises(AuthError, match=f"HTTP {status}"):
            async with Client(url, api_key="k-123"):
                pass
    assert server.headers[0]["authorization"] == "Bearer k-123"


async def test_the_real_server_refusing_a_key_raises_auth_error() -> None:
    if "api_keys" not in {f for f in Config.__dataclass_fields__}:
        pytest.skip("the server on this main has no API keys yet")
    async with running_sim() as sim, running_proxy(sim, api_keys="good-key") as app:
        with pytest.raises(AuthError, match="401"):
            async with Client(ws_url(app), api_key="bad-key"):
                pass
        async with Client(ws_url(app), api_key="good-key") as c:
            await c.subscribe(TICKER)
            await next_event(c, is_data(TICKER))


async def test_the_first_connection_failing_is_raised_at_once() -> None:
    with pytest.raises(OSError):
        async with Client(f"ws://127.0.0.1:{free_port()}/ws"):
            pass


# -- a TCP cut in the middle ---------------------------------------------------------------


class LineCutter:
    """A forwarding TCP proxy between client and server that can cut every connection and
    refuse new ones for a while (what a flaky network or a load balancer failover does)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_until = 0.0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._silenced: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._abort_all()
        if self._server is not None:
            self._server.close()

    def cut(self, seconds: float) -> None:
        self.cut_until = time.monotonic() + seconds
        self._abort_all()

    def black_hole(self) -> None:
        """The connections open now stay open but carry nothing more, either way (a half-open
        line); new connections work."""
        self._silenced.update(self._writers)

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.cut_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if writer in self._silenced:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@asynccontextmanager
async def line_cutter(app: App) -> AsyncIterator[LineCutter]:
    cutter = LineCutter(app.port)
    await cutter.start()
    try:
        yield cutter
    finally:
        await cutter.stop()


async def test_a_silent_half_open_connection_is_found_by_ping_and_replaced() -> None:
    async with running_sim() as sim, running_proxy(sim) as app, line_cutter(app) as line:
        url = f"ws://127.0.0.1:{line.port}/ws"
        async with fast_client(url, ping_interval=1.0, ping_timeout=1.0) as c:
            await c.subscribe(TICKER)
            await next_event(c, is_data(TICKER))
            line.black_hole()
            loop = asyncio.get_running_loop()
            silenced_at = loop.time()
            stale, _ = await next_event(c, lambda e: e.kind == "status", 15)
            assert stale.message["state"] == "stale"
            assert stale.message["reason"] == "disconnected from the server"
            await next_event(c, lambda e: e.kind == "reconnected", 15)
            found_after = loop.time() - silenced_at
            await next_event(c, is_data(TICKER))
            assert c.reconnects == 1 and line.accepted == 2
            print(f"a silent connection was replaced {found_after:.1f} s after it went quiet")


def record_trades(sim: Simulator, symbol: str) -> list[str]:
    """Every trade id the simulator sends for `symbol`, in order."""
    ids: list[str] = []
    topic = f"publicTrade.{symbol}"
    broadcast = sim._broadcast

    def recording(feed: Any, frames: list[bytes], now: float) -> None:
        if feed.topic == topic and feed.ref.category == "linear":
            for frame in frames:
                ids.extend(trade["i"] for trade in orjson.loads(frame)["data"])
        broadcast(feed, frames, now)

    sim._broadcast = recording  # type: ignore[method-assign]
    return ids


async def test_a_two_second_cut_loses_no_trade() -> None:
    # The linger keeps the stream held upstream while its only client is away (on a real node
    # other clients do that), so that there is something to resume.
    async with (
        running_sim(trade_rate=40.0) as sim,
        running_proxy(sim, unsubscribe_linger=10.0) as app,
        line_cutter(app) as line,
    ):
        require(await probe(app), "epoch", "resumed")
        sent = record_trades(sim, "BTCUSDT")
        received: list[str] = []
        gaps: list[Event] = []
        async with fast_client(f"ws://127.0.0.1:{line.port}/ws") as c:
            await c.subscribe(TRADE)
            loop = asyncio.get_running_loop()
            cut_at = loop.time() + 2.0
            done_at: float | None = None
            async with asyncio.timeout(30):
                async for event in c:
                    if event.kind == "gap":
                        gaps.append(event)
                    if event.kind == "data" and event.arg == TRADE:
                        received.extend(trade["id"] for trade in event.message["data"])
                    if cut_at and loop.time() >= cut_at:
                        line.cut(2.0)
                        cut_at = 0.0
                    if c.reconnects and done_at is None:
                        done_at = loop.time() + 2.0
                    if done_at is not None and loop.time() > done_at:
                        break
        assert c.reconnects >= 1 and line.accepted >= 2
        assert gaps == []
        # every trade the exchange sent between the client's first and last, exactly once
        first, last = sent.index(received[0]), sent.index(received[-1])
        assert received == sent[first : last + 1]
        assert len(received) > 100


async def resumes_across_nodes(first: App, second: App) -> bool:
    """Whether a stream left on one node resumes on another (history shared in Redis)."""
    async with client(first) as ws:
        await subscribe(ws, TRADE)
        snapshot = await recv_data(ws, "mudrex.futures.trade.BTCUSDT")
    if "epoch" not in snapshot:
        return False
    await asyncio.sleep(0.3)
    async with client(second) as ws:
        resume = {TRADE: {"epoch": snapshot["epoch"], "seq": snapshot["seq"]}}
        await send(ws, {"op": "subscribe", "args": [TRADE], "resume": resume})
        ack = await recv(ws)
    return TRADE in (ack.get("resumed") or [])


async def test_a_cut_that_lands_on_another_node_loses_no_trade(redis_url: str) -> None:
    """Cluster mode: the client leaves node A and the load balancer sends it to node B; the
    stream resumes there from the history in Redis."""
    prefix = f"t{os.urandom(5).hex()}"
    bus_url = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    try:
        async with (
            running_sim(trade_rate=40.0) as sim,
            running_proxy(sim, redis_url=bus_url, unsubscribe_linger=10.0) as node_a,
            running_proxy(sim, redis_url=bus_url, unsubscribe_linger=10.0) as node_b,
            line_cutter(node_a) as line,
        ):
            sent = record_trades(sim, "BTCUSDT")  # before the probe starts the stream
            if not await resumes_across_nodes(node_a, node_b):
                pytest.skip("the server on this main does not resume on another node yet")
            received: list[str] = []
            async with fast_client(f"ws://127.0.0.1:{line.port}/ws") as c:
                await c.subscribe(TRADE)
                for _ in range(20):
                    event, before = await next_event(c, is_data(TRADE))
                    assert not [e for e in before if e.kind == "gap"]
                    received.extend(trade["id"] for trade in event.message["data"])
                line.target_port = node_b.port
                line.cut(2.0)
                reconnected, before = await next_event(c, lambda e: e.kind == "reconnected", 20)
                assert reconnected.message["resumed"] == [TRADE]
                received.extend(
                    trade["id"] for e in before if e.kind == "data" for trade in e.message["data"]
                )
                for _ in range(40):
                    event, before = await next_event(c, is_data(TRADE))
                    assert not [e for e in before if e.kind == "gap"]
                    received.extend(trade["id"] for trade in event.message["data"])
            first, last = sent.index(received[0]), sent.index(received[-1])
            assert received == sent[first : last + 1]
    finally:
        await delete_prefix(redis_url, prefix)


def true_book(sim: Simulator, depth: int, symbol: str) -> dict[int, tuple[list, list]]:
    """The simulator's book at every update id it sends (levels as the exchange's strings)."""
    return sim.record_books(f"orderbook.{depth}.{symbol}")  # type: ignore[attr-defined,no-any-return]


def same_book(book: Book, levels: tuple[list, list]) -> bool:
    bids, asks = levels
    return [list(level) for level in book.bids] == bids and [
        list(level) for level in book.asks
    ] == asks


async def test_after_a_two_second_cut_the_book_equals_the_simulators() -> None:
    async with (
        running_sim() as sim,
        running_proxy(sim, unsubscribe_linger=10.0) as app,
        line_cutter(app) as line,
    ):
        truth = true_book(sim, 50, "BTCUSDT")
        async with fast_client(f"ws://127.0.0.1:{line.port}/ws") as c:
            await c.subscribe(BOOK, TRADE)
            await next_event(c, is_data(BOOK))
            checked = 0

            def check_book() -> None:
                nonlocal checked
                book = c.book(BOOK)
                assert book is not None
                if book.update_id in truth:
                    assert same_book(book, truth[book.update_id]), book.update_id
                    checked += 1

            for _ in range(50):
                await next_event(c, is_data(BOOK))
                check_book()
            line.cut(2.0)
            await next_event(c, lambda e: e.kind == "reconnected", timeout=20)
            for _ in range(50):
                await next_event(c, is_data(BOOK))
                check_book()
            assert checked >= 90  # the client's book matched the exchange's, update by update


BOOK_FAULTS = (
    "skip_u",
    "repeat_u",
    "backward_u",
    "drop_delta",
    "crossed_delta",
    "resend_snapshot",
)


async def test_the_book_follows_the_exchange_through_its_faults() -> None:
    """Lost, repeated, backward and crossing deltas, a mid-stream snapshot and an exchange
    restart (u=1): the server rebuilds its book and sends a fresh snapshot, and the client's
    book equals the exchange's at every updateId it holds, without ever having to resync."""
    async with running_sim() as sim, running_proxy(sim) as app:
        truth = true_book(sim, 50, "BTCUSDT")
        async with fast_client(ws_url(app)) as c:
            await c.subscribe(BOOK)
            await next_event(c, is_data(BOOK))
            faults = [name for name in BOOK_FAULTS if hasattr(sim, name)]
            checked = snapshots = 0
            held: set[int] = set()
            for fault in [*faults, "restart_books"]:
                # A repeated or backward `u` makes the exchange name two books with one id:
                # only ids this client had not held before the fault are compared.
                held_before = set(held)
                if fault == "restart_books":
                    sim.restart_books()
                else:
                    getattr(sim, fault)("orderbook.50.BTCUSDT")
                for _ in range(15):
                    event, before = await next_event(c, is_data(BOOK))
                    assert not [e for e in before if e.kind == "gap"], fault
                    snapshots += event.message["type"] == "snapshot"
                    book = c.book(BOOK)
                    assert book is not None
                    held.add(book.update_id)
                    if book.update_id in truth and book.update_id not in held_before:
                        assert same_book(book, truth[book.update_id]), (fault, book.update_id)
                        checked += 1
            assert c.resyncs == 0
            assert snapshots >= 2  # at least the restart and the mid-stream snapshot
            assert checked >= 10 * (len(faults) + 1)


# -- stale and live ------------------------------------------------------------------------


@asynccontextmanager
async def sim_process() -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """The simulator in its own process, so that it can be stopped (SIGSTOP) like a frozen
    exchange."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fastproxy.sim", "--port", str(port), "--ticker-interval", "0.05"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the simulator process did not start") from None
                await asyncio.sleep(0.1)
        yield process, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_stale_then_live_when_the_exchange_freezes_and_comes_back() -> None:
    async with sim_process() as (process, port):
        config = Config(
            host="127.0.0.1",
            port=0,
            bybit_ws_url=f"ws://127.0.0.1:{port}/v5/public/linear",
            bybit_rest_url=f"http://127.0.0.1:{port}",
            log_format="text",
        )
        app = App(config)
        await app.start()
        try:
            require(await probe(app), "status")
            async with fast_client(ws_url(app)) as c:
                await c.subscribe(TICKER)
                await next_event(c, is_data(TICKER))
                loop = asyncio.get_running_loop()
                stopped_at = loop.time()
                os.kill(process.pid, signal.SIGSTOP)
                stale, _ = await next_event(
                    c, lambda e: e.kind == "status" and e.message["state"] == "stale", 15
                )
                stale_after = loop.time() - stopped_at
                assert stale.arg == TICKER and c.freshness(TICKER) == "stale"
                assert stale.message["stream"] == "mudrex.futures.ticker.BTCUSDT"
                assert isinstance(stale.message["since"], int)
                os.kill(process.pid, signal.SIGCONT)
                live, between = await next_event(
                    c, lambda e: e.kind == "status" and e.message["state"] == "live", 60
                )
                assert live.arg == TICKER and c.freshness(TICKER) == "live"
                assert not [e for e in between if e.kind == "data"]  # nothing while stale
                after, _ = await next_event(c, is_data(TICKER))
                assert after.message["type"] == "snapshot"
                assert c.reconnects == 0  # the client's own connection never dropped
                print(f"stale reported {stale_after:.1f} s after the exchange froze")
        finally:
            await app.stop()


# -- the command line ----------------------------------------------------------------------


async def test_python_m_fastproxy_client_prints_a_stream() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fastproxy.client",
            TICKER,
            "--url",
            ws_url(app),
            "--count",
            "3",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err
        lines = [orjson.loads(line) for line in out.splitlines()]
        assert [line["kind"] for line in lines] == ["data"] * 3
        assert lines[0]["arg"] == TICKER and lines[0]["message"]["type"] == "snapshot"


async def test_python_m_fastproxy_client_reports_errors_in_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastproxy.client",
        "bogus:X",
        "--url",
        f"ws://127.0.0.1:{free_port()}/ws",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert err.decode().startswith("error: ")


# -- the README's example, as written ------------------------------------------------------


def readme_example() -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as file:
        readme = file.read()
    section = readme.split("## Python client", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_example_runs_as_written() -> None:
    code = readme_example()
    assert 'Client("ws://127.0.0.1:8000/ws")' in code
    async with running_sim() as sim, running_proxy(sim) as app:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code.replace("ws://127.0.0.1:8000/ws", ws_url(app)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(20):
                while sum(line.startswith("  bid") for line in lines) < 5 or not any(
                    line.startswith("data trade:BTCUSDT") for line in lines
                ):
                    line = await process.stdout.readline()
                    assert line, (lines, await process.stderr.read())  # type: ignore[union-attr]
                    lines.append(line.decode())
        finally:
            process.kill()
            await process.wait()
        assert any(line.startswith("data trade:BTCUSDT") for line in lines)
        assert any(line.startswith("data orderbook:50:BTCUSDT snapshot") for line in lines)

"""The simulator's network shell: a picows server that routes WebSocket paths, REST and control
endpoints, and a driver task that steps the market and fans shared frames out to subscribers.

All protocol and market logic lives in the sans-I/O modules; this file only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol

from fastproxy.sim import rest
from fastproxy.sim.config import SimConfig
from fastproxy.sim.exchange import Exchange
from fastproxy.sim.faults import apply_fault, parse_fault_spec
from fastproxy.sim.feeds import BookFeed, Feed, LiquidationFeed
from fastproxy.sim.instruments import Catalog
from fastproxy.sim.jsonenc import go_dumps
from fastproxy.sim.market import ModelParams
from fastproxy.sim.session import ConnIdFactory, ProtocolOptions, SessionProtocol
from fastproxy.sim.topics import TopicRef

log = logging.getLogger("fastproxy.sim")

WS_PATHS = {
    "/v5/public/linear": "linear",
    "/v5/public/inverse": "inverse",
    "/v5/public/spot": "spot",
    "/v5/public/option": "option",
}
_JSON = {"Content-Type": "application/json"}
_REFUSAL_BODY = {
    403: b"403 Forbidden",
    429: b"429 Too Many Requests",
    502: b"502 Bad Gateway",
    503: b"503 Service Unavailable",
}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_TS = re.compile(rb'"ts":(\d+)')


def _aged(frame: bytes, age_ms: int) -> bytes:
    """The frame with its `ts` moved `age_ms` into the past."""
    return _TS.sub(lambda m: b'"ts":' + str(int(m.group(1)) - age_ms).encode(), frame, count=1)


class _Peer:
    __slots__ = ("ip",)

    def __init__(self) -> None:
        self.ip = ""


class _PeerAwareProtocol(WSProtocol):  # type: ignore[misc]
    """picows's server protocol, recording the client address before the handshake is routed.

    picows hands the listener factory only the HTTP request; per-IP limits need the peer, and
    connection_made is the one place that sees both.
    """

    def __init__(self, peer: _Peer, *args: Any) -> None:
        super().__init__(*args)
        self._peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        self._peer.ip = str(peername[0]) if peername else ""
        super().connection_made(transport)


class _Conn(WSListener):  # type: ignore[misc]
    def __init__(self, sim: Simulator, category: str, ip: str, session: SessionProtocol) -> None:
        super().__init__()
        self.sim = sim
        self.category = category
        self.ip = ip
        self.session = session
        self.transport: WSTransport | None = None
        # set the moment we decide to drop it, so nothing more is written to a dying socket
        self.closed = False
        self.gone = False
        self.last_activity = 0.0
        self.fragments: list[bytes] | None = None

    @property
    def conn_id(self) -> str:
        return self.session.conn_id

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.sim._on_connected(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.sim._on_frame(self, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.sim._on_disconnected(self)

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.send(WSMsgType.TEXT, data)

    def abort(self) -> None:
        """Close the TCP connection without a close frame: the client sees 1006."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.disconnect(graceful=False)


class Simulator:
    """A Bybit V5 public WebSocket + REST simulator with fault injection."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = cfg = config or SimConfig()
        self.catalog = Catalog(
            cfg.symbols, cfg.inverse_symbols, cfg.spot_symbols, cfg.option_symbols
        )
        params = ModelParams(
            volatility=cfg.volatility,
            trade_rate=cfg.trade_rate,
            liquidation_rate=cfg.liquidation_rate,
            book_churn=cfg.book_churn,
            kline_time_scale=cfg.kline_time_scale,
        )
        self.exchange = Exchange(self.catalog, params, cfg.seed, int(cfg.l1_heartbeat * 1000))
        self.options = ProtocolOptions(
            keep_earlier_args=cfg.keep_earlier_args,
            max_args_per_request=cfg.max_args_per_request,
            max_args_chars=cfg.max_args_chars,
        )
        self.port = cfg.port
        self.handshake_attempts = 0
        self.half_dead = False
        self.pong_delay = 0.0
        self.frame_age_ms = 0  # data frames stamped this far in the past (a lagging exchange)
        self.snapshot_before_ack = cfg.snapshot_before_ack
        self._refuse_status: int | None = None
        self._refuse_remaining: int | None = None
        self._conn_ids = ConnIdFactory()
        self._conns: set[_Conn] = set()
        self._subs: dict[tuple[str, str], set[_Conn]] = {}
        self._ip_recent: dict[str, deque[float]] = defaultdict(deque)
        self._ip_open: dict[str, int] = defaultdict(int)
        self.http_requests: dict[str, int] = defaultdict(int)  # REST path -> requests served
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws_logger = logging.getLogger("fastproxy.sim.ws")
        if self._ws_logger.level == logging.NOTSET:
            # picows logs every accepted and closed connection at INFO; quiet unless asked for
            self._ws_logger.setLevel(logging.WARNING)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; ``self.port`` then holds the real port."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        loop = self._loop = asyncio.get_running_loop()
        for spec in self.config.faults:
            name, params = parse_fault_spec(spec)
            apply_fault(self, name, params)
        self._server = await loop.create_server(
            self._make_protocol, self.config.host, self.config.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks = [
            loop.create_task(self._drive(), name="sim-drive"),
            loop.create_task(self._monitor(), name="sim-monitor"),
        ]

    async def stop(self) -> None:
        """Stop serving and abort every connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.drop_all()
        # let the aborted transports deliver connection_lost before the loop may go away
        for _ in range(20):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def ws_url(self, category: str = "linear") -> str:
        return f"ws://{self._url_host()}:{self.port}/v5/public/{category}"

    @property
    def http_url(self) -> str:
        return f"http://{self._url_host()}:{self.port}"

    def _url_host(self) -> str:
        host = self.config.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    # -- introspection ---------------------------------------------------------------------------

    def connection_count(self) -> int:
        return sum(1 for conn in self._conns if not conn.closed)

    def subscription_counts(self) -> dict[str, int]:
        """Subscribed connections per topic; non-linear topics are keyed ``category:topic``."""
        counts: dict[str, int] = {}
        for (category, topic), conns in self._subs.items():
            live = sum(1 for conn in conns if not conn.closed)
            if live:
                counts[topic if category == "linear" else f"{category}:{topic}"] = live
        return counts

    def status(self) -> dict[str, Any]:
        by_category: dict[str, int] = defaultdict(int)
        for conn in self._conns:
            if not conn.closed:
                by_category[conn.category] += 1
        return {
            "port": self.port,
            "connections": self.connection_count(),
            "connections_by_category": dict(by_category),
            "handshake_attempts": self.handshake_attempts,
            "subscriptions": self.subscription_counts(),
            "faults": {
                "half_dead": self.half_dead,
                "pong_delay": self.pong_delay,
                "refuse_status": self._refuse_status,
                "refuse_remaining": self._refuse_remaining,
                "snapshot_before_ack": self.snapshot_before_ack,
                "keep_earlier_args": self.options.keep_earlier_args,
            },
        }

    # -- faults ----------------------------------------------------------------------------------

    def drop_all(self) -> int:
        """Abort every connection without a close frame; returns how many were dropped."""
        dropped = 0
        for conn in list(self._conns):
            if not conn.closed:
                conn.abort()
                dropped += 1
        return dropped

    def set_half_dead(self, on: bool) -> None:
        if self.half_dead and not on:
            # the silence was ours: do not let the idle cut-off punish clients for it
            now = self._time()
            for conn in self._conns:
                conn.last_activity = now
        self.half_dead = on

    def set_frame_age(self, seconds: float) -> None:
        """Stamp every data frame `seconds` in the past from now on (0: stamp them now), as an
        exchange whose data reaches us late does."""
        self.frame_age_ms = max(0, int(seconds * 1000))

    def set_pong_delay(self, seconds: float) -> None:
        self.pong_delay = max(0.0, float(seconds))

    def refuse_handshakes(self, status: int | None, count: int | None = None) -> None:
        """Refuse WS handshakes with HTTP ``status`` (all, or only the next ``count``)."""
        if status is None:
            self._refuse_status = self._refuse_remaining = None
            return
        if status < 400:
            raise ValueError("refusal status must be >= 400")
        if count is not None and count <= 0:
            raise ValueError("count must be positive")
        self._refuse_status, self._refuse_remaining = int(status), count

    def restart_books(self) -> int:
        """Every book topic re-snapshots with u=1; returns how many live books restart."""
        live = 0
        for feed in self.exchange.book_feeds():
            live += feed.active
            feed.restart()
        return live

    def _book_feed(self, topic: str, category: str) -> BookFeed:
        ref = self._ref(topic, category)
        feed = self.exchange.feed(ref, _now_ms())
        if not isinstance(feed, BookFeed):
            raise ValueError(f"{topic} is not an order book topic")
        return feed

    def _ref(self, topic: str, category: str) -> TopicRef:
        ref = self.exchange.parse(category, topic)
        if ref is None:
            raise ValueError(f"unknown {category} topic {topic!r}")
        return ref

    def skip_u(self, topic: str, category: str = "linear") -> None:
        """The next frame of book ``topic`` jumps u by 2 (one update id missing)."""
        self._book_feed(topic, category).skip_next += 1

    def repeat_u(self, topic: str, category: str = "linear") -> None:
        """The next frame of book ``topic`` repeats the previous u."""
        self._book_feed(topic, category).repeat_next += 1

    def backward_u(self, topic: str, category: str = "linear") -> None:
        """The next frame of book ``topic`` carries the u before the previous one."""
        self._book_feed(topic, category).back_next += 1

    def drop_delta(self, topic: str, category: str = "linear") -> None:
        """The next delta of book ``topic`` is lost: its change happens, no frame is sent."""
        self._book_feed(topic, category).drop_next += 1

    def crossed_delta(self, topic: str, category: str = "linear") -> None:
        """The next frame of book ``topic`` is a delta that crosses the book (a bid at the best
        ask), taking the next u; the exchange's book is not changed by it."""
        self._book_feed(topic, category).cross_next += 1

    def record_books(self, topic: str, category: str = "linear") -> dict[int, Any]:
        """Start keeping book ``topic``'s levels per u as sent (for tests); returns that log."""
        feed = self._book_feed(topic, category)
        if feed.truth is None:
            feed.truth = {}
        return feed.truth

    def resend_snapshot(self, topic: str, category: str = "linear") -> None:
        """Push a mid-stream snapshot of a ticker, book or kline topic on its next tick."""
        self.exchange.feed(self._ref(topic, category), _now_ms()).resend_snapshot()

    def inject_trades(self, symbol: str, count: int, category: str = "linear") -> None:
        """One taker order with ``count`` fills; more than 1024 split into frames sharing seq."""
        if count <= 0:
            raise ValueError("count must be positive")
        if self.catalog.get(category, symbol) is None:
            raise ValueError(f"unknown {category} symbol {symbol!r}")
        inst = self.exchange.instrument(category, symbol, _now_ms())
        self.exchange.route(inst, inst.inject_trades(count, _now_ms()))

    def inject_liquidation(self, symbol: str, category: str = "linear") -> None:
        if category not in ("linear", "inverse") or self.catalog.get(category, symbol) is None:
            raise ValueError(f"no allLiquidation stream for {category} {symbol!r}")
        inst = self.exchange.instrument(category, symbol, _now_ms())
        key = (category, f"allLiquidation.{symbol}")
        feed = self.exchange.live["allLiquidation"].get(key)
        if isinstance(feed, LiquidationFeed):
            feed.add([inst.make_liquidation(_now_ms())])

    def set_snapshot_before_ack(self, on: bool) -> None:
        self.snapshot_before_ack = on

    def set_keep_earlier_args(self, on: bool) -> None:
        self.options.keep_earlier_args = on

    def clear_faults(self) -> None:
        self.set_half_dead(False)
        self.pong_delay = 0.0
        self.refuse_handshakes(None)
        self.snapshot_before_ack = False

    # -- handshake routing -----------------------------------------------------------------------

    def _make_protocol(self) -> WSProtocol:
        peer = _Peer()
        return _PeerAwareProtocol(
            peer,
            None,  # host_port (client side only)
            None,  # ws_path (client side only)
            False,  # is_client_side
            partial(self._route, peer),
            self._ws_logger,
            True,  # disconnect_on_exception
            5.0,  # websocket_handshake_timeout
            False,  # enable_auto_ping: Bybit never pings clients
            20.0,
            20.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # enable_auto_pong: pongs are ours to delay or withhold
            1 << 20,  # max_frame_size
            None,  # extra_headers
            8192,  # read_buffer_init_size: client frames are small
        )

    def _route(
        self, peer: _Peer, request: WSUpgradeRequest
    ) -> WSListener | WSUpgradeResponseWithListener | None:
        target = urlsplit(request.path.decode("latin-1"))
        category = WS_PATHS.get(target.path)
        is_upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if category is None and not is_upgrade:
            return self._http(target.path, target.query)
        self.handshake_attempts += 1
        if category is None:
            return None  # picows answers 404
        status = self._refusal(peer.ip)
        if status is not None:
            body = _REFUSAL_BODY.get(status, f"{status}".encode())
            response = WSUpgradeResponse.create_error_response(status, body)
            return WSUpgradeResponseWithListener(response, None)
        if self.config.rate_limit is not None:
            self._ip_recent[peer.ip].append(self._time())
        session = SessionProtocol(category, self._conn_ids(), self.exchange.parse, self.options)
        return _Conn(self, category, peer.ip, session)

    def _refusal(self, ip: str) -> int | None:
        if self._refuse_status is not None:
            status = self._refuse_status
            if self._refuse_remaining is not None:
                self._refuse_remaining -= 1
                if self._refuse_remaining <= 0:
                    self._refuse_status = self._refuse_remaining = None
            return status
        cfg = self.config
        if (
            cfg.max_connections_per_ip is not None
            and self._ip_open[ip] >= cfg.max_connections_per_ip
        ):
            return cfg.rate_limit_status
        if cfg.rate_limit is not None:
            recent = self._ip_recent[ip]
            horizon = self._time() - cfg.rate_limit_window
            while recent and recent[0] < horizon:
                recent.popleft()
            if len(recent) >= cfg.rate_limit:
                return cfg.rate_limit_status
        return None

    def _http(self, path: str, query_text: str) -> WSUpgradeResponseWithListener:
        query = {k: v[0] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
        status, body = 200, b""
        self.http_requests[path] += 1
        if path == "/v5/market/instruments-info":
            body = rest.instruments_info(self.catalog, query, _now_ms())
        elif path == "/v5/market/time":
            body = rest.server_time(time.time_ns())
        elif path == "/_sim/status":
            body = go_dumps(self.status())
        elif path == "/_sim/fault":
            status, body = self._http_fault(query)
        else:
            status, body = 404, go_dumps({"error": "not found", "path": path})
        if status == 200:
            response = WSUpgradeResponse.create_ok_response(body, _JSON)
        else:
            response = WSUpgradeResponse.create_error_response(status, body, _JSON)
        return WSUpgradeResponseWithListener(response, None)

    def _http_fault(self, query: Mapping[str, str]) -> tuple[int, bytes]:
        name = query.get("name", "")
        try:
            result = apply_fault(self, name, query)
        except (ValueError, KeyError) as exc:
            return 400, go_dumps({"ok": False, "error": str(exc)})
        log.info("fault applied: %s %s", name, result)
        return 200, go_dumps({"ok": True, "fault": name, "result": result})

    # -- connection events -----------------------------------------------------------------------

    def _time(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else time.monotonic()

    def _on_connected(self, conn: _Conn) -> None:
        conn.last_activity = self._time()
        self._conns.add(conn)
        self._ip_open[conn.ip] += 1

    def _on_disconnected(self, conn: _Conn) -> None:
        if conn.gone:
            return
        conn.gone = True
        self._conns.discard(conn)
        self._ip_open[conn.ip] -= 1
        if self._ip_open[conn.ip] <= 0:
            del self._ip_open[conn.ip]
        for ref in list(conn.session.topics.values()):
            self._release(conn, ref)

    def _on_frame(self, conn: _Conn, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.PING:
            if not self.half_dead:
                self._answer_ws_ping(conn, frame.get_payload_as_bytes())
            return
        if msg_type == WSMsgType.CLOSE:
            if not self.half_dead and not conn.closed and conn.transport is not None:
                conn.transport.send_close(WSCloseCode.OK)
                conn.closed = True
                conn.transport.disconnect()
            return
        if msg_type == WSMsgType.PONG:
            return
        payload = frame.get_payload_as_bytes()
        if msg_type == WSMsgType.CONTINUATION:
            if conn.fragments is None:
                return
            conn.fragments.append(payload)
            if not frame.fin:
                return
            payload, conn.fragments = b"".join(conn.fragments), None
        elif not frame.fin:
            conn.fragments = [payload]
            return
        if self.half_dead or conn.closed:
            return
        try:
            self._on_command(conn, payload)
        except Exception:
            # one bad command must not take the connection (or the simulator) down
            log.exception("simulator failed to handle a command on %s", conn.conn_id)

    def _answer_ws_ping(self, conn: _Conn, payload: bytes) -> None:
        def pong() -> None:
            if not conn.closed and conn.transport is not None and not self.half_dead:
                conn.transport.send_pong(payload)

        if self.pong_delay > 0 and self._loop is not None:
            self._loop.call_later(self.pong_delay, pong)
        else:
            pong()

    def _on_command(self, conn: _Conn, payload: bytes) -> None:
        now, now_ms = self._time(), _now_ms()
        reply = conn.session.handle(payload, now_ms)
        if reply.kind == "pong":
            conn.last_activity = now
            if self.pong_delay > 0 and self._loop is not None:
                self._loop.call_later(self.pong_delay, self._late_send, conn, reply.frame)
            else:
                conn.send(reply.frame)
            return
        # released before the ack goes out, so no frame of the topic can follow its ack
        for ref in reply.unsubscribed:
            self._release(conn, ref)
        snapshots: list[bytes] = []
        for ref in reply.subscribed:
            snapshots.extend(self._acquire(conn, ref, now_ms).snapshot_frames(now_ms))
        if snapshots:
            conn.last_activity = now
        if self.snapshot_before_ack:
            for frame in snapshots:
                conn.send(frame)
            conn.send(reply.frame)
        else:
            conn.send(reply.frame)
            for frame in snapshots:
                conn.send(frame)

    def _late_send(self, conn: _Conn, frame: bytes) -> None:
        if not self.half_dead:
            conn.send(frame)

    def _acquire(self, conn: _Conn, ref: TopicRef, now_ms: int) -> Feed:
        key = (ref.category, ref.topic)
        subs = self._subs.get(key)
        if not subs:
            subs = self._subs[key] = set()
            feed = self.exchange.activate(ref, now_ms)
        else:
            feed = self.exchange.feed(ref, now_ms)
        subs.add(conn)
        return feed

    def _release(self, conn: _Conn, ref: TopicRef) -> None:
        key = (ref.category, ref.topic)
        subs = self._subs.get(key)
        if subs is None:
            return
        subs.discard(conn)
        if not subs:
            del self._subs[key]
            self.exchange.deactivate(ref)

    # -- periodic work ---------------------------------------------------------------------------

    def _periods(self) -> dict[str, float]:
        cfg = self.config
        # the shortest candle (1 minute) must be seen closing promptly even when time-compressed
        kline = min(cfg.kline_interval, max(0.02, 60.0 / cfg.kline_time_scale / 4))
        periods = {
            "tickers": cfg.ticker_interval,
            "publicTrade": 0.0,
            "kline": kline,
            "allLiquidation": cfg.liquidation_interval,
        }
        for depth, period in cfg.orderbook_intervals.items():
            periods[f"orderbook.{depth}"] = period
        return periods

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        step = max(0.001, self.config.market_interval)
        periods = self._periods()
        next_due: dict[str, float] = {}
        wake = loop.time()
        while True:
            now = loop.time()
            now_ms = _now_ms()
            try:
                self.exchange.step(now_ms)
                for schedule in self.exchange.schedules():
                    period = periods.get(schedule, step)
                    # half a step of slack keeps a period equal to the step from slipping to 2x
                    if now + step / 2 < next_due.get(schedule, 0.0):
                        continue
                    due = next_due.get(schedule, now) + period
                    next_due[schedule] = due if due > now else now + period
                    for feed, frames in self.exchange.tick(schedule, now_ms):
                        self._broadcast(feed, frames, now)
            except Exception:
                log.exception("simulator tick failed")
            wake += step
            delay = wake - loop.time()
            if delay < 0:
                wake, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    def _broadcast(self, feed: Feed, frames: list[bytes], now: float) -> None:
        if self.half_dead:
            return
        subs = self._subs.get((feed.ref.category, feed.topic))
        if not subs:
            return
        if self.frame_age_ms:
            frames = [_aged(frame, self.frame_age_ms) for frame in frames]
        for conn in subs:
            if conn.closed or conn.transport is None:
                continue
            send = conn.transport.send
            try:
                for frame in frames:
                    send(WSMsgType.TEXT, frame)
            except Exception:
                log.exception("send failed on %s; dropping it", conn.conn_id)
                conn.abort()
                continue
            conn.last_activity = now

    async def _monitor(self) -> None:
        cfg = self.config
        # once a second is plenty for the real 600 s cut-off and catches slow readers early
        period = min(1.0, max(0.05, cfg.idle_timeout / 10))
        while True:
            await asyncio.sleep(period)
            now = self._time()
            for conn in list(self._conns):
                if conn.closed or conn.transport is None:
                    continue
                buffered = conn.transport.underlying_transport.get_write_buffer_size()
                if buffered > cfg.max_write_buffer:
                    log.warning("dropping slow reader %s (%d bytes queued)", conn.conn_id, buffered)
                    conn.abort()
                elif not self.half_dead and now - conn.last_activity >= cfg.idle_timeout:
                    log.info("idle cut-off of %s", conn.conn_id)
                    conn.abort()

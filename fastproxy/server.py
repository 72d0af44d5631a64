"""The picows server: WS /ws for clients, plain HTTP GET for /, /health, /ready, /stats, /metrics,
/dashboard.

A thin I/O edge: frames go into the protocol functions and the hub, bytes come out.

Slow clients are seen through both buffers that hold their unread data: the transport's (user
space) and the kernel's send queue (SIOCOUTQ), which TCP_NOTSENT_LOWAT keeps small on purpose so
that the excess waits in user space, where the hub can conflate it. A client over the soft mark
is conflated (SLOW_CLIENT_POLICY=conflate) or, with `drop`, closed with 4008 once it has stayed
there for FANOUT_CALLBACK_TIMEOUT; past the hard cap it is closed at once; one that takes nothing
at all for FANOUT_CALLBACK_TIMEOUT while data waits is closed under either policy. A closed
client's socket is reset after the close grace, so the kernel frees what the peer would not take.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import logging
import socket
import ssl
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

import orjson
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSCloseCode

from fastproxy.access import (
    AddressLimit,
    ClientAddress,
    KeyFileError,
    KeyRing,
    KeyUsage,
    origin_allowed,
    request_token,
)
from fastproxy.config import Config
from fastproxy.handshake import DeflateAgreement, check_upgrade, negotiate_deflate, serve_ws
from fastproxy.history import splice
from fastproxy.hub import Backlog, Hub
from fastproxy.logs import ThrottledLog
from fastproxy.protocol import (
    CLOSE_CONNECTION_LIMIT,
    CLOSE_FLOODING,
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_KEY_REVOKED,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    INTERNAL_ERROR,
    INVALID_JSON,
    MAX_FRAME_SIZE,
    OP_PING,
    OP_SUBSCRIBE,
    RATE_LIMIT_EXCEEDED,
    FloodGuard,
    MessageAssembler,
    ProtocolViolation,
    RequestError,
    SubscribePlan,
    SubscriptionBudget,
    error_reply,
    parse_request,
    plan_subscribe,
    plan_unsubscribe,
    pong_reply,
    subscribe_reply,
    unsubscribe_reply,
)
from fastproxy.streams import Stream
from fastproxy.wire import InflateError, inflate

log = logging.getLogger("fastproxy.server")

# After a close frame, how long a client gets to read what is queued before the socket is cut.
CLOSE_GRACE = 2.0
# Slow clients are judged this often, so one that stalls is closed within
# FANOUT_CALLBACK_TIMEOUT + 2 intervals of its last progress.
HOUSEKEEPING_INTERVAL = 0.5
# Sessions checked between two yields to the loop, so a pass over thousands of clients (or many
# of them closed at once) never holds up the fan-out for long.
HOUSEKEEPING_SLICE = 500
# Taking less than this since the last progress is no progress (a zero-window probe takes a few
# bytes from a client that reads nothing).
PROGRESS_MIN_BYTES = 64
# SIOCOUTQ: bytes in a TCP socket's send queue (sent but not acknowledged, or not yet sent).
SIOCOUTQ = termios.TIOCOUTQ
_INT = b"\0\0\0\0"
_LINGER_RESET = struct.pack("ii", 1, 0)
# Upper edges of the unread-bytes distribution in /stats and /metrics.
UNREAD_BUCKETS = (0, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# A client over its frame rate is not read from for this long: TCP flow control then holds its
# flood in the kernel at no cost to us, instead of every frame being parsed only to be dropped.
# Shorter than the second without refusals that ends a flood, so a flood stays one flood.
FLOOD_READ_PAUSE = 0.5
# Client frames are tiny; picows grows the buffer when one is not.
READ_BUFFER_INIT = 1024
# Connections the kernel may queue before we accept them (it caps this at net.core.somaxconn).
# asyncio's default of 100 overflows in a reconnect storm while the loop is busy with
# handshakes, and each dropped SYN costs that client a 1 s retransmit.
LISTEN_BACKLOG = 4096
# How long a resume may wait for the cluster's history and this node to line up.
RESUME_WAIT = 5.0

_JSON = {"Content-Type": "application/json", "Cache-Control": "no-store"}
_HTML = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # The page loads nothing from anywhere: its own script and style, /stats, /health and /ws.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    ),
}

# Why a session ended, by the close code we sent (the labels of disconnects by reason).
_END_REASONS = {
    CLOSE_GOING_AWAY: "shutdown",
    CLOSE_IDLE: "idle",
    CLOSE_KEY_REVOKED: "key_revoked",
    CLOSE_CONNECTION_LIMIT: "connection_limit",
    CLOSE_TOO_SLOW: "slow_client",
    CLOSE_FLOODING: "flooding",
    CLOSE_TOO_BIG: "too_big",
    CLOSE_PROTOCOL_ERROR: "protocol_error",
}


class ClientSession(WSListener):
    """One downstream client. The hub appends frames to `out`; `flush` writes them in one go."""

    # Slots, not a __dict__: on a subclass of picows' extension type, dict attributes take
    # CPython's generic lookup, which cost the fan-out loop more than its own work; slots are
    # also ~300 bytes a connection smaller.
    __slots__ = (
        "assembler",
        "backlog",
        "budget",
        "bytes_out",
        "closed",
        "compressed",
        "connected_at",
        "deflate",
        "delivered",
        "end_reason",
        "fd",
        "guard",
        "key",
        "last_ping",
        "last_seen",
        "out",
        "over_soft_since",
        "paused",
        "peer",
        "progress_at",
        "raw",
        "resumed_at",
        "server",
        "streams",
        "transport",
        "unread_kernel",
        "unread_user",
        "usage",
    )

    def __init__(
        self,
        server: ProxyServer,
        peer: str,
        key: str | None = None,
        deflate: DeflateAgreement | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.peer = peer  # the client's address (X-Forwarded-For's behind a trusted proxy)
        self.key = key  # the key id it authenticated with, or None
        self.usage: KeyUsage | None = None
        self.end_reason: str | None = None
        # permessage-deflate agreed: the hub gives this client the shared compressed frames.
        self.deflate = deflate is not None
        self.compressed = False  # the fragmented message in progress is compressed
        self.transport: WSTransport | None = None
        self.raw: Any = None  # the asyncio transport under picows, written to directly
        self.out: list[bytes] = []
        self.streams: set[Stream] = set()
        now = time.monotonic()
        self.connected_at = now
        self.last_seen = now
        self.last_ping = now
        self.over_soft_since: float | None = None
        config = server.config
        self.guard = FloodGuard(config.max_message_rate_per_client, now)
        self.budget = SubscriptionBudget(
            config.max_stream_change_rate_per_client,
            config.max_snapshot_rate_per_client,
            config.max_subscriptions_per_client,
            now,
        )
        self.assembler: MessageAssembler | None = None  # made when the client first fragments
        self.closed = False
        self.backlog: Backlog | None = None  # the hub's, while this client is behind
        self.paused = False
        self.resumed_at = now
        self.fd = -1
        # Progress: bytes handed to the transport, minus what the transport and the kernel still
        # hold, is what the client has taken; it not growing while data waits is a stall.
        self.bytes_out = 0
        self.delivered = 0
        self.progress_at = now
        self.unread_user = 0
        self.unread_kernel = 0

    # -- picows callbacks ----------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        raw = self.raw = transport.underlying_transport
        self._shared_path_limits()
        sock = raw.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            self.server.tune_socket(sock)
        self.server.admit(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.closed:
            # Closing: the client's close reply ends it; anything else is read and discarded,
            # because closing a socket with unread input makes the kernel reset it and the
            # client would never read our close frame.
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()
            return
        now = time.monotonic()
        self.last_seen = now
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:  # honoured whatever the rate: it ends the session
            self.end_reason = "client_closed"
            self.closed = True
            self.server.forget(self)
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and not self.deflate):
            self.violation(CLOSE_PROTOCOL_ERROR, "reserved bit set; no extension was negotiated")
            return
        compressed = frame.rsv1
        if compressed and msg_type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            # RFC 7692 6: only the first frame of a data message may say it is compressed.
            self.violation(CLOSE_PROTOCOL_ERROR, "RSV1 set on a control or continuation frame")
            return
        # Every frame counts, control frames too: answering a ping costs as much as a request.
        verdict = self.guard.check(now)
        if verdict:
            self._refuse(verdict)
            return
        if msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
            return
        if msg_type == WSMsgType.PONG:
            return
        assembler = self.assembler
        if frame.fin and assembler is None and msg_type != WSMsgType.CONTINUATION:
            payload = frame.get_payload_as_bytes()
        else:
            if assembler is None:
                assembler = self.assembler = MessageAssembler()
            try:
                message = assembler.feed(msg_type, frame.fin, frame.get_payload_as_memoryview())
            except ProtocolViolation as exc:
                self.violation(exc.code, exc.reason)
                return
            if msg_type != WSMsgType.CONTINUATION:
                self.compressed = compressed
            if message is None:
                return
            msg_type, payload = message
            compressed = self.compressed
        if compressed:
            try:
                # client_no_context_takeover was agreed: each message inflates alone.
                payload = inflate(payload, MAX_FRAME_SIZE)
            except InflateError as exc:
                self.violation(CLOSE_TOO_BIG if exc.too_big else CLOSE_PROTOCOL_ERROR, exc.reason)
                return
        if msg_type == WSMsgType.BINARY:
            self.reply(error_reply(INVALID_JSON, "Binary frames are not supported; send JSON text"))
            return
        try:
            self.server.handle_request(self, payload, now)
        except ProtocolViolation as exc:
            self.violation(exc.code, exc.reason)
        except Exception:
            self.server.bug_log.exception("request failed", extra={"peer": self.peer})
            self.reply(error_reply(INTERNAL_ERROR, "Internal error"))

    def _refuse(self, verdict: int) -> None:
        """A frame over the rate limit: dropped unanswered, a fragmented message with it."""
        if self.assembler is not None:
            self.assembler.discard()
        raw = self.raw
        if verdict != FloodGuard.CLOSE and raw.is_reading():
            raw.pause_reading()
            asyncio.get_running_loop().call_later(FLOOD_READ_PAUSE, self._resume_reading)
        if verdict == FloodGuard.WARN:
            self.reply(
                error_reply(
                    RATE_LIMIT_EXCEEDED,
                    f"More than {self.server.config.max_message_rate_per_client} "
                    "messages a second; messages are being dropped",
                )
            )
        elif verdict == FloodGuard.CLOSE:
            # Read again while closing: unread input would make the kernel reset the
            # connection, and the client would never see the close code.
            self._resume_reading()
            self.server.count_drop("flooding")
            self.close(CLOSE_FLOODING, "kept flooding after RATE_LIMIT_EXCEEDED")

    def _resume_reading(self) -> None:
        raw = self.raw
        if not raw.is_closing() and not raw.is_reading():
            raw.resume_reading()

    def violation(self, code: int, reason: str) -> None:
        """A frame that breaks RFC 6455: closed with its code (1002, 1007, 1009)."""
        self.server.count_drop("too_big" if code == CLOSE_TOO_BIG else "protocol_error")
        self.close(code, reason)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        reason = self.end_reason
        if reason is None:
            # picows itself closes with 1009 when a frame is over max_frame_size
            handshake = transport.close_handshake
            sent = handshake.sent if handshake is not None else None
            if sent is not None and sent.code == WSCloseCode.MESSAGE_TOO_BIG:
                reason = "too_big"
                self.server.count_drop(reason)
            else:
                reason = "connection_lost"
        self.closed = True
        self.server.forget(self)
        self.server.count_disconnect(reason)

    def pause_writing(self) -> None:
        now = time.monotonic()
        self.paused = True
        if self.backlog is not None or self.closed:
            return
        if self.server.conflate:
            self.server.hub.fall_behind(self)
            # Behind: hand the transport the next batch only once it has written the last one
            # into the kernel, so what the client reads next is at most one batch old.
            self.raw.set_write_buffer_limits(high=0, low=0)
        elif self.over_soft_since is None:
            self.over_soft_since = now

    def resume_writing(self) -> None:
        self.paused = False
        self.resumed_at = time.monotonic()
        self.over_soft_since = None
        if self.backlog is not None and not self.closed:
            self.server.hub.drained(self)

    def caught_up(self) -> None:
        self._shared_path_limits()

    def _shared_path_limits(self) -> None:
        soft = self.server.config.write_buffer_soft_limit
        self.raw.set_write_buffer_limits(high=soft, low=soft // 4)

    # -- output --------------------------------------------------------------------------

    def reply(self, payload: bytes) -> None:
        self.server.hub.send_payload(self, payload)

    def flush(self) -> None:
        out = self.out
        if not out:
            self.server.flushes_without_write += 1
            return
        if self.closed:
            self.server.flushes_without_write += 1
            out.clear()
            return
        count = len(out)
        data = out[0] if count == 1 else b"".join(out)
        out.clear()
        raw = self.raw
        raw.write(data)
        size = len(data)
        self.bytes_out += size
        server = self.server
        server.frames_sent += count
        server.bytes_sent += size
        if raw.get_write_buffer_size() > server.hard_limit:
            server.count_drop("slow_client")
            self.close(CLOSE_TOO_SLOW, "too slow: unread data passed the write-buffer cap")

    def kernel_unsent(self) -> int:
        """Bytes in the kernel's send queue for this client (0 when it cannot be read)."""
        if self.fd < 0:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(self.fd, SIOCOUTQ, _INT))[0]
        except OSError:
            return 0

    def close(self, code: int, reason: str) -> None:
        """Close with a code the client can read: the close frame goes out behind what is
        already queued, our side is half-closed, and the socket is cut when the client answers
        or after a short grace, whichever comes first."""
        if self.closed:
            return
        self.closed = True
        self.end_reason = _END_REASONS.get(code, "closed")
        self.out.clear()
        self.server.forget(self)
        transport = self.transport
        if transport is None:
            return
        try:
            transport.send_close(code, reason.encode()[:120])
            if self.raw.can_write_eof():
                self.raw.write_eof()
        except Exception:
            self._abort()
            return
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        """Cut the connection; if the peer left data unread, reset it (SO_LINGER 0) so the
        kernel frees that data now instead of retrying it for minutes in FIN-WAIT-1."""
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if self.fd >= 0 and (self.raw.get_write_buffer_size() or self.kernel_unsent()):
            sock = self.raw.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.server.resets += 1
        transport.disconnect(graceful=False)


class KeyedSession(ClientSession):
    """A client that connected with an API key: what it is sent is counted under the key id.
    A subclass, so that sessions without a key pay nothing for it on every flush."""

    __slots__ = ()

    def flush(self) -> None:
        count = 0 if self.closed else len(self.out)
        ClientSession.flush(self)
        if self.usage is not None:
            self.usage.messages_sent += count


class Seats:
    """Connection slots under MAX_CLIENTS_TOTAL, counted in this process. With workers, the
    supervisor hands each worker one that counts for the whole machine."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1


class ProxyServer:
    """Owns the listening socket and every client session of this node."""

    def __init__(
        self,
        config: Config,
        hub: Hub,
        symbol_known: Callable[[str], bool | None] | None = None,
        health: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        metrics: Callable[[], bytes] | None = None,
        version: str = "",
        seats: Seats | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self.seats = seats or Seats(config.max_clients_total)
        self.symbol_known = symbol_known
        self._health = health
        self._stats = stats
        self._metrics = metrics
        self.version = version
        self.sessions: set[ClientSession] = set()
        self.ready = False
        self.draining = False
        self._server: asyncio.Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.port = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.connections_total = 0
        self.requests = 0
        self.drops: dict[str, int] = {}
        # Socket writes are the hub's session flushes minus these (a closed session's, an
        # emptied one's): the hot path counts nothing per write. frames_sent / writes is the
        # coalescing factor.
        self.flushes_without_write = 0
        self.refused: dict[str, int] = {}  # HTTP refusals of /ws before the upgrade, by reason
        self.disconnects: dict[str, int] = {}  # ended sessions, by reason
        self.keys = KeyRing(config.api_keys, config.api_keys_file)
        self.key_usage: dict[str, KeyUsage] = {}
        self.addresses = ClientAddress(config.trusted_proxies)
        self.per_address = AddressLimit(config.max_connections_per_ip)
        self.scheme = "https" if config.tls_cert else "http"
        self._tasks: set[asyncio.Task[None]] = set()
        self.resets = 0  # closed sockets reset because the peer left data unread
        self.ping_interval = max(1.0, min(30.0, config.client_idle_timeout / 3))
        self.hard_limit = config.write_buffer_hard_limit  # read on every flush
        self.conflate = config.slow_client_policy == "conflate"
        self._socket_options: list[tuple[int, int, int]] = []
        if config.client_notsent_lowat:
            self._socket_options.append(
                (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, config.client_notsent_lowat)
            )
        if config.client_sndbuf:
            self._socket_options.append((socket.SOL_SOCKET, socket.SO_SNDBUF, config.client_sndbuf))
        # What clients cause is logged through these: rate-limited, a client's fault WARNING
        # at most, our own bugs (an exception a request raised) ERROR.
        self.client_log = ThrottledLog(log)
        self.bug_log = ThrottledLog(log, ceiling=logging.ERROR)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve_ws(
            self._route,
            self.config.host,
            self.config.port,
            max_frame_size=MAX_FRAME_SIZE,
            enable_auto_pong=False,  # we answer pings ourselves: they count as client activity
            enable_auto_ping=False,
            read_buffer_init_size=READ_BUFFER_INIT,
            websocket_handshake_timeout=10,
            # An adapter, not a logger name: given a Logger, picows makes a child Logger per
            # connection and keeps it for the connection's life (~0.6 KiB each).
            logger_name=ThrottledLog(logging.getLogger("picows.server")),
            with_peer=True,  # the router gets the TCP peer: per-address limits answer 429
            ssl=self._tls_context(),
            reuse_address=True,
            # Workers each listen on the same port; the kernel spreads connections over them.
            reuse_port=self.config.workers > 1,
            backlog=LISTEN_BACKLOG,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        self.ready = True

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    def reload_keys(self) -> None:
        """SIGHUP: re-read API_KEYS_FILE. Clients whose key is gone are closed with 4001."""
        try:
            ids = self.keys.reload()
        except KeyFileError as exc:
            log.error("API keys not reloaded; the old ones stay", extra={"error": str(exc)})
            return
        accepted = set(ids)
        revoked = [s for s in self.sessions if s.key is not None and s.key not in accepted]
        for session in revoked:
            session.close(CLOSE_KEY_REVOKED, "API key revoked")
        log.info(
            "API keys reloaded",
            extra={"keys": len(ids), "key_ids": ",".join(ids), "clients_closed": len(revoked)},
        )

    async def drain(self) -> None:
        """Graceful stop: refuse newcomers, close every client with 1001, stop listening."""
        self.ready = False
        self.draining = True
        for session in list(self.sessions):
            session.close(CLOSE_GOING_AWAY, "server shutting down")
        deadline = time.monotonic() + CLOSE_GRACE
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 3.0)

    # -- routing -------------------------------------------------------------------------

    def _route(self, request: WSUpgradeRequest, peer: str = "") -> Any:
        path, _, query = request.path.partition(b"?")
        if path == b"/ws":
            refusal = check_upgrade(request.headers)
            if refusal is not None:
                return refusal.with_listener()
            if self.draining or not self.ready:
                return self._refuse("draining", 503, "shutting down")
            headers = request.headers
            if self.config.allowed_origins and not origin_allowed(
                headers.get("origin"), self.config.allowed_origins
            ):
                return self._refuse("origin", 403, "this origin is not allowed")
            key = None
            if self.keys.enabled:
                key = self.keys.check(request_token(headers.get("authorization"), query))
                if key is None:
                    return self._refuse(
                        "unauthorized", 401, "an API key is required: Bearer header or ?token="
                    )
            address = self.addresses.resolve(peer, headers.get("x-forwarded-for"))
            if self.per_address.full(address):
                return self._refuse("address_limit", 429, "too many connections from this address")
            connection = headers.get("connection", "")
            # Browsers and proxies send "keep-alive, Upgrade"; picows only accepts "upgrade".
            if connection.lower() != "upgrade" and "upgrade" in (
                token.strip().lower() for token in connection.split(",")
            ):
                headers["Connection"] = "Upgrade"
            agreement = None
            if self.config.compression:
                offers = headers.getall("sec-websocket-extensions", ())
                agreement = negotiate_deflate(", ".join(offers)) if offers else None
            kind = ClientSession if key is None else KeyedSession
            session = kind(self, address, key, agreement)
            if agreement is None:
                return session
            response = WSUpgradeResponse.create_101_response(
                {"Sec-WebSocket-Extensions": agreement.header}
            )
            return WSUpgradeResponseWithListener(response, session)
        if path == b"/":
            return _http(
                200,
                {
                    "name": "fastproxy",
                    "version": self.version,
                    "websocket": "/ws",
                    "health": "/health",
                    "ready": "/ready",
                    "metrics": "/metrics",
                    "dashboard": "/dashboard",
                },
            )
        if path == b"/health":
            healthy, body = self._health() if self._health else (True, {})
            body = {"status": "healthy" if healthy else "degraded", **body}
            body.setdefault("connections", len(self.sessions))
            return _http(200 if healthy else 503, body)
        if path == b"/ready":
            return _http(200 if self.ready else 503, {"ok": self.ready})
        if path == b"/dashboard":
            from fastproxy.dashboard import page

            response = WSUpgradeResponse.create_ok_response(page(), _HTML)
            return WSUpgradeResponseWithListener(response, None)
        if path in (b"/stats", b"/metrics") and not self._operator_allowed(request, query):
            return _http(
                401,
                {
                    "error": "unauthorized",
                    "message": "a token is required: Bearer header or ?token=",
                },
                {"WWW-Authenticate": 'Bearer realm="fastproxy"'},
            )
        if path == b"/stats":
            return _http(200, self._stats() if self._stats else {})
        if path == b"/metrics" and self._metrics is not None:
            response = WSUpgradeResponse.create_ok_response(
                self._metrics(), {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
            )
            return WSUpgradeResponseWithListener(response, None)
        return _http(404, {"error": "not found"})

    def _refuse(self, reason: str, status: int, message: str) -> WSUpgradeResponseWithListener:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        extra = {"WWW-Authenticate": 'Bearer realm="fastproxy"'} if status == 401 else None
        return _http(status, {"error": reason, "message": message}, extra)

    def _operator_allowed(self, request: WSUpgradeRequest, query: bytes) -> bool:
        """/stats and /metrics: METRICS_TOKEN when set, else any API key when keys are set."""
        token = self.config.metrics_token
        if not token and not self.keys.enabled:
            return True
        presented = request_token(request.headers.get("authorization"), query)
        if presented is None:
            return False
        if token:
            return hmac.compare_digest(presented.encode(), token.encode())
        return self.keys.check(presented) is not None

    # -- sessions ------------------------------------------------------------------------

    def admit(self, session: ClientSession) -> None:
        self.connections_total += 1
        if self.draining:
            session.close(CLOSE_GOING_AWAY, "server shutting down")
            return
        if not self.seats.take():
            self.count_drop("connection_limit")
            session.close(CLOSE_CONNECTION_LIMIT, "connection limit reached")
            return
        self.sessions.add(session)
        self.per_address.add(session.peer)
        if session.key is not None:
            usage = self.key_usage.get(session.key)
            if usage is None:
                usage = self.key_usage[session.key] = KeyUsage()
            usage.clients += 1
            usage.connections += 1
            session.usage = usage

    def tune_socket(self, sock: Any) -> None:
        """Bound what the kernel holds for one client (the rest waits in user space)."""
        for level, option, value in self._socket_options:
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:
                self.client_log.warning(
                    "cannot set a client socket option", extra={"reason": str(exc)}
                )

    def forget(self, session: ClientSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.per_address.remove(session.peer)
            if session.usage is not None:
                session.usage.clients -= 1
            self.seats.give()
            self.hub.drop(session)

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def count_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if reason not in ("connection_limit",):
            self.client_log.info("client dropped", extra={"reason": reason})

    def handle_request(self, session: ClientSession, payload: bytes, now: float) -> None:
        """Answer one request. Raises ProtocolViolation for a payload that is not text."""
        self.requests += 1
        if session.usage is not None:
            session.usage.requests += 1
        try:
            request = parse_request(payload)
            if request.op == OP_PING:
                session.reply(pong_reply(int(time.time() * 1000), request.req_id))
            elif request.op == OP_SUBSCRIBE:
                budget = session.budget
                refusal = budget.exhausted(now, len(request.args))
                if refusal is None:
                    plan = plan_subscribe(
                        request.args,
                        session.streams,
                        self.config.max_subscriptions_per_client,
                        self.symbol_known,
                        request.req_id,
                        request.resume,
                    )
                    refusal = budget.admit(now, len(plan.new_streams))
                if refusal is not None:
                    refusal.req_id, refusal.args_refused = request.req_id, request.args
                    raise refusal
                # decided and applied in this one tick: nothing is delivered in between
                replays = self.hub.resume(plan.resume) if plan.resume else {}
                if plan.resume and self.hub.bus.shared_history:
                    shared = [s for s in plan.resume if s not in replays]
                    if shared:  # the cluster's history may bridge what this node's cannot
                        self.hub.hold(shared)
                        task = asyncio.get_running_loop().create_task(
                            self._resume_shared(session, plan, request.req_id, replays, shared)
                        )
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                        return
                session.reply(subscribe_reply(plan, request.req_id, list(replays)))  # ack first
                if plan.new_streams:
                    self.hub.subscribe(session, plan.new_streams, replays)
            else:
                unplan = plan_unsubscribe(request.args, session.streams)
                session.budget.charge_unsubscribe(now, len(unplan.streams))
                self.hub.unsubscribe(session, unplan.streams)
                session.reply(unsubscribe_reply(unplan, request.req_id))
        except RequestError as exc:
            session.reply(exc.reply())

    async def _resume_shared(
        self,
        session: ClientSession,
        plan: SubscribePlan,
        req_id: Any,
        replays: dict[Stream, list[bytes]],
        shared: list[Stream],
    ) -> None:
        """Resume from the cluster's history: once this node receives every Message of the
        streams (so nothing can fall between), fetch what the client missed, wait until this
        node has received up to where that ends, join the two, then ack and subscribe in one
        tick. Anything that cannot be bridged in time takes the snapshot path."""
        hub, bus = self.hub, self.hub.bus
        assert plan.resume is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESUME_WAIT
        try:
            while not all(bus.ready(s) for s in shared) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            shared = [s for s in shared if bus.ready(s)]  # the others: snapshots
            fetched = await asyncio.gather(
                *(bus.history_after(s, plan.resume[s].epoch, plan.resume[s].seq) for s in shared),
                return_exceptions=True,
            )
            for stream, got in zip(shared, fetched, strict=True):
                if not isinstance(got, list):
                    continue
                position = plan.resume[stream]
                upto = got[-1][0] if got else position.seq
                while loop.time() < deadline:  # this node catches up with what was fetched
                    kept = hub.last_kept(stream)
                    if kept is not None and (kept[0] != position.epoch or kept[1] >= upto):
                        break
                    await asyncio.sleep(0.01)
                replay = splice(hub.history, stream.stream_id, position, got, time.monotonic())
                if replay is not None:
                    replays[stream] = replay
                else:
                    log.info(
                        "resume not bridged; a snapshot instead",
                        extra={
                            "stream": stream.stream_id,
                            "fetched": len(got),
                            "upto": upto,
                            "here": hub.history.span(stream.stream_id),
                        },
                    )
        except Exception:
            log.exception("resume from shared history failed; sending snapshots")
        if session.closed:
            return
        session.reply(subscribe_reply(plan, req_id, list(replays)))
        if plan.new_streams:
            hub.subscribe(session, plan.new_streams, replays)

    async def _housekeep(self) -> None:
        """Twice a second: slow clients judged, idle clients out, quiet clients pinged."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            sessions = list(self.sessions)
            for start in range(0, len(sessions), HOUSEKEEPING_SLICE):
                if start:
                    await asyncio.sleep(0)
                now = time.monotonic()
                for session in sessions[start : start + HOUSEKEEPING_SLICE]:
                    if not session.closed:
                        self._check(session, now)

    def _check(self, session: ClientSession, now: float) -> None:
        config = self.config
        slow_limit = config.fanout_callback_timeout
        user = session.raw.get_write_buffer_size() if session.raw is not None else 0
        kernel = session.kernel_unsent()
        session.unread_user, session.unread_kernel = user, kernel
        unread = user + kernel
        delivered = session.bytes_out - unread
        if unread == 0 or delivered > session.delivered + PROGRESS_MIN_BYTES:
            session.delivered = delivered
            session.progress_at = now
        elif now - session.progress_at > slow_limit:
            self._too_slow(session, f"took nothing for {slow_limit:g} s")
            return
        backlog = session.backlog
        if backlog is not None:
            since = backlog.first_event_at
            if since is not None and now - since > slow_limit:
                self._too_slow(session, f"events undelivered for {slow_limit:g} s")
                return
            if backlog.event_bytes > self.hard_limit:
                self._too_slow(session, "undelivered events passed the write-buffer cap")
                return
        elif not self.conflate:
            if unread > self.hard_limit:
                self._too_slow(session, "unread data passed the write-buffer cap")
                return
            if unread > config.write_buffer_soft_limit:
                if session.over_soft_since is None:
                    session.over_soft_since = now
            elif not session.paused:
                session.over_soft_since = None
            if session.over_soft_since is not None and now - session.over_soft_since > slow_limit:
                self._too_slow(session, "stayed over the write-buffer mark")
                return
        quiet = now - session.last_seen
        if quiet > config.client_idle_timeout:
            self.count_drop("idle")
            session.close(CLOSE_IDLE, "idle timeout")
        elif quiet > self.ping_interval and now - session.last_ping > self.ping_interval:
            session.last_ping = now
            if session.transport is not None:
                session.transport.send_ping()

    def _too_slow(self, session: ClientSession, why: str) -> None:
        self.count_drop("slow_client")
        self.client_log.info("slow client closed", extra={"peer": session.peer, "reason": why})
        session.close(CLOSE_TOO_SLOW, f"too slow: {why}")

    def stats(self) -> dict[str, Any]:
        return {
            "connected": len(self.sessions),
            "connections_total": self.connections_total,
            "max_clients": self.config.max_clients_total,
            "requests": self.requests,
            "messages_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "drops": dict(self.drops),
            "writes": self.hub.flushes - self.flushes_without_write,
            "refused": dict(self.refused),
            "disconnects": dict(self.disconnects),
            "access": {
                "api_keys": self.keys.enabled,
                "max_connections_per_ip": self.per_address.limit,
                "allowed_origins": len(self.config.allowed_origins),
                "tls": bool(self.config.tls_cert),
            },
            "keys": {
                kid: {
                    "clients": u.clients,
                    "connections": u.connections,
                    "messages_sent": u.messages_sent,
                    "requests": u.requests,
                }
                for kid, u in sorted(self.key_usage.items())
            },
            "slow_clients": self.slow_client_stats(),
        }

    def slow_client_stats(self) -> dict[str, Any]:
        """Clients behind and how much they have not read, as of the last housekeeping pass."""
        user = [0] * (len(UNREAD_BUCKETS) + 1)
        kernel = [0] * (len(UNREAD_BUCKETS) + 1)
        user_total = kernel_total = 0
        for session in self.sessions:
            user[_bucket(session.unread_user)] += 1
            kernel[_bucket(session.unread_kernel)] += 1
            user_total += session.unread_user
            kernel_total += session.unread_kernel
        edges = [str(edge) for edge in UNREAD_BUCKETS] + ["+Inf"]
        return {
            "policy": self.config.slow_client_policy,
            "conflating": self.hub.clients_behind,
            "conflated_messages": self.hub.conflated,
            "resets": self.resets,
            # clients by unread bytes, each count under the upper edge of its bucket
            "unread_bytes_user": dict(zip(edges, user, strict=True)),
            "unread_bytes_kernel": dict(zip(edges, kernel, strict=True)),
            "unread_bytes_user_total": user_total,
            "unread_bytes_kernel_total": kernel_total,
        }


def _bucket(value: int) -> int:
    for index, edge in enumerate(UNREAD_BUCKETS):
        if value <= edge:
            return index
    return len(UNREAD_BUCKETS)


def _http(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> WSUpgradeResponseWithListener:
    """A JSON answer to a plain GET (picows sends it with `Connection: close`)."""
    data = orjson.dumps(body)
    all_headers = _JSON if headers is None else {**_JSON, **headers}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(data, all_headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, data, all_headers)
    return WSUpgradeResponseWithListener(response, None)

"""The client's HTTP request head, checked before picows sees the connection.

picows parses the head in Cython and answers what it refuses itself: a method other than GET
or a version other than HTTP/1.1 with a 400 whose body is a Python bytes repr, an oversized
head by dropping the connection without a word. So each connection starts with a small guard
protocol that reads the head, answers those cases as HTTP says (405 with `Allow`, 400, 431)
and otherwise hands the transport, with the bytes it read, to picows' protocol (the way picows
itself hands a connection over after TLS). From then on picows reads the socket directly:
nothing of this runs once a connection is upgraded.

`check_request_head` and `check_upgrade` are plain functions (no I/O); the guard is the shell.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from picows import WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSAutoPingStrategy, WSProtocol  # type: ignore[attr-defined]

# picows drops a head of 16 KiB or more; ours is refused with 431 just below that.
MAX_REQUEST_HEAD = 16 * 1024 - 1
MAX_HEADER_FIELDS = 100
WEBSOCKET_VERSION = "13"
# After a refusal, how long the client gets to read it while what it still sends is discarded
# (closing with unread input would make the kernel reset the connection first).
REFUSAL_GRACE = 2.0

_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP error answer: status, a message for the JSON body, extra headers."""

    status: int
    error: str
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> WSUpgradeResponse:
        return WSUpgradeResponse.create_error_response(
            self.status, orjson.dumps({"error": self.error}), _JSON_HEADERS + self.headers
        )

    def with_listener(self) -> WSUpgradeResponseWithListener:
        """For picows' router: the answer it sends (with `Connection: close`) instead of 101."""
        return WSUpgradeResponseWithListener(self.response(), None)

    def to_bytes(self) -> bytes:
        response = self.response()
        response.headers["Connection"] = "close"
        return bytes(response.to_bytes())


TOO_LARGE = Refusal(431, f"request head too large (at most {MAX_REQUEST_HEAD} bytes)")


def check_request_head(head: bytes) -> Refusal | None:
    """What to answer instead of serving a request head (without its blank line), or None."""
    if len(head) > MAX_REQUEST_HEAD:
        return TOO_LARGE
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return Refusal(400, "malformed request line; expected METHOD /path HTTP/1.1")
    method, _, version = parts
    if version != b"HTTP/1.1":
        if version.startswith(b"HTTP/"):
            return Refusal(400, "HTTP/1.1 required")
        return Refusal(400, "malformed request line; expected METHOD /path HTTP/1.1")
    if method != b"GET":
        return Refusal(405, "method not allowed; use GET", (("Allow", "GET"),))
    if head.count(b"\r\n") > MAX_HEADER_FIELDS:
        return Refusal(431, f"too many header fields (at most {MAX_HEADER_FIELDS})")
    return None


def check_upgrade(headers: Mapping[str, str]) -> Refusal | None:
    """RFC 6455 4.2.2: a version we do not speak is answered 426 with the one we do."""
    if headers.get("sec-websocket-version", "").strip() != WEBSOCKET_VERSION:
        return Refusal(
            426,
            f"unsupported WebSocket version; this server speaks version {WEBSOCKET_VERSION}",
            (("Sec-WebSocket-Version", WEBSOCKET_VERSION),),
        )
    return None


PERMESSAGE_DEFLATE = "permessage-deflate"
DEFLATE_ANSWER = f"{PERMESSAGE_DEFLATE}; server_no_context_takeover; client_no_context_takeover"


@dataclass(frozen=True, slots=True)
class DeflateAgreement:
    """permessage-deflate as agreed with one client (RFC 7692)."""

    header: str  # the Sec-WebSocket-Extensions value of our 101


def _offer_params(offer: str) -> tuple[str, dict[str, str | None]] | None:
    """`name; a; b=1` -> ("name", {"a": None, "b": "1"}); None for a malformed or repeated one."""
    name, *parts = (part.strip() for part in offer.split(";"))
    params: dict[str, str | None] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not key or key in params:
            return None
        params[key] = value.strip().strip('"') if eq else None
    return name.lower(), params


def negotiate_deflate(offers: str) -> DeflateAgreement | None:
    """Our answer to a client's Sec-WebSocket-Extensions offers, or None to decline them all.

    We always compress with no context takeover (one compressed frame serves every client), so
    we answer `server_no_context_takeover` whether or not it was asked for; and we always ask
    the client for `client_no_context_takeover` (RFC 7692 7.1.1.2 lets a server), so a client's
    messages inflate alone and no client costs us an inflater's 32 KiB window. An offer we cannot
    honour (a server window under 15 bits: our shared frames are made with 15; an unknown or
    malformed parameter) is skipped for the client's next one, as RFC 7692 section 5 says.
    """
    for offer in offers.split(","):
        parsed = _offer_params(offer)
        if parsed is None or parsed[0] != PERMESSAGE_DEFLATE:
            continue
        params = parsed[1]
        if set(params) - {
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        }:
            continue
        if params.get("server_no_context_takeover", None) is not None:
            continue
        if params.get("client_no_context_takeover", None) is not None:
            continue
        if "server_max_window_bits" in params and params["server_max_window_bits"] != "15":
            continue
        client_bits = params.get("client_max_window_bits")
        if client_bits is not None and not (
            client_bits.isdigit() and 8 <= int(client_bits) <= 15 and client_bits[0] != "0"
        ):
            continue
        # client_max_window_bits only says the client could honour a limit; we set none: our
        # inflater takes any window.
        return DeflateAgreement(DEFLATE_ANSWER)
    return None


class RequestHeadGuard(asyncio.Protocol):
    """Reads one request head, then answers it or hands the connection to picows."""

    __slots__ = (
        "_buffer",
        "_make_protocol",
        "_refused",
        "_scanned",
        "_timeout",
        "_timer",
        "_transport",
    )

    def __init__(self, make_protocol: Callable[[str], Any], timeout: float) -> None:
        self._make_protocol = make_protocol
        self._buffer = bytearray()
        self._scanned = 0
        self._refused = False
        self._transport: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = timeout

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        # A client that never finishes its head is cut as picows would cut it.
        self._timer = asyncio.get_running_loop().call_later(self._timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and discarded until the grace ends
        buffer = self._buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buffer)
            if len(buffer) > MAX_REQUEST_HEAD:
                self._refuse(TOO_LARGE)
            return
        refusal = check_request_head(bytes(buffer[:end]))
        if refusal is not None:
            self._refuse(refusal)
        else:
            self._hand_over()

    def eof_received(self) -> bool:
        return False  # the transport closes itself (after writing what is queued)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _refuse(self, refusal: Refusal) -> None:
        self._refused = True
        self._buffer = bytearray()
        transport = self._transport
        transport.write(refusal.to_bytes())
        if transport.can_write_eof():
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_GRACE, transport.close)

    def _hand_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        peer = transport.get_extra_info("peername")
        protocol = self._make_protocol(peer[0] if isinstance(peer, tuple) else "")
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data = memoryview(self._buffer)
        self._buffer = bytearray()
        while data and not transport.is_closing():
            buffer = protocol.get_buffer(-1)
            count = min(len(buffer), len(data))
            buffer[:count] = data[:count]
            data = data[count:]
            protocol.buffer_updated(count)


async def serve_ws(
    ws_listener_factory: Callable[[Any], Any],
    host: str | None,
    port: int | None,
    *,
    logger_name: Any,
    websocket_handshake_timeout: float = 5.0,
    max_frame_size: int = 10 * 1024 * 1024,
    read_buffer_init_size: int = 16 * 1024,
    enable_auto_pong: bool = True,
    enable_auto_ping: bool = False,
    auto_ping_idle_timeout: float = 20.0,
    auto_ping_reply_timeout: float = 20.0,
    use_aiofastnet: bool = False,
    with_peer: bool = False,
    **kwargs: Any,
) -> asyncio.Server:
    """picows' `ws_create_server` with the request-head guard in front: the same arguments
    (`logger_name` must be a logger-like object), the same picows protocol behind it.
    `with_peer`: the factory is called as `factory(request, peer_ip)` (picows alone cannot
    tell a router which address connected)."""
    if use_aiofastnet:
        raise ValueError("the request-head guard runs on the event loop's own transports")

    def make_protocol(peer: str) -> Any:
        return WSProtocol(
            None,  # host and port: a client's
            None,  # path: a client's
            False,  # server side
            (lambda request: ws_listener_factory(request, peer))
            if with_peer
            else ws_listener_factory,
            logger_name,
            True,  # disconnect when a listener callback raises
            websocket_handshake_timeout,
            enable_auto_ping,
            auto_ping_idle_timeout,
            auto_ping_reply_timeout,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            enable_auto_pong,
            max_frame_size,
            None,  # extra headers: a client's
            read_buffer_init_size,
        )

    timeout = websocket_handshake_timeout
    return await asyncio.get_running_loop().create_server(
        lambda: RequestHeadGuard(make_protocol, timeout), host, port, **kwargs
    )

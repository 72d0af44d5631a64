"""The client protocol (v1): parse requests, plan subscriptions, build replies. Sans-I/O.

The wire contract is docs/protocol.md (a copy of the reference we serve). Nothing here touches a
socket: the server feeds frames in and writes the bytes that come out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastproxy.history import Position
from fastproxy.streams import Stream, StreamError, parse_stream_arg

OP_SUBSCRIBE = "subscribe"
OP_UNSUBSCRIBE = "unsubscribe"
OP_PING = "ping"
OPS = (OP_SUBSCRIBE, OP_UNSUBSCRIBE, OP_PING)

INVALID_JSON = "INVALID_JSON"
UNKNOWN_OP = "UNKNOWN_OP"
INVALID_ARGS = "INVALID_ARGS"
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
SUBSCRIPTION_RATE_EXCEEDED = "SUBSCRIPTION_RATE_EXCEEDED"
UPSTREAM_REJECTED = "UPSTREAM_REJECTED"
INTERNAL_ERROR = "INTERNAL_ERROR"

CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_TEXT = 1007
CLOSE_TOO_BIG = 1009
CLOSE_IDLE = 4000
CLOSE_CONNECTION_LIMIT = 4003
CLOSE_TOO_SLOW = 4008
CLOSE_FLOODING = 4029

MAX_FRAME_SIZE = 64 * 1024
# A request may not name more args than this, however high MAX_SUBSCRIPTIONS_PER_CLIENT is set:
# it bounds the work one frame can cause.
MAX_ARGS_PER_REQUEST = 1000
MAX_ARG_LENGTH = 64
MAX_REQ_ID_LENGTH = 128
MAX_EPOCH_LENGTH = 64
MAX_SEQ = 2**63 - 1
RESUME_FORMAT = (
    '\'resume\' must be an object mapping args to {"epoch": string, "seq": integer >= 0}'
)


class ProtocolViolation(Exception):
    """A frame that breaks RFC 6455: the connection is closed with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RequestError(Exception):
    """A request we answer with an error reply. `message` is safe to show the client."""

    def __init__(
        self,
        code: str,
        message: str,
        req_id: Any = None,
        *,
        args: list[str] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id
        self.args_refused = args  # not `args`: Exception has its own
        self.retry_after_ms = retry_after_ms

    def reply(self) -> bytes:
        return error_reply(
            self.code, self.message, self.req_id, self.args_refused, self.retry_after_ms
        )


@dataclass(slots=True)
class Request:
    op: str
    args: list[str] = field(default_factory=list)
    req_id: Any = None  # None: the client sent none, and none is echoed
    resume: dict[str, Position] | None = None  # arg as written -> where the client stands


def _valid_req_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return len(value) <= MAX_REQ_ID_LENGTH
    return isinstance(value, int | float)


def _number_token(token: str) -> orjson.Fragment:
    return orjson.Fragment(token)


def _exact_req_id(payload: bytes | str) -> Any:
    """The req_id as the client wrote it, for numbers a float would change (1e30, 1.50): the
    raw JSON token, which orjson writes back verbatim. Only on this rare path is the payload
    parsed a second time."""
    obj = json.loads(payload, parse_float=_number_token, parse_int=_number_token)
    return obj.get("req_id")


def parse_request(payload: bytes | str, max_args: int = MAX_ARGS_PER_REQUEST) -> Request:
    """Decode one text frame into a Request, or raise RequestError with the code to answer.

    Raises ProtocolViolation(1007) for a text payload that is not UTF-8: orjson checks that
    anyway, so the valid path pays nothing for it."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        if isinstance(payload, bytes | bytearray | memoryview):
            try:
                bytes(payload).decode()
            except UnicodeDecodeError:
                raise ProtocolViolation(CLOSE_INVALID_TEXT, "text frame is not UTF-8") from None
        raise RequestError(INVALID_JSON, "Message must be a JSON object") from None
    if not isinstance(obj, dict):
        raise RequestError(INVALID_JSON, "Message must be a JSON object")
    req_id = obj.get("req_id")
    if req_id is not None and not _valid_req_id(req_id):
        raise RequestError(
            INVALID_ARGS, f"req_id must be a string of at most {MAX_REQ_ID_LENGTH} or a number"
        )
    if isinstance(req_id, float):
        req_id = _exact_req_id(payload)
    op = obj.get("op")
    if op not in OPS:
        message = "Missing 'op'" if op is None else "Unknown op; use subscribe, unsubscribe or ping"
        raise RequestError(UNKNOWN_OP, message, req_id)
    if op == OP_PING:
        return Request(op, [], req_id)
    args = obj.get("args")
    if not isinstance(args, list) or not args:
        raise RequestError(INVALID_ARGS, "'args' must be a non-empty list of strings", req_id)
    if not all(isinstance(a, str) for a in args):
        raise RequestError(INVALID_ARGS, "'args' must be a non-empty list of strings", req_id)
    limit = min(max_args, MAX_ARGS_PER_REQUEST)
    if len(args) > limit:
        raise RequestError(INVALID_ARGS, f"At most {limit} args per request", req_id)
    resume = obj.get("resume")
    if resume is None:
        return Request(op, args, req_id)
    if op != OP_SUBSCRIBE:
        raise RequestError(INVALID_ARGS, "'resume' is only valid with subscribe", req_id)
    return Request(op, args, req_id, _parse_resume(resume, len(args), req_id))


def _parse_resume(resume: Any, nargs: int, req_id: Any) -> dict[str, Position]:
    if not isinstance(resume, dict):
        raise RequestError(INVALID_ARGS, RESUME_FORMAT, req_id)
    if len(resume) > nargs:
        raise RequestError(INVALID_ARGS, "'resume' names more streams than 'args'", req_id)
    positions: dict[str, Position] = {}
    for arg, where in resume.items():
        shown = arg if len(arg) <= MAX_ARG_LENGTH else arg[:MAX_ARG_LENGTH] + "..."
        if not isinstance(where, dict):
            raise RequestError(INVALID_ARGS, f"resume[{shown!r}]: {RESUME_FORMAT}", req_id)
        epoch, seq = where.get("epoch"), where.get("seq")
        if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
            raise RequestError(
                INVALID_ARGS,
                f"resume[{shown!r}].epoch must be a non-empty string of at most "
                f"{MAX_EPOCH_LENGTH} characters",
                req_id,
            )
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise RequestError(
                INVALID_ARGS, f"resume[{shown!r}].seq must be an integer >= 0", req_id
            )
        positions[arg] = Position(epoch, seq)
    return positions


@dataclass(slots=True)
class SubscribePlan:
    accepted: list[str]  # args as the client wrote them
    new_streams: list[Stream]  # streams the client does not hold yet, in request order
    rejected: list[dict[str, str]]
    # Of the new streams, those the client asked to resume, with its position; None when the
    # request had no 'resume'. `arg_of` is the arg as the client wrote it, for the ack.
    resume: dict[Stream, Position] | None = None
    arg_of: dict[Stream, str] = field(default_factory=dict)


def plan_subscribe(
    args: list[str],
    held: Collection[Stream],
    max_subscriptions: int,
    symbol_known: Callable[[str], bool | None] | None = None,
    req_id: Any = None,
    resume: dict[str, Position] | None = None,
) -> SubscribePlan:
    """Decide what a subscribe request does. Raises RequestError(LIMIT_EXCEEDED) if the request
    would take the client past its cap, and RequestError(INVALID_ARGS) if `resume` names a
    stream that is not in `args`; then nothing of it is applied."""
    accepted: list[str] = []
    new_streams: list[Stream] = []
    rejected: list[dict[str, str]] = []
    seen: set[Stream] = set()
    arg_of: dict[Stream, str] = {}
    for arg in args:
        if len(arg) > MAX_ARG_LENGTH:
            rejected.append({"arg": arg[:MAX_ARG_LENGTH] + "...", "reason": "stream name too long"})
            continue
        try:
            stream = parse_stream_arg(arg)
        except StreamError as exc:
            rejected.append({"arg": arg, "reason": str(exc)})
            continue
        if symbol_known is not None and symbol_known(stream.symbol) is False:
            rejected.append({"arg": arg, "reason": f"unknown symbol {stream.symbol}"})
            continue
        accepted.append(arg)
        arg_of.setdefault(stream, arg)
        if stream not in held and stream not in seen:
            seen.add(stream)
            new_streams.append(stream)
    positions = None if resume is None else _resume_streams(resume, args, arg_of, seen, req_id)
    if len(held) + len(new_streams) > max_subscriptions:
        raise RequestError(
            LIMIT_EXCEEDED,
            f"Subscription limit is {max_subscriptions} streams per connection; "
            f"you hold {len(held)} and asked for {len(new_streams)} more",
            req_id,
        )
    return SubscribePlan(accepted, new_streams, rejected, positions, arg_of)


def _resume_streams(
    resume: dict[str, Position],
    args: list[str],
    arg_of: dict[Stream, str],
    new: set[Stream],
    req_id: Any,
) -> dict[Stream, Position]:
    """The resume entries by stream, for the streams this request adds. An entry must name
    one of the request's args (in any spelling of the same stream)."""
    positions: dict[Stream, Position] = {}
    for arg, position in resume.items():
        shown = arg if len(arg) <= MAX_ARG_LENGTH else arg[:MAX_ARG_LENGTH] + "..."
        try:
            stream = parse_stream_arg(arg) if len(arg) <= MAX_ARG_LENGTH else None
        except StreamError:
            stream = None
        if stream is None or stream not in arg_of:
            if arg in args:
                continue  # the arg itself was refused; the ack says why
            raise RequestError(
                INVALID_ARGS, f"resume names {shown!r}, which is not one of the args", req_id
            )
        if stream in new:  # a refused arg, or one the client already holds, has nothing to resume
            positions[stream] = position
    return positions


@dataclass(slots=True)
class UnsubscribePlan:
    accepted: list[str]
    streams: list[Stream]
    rejected: list[dict[str, str]]


def plan_unsubscribe(args: list[str], held: Collection[Stream]) -> UnsubscribePlan:
    accepted: list[str] = []
    streams: list[Stream] = []
    rejected: list[dict[str, str]] = []
    seen: set[Stream] = set()
    for arg in args:
        try:
            stream = parse_stream_arg(arg)
        except StreamError as exc:
            rejected.append({"arg": arg[: MAX_ARG_LENGTH + 3], "reason": str(exc)})
            continue
        if stream not in held:
            rejected.append({"arg": arg, "reason": "not subscribed"})
            continue
        accepted.append(arg)
        if stream not in seen:
            seen.add(stream)
            streams.append(stream)
    return UnsubscribePlan(accepted, streams, rejected)


def _with_req_id(reply: dict[str, Any], req_id: Any) -> bytes:
    if req_id is not None:
        reply["req_id"] = req_id
    return orjson.dumps(reply)


def _ack(op: str, message: str, plan: SubscribePlan | UnsubscribePlan, req_id: Any) -> bytes:
    return _with_req_id(
        {
            "op": op,
            "success": bool(plan.accepted),
            "args": plan.accepted,
            "message": message,
            "rejected": plan.rejected or None,
        },
        req_id,
    )


def subscribe_reply(
    plan: SubscribePlan, req_id: Any = None, resumed: list[Stream] | None = None
) -> bytes:
    """The ack; with `resumed` (a request that carried 'resume'), the args that resume."""
    reply: dict[str, Any] = {
        "op": OP_SUBSCRIBE,
        "success": bool(plan.accepted),
        "args": plan.accepted,
        "message": f"Subscribed to {len(plan.accepted)} streams",
        "rejected": plan.rejected or None,
    }
    if plan.resume is not None:
        reply["resumed"] = [plan.arg_of[stream] for stream in resumed or ()]
    return _with_req_id(reply, req_id)


def unsubscribe_reply(plan: UnsubscribePlan, req_id: Any = None) -> bytes:
    return _ack(OP_UNSUBSCRIBE, f"Unsubscribed from {len(plan.accepted)} streams", plan, req_id)


def pong_reply(now_ms: int, req_id: Any = None) -> bytes:
    return _with_req_id({"op": "pong", "timestamp": now_ms}, req_id)


def error_reply(
    code: str,
    message: str,
    req_id: Any = None,
    args: list[str] | None = None,
    retry_after_ms: int | None = None,
) -> bytes:
    reply: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if args is not None:
        reply["args"] = args
    if retry_after_ms is not None:
        reply["retry_after_ms"] = retry_after_ms
    return _with_req_id(reply, req_id)


class TokenBucket:
    """`rate` units a second, bursts up to `capacity` (default: `rate`). Monotonic seconds.

    `take` is the one-frame path; `available`, `charge` and `wait` serve budgets where one
    request costs many units."""

    __slots__ = ("_last", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, now: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = float(rate if capacity is None else capacity)
        self._tokens = self.capacity
        self._last = now

    def available(self, now: float) -> float:
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens > self.capacity:
            tokens = self.capacity
        self._tokens = tokens
        return tokens

    def take(self, now: float) -> bool:
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens > self.capacity:
            tokens = self.capacity
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def charge(self, now: float, count: float) -> None:
        """Spend `count` whatever the balance; a debt delays what comes next."""
        self._tokens = self.available(now) - count

    def wait(self, now: float, count: float) -> float:
        """Seconds until `count` units (at most the capacity) are there."""
        missing = min(count, self.capacity) - self.available(now)
        return max(0.0, missing / self.rate)


class SubscriptionBudget:
    """The work one client may cause: streams subscribed plus unsubscribed a second, and
    snapshots (one per newly subscribed stream) a second. Both bursts are at least the
    subscription cap, so a client can always take its whole allowance in one request.

    A subscribe over budget is refused whole; an unsubscribe is never refused (it only ever
    lowers the load) but is charged, so churning costs the same either way."""

    __slots__ = ("_changes", "_snapshots")

    def __init__(self, change_rate: float, snapshot_rate: float, cap: int, now: float) -> None:
        self._changes = TokenBucket(change_rate, now, max(change_rate, cap))
        self._snapshots = TokenBucket(snapshot_rate, now, max(snapshot_rate, cap))

    def exhausted(self, now: float, args: int) -> RequestError | None:
        """A refusal before the request is even planned, when nothing at all is left: the
        cheap answer to a client that keeps asking."""
        if self._changes.available(now) >= 1.0 and self._snapshots.available(now) >= 1.0:
            return None
        return self.refusal(now, args)

    def admit(self, now: float, new_streams: int) -> RequestError | None:
        """Spend the budget for a subscribe adding `new_streams`, or say why not."""
        if not new_streams:
            return None
        changes, snapshots = self._changes, self._snapshots
        if changes.available(now) >= new_streams and snapshots.available(now) >= new_streams:
            changes.charge(now, new_streams)
            snapshots.charge(now, new_streams)
            return None
        return self.refusal(now, new_streams)

    def refusal(self, now: float, streams: int) -> RequestError:
        change_wait = self._changes.wait(now, streams)
        snapshot_wait = self._snapshots.wait(now, streams)
        if change_wait >= snapshot_wait:
            what = f"{self._changes.rate:g} stream changes (subscribe plus unsubscribe) a second"
        else:
            what = f"{self._snapshots.rate:g} snapshots (newly subscribed streams) a second"
        retry_ms = int(max(change_wait, snapshot_wait) * 1000) + 1
        return RequestError(
            SUBSCRIPTION_RATE_EXCEEDED,
            f"At most {what}; nothing in this request was applied, retry in {retry_ms} ms",
            retry_after_ms=retry_ms,
        )

    def charge_unsubscribe(self, now: float, streams: int) -> None:
        if streams:
            self._changes.charge(now, streams)


class FloodGuard:
    """Rate limit with the protocol's rules: one RATE_LIMIT_EXCEEDED a second at most, and the
    client is closed once it has kept flooding for `close_after` seconds."""

    __slots__ = ("_bucket", "_flood_since", "_last_refused", "_last_warned", "close_after")

    OK = 0
    DROP = 1  # refuse the frame silently
    WARN = 2  # refuse it and send RATE_LIMIT_EXCEEDED
    CLOSE = 3  # close with 4029

    def __init__(self, rate: float, now: float, close_after: float = 10.0) -> None:
        self._bucket = TokenBucket(rate, now)
        self.close_after = close_after
        self._last_warned = -1e18
        self._last_refused = -1e18
        self._flood_since: float | None = None

    def check(self, now: float) -> int:
        if self._bucket.take(now):
            # A second with no refusal ends a flood.
            if self._flood_since is not None and now - self._last_refused > 1.0:
                self._flood_since = None
            return self.OK
        if self._flood_since is None or now - self._last_refused > 1.0:
            self._flood_since = now
        self._last_refused = now
        if now - self._flood_since >= self.close_after:
            return self.CLOSE
        if now - self._last_warned >= 1.0:
            self._last_warned = now
            return self.WARN
        return self.DROP


OPCODE_CONTINUATION = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2


class MessageAssembler:
    """Joins a fragmented message (RFC 6455 section 5.4) up to `max_size` bytes.

    A session makes one only when a client first fragments, so the common path (one frame, one
    message) never touches it. Control frames never come here: they may interleave."""

    __slots__ = ("_buffer", "_opcode", "max_size")

    def __init__(self, max_size: int = MAX_FRAME_SIZE) -> None:
        self.max_size = max_size
        self._opcode: int | None = None  # the message in progress; None: none is
        self._buffer: bytearray | None = None  # None while one is being discarded

    @property
    def busy(self) -> bool:
        return self._opcode is not None

    def feed(self, opcode: int, fin: bool, payload: bytes | memoryview) -> tuple[int, bytes] | None:
        """(opcode, payload) of a whole message, None while one is incomplete or discarded.
        Raises ProtocolViolation for frames out of order (1002) or a message too big (1009)."""
        if opcode == OPCODE_CONTINUATION:
            if self._opcode is None:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "continuation frame of no message")
            buffer = self._buffer
            if buffer is not None:
                buffer += payload
                if len(buffer) > self.max_size:
                    raise ProtocolViolation(CLOSE_TOO_BIG, "message too big")
            if not fin:
                return None
            message_opcode, self._opcode, self._buffer = self._opcode, None, None
            return None if buffer is None else (message_opcode, bytes(buffer))
        if self._opcode is not None:
            raise ProtocolViolation(
                CLOSE_PROTOCOL_ERROR, "new message before the fragmented one ended"
            )
        if fin:
            return opcode, bytes(payload)
        self._opcode = opcode
        self._buffer = bytearray(payload)
        return None

    def discard(self) -> None:
        """Drop the message in progress (its frame was refused); its remaining fragments are
        read and ignored."""
        if self._opcode is not None:
            self._buffer = None

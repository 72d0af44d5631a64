"""Client command handling of one simulated Bybit connection (sans-I/O).

One incoming text frame produces exactly one reply frame, as on Bybit: an ack, a failure, or a pong.
The caller delivers it and starts or stops the feeds named in the result.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastproxy.sim.jsonenc import go_dumps
from fastproxy.sim.topics import TopicRef

# marks a request without req_id (linear echoes "", spot omits the key)
_ABSENT: Any = object()
_BASE32HEX = "0123456789abcdefghijklmnopqrstuv"
_SUFFIX_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


class ConnIdFactory:
    """xid-like ids (``d9tc7k421nl91l9k6obg-s09y``): time, machine, pid, counter; then a suffix.

    The counter makes ids unique within a process; the random machine/pid part across simulators.
    """

    def __init__(self) -> None:
        self._machine = secrets.token_bytes(5)
        self._counter = itertools.count(secrets.randbelow(1 << 20))

    def __call__(self) -> str:
        counter = next(self._counter) & 0xFFFFFF
        raw = int(time.time()).to_bytes(4, "big") + self._machine + counter.to_bytes(3, "big")
        number = int.from_bytes(raw, "big") << 4  # 96 bits padded to 100 = 20 base32 digits
        digits = []
        for _ in range(20):
            number, rem = divmod(number, 32)
            digits.append(_BASE32HEX[rem])
        suffix = "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(4))
        return "".join(reversed(digits)) + "-" + suffix


@dataclass
class ProtocolOptions:
    """Switches shared by all sessions of a simulator; mutable at run time."""

    # Bybit's handling of args before a bad one is unconfirmed; strict (False) applies none of them
    keep_earlier_args: bool = False
    # linear/inverse have no documented per-request cap; None means unlimited
    max_args_per_request: int | None = None
    spot_max_args_per_request: int = 10
    option_max_args_per_connection: int = 2000
    # Bybit documents 21,000 characters of args per connection; None disables the check
    max_args_chars: int | None = None


@dataclass
class Reply:
    frame: bytes
    # "ack", "error" or "pong"
    kind: str
    subscribed: list[TopicRef] = field(default_factory=list)
    unsubscribed: list[TopicRef] = field(default_factory=list)


class _DecodeError(Exception):
    pass


def _context(text: str, pos: int) -> str:
    near = text[max(0, pos - 10) : pos + 10]
    bigger = text[max(0, pos - 50) : pos + 50]
    return f"error found in #{pos + 1} byte of ...|{near}|..., bigger context ...|{bigger}|..."


def _decode_failure(data: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse a command; on failure return a message shaped like Go jsoniter's errors."""
    text = data.decode("utf-8", "replace")
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        stripped = text.lstrip()
        first = stripped[:1]
        pos = getattr(exc, "pos", 0) or 0
        if first not in ("{", "n"):
            found = first if first else "EOF"
            reason = f"readObjectStart: expect {{ or n, but found {found}"
            return None, f"{reason}, {_context(text, len(text) - len(stripped))}"
        return None, f"op.CmdReq.ReadObject: {exc.msg}, {_context(text, pos)}"
    if msg is None:
        return {}, ""
    if not isinstance(msg, dict):
        stripped = text.lstrip()
        found = stripped[:1] or "EOF"
        reason = f"readObjectStart: expect {{ or n, but found {found}"
        return None, f"{reason}, {_context(text, len(text) - len(stripped))}"
    return msg, ""


def _type_error(text: str, key: str, reason: str) -> str:
    pos = max(text.find(f'"{key}"'), 0)
    return f"{reason}, {_context(text, pos)}"


class SessionProtocol:
    def __init__(
        self,
        category: str,
        conn_id: str,
        parse: Callable[[str, str], TopicRef | None],
        options: ProtocolOptions | None = None,
    ) -> None:
        self.category = category
        self.conn_id = conn_id
        self._parse = parse
        self.options = options or ProtocolOptions()
        # insertion-ordered: topic -> parsed ref
        self.topics: dict[str, TopicRef] = {}
        self._args_chars = 0

    # -- frames ----------------------------------------------------------------------------------

    def _envelope(self, success: bool, ret_msg: str, req_id: Any, op: str) -> bytes:
        frame: dict[str, Any] = {"success": success, "ret_msg": ret_msg, "conn_id": self.conn_id}
        if req_id is not _ABSENT:
            frame["req_id"] = req_id
        elif self.category != "spot":
            frame["req_id"] = ""
        frame["op"] = op
        return go_dumps(frame)

    def _failure(self, ret_msg: str, req_id: Any, op: str) -> Reply:
        return Reply(self._envelope(False, ret_msg, req_id, op), "error")

    def _pong(self, req_id: Any, now_ms: int) -> Reply:
        if self.category == "option":
            frame: dict[str, Any] = {}
            if req_id is not _ABSENT:
                frame["req_id"] = req_id
            frame["args"] = [str(now_ms)]
            frame["op"] = "pong"
            return Reply(go_dumps(frame), "pong")
        return Reply(self._envelope(True, "pong", req_id, "ping"), "pong")

    # -- entry point -----------------------------------------------------------------------------

    def handle(self, data: bytes, now_ms: int) -> Reply:
        msg, problem = _decode_failure(data)
        if msg is None:
            return self._failure(f"Failed to decode incoming data:{problem}", "", "")
        text = data.decode("utf-8", "replace")
        try:
            op, req_id, args = self._fields(msg, text)
        except _DecodeError as exc:
            return self._failure(f"Failed to decode incoming data:{exc}", "", "")
        if op == "ping":
            return self._pong(req_id, now_ms)
        if op == "subscribe":
            return self._subscribe(args, req_id)
        if op == "unsubscribe":
            return self._unsubscribe(args, req_id)
        return self._failure("error:invalid op", req_id, op)

    @staticmethod
    def _fields(msg: dict[str, Any], text: str) -> tuple[str, Any, list[str]]:
        op = msg.get("op", "")
        if op is None:
            op = ""
        if not isinstance(op, str):
            raise _DecodeError(
                _type_error(
                    text, "op", 'op.CmdReq.Op: ReadString: expects " or n, but found ' + str(op)[:1]
                )
            )
        req_id = msg.get("req_id", _ABSENT)
        if req_id is None:
            req_id = _ABSENT
        elif req_id is not _ABSENT and (
            isinstance(req_id, bool) or not isinstance(req_id, (str, int, float))
        ):
            raise _DecodeError(
                _type_error(
                    text, "req_id", "op.CmdReq.ReqId: fuzzyStringDecoder: not number or string"
                )
            )
        raw_args = msg.get("args")
        if raw_args is None:
            raw_args = []
        if not isinstance(raw_args, list):
            raise _DecodeError(
                _type_error(text, "args", "op.CmdReq.Args: []string: decode slice: expect [ or n")
            )
        args: list[str] = []
        for arg in raw_args:
            if isinstance(arg, str):
                args.append(arg)
            elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
                # jsoniter's fuzzy decoder turns numbers into strings; they then fail as topics
                args.append(orjson.dumps(arg).decode())
            else:
                raise _DecodeError(
                    _type_error(
                        text,
                        "args",
                        "op.CmdReq.Args: []string: fuzzyStringDecoder: not number or string",
                    )
                )
        return op, req_id, args

    # -- subscribe / unsubscribe -----------------------------------------------------------------

    def _limit_failure(self, args: list[str], req_id: Any, op: str) -> Reply | None:
        opts = self.options
        cap = (
            opts.spot_max_args_per_request
            if self.category == "spot"
            else opts.max_args_per_request
            if self.category in ("linear", "inverse")
            else None
        )
        if cap is not None and len(args) > cap:
            return self._failure(f"args size >{cap}", req_id, op)
        return None

    def _subscribe(self, args: list[str], req_id: Any) -> Reply:
        if self.category == "option":
            return self._option_command(args, req_id, subscribe=True)
        limited = self._limit_failure(args, req_id, "subscribe")
        if limited is not None:
            return limited
        accepted: list[TopicRef] = []
        seen: set[str] = set()
        failure: str | None = None
        chars = self._args_chars
        for arg in args:
            ref = self._parse(self.category, arg)
            if ref is None:
                failure = f"error:handler not found,topic:{arg}"
                break
            if arg in self.topics or arg in seen:
                # a duplicate poisons the whole request, earlier args included
                return self._failure(f"error:already subscribed,topic:{arg}", req_id, "subscribe")
            limit = self.options.max_args_chars
            if limit is not None and chars + len(arg) > limit:
                failure = f"error:args length exceeds {limit},topic:{arg}"
                break
            chars += len(arg)
            seen.add(arg)
            accepted.append(ref)
        if failure is not None:
            reply = self._failure(failure, req_id, "subscribe")
            if self.options.keep_earlier_args:
                self._apply_subscribe(accepted)
                reply.subscribed = accepted
            return reply
        self._apply_subscribe(accepted)
        return Reply(self._ack(req_id, "subscribe"), "ack", subscribed=accepted)

    def _apply_subscribe(self, refs: list[TopicRef]) -> None:
        for ref in refs:
            self.topics[ref.topic] = ref
            self._args_chars += len(ref.topic)

    def _unsubscribe(self, args: list[str], req_id: Any) -> Reply:
        if self.category == "option":
            return self._option_command(args, req_id, subscribe=False)
        limited = self._limit_failure(args, req_id, "unsubscribe")
        if limited is not None:
            return limited
        removable: list[str] = []
        failure: str | None = None
        for arg in args:
            if self._parse(self.category, arg) is None:
                failure = f"error:handler not found,topic:{arg}"
                break
            # unsubscribing a topic that is not subscribed is a quiet no-op
            if arg in self.topics and arg not in removable:
                removable.append(arg)
        if failure is not None and not self.options.keep_earlier_args:
            return self._failure(failure, req_id, "unsubscribe")
        removed = [self._remove(topic) for topic in removable]
        if failure is not None:
            reply = self._failure(failure, req_id, "unsubscribe")
            reply.unsubscribed = removed
            return reply
        return Reply(self._ack(req_id, "unsubscribe"), "ack", unsubscribed=removed)

    def _remove(self, topic: str) -> TopicRef:
        ref = self.topics.pop(topic)
        self._args_chars -= len(topic)
        return ref

    def _ack(self, req_id: Any, op: str) -> bytes:
        # spot acks carry the op in ret_msg; linear and inverse leave it empty
        return self._envelope(True, op if self.category == "spot" else "", req_id, op)

    def _option_command(self, args: list[str], req_id: Any, subscribe: bool) -> Reply:
        """Option answers per topic with successTopics/failTopics instead of one verdict."""
        ok: list[str] = []
        failed: list[str] = []
        refs: list[TopicRef] = []
        cap = self.options.option_max_args_per_connection
        for arg in args:
            ref = self._parse(self.category, arg)
            if ref is None:
                failed.append(arg)
            elif subscribe:
                if arg in self.topics or len(self.topics) >= cap:
                    failed.append(arg)
                else:
                    self.topics[arg] = ref
                    ok.append(arg)
                    refs.append(ref)
            else:
                if arg in self.topics:
                    refs.append(self._remove(arg))
                ok.append(arg)
        frame: dict[str, Any] = {"success": not failed, "conn_id": self.conn_id}
        if req_id is not _ABSENT:
            frame["req_id"] = req_id
        frame["data"] = {"failTopics": failed, "successTopics": ok}
        frame["type"] = "COMMAND_RESP"
        reply = Reply(go_dumps(frame), "ack" if not failed else "error")
        if subscribe:
            reply.subscribed = refs
        else:
            reply.unsubscribed = refs
        return reply

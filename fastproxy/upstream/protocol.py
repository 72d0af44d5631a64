"""The Bybit V5 public WebSocket protocol of one upstream connection, sans-I/O.

`ConnectionState` knows which topics this connection should carry and what the exchange was told
about each of them; it builds the requests, correlates replies by `req_id`, keeps the heartbeat
deadlines and decides retries. It never touches a socket: the caller feeds it parsed frames and
the current time and sends the bytes it returns. See reference §2.2-2.5 for the wire format and
§2.4 for why failed batches are handled the way they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson

from fastproxy.upstream.settings import UpstreamSettings

log = logging.getLogger("fastproxy.upstream")

# Frame kinds (reference §2.1): data carries `topic`; a pong is `ret_msg == "pong"` on linear
# (whose pong says op "ping") or `op == "pong"` elsewhere; anything else with `success` answers a
# subscribe/unsubscribe.
FRAME_DATA = "data"
FRAME_PONG = "pong"
FRAME_RESPONSE = "response"
FRAME_OTHER = "other"

# What the exchange was last told about a topic on this connection.
WIRE_NONE = 0  # nothing (never sent, or known not to be subscribed)
WIRE_SUBSCRIBING = 1  # a subscribe request is in flight
WIRE_SUBSCRIBED = 2  # acked, or data seen
WIRE_UNSUBSCRIBING = 3  # an unsubscribe request is in flight

FAIL_NOT_FOUND = "handler not found"
FAIL_ALREADY = "already subscribed"
FAIL_OTHER = "other"


def classify(msg: Any) -> str:
    if type(msg) is not dict:
        return FRAME_OTHER
    if "topic" in msg:
        return FRAME_DATA
    if msg.get("ret_msg") == "pong" or msg.get("op") == "pong":
        return FRAME_PONG
    if "success" in msg:
        return FRAME_RESPONSE
    return FRAME_OTHER


def parse_failure(ret_msg: str) -> tuple[str, str | None]:
    """The kind of a failure `ret_msg` and the topic it names, if any.

    `error:handler not found,topic:orderbook.50.NOPEUSDT` -> (FAIL_NOT_FOUND, "orderbook.50...").
    """
    for kind in (FAIL_NOT_FOUND, FAIL_ALREADY):
        if ret_msg.startswith("error:" + kind):
            _, sep, topic = ret_msg.partition(",topic:")
            return (kind, topic) if sep and topic else (FAIL_OTHER, None)
    return FAIL_OTHER, None


def arg_cost(topic: str) -> int:
    """Characters a topic adds to a connection's `args` (its JSON string plus a separator).

    Bybit limits the args of one connection to 21,000 characters without saying how it counts;
    counting the encoded form is the conservative reading.
    """
    return len(topic) + 3


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class TopicEntry:
    __slots__ = ("cost", "desired", "req", "solo", "topic", "tries", "wire")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.cost = arg_cost(topic)
        self.desired = False
        self.wire = WIRE_NONE
        # After a failed batch the topic goes out alone: one bad neighbour cannot poison it again.
        self.solo = False
        self.tries = 0
        self.req: Request | None = None


class Request:
    __slots__ = ("op", "req_id", "sent_at", "topics")

    def __init__(self, req_id: str, op: str, topics: tuple[str, ...], sent_at: float) -> None:
        self.req_id = req_id
        self.op = op
        self.topics = topics
        self.sent_at = sent_at


class Tick:
    """What the timer asks of the shell: send a ping, declare the connection dead, close it as
    idle, and topics the exchange refused for good (from request timeouts)."""

    __slots__ = ("dead", "failed", "idle", "ping", "silent")

    def __init__(self) -> None:
        self.ping: bytes | None = None
        self.dead: str | None = None
        self.idle = False
        self.silent = False  # the connection just went silent: its streams are now stale
        self.failed: list[tuple[str, str]] = []


class ConnectionState:
    """Topics and protocol state of one upstream connection across its reconnections."""

    def __init__(self, settings: UpstreamSettings, ident: int) -> None:
        self.settings = settings
        self.ident = ident
        self.topics: dict[str, TopicEntry] = {}
        self.chars = 0
        self.wanted = 0
        self.open = False
        self.retired = False
        self.generation = 0
        self.requests: dict[str, Request] = {}
        self._todo: dict[str, None] = {}  # topics whose wire state lags their desired state
        self._again: set[str] = set()  # subscribed topics to unsubscribe and subscribe anew
        self._seq = 0
        self.last_frame_at = 0.0
        self.last_data_at: float | None = None
        self.ping_sent_at: float | None = None
        self.next_ping_at = 0.0
        self.data_seen = False
        self.pongs = 0
        self.empty_since: float | None = None
        # Freshness: nothing received for `stale_after` while open (cleared by any frame), and
        # since when (monotonic) the connection has been lost or failing to connect; None while
        # open and before the first attempt.
        self.silent = False
        self.down_since: float | None = None
        # Topics whose subscription data or an ack just confirmed, for the pool's freshness.
        self.newly_confirmed: list[str] = []

    # -- placement --------------------------------------------------------------------------

    def has_room(self, topic: str) -> bool:
        s = self.settings
        return (
            not self.retired
            and len(self.topics) < s.max_topics_per_conn
            and self.chars + arg_cost(topic) <= s.max_args_chars_per_conn
        )

    def want(self, topic: str) -> None:
        entry = self.topics.get(topic)
        if entry is None:
            entry = self.topics[topic] = TopicEntry(topic)
            self.chars += entry.cost
        if entry.desired:
            return
        entry.desired = True
        self.wanted += 1
        self.empty_since = None
        # With a request in flight its reply decides what to send next; otherwise the next
        # flush reconciles.
        if entry.wire in (WIRE_NONE, WIRE_SUBSCRIBED):
            self._todo[topic] = None

    def unwant(self, topic: str, now: float) -> None:
        entry = self.topics.get(topic)
        if entry is None or not entry.desired:
            return
        entry.desired = False
        self.wanted -= 1
        if self.wanted == 0:
            self.empty_since = now
        if entry.wire == WIRE_NONE:
            self._drop(entry)
        elif entry.wire == WIRE_SUBSCRIBED:
            self._todo[topic] = None

    def resubscribe(self, topic: str) -> bool:
        """Unsubscribe a live topic and subscribe it again, for a fresh snapshot (a book that
        can no longer be trusted). False when nothing needs sending: the topic is not wanted
        here, or a subscribe is already due or in flight (its snapshot is coming anyway)."""
        entry = self.topics.get(topic)
        if entry is None or not entry.desired or entry.wire != WIRE_SUBSCRIBED:
            return False
        self._again.add(topic)
        self._todo[topic] = None
        return True

    def state_of(self, topic: str) -> str | None:
        entry = self.topics.get(topic)
        if entry is None or not entry.desired:
            return None
        return "live" if entry.wire == WIRE_SUBSCRIBED else "pending"

    def counts(self) -> tuple[int, int]:
        """(pending, live) among the wanted topics."""
        live = 0
        for entry in self.topics.values():
            if entry.desired and entry.wire == WIRE_SUBSCRIBED:
                live += 1
        return self.wanted - live, live

    def desired_topics(self) -> list[str]:
        return [e.topic for e in self.topics.values() if e.desired]

    @property
    def has_todo(self) -> bool:
        return bool(self._todo)

    def _drop(self, entry: TopicEntry) -> None:
        if self.topics.pop(entry.topic, None) is None:
            return
        self.chars -= entry.cost
        self._todo.pop(entry.topic, None)
        if entry.desired:
            entry.desired = False
            self.wanted -= 1

    # -- connection lifecycle ----------------------------------------------------------------

    def opened(self, now: float, generation: int) -> None:
        """A fresh connection: the exchange holds nothing, so every wanted topic is sent again."""
        self.open = True
        self.generation = generation
        self.last_frame_at = now
        self.ping_sent_at = None
        self.next_ping_at = now + self.settings.ping_interval
        self.data_seen = False
        self.pongs = 0
        self.silent = False
        self.down_since = None
        self._forget_wire()
        for entry in self.topics.values():
            self._todo[entry.topic] = None
        if self.wanted == 0 and self.empty_since is None:
            self.empty_since = now

    def closed(self, now: float | None = None) -> list[str]:
        """The connection is gone. Returns the wanted topics, whose state is now stale."""
        self.open = False
        self.ping_sent_at = None
        self.silent = False
        if self.down_since is None and now is not None:
            self.down_since = now
        self._forget_wire()
        return self.desired_topics()

    def _forget_wire(self) -> None:
        self.requests.clear()
        self._todo.clear()
        self._again.clear()
        for entry in list(self.topics.values()):
            if not entry.desired:
                self._drop(entry)
                continue
            entry.wire = WIRE_NONE
            entry.req = None
            entry.solo = False
            entry.tries = 0

    def settled(self) -> bool:
        """Everything wanted is subscribed and the connection has shown it is alive: the moment
        to reset the reconnect backoff."""
        if not self.open or self._todo:
            return False
        for request in self.requests.values():
            if request.op == "subscribe":
                return False
        return self.data_seen or self.pongs > 0

    # -- outgoing ----------------------------------------------------------------------------

    def _next_id(self, kind: str) -> str:
        self._seq += 1
        return f"{kind}{self.ident}-{self._seq}"

    def _request(self, op: str, entries: list[TopicEntry], now: float) -> bytes:
        req_id = self._next_id(op[0])
        topics = tuple(e.topic for e in entries)
        request = Request(req_id, op, topics, now)
        wire = WIRE_SUBSCRIBING if op == "subscribe" else WIRE_UNSUBSCRIBING
        for entry in entries:
            entry.wire = wire
            entry.req = request
        self.requests[req_id] = request
        return orjson.dumps({"req_id": req_id, "op": op, "args": list(topics)})

    def take_requests(self, now: float) -> list[bytes]:
        """Requests that bring the exchange in line with the wanted topics, ready to send."""
        if not self.open or not self._todo:
            return []
        batch: list[TopicEntry] = []
        solo: list[TopicEntry] = []
        leave: list[TopicEntry] = []
        for topic in self._todo:
            entry = self.topics.get(topic)
            if entry is None:
                continue
            if entry.desired and entry.wire == WIRE_NONE:
                (solo if entry.solo else batch).append(entry)
            elif entry.wire == WIRE_SUBSCRIBED and (not entry.desired or topic in self._again):
                leave.append(entry)  # a wanted one is subscribed again once this is answered
        self._todo.clear()
        self._again.clear()
        size = self.settings.batch_size
        out = [self._request("unsubscribe", part, now) for part in chunks(leave, size)]
        out.extend(self._request("subscribe", part, now) for part in chunks(batch, size))
        out.extend(self._request("subscribe", [entry], now) for entry in solo)
        return out

    # -- incoming ----------------------------------------------------------------------------

    def accept_data(self, topic: str, now: float) -> bool:
        """A data frame of `topic` arrived: True when it should be delivered.

        Data proves the subscription even before its ack (reference §7.8), so the topic is live
        and will not be sent again. Frames of topics no longer wanted are in-flight leftovers.
        """
        entry = self.topics.get(topic)
        if entry is None or not entry.desired:
            return False
        if entry.wire != WIRE_SUBSCRIBED:
            if entry.wire == WIRE_UNSUBSCRIBING:
                return False
            entry.wire = WIRE_SUBSCRIBED
            entry.req = None
            entry.tries = 0
            self.newly_confirmed.append(topic)
        self.last_data_at = now
        self.data_seen = True
        return True

    def on_control(self, msg: Any, now: float) -> list[tuple[str, str]]:
        """A non-data frame. Returns the wanted topics the exchange refused, with the reason."""
        kind = classify(msg)
        if kind == FRAME_PONG:
            # Whatever req_id it echoes, the socket answered: that is all a pong has to prove.
            self.ping_sent_at = None
            self.pongs += 1
            return []
        if kind != FRAME_RESPONSE:
            log.debug("unexpected upstream frame ignored", extra={"frame": str(msg)[:200]})
            return []
        req_id = msg.get("req_id")
        request = self.requests.pop(req_id, None) if isinstance(req_id, str) else None
        if request is None:
            # A reply after its request timed out, or to nothing we sent (e.g. a decode error).
            log.info(
                "upstream reply matches no pending request",
                extra={"req_id": req_id, "ret_msg": msg.get("ret_msg")},
            )
            return []
        ret_msg = msg.get("ret_msg")
        return self._reply(
            request, msg.get("success") is True, ret_msg if isinstance(ret_msg, str) else "", now
        )

    def _reply(self, request: Request, ok: bool, ret_msg: str, now: float) -> list[tuple[str, str]]:
        entries = []
        for topic in request.topics:
            entry = self.topics.get(topic)
            # An entry that data already confirmed, or a later request took over, is not ours.
            if entry is not None and entry.req is request:
                entry.req = None
                entries.append(entry)
        if request.op == "unsubscribe":
            if not ok:
                log.warning(
                    "upstream unsubscribe failed",
                    extra={"topics": list(request.topics), "ret_msg": ret_msg},
                )
            for entry in entries:
                entry.wire = WIRE_NONE
                if entry.desired:
                    self._todo[entry.topic] = None
                else:
                    self._drop(entry)
            return []
        failed: list[tuple[str, str]] = []
        if ok:
            for entry in entries:
                self._confirmed(entry)
            return failed
        kind, named = parse_failure(ret_msg)
        if kind == FAIL_ALREADY and named in request.topics:
            # A duplicate makes Bybit reject the whole request: the named topic is subscribed,
            # the others were not applied.
            for entry in entries:
                if entry.topic == named:
                    self._confirmed(entry)
                else:
                    self._resend(entry)
        elif kind == FAIL_NOT_FOUND and named in request.topics:
            # Bybit stops at the first bad arg; whether earlier args were applied is unknown,
            # so the others go again one per request (a duplicate then reads as success).
            for entry in entries:
                if entry.topic == named:
                    self._refuse(entry, ret_msg, failed, now)
                else:
                    self._unknown(entry)
        elif len(request.topics) > 1:
            for entry in entries:
                self._unknown(entry)
        else:
            for entry in entries:
                entry.tries += 1
                if entry.tries >= self.settings.subscribe_tries:
                    self._refuse(entry, ret_msg, failed, now)
                else:
                    self._resend(entry)
        log.info(
            "upstream subscribe failed",
            extra={"conn": self.ident, "topics": list(request.topics), "ret_msg": ret_msg},
        )
        return failed

    def _confirmed(self, entry: TopicEntry) -> None:
        entry.wire = WIRE_SUBSCRIBED
        entry.tries = 0
        if entry.desired:
            self.newly_confirmed.append(entry.topic)
        else:
            self._todo[entry.topic] = None

    def _resend(self, entry: TopicEntry) -> None:
        """The exchange did not apply the request for this topic."""
        entry.wire = WIRE_NONE
        if entry.desired:
            entry.solo = True
            self._todo[entry.topic] = None
        else:
            self._drop(entry)

    def _unknown(self, entry: TopicEntry) -> None:
        """The exchange may or may not have applied it."""
        if entry.desired:
            entry.wire = WIRE_NONE
            entry.solo = True
        else:
            entry.wire = WIRE_SUBSCRIBED  # so that an unsubscribe makes sure
        self._todo[entry.topic] = None

    def _refuse(
        self, entry: TopicEntry, reason: str, failed: list[tuple[str, str]], now: float
    ) -> None:
        if entry.desired:
            failed.append((entry.topic, reason))
        self._drop(entry)
        if self.wanted == 0 and self.empty_since is None:
            self.empty_since = now

    # -- timers ------------------------------------------------------------------------------

    def _ping(self, now: float) -> bytes:
        self.ping_sent_at = now
        self.next_ping_at = now + self.settings.ping_interval
        return orjson.dumps({"req_id": self._next_id("p"), "op": "ping"})

    def poll(self, now: float) -> Tick:
        tick = Tick()
        if not self.open:
            return tick
        s = self.settings
        if self.requests:
            expired = [r for r in self.requests.values() if now - r.sent_at >= s.request_timeout]
            for request in expired:
                del self.requests[request.req_id]
                reason = f"no reply within {s.request_timeout:g} s"
                tick.failed.extend(self._reply(request, False, reason, now))
        if self.ping_sent_at is not None and now - self.ping_sent_at >= s.pong_timeout:
            tick.dead = f"no pong within {s.pong_timeout:g} s"
        elif now - self.last_frame_at >= s.silence_deadline:
            tick.dead = f"nothing received for {s.silence_deadline:g} s"
        quiet = now - self.last_frame_at
        if not self.silent and quiet >= s.stale_after:
            self.silent = tick.silent = True
        if tick.dead is not None:
            return tick
        if self.ping_sent_at is None and (now >= self.next_ping_at or quiet >= s.probe_after):
            tick.ping = self._ping(now)
        if (
            self.empty_since is not None
            and not self.topics
            and not self.requests
            and now - self.empty_since >= s.empty_conn_linger
        ):
            tick.idle = True
        return tick

    def next_wakeup(self, now: float) -> float:
        """The earliest time `poll` may have something to do."""
        if not self.open:
            return now + 1.0
        s = self.settings
        when = self.last_frame_at + s.silence_deadline
        if not self.silent:
            when = min(when, self.last_frame_at + s.stale_after)
        if self.ping_sent_at is not None:
            when = min(when, self.ping_sent_at + s.pong_timeout)
        else:
            when = min(when, self.next_ping_at, self.last_frame_at + s.probe_after)
        for request in self.requests.values():
            when = min(when, request.sent_at + s.request_timeout)
        if self.empty_since is not None:
            when = min(when, self.empty_since + s.empty_conn_linger)
        return when

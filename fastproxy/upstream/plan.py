"""Placement of topics on connections, sans-I/O: which connection carries which topic, within
the per-connection limits, and which topics the exchange refused."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from fastproxy.upstream.bybit_protocol import ConnectionState, arg_cost
from fastproxy.upstream.settings import UpstreamSettings


class PoolPlan:
    # Refused topics are remembered for topic_state() and /health, but only this many: clients
    # asking for endless unknown symbols must not grow memory.
    MAX_FAILED = 10_000

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.conns: list[ConnectionState] = []  # in creation order: fill the oldest first
        self.where: dict[str, ConnectionState] = {}  # wanted topic -> its connection
        self.failed: OrderedDict[str, str] = OrderedDict()  # topic -> reason
        self._idents = 0

    def subscribe(
        self, topics: Iterable[str]
    ) -> tuple[list[ConnectionState], list[tuple[str, str]]]:
        """Place new topics. Returns the connections that got topics (new ones included) and
        the topics that can never be placed, with the reason."""
        touched: dict[int, ConnectionState] = {}
        rejected: list[tuple[str, str]] = []
        for topic in topics:
            if not isinstance(topic, str) or not topic or topic in self.where:
                continue
            self.failed.pop(topic, None)
            if arg_cost(topic) > self.settings.max_args_chars_per_conn:
                rejected.append((topic, "topic longer than the args limit of a connection"))
                continue
            conn = self._holding(topic) or self._with_room(topic) or self._new_conn()
            conn.want(topic)
            self.where[topic] = conn
            touched[conn.ident] = conn
        return list(touched.values()), rejected

    def unsubscribe(self, topics: Iterable[str], now: float) -> list[ConnectionState]:
        touched: dict[int, ConnectionState] = {}
        for topic in topics:
            self.failed.pop(topic, None)
            conn = self.where.pop(topic, None)
            if conn is not None:
                conn.unwant(topic, now)
                touched[conn.ident] = conn
        return list(touched.values())

    def _holding(self, topic: str) -> ConnectionState | None:
        # A topic still being unsubscribed goes back where it is: a second connection would
        # carry it twice until the unsubscribe lands.
        for conn in self.conns:
            if topic in conn.topics and not conn.retired:
                return conn
        return None

    def _with_room(self, topic: str) -> ConnectionState | None:
        for conn in self.conns:
            if conn.has_room(topic):
                return conn
        return None

    def _new_conn(self) -> ConnectionState:
        self._idents += 1
        conn = ConnectionState(self.settings, self._idents)
        self.conns.append(conn)
        return conn

    def refused(self, conn: ConnectionState, topic: str, reason: str) -> bool:
        """The exchange refused a topic of `conn`. True when it was still wanted there (so the
        owner must hear of it)."""
        if self.where.get(topic) is not conn:
            return False
        del self.where[topic]
        self.remember_failed(topic, reason)
        return True

    def remember_failed(self, topic: str, reason: str) -> None:
        self.failed[topic] = reason
        self.failed.move_to_end(topic)
        while len(self.failed) > self.MAX_FAILED:
            self.failed.popitem(last=False)

    def retire(self, conn: ConnectionState) -> None:
        """Take an empty connection out of service; nothing will be placed on it any more."""
        conn.retired = True
        if conn in self.conns:
            self.conns.remove(conn)

    def topic_state(self, topic: str) -> str | None:
        conn = self.where.get(topic)
        if conn is not None:
            return conn.state_of(topic)
        return "failed" if topic in self.failed else None

    def counts(self) -> dict[str, int]:
        pending = live = 0
        for conn in self.conns:
            p, lv = conn.counts()
            pending += p
            live += lv
        return {"pending": pending, "live": live, "failed": len(self.failed)}

"""Reconnect policy, sans-I/O: exponential backoff with full jitter, and a sliding-window budget
of connection attempts shared by the whole pool."""

from __future__ import annotations

import random
from collections import deque


class Backoff:
    """Delay before the next connection attempt: uniform in [0, min(cap, base * 2**n)].

    Full jitter spreads a pool's reconnects after a mass drop instead of having every connection
    hit the exchange in the same instant. The caller resets it once a connection has proven
    itself (subscribed and data flowing), not merely on a completed handshake: an exchange that
    accepts and then drops at once would otherwise be hammered at the base delay forever.
    """

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        # The exponent is clamped so that a very long outage cannot overflow the float.
        return min(self.cap, self.base * 2.0 ** min(self.failures, 60))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class ConnectionBudget:
    """At most `limit` connection attempts in any `window` seconds, across the whole pool.

    Bybit counts every new connection against 500 per 5 minutes per IP; a reconnect storm of
    many pooled connections must not exceed it, whatever each connection's own backoff says.
    Memory is bounded: the window never holds more than `limit` timestamps.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._stamps: deque[float] = deque()
        self.waits = 0

    def _expire(self, now: float) -> None:
        stamps = self._stamps
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()

    def used(self, now: float) -> int:
        self._expire(now)
        return len(self._stamps)

    def reserve(self, now: float) -> float:
        """Take an attempt now (returns 0.0), or return the seconds to wait before asking again."""
        self._expire(now)
        if len(self._stamps) < self.limit:
            self._stamps.append(now)
            return 0.0
        self.waits += 1
        return max(self._stamps[0] + self.window - now, 0.001)

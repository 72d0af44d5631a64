"""Order book maintenance on the client side, sans-I/O.

A book starts from a `snapshot` message and applies `update`s whose `updateId` is exactly the
previous one + 1; size "0" removes a level. Anything else (an update before any snapshot, a
skipped or repeated `updateId`, a crossed book, a malformed level) raises BookError and leaves
the book empty: the caller must get a fresh snapshot, because a book that missed one delta is
wrong in a way nobody can see.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

Level = tuple[str, str]  # (price, size), the exchange's strings unchanged


class BookError(ValueError):
    """The book cannot be trusted any more; it needs a fresh snapshot."""


@dataclass(frozen=True, slots=True)
class Book:
    """A copy of one order book at one `update_id`: levels best first, at most the stream's
    depth on each side."""

    bids: list[Level]
    asks: list[Level]
    update_id: int
    time: int | None = None


class _Side:
    """One side of a book: levels keyed by numeric price, kept sorted."""

    __slots__ = ("_keys", "_levels", "best_high")

    def __init__(self, best_high: bool) -> None:
        self.best_high = best_high  # bids: the highest price is the best
        self._keys: list[Decimal] = []  # ascending
        self._levels: dict[Decimal, Level] = {}

    def clear(self) -> None:
        self._keys.clear()
        self._levels.clear()

    def set(self, price: str, size: str) -> None:
        key = _price(price)
        if _is_zero(size):
            if self._levels.pop(key, None) is not None:
                del self._keys[bisect_left(self._keys, key)]
            return
        if key not in self._levels:
            insort(self._keys, key)
        self._levels[key] = (price, size)

    def truncate(self, depth: int) -> None:
        excess = len(self._keys) - depth
        if excess <= 0:
            return
        # the worst levels go: the lowest bids, the highest asks
        dropped = self._keys[:excess] if self.best_high else self._keys[-excess:]
        for key in dropped:
            del self._levels[key]
        if self.best_high:
            del self._keys[:excess]
        else:
            del self._keys[-excess:]

    def best(self) -> Decimal | None:
        if not self._keys:
            return None
        return self._keys[-1] if self.best_high else self._keys[0]

    def levels(self) -> list[Level]:
        keys = reversed(self._keys) if self.best_high else self._keys
        levels = self._levels
        return [levels[key] for key in keys]

    def __len__(self) -> int:
        return len(self._keys)


def _number(text: Any, what: str) -> Decimal:
    """A finite, non-negative decimal from the exchange's string."""
    if not isinstance(text, str):
        raise BookError(f"{what} {text!r} is not a string")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise BookError(f"{what} {text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise BookError(f"{what} {text!r} is not a non-negative number")
    return value


def _price(text: Any) -> Decimal:
    value = _number(text, "price")
    if value == 0:
        raise BookError(f"price {text!r} is zero")
    return value


def _is_zero(size: Any) -> bool:
    return _number(size, "size") == 0


def _levels_of(data: dict[str, Any], key: str) -> list[Any]:
    levels = data.get(key)
    if not isinstance(levels, list):
        raise BookError(f"{key!r} is not a list of levels")
    for level in levels:
        if not isinstance(level, list | tuple) or len(level) < 2:
            raise BookError(f"level {level!r} in {key!r} is not [price, size]")
    return levels


def _update_id(data: dict[str, Any]) -> int:
    value = data.get("updateId")
    if not isinstance(value, int) or isinstance(value, bool):
        raise BookError(f"updateId {value!r} is not an integer")
    return value


class OrderBook:
    """The client's copy of one order book stream.

    `depth` bounds each side (the stream's DEPTH); with depth 1 every message is complete and
    replaces the book, whatever its type, because the exchange re-sends that book unchanged.
    """

    def __init__(self, depth: int | None = None) -> None:
        self.depth = depth
        self.update_id: int | None = None  # None: no trusted book (none yet, or broken)
        self.time: int | None = None
        self._bids = _Side(best_high=True)
        self._asks = _Side(best_high=False)

    @property
    def ready(self) -> bool:
        return self.update_id is not None

    def clear(self) -> None:
        self.update_id = None
        self.time = None
        self._bids.clear()
        self._asks.clear()

    def apply(self, kind: str, data: Any) -> None:
        """Apply one message's `type` and `data`; raise BookError (and clear) when the book
        cannot be trusted after it."""
        try:
            if not isinstance(data, dict):
                raise BookError("book data is not an object")
            if kind == "snapshot" or self.depth == 1:
                self._replace(data)
            elif kind == "update":
                self._update(data)
            else:
                raise BookError(f"unknown message type {kind!r}")
            self._check_crossed()
        except BookError:
            self.clear()
            raise

    def _replace(self, data: dict[str, Any]) -> None:
        update_id = _update_id(data)
        bids, asks = _levels_of(data, "bids"), _levels_of(data, "asks")
        self._bids.clear()
        self._asks.clear()
        for price, size, *_ in bids:
            self._bids.set(price, size)
        for price, size, *_ in asks:
            self._asks.set(price, size)
        self._finish(update_id, data)

    def _update(self, data: dict[str, Any]) -> None:
        if self.update_id is None:
            raise BookError("an update arrived before any snapshot")
        update_id = _update_id(data)
        if update_id != self.update_id + 1:
            raise BookError(f"updateId {update_id} does not follow {self.update_id}")
        bids, asks = _levels_of(data, "bids"), _levels_of(data, "asks")
        for price, size, *_ in bids:
            self._bids.set(price, size)
        for price, size, *_ in asks:
            self._asks.set(price, size)
        self._finish(update_id, data)

    def _finish(self, update_id: int, data: dict[str, Any]) -> None:
        if self.depth is not None:
            self._bids.truncate(self.depth)
            self._asks.truncate(self.depth)
        self.update_id = update_id
        time = data.get("time")
        self.time = time if isinstance(time, int) and not isinstance(time, bool) else None

    def _check_crossed(self) -> None:
        bid, ask = self._bids.best(), self._asks.best()
        if bid is not None and ask is not None and bid >= ask:
            raise BookError(f"crossed book: best bid {bid} >= best ask {ask}")

    def view(self) -> Book | None:
        """A copy of the book as it stands, or None when there is no trusted book."""
        if self.update_id is None:
            return None
        return Book(self._bids.levels(), self._asks.levels(), self.update_id, self.time)

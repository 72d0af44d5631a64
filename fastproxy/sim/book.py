"""A synthetic limit order book on an integer price grid (prices in ticks, sizes in lot steps).

Prices are kept in sorted lists so that the top N levels of a side are a slice, which keeps the
per-publish window diff of every depth topic cheap.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable

Level = tuple[int, int]


class OrderBook:
    def __init__(self) -> None:
        # both lists ascending: the best bid is bids[-1], the best ask is asks[0]
        self.bids: list[int] = []
        self.asks: list[int] = []
        self.bid_sizes: dict[int, int] = {}
        self.ask_sizes: dict[int, int] = {}
        # bumped on every mutation so publishers can skip diffing an unchanged book
        self.version = 0

    # -- queries ---------------------------------------------------------------------------------

    def best_bid(self) -> Level | None:
        if not self.bids:
            return None
        price = self.bids[-1]
        return price, self.bid_sizes[price]

    def best_ask(self) -> Level | None:
        if not self.asks:
            return None
        price = self.asks[0]
        return price, self.ask_sizes[price]

    def top_bids(self, n: int) -> list[Level]:
        """Best n bids, descending by price."""
        sizes = self.bid_sizes
        return [(p, sizes[p]) for p in reversed(self.bids[-n:])] if n else []

    def top_asks(self, n: int) -> list[Level]:
        """Best n asks, ascending by price."""
        sizes = self.ask_sizes
        return [(p, sizes[p]) for p in self.asks[:n]]

    # -- mutation --------------------------------------------------------------------------------

    def set_bid(self, price: int, size: int) -> None:
        if size <= 0:
            self.remove_bid(price)
            return
        if price not in self.bid_sizes:
            bisect.insort(self.bids, price)
        self.bid_sizes[price] = size
        self.version += 1

    def set_ask(self, price: int, size: int) -> None:
        if size <= 0:
            self.remove_ask(price)
            return
        if price not in self.ask_sizes:
            bisect.insort(self.asks, price)
        self.ask_sizes[price] = size
        self.version += 1

    def remove_bid(self, price: int) -> None:
        if self.bid_sizes.pop(price, None) is not None:
            del self.bids[bisect.bisect_left(self.bids, price)]
            self.version += 1

    def remove_ask(self, price: int) -> None:
        if self.ask_sizes.pop(price, None) is not None:
            del self.asks[bisect.bisect_left(self.asks, price)]
            self.version += 1

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()
        self.bid_sizes.clear()
        self.ask_sizes.clear()
        self.version += 1

    def recenter(
        self,
        best_bid: int,
        best_ask: int,
        rng: random.Random,
        size_fn: Callable[[int], int],
    ) -> None:
        """Move the inside of the book to (best_bid, best_ask), keeping bid < ask.

        Levels crossing the new inside are removed; a gap opened by a jump is partly refilled so the
        top of the book does not look hollow.
        """
        if best_bid >= best_ask:
            raise ValueError("best_bid must be below best_ask")
        bids, asks = self.bids, self.asks
        while bids and bids[-1] > best_bid:
            del self.bid_sizes[bids.pop()]
            self.version += 1
        while asks and asks[0] < best_ask:
            del self.ask_sizes[asks.pop(0)]
            self.version += 1
        if not bids or bids[-1] < best_bid:
            floor = bids[-1] if bids else best_bid - 40
            price = best_bid
            for depth in range(12):
                if price <= floor:
                    break
                self.bid_sizes[price] = size_fn(depth)
                bisect.insort(bids, price)
                price -= rng.randint(1, 3)
            self.version += 1
        if not asks or asks[0] > best_ask:
            ceiling = asks[0] if asks else best_ask + 40
            price = best_ask
            for depth in range(12):
                if price >= ceiling:
                    break
                self.ask_sizes[price] = size_fn(depth)
                bisect.insort(asks, price)
                price += rng.randint(1, 3)
            self.version += 1

    def maintain_depth(
        self, levels: int, rng: random.Random, size_fn: Callable[[int], int], min_price: int = 1
    ) -> None:
        """Keep each side between ``levels`` and ``levels + 64`` price levels deep."""
        bids, asks = self.bids, self.asks
        if len(bids) < levels:
            new: list[int] = []
            price = bids[0] if bids else (asks[0] - 1 if asks else min_price + levels * 2)
            for _ in range(levels - len(bids)):
                price -= rng.randint(1, 2)
                if price < min_price:
                    break
                new.append(price)
                self.bid_sizes[price] = size_fn(len(bids) + len(new))
            new.reverse()
            bids[:0] = new
            self.version += 1
        elif len(bids) > levels + 64:
            for price in bids[: len(bids) - levels]:
                del self.bid_sizes[price]
            del bids[: len(bids) - levels]
            self.version += 1
        if len(asks) < levels:
            price = asks[-1] if asks else (bids[-1] + 1 if bids else min_price + levels * 2)
            for _ in range(levels - len(asks)):
                price += rng.randint(1, 2)
                asks.append(price)
                self.ask_sizes[price] = size_fn(len(asks))
            self.version += 1
        elif len(asks) > levels + 64:
            for price in asks[levels:]:
                del self.ask_sizes[price]
            del asks[levels:]
            self.version += 1

    def churn(self, changes: int, rng: random.Random, size_fn: Callable[[int], int]) -> None:
        """Random size updates, cancels and new levels, concentrated near the inside."""
        for _ in range(changes):
            is_bid = rng.random() < 0.5
            prices = self.bids if is_bid else self.asks
            sizes = self.bid_sizes if is_bid else self.ask_sizes
            if len(prices) < 3:
                continue
            depth = min(int(rng.expovariate(1 / 8.0)), 80, len(prices) - 2)
            index = len(prices) - 1 - depth if is_bid else depth
            price = prices[index]
            roll = rng.random()
            if roll < 0.12 and depth > 0:
                # cancel a whole level, but never the inside (the inside only moves by recenter)
                del sizes[price]
                del prices[index]
            elif roll < 0.24:
                # add a level into a gap next to this one, if there is room on the grid
                neighbour = prices[index - 1] if is_bid else prices[index + 1]
                lo, hi = (neighbour, price) if is_bid else (price, neighbour)
                if hi - lo > 1:
                    new_price = rng.randint(lo + 1, hi - 1)
                    sizes[new_price] = size_fn(depth)
                    bisect.insort(prices, new_price)
            else:
                sizes[price] = size_fn(depth)
            self.version += 1

    def take(self, is_buy: bool, steps: int) -> list[Level]:
        """Execute a market order of ``steps`` lots against the book; returns (price, filled) fills.

        At most eight levels are swept and the last level of a side is never taken, so the book
        always keeps both sides.
        """
        fills: list[Level] = []
        prices = self.asks if is_buy else self.bids
        sizes = self.ask_sizes if is_buy else self.bid_sizes
        remaining = steps
        while remaining > 0 and len(prices) > 1 and len(fills) < 8:
            price = prices[0] if is_buy else prices[-1]
            available = sizes[price]
            if available > remaining:
                sizes[price] = available - remaining
                fills.append((price, remaining))
                break
            fills.append((price, available))
            remaining -= available
            del sizes[price]
            if is_buy:
                prices.pop(0)
            else:
                prices.pop()
        if fills:
            self.version += 1
        return fills


def diff_window(previous: dict[int, int], current: list[Level]) -> list[Level]:
    """Levels to send so that ``previous`` becomes ``current``; departed levels get size 0."""
    out: list[Level] = []
    current_prices = set()
    for price, size in current:
        current_prices.add(price)
        if previous.get(price) != size:
            out.append((price, size))
    for price in previous:
        if price not in current_prices:
            out.append((price, 0))
    return out

"""Latency histograms counted on the hot path in plain integers, rendered only at scrape.

`observe` is one `bisect` and two additions; nothing here allocates per observation or knows
about Prometheus (metrics.py turns the counts into cumulative buckets).
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds, 100 µs to 10 s: residence lives at the low end, exchange lag
# (network plus the exchange's own batching) in the middle.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Counts per bucket (the last one is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le="bound")
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) pairs ending with +Inf, as Prometheus wants."""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def snapshot(self) -> dict[str, object]:
        return {"count": self.count, "sum": round(self.total, 6), "buckets": self.cumulative()}


def by_kind(kinds: tuple[str, ...]) -> dict[str, Histogram]:
    return {kind: Histogram() for kind in kinds}

"""One node's numbers out of its workers' reports (sans-I/O).

Every worker reports its server and hub stats to the feed process about twice a second; the
feed process sends every worker the same node snapshot, and whichever worker a request lands on
answers /stats and /metrics from it. Counters of workers that died are kept (`retire`), so node
counters never go backwards when a worker is replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# The counters among a worker's numbers (everything else there is a gauge).
COUNTERS: dict[str, tuple[str, ...]] = {
    "connections": ("connections_total", "requests", "messages_sent", "bytes_sent", "drops"),
    "hub": ("messages_in", "deliveries", "releases", "conflated_messages"),
}
SECTIONS = tuple(COUNTERS)


def add_into(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add every number of `part` into `total`, key by key, nested dicts alike."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_into(total.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
    return total


def retire(retired: dict[str, Any], report: dict[str, Any]) -> None:
    """Keep the counters of a worker that is gone in `retired`."""
    for section, keys in COUNTERS.items():
        numbers = report.get(section, {})
        add_into(retired.setdefault(section, {}), {k: numbers[k] for k in keys if k in numbers})


def totals(reports: Iterable[dict[str, Any]], retired: dict[str, Any]) -> dict[str, Any]:
    """Node totals of every section: live workers' numbers plus the retired counters."""
    node: dict[str, Any] = {section: {} for section in SECTIONS}
    for report in reports:
        for section in SECTIONS:
            add_into(node[section], report.get(section, {}))
    for section in SECTIONS:
        add_into(node[section], retired.get(section, {}))
    return node

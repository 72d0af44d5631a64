"""Prometheus metrics, read from the counters the components keep anyway.

Nothing on the hot path touches prometheus_client: a scrape walks the plain integer counters
of the server, hub, feed and upstream pool and renders them then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from fastproxy.latency import Histogram

_HISTOGRAMS = {
    "exchange_lag": (
        "fastproxy_exchange_lag_seconds",
        "Receipt by this proxy minus the exchange's ts, by stream kind (clock skew counts as 0)",
    ),
    "residence": (
        "fastproxy_residence_seconds",
        "A Message's arrival at this node's hub to its write to every local subscriber, by kind",
    ),
}


def _reasons(name: str, help_text: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


# Counters the Redis bus reports in its status; the memory bus has none of them.
_BUS_COUNTERS = {
    "published": "Messages this node published to Redis as owner",
    "publish_dropped": "Messages dropped because the publish queue was full",
    "received": "Messages received from Redis for streams owned elsewhere",
    "duplicates_dropped": "Messages dropped as already delivered (seq at or below the last)",
    "gaps": "Seq jumps delivered as snapshots",
    "leases_won": "Stream leases this node took",
    "leases_lost": "Stream leases this node lost",
    "redis_errors": "Redis errors seen by the bus",
}


class ProxyCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        latency: Callable[[], dict[str, dict[str, Histogram]]] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._latency = latency

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        conns = s["connections"]
        up = s["upstream"]
        hub = s["hub"]
        yield GaugeMetricFamily("fastproxy_clients", "Connected clients", value=conns["connected"])
        yield CounterMetricFamily(
            "fastproxy_client_connections",
            "Client connections accepted",
            value=conns["connections_total"],
        )
        yield CounterMetricFamily(
            "fastproxy_messages_sent", "Frames written to clients", value=conns["messages_sent"]
        )
        yield CounterMetricFamily(
            "fastproxy_bytes_sent", "Bytes written to clients", value=conns["bytes_sent"]
        )
        yield _reasons(
            "fastproxy_client_drops", "Clients closed by the server, by reason", conns["drops"]
        )
        yield _reasons(
            "fastproxy_client_refused",
            "WebSocket upgrades refused with an HTTP error before the upgrade, by reason",
            conns.get("refused", {}),
        )
        yield _reasons(
            "fastproxy_client_disconnects",
            "Client sessions ended, by reason (client_closed, connection_lost, or the drop's)",
            conns.get("disconnects", {}),
        )
        yield CounterMetricFamily(
            "fastproxy_socket_writes",
            "Socket writes to clients (frames are coalesced: messages_sent / writes per write)",
            value=conns.get("writes", 0),
        )
        keys = conns.get("keys", {})
        if keys:
            per_key = {
                "clients": GaugeMetricFamily(
                    "fastproxy_key_clients", "Clients connected, by API key id", labels=["key_id"]
                ),
                "connections": CounterMetricFamily(
                    "fastproxy_key_connections",
                    "Client connections accepted, by API key id",
                    labels=["key_id"],
                ),
                "messages_sent": CounterMetricFamily(
                    "fastproxy_key_messages_sent",
                    "Frames written to clients, by API key id",
                    labels=["key_id"],
                ),
                "requests": CounterMetricFamily(
                    "fastproxy_key_requests",
                    "Client requests (subscribe, unsubscribe, ping), by API key id",
                    labels=["key_id"],
                ),
            }
            for kid, usage in keys.items():
                for field, family in per_key.items():
                    family.add_metric([kid], usage[field])
            yield from per_key.values()
        slow = conns.get("slow_clients")
        if slow is not None:
            yield GaugeMetricFamily(
                "fastproxy_clients_conflating",
                "Clients behind, getting conflated state streams",
                value=slow["conflating"],
            )
            yield CounterMetricFamily(
                "fastproxy_conflated_messages",
                "State messages replaced by a newer one for a client behind",
                value=slow["conflated_messages"],
            )
            yield CounterMetricFamily(
                "fastproxy_client_resets",
                "Closed client sockets reset because the peer left data unread",
                value=slow["resets"],
            )
            unread = GaugeHistogramMetricFamily(
                "fastproxy_client_unread_bytes",
                "Clients by bytes written to them and not yet read, in user space (the "
                "transport's buffer) or in the kernel's send queue",
                labels=["where"],
            )
            for where in ("user", "kernel"):
                counts = slow[f"unread_bytes_{where}"]
                cumulative, buckets = 0, []
                for edge, count in counts.items():
                    cumulative += count
                    buckets.append((edge, cumulative))
                unread.add_metric([where], buckets, slow[f"unread_bytes_{where}_total"])
            yield unread
        subs = GaugeMetricFamily(
            "fastproxy_subscriptions", "Client subscriptions by stream kind", labels=["kind"]
        )
        for kind, count in hub["subscriptions_by_kind"].items():
            subs.add_metric([kind], count)
        yield subs
        yield GaugeMetricFamily(
            "fastproxy_streams", "Streams held on this node", value=hub["streams"]
        )
        yield GaugeMetricFamily(
            "fastproxy_stale_streams",
            "Streams held on this node whose data may not be current (clients were told)",
            value=hub.get("stale_streams", 0),
        )
        history = hub.get("history", {})
        yield GaugeMetricFamily(
            "fastproxy_history_bytes",
            "Bytes the resume history holds (capped by HISTORY_MAX_BYTES)",
            value=history.get("bytes", 0),
        )
        yield GaugeMetricFamily(
            "fastproxy_history_messages",
            "Messages the resume history holds",
            value=history.get("messages", 0),
        )
        yield CounterMetricFamily(
            "fastproxy_deliveries", "Messages queued to clients", value=hub["deliveries"]
        )
        yield GaugeMetricFamily(
            "fastproxy_upstream_connections",
            "Open Bybit connections",
            value=up.get("connected", 0),
        )
        topics = GaugeMetricFamily(
            "fastproxy_upstream_topics", "Upstream topics by state", labels=["state"]
        )
        for state, count in up.get("topics", {}).items():
            topics.add_metric([state], count)
        yield topics
        yield CounterMetricFamily(
            "fastproxy_upstream_reconnects", "Bybit reconnects", value=up.get("reconnects", 0)
        )
        yield CounterMetricFamily(
            "fastproxy_upstream_messages",
            "Bybit data frames received",
            value=up.get("messages_in", 0),
        )
        yield CounterMetricFamily(
            "fastproxy_codec_errors",
            "Malformed upstream frames dropped",
            value=s.get("feed", {}).get("codec_errors", 0),
        )
        yield CounterMetricFamily(
            "fastproxy_upstream_old_frames",
            "Bybit frames older than UPSTREAM_MAX_FRAME_AGE (their streams marked stale)",
            value=s.get("feed", {}).get("old_frames", 0),
        )
        resyncs = CounterMetricFamily(
            "fastproxy_book_resyncs",
            "Order books rebuilt from a fresh exchange snapshot, by reason",
            labels=["reason"],
        )
        for reason, count in s.get("feed", {}).get("book_resyncs", {}).items():
            resyncs.add_metric([reason], count)
        yield resyncs
        bus = s["bus"]
        yield GaugeMetricFamily(
            "fastproxy_bus_healthy",
            "1 when the bus (Redis in cluster mode) is reachable",
            value=1 if bus.get("healthy") else 0,
        )
        roles = GaugeMetricFamily(
            "fastproxy_bus_streams", "Streams by this node's role for them", labels=["role"]
        )
        for role in ("owned", "following", "local"):
            if f"streams_{role}" in bus:
                roles.add_metric([role], bus[f"streams_{role}"])
        yield roles
        for key, help_text in _BUS_COUNTERS.items():
            if key in bus:
                yield CounterMetricFamily(f"fastproxy_bus_{key}", help_text, value=bus[key])
        if self._latency is not None:
            yield from _histograms(self._latency())
        if "workers" in s:  # --workers N: the supervisor's view
            yield from _worker_metrics(s)


def _worker_metrics(s: dict[str, Any]) -> Iterator[Any]:
    node = s["node"]
    yield GaugeMetricFamily("fastproxy_workers", "Worker processes alive", value=node["alive"])
    yield CounterMetricFamily(
        "fastproxy_worker_restarts", "Workers started again after dying", value=node["restarts"]
    )
    clients = GaugeMetricFamily(
        "fastproxy_worker_clients", "Connected clients by worker", labels=["worker"]
    )
    for worker in s["workers"]:
        clients.add_metric([str(worker["id"])], worker["connected"])
    yield clients


def _histograms(latency: dict[str, dict[str, Histogram]]) -> Iterator[HistogramMetricFamily]:
    for key, (name, help_text) in _HISTOGRAMS.items():
        family = HistogramMetricFamily(name, help_text, labels=["kind"])
        for kind, histogram in sorted(latency.get(key, {}).items()):
            family.add_metric([kind], histogram.cumulative(), sum_value=histogram.total)
        yield family


def metrics_renderer(
    snapshot: Callable[[], dict[str, Any]],
    latency: Callable[[], dict[str, dict[str, Histogram]]] | None = None,
) -> Callable[[], bytes]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(snapshot, latency))
    ProcessCollector(namespace="", registry=registry)  # process_cpu_seconds_total, RSS, fds
    return lambda: generate_latest(registry)

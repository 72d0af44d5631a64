"""/metrics: rendering from snapshots, and every metric moving over the real server."""

import asyncio
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from fastproxy.latency import Histogram
from fastproxy.metrics import metrics_renderer
from tests.proxyutil import (
    RawClient,
    client,
    http_get,
    recv_data,
    running_proxy,
    running_sim,
    subscribe,
)


def snapshot(bus: dict) -> dict:
    return {
        "connections": {
            "connected": 3,
            "connections_total": 5,
            "messages_sent": 10,
            "bytes_sent": 100,
            "drops": {"slow_client": 2},
        },
        "upstream": {"connected": 1, "topics": {"live": 4}, "reconnects": 1, "messages_in": 9},
        "hub": {"streams": 4, "deliveries": 12, "subscriptions_by_kind": {"ticker": 4}},
        "feed": {"codec_errors": 0},
        "bus": bus,
    }


def test_memory_bus_metrics() -> None:
    text = metrics_renderer(lambda: snapshot({"engine": "memory", "healthy": True}))().decode()
    assert "fastproxy_clients 3.0" in text
    assert 'fastproxy_client_drops_total{reason="slow_client"} 2.0' in text
    assert 'fastproxy_upstream_topics{state="live"} 4.0' in text
    assert "fastproxy_bus_healthy 1.0" in text
    assert "fastproxy_bus_leases_won" not in text


def test_redis_bus_counters_are_exported() -> None:
    bus = {"healthy": False, "streams_owned": 2, "streams_following": 1, "leases_won": 7}
    text = metrics_renderer(lambda: snapshot(bus))().decode()
    assert "fastproxy_bus_healthy 0.0" in text
    assert 'fastproxy_bus_streams{role="owned"} 2.0' in text
    assert "fastproxy_bus_leases_won_total 7.0" in text


# -- every new metric moves: scrape, act, scrape (real proxy, real sockets) ----------------

TICKER = "mudrex.futures.ticker.BTCUSDT"


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    h = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.005, 2.0):
        h.observe(value)
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert h.count == 4 and abs(h.total - 2.0065) < 1e-9
    latency = {"exchange_lag": {"ticker": h}, "residence": {}}
    text = metrics_renderer(lambda: snapshot({"healthy": True}), lambda: latency)().decode()
    assert 'fastproxy_exchange_lag_seconds_bucket{kind="ticker",le="0.01"} 3.0' in text
    assert 'fastproxy_exchange_lag_seconds_count{kind="ticker"} 4.0' in text
    assert "# TYPE fastproxy_residence_seconds histogram" in text


async def scrape(app: object) -> dict[str, float]:
    status, body = await asyncio.to_thread(http_get, app, "/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


async def test_latency_writes_and_disconnect_metrics_move() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:
        before = await scrape(app)
        async with client(app) as ws:
            await subscribe(ws, "ticker:BTCUSDT")
            for _ in range(5):
                await recv_data(ws, TICKER)
            after = await scrape(app)
        lag = 'fastproxy_exchange_lag_seconds_count{kind="ticker"}'
        residence = 'fastproxy_residence_seconds_count{kind="ticker"}'
        assert before.get(lag, 0) == 0 and after[lag] >= 4
        assert before.get(residence, 0) == 0 and after[residence] >= 4
        # the simulator's ts is its wall clock: lag is real and small on loopback
        assert 0 <= after['fastproxy_exchange_lag_seconds_sum{kind="ticker"}'] / after[lag] < 5
        assert (
            after['fastproxy_residence_seconds_bucket{kind="ticker",le="+Inf"}'] == after[residence]
        )
        writes = "fastproxy_socket_writes_total"
        assert (
            after[writes] > before[writes]
            and after[writes] <= after["fastproxy_messages_sent_total"]
        )
        assert "process_resident_memory_bytes" in after
        # disconnects by reason: a client that closes, one whose socket just goes, a 1009
        await asyncio.sleep(0.3)
        mid = await scrape(app)
        assert mid['fastproxy_client_disconnects_total{reason="client_closed"}'] == 1
        raw = await RawClient(app.port).connect()
        raw.close()
        raw = await RawClient(app.port).connect()
        raw.send_frame(0x1, b"x" * (70 * 1024))
        assert await raw.read_until_close() == 1009
        raw.close()
        await asyncio.sleep(0.3)
        end = await scrape(app)
        assert end['fastproxy_client_disconnects_total{reason="connection_lost"}'] == 1
        assert end['fastproxy_client_disconnects_total{reason="too_big"}'] == 1
        assert end['fastproxy_client_drops_total{reason="too_big"}'] == 1


async def test_refusal_and_per_key_metrics_move() -> None:
    async with running_sim() as sim, running_proxy(sim, api_keys=("k-one",)) as app:
        headers = {"Authorization": "Bearer k-one"}

        async def scrape_keyed() -> dict[str, float]:
            status, body = await asyncio.to_thread(_get_with, app.port, "/metrics", headers)
            assert status == 200
            return {
                f"{s.name}{dict(sorted(s.labels.items()))}": s.value
                for f in text_string_to_metric_families(body.decode())
                for s in f.samples
            }

        before = await scrape_keyed()
        with pytest.raises(Exception, match="401"):
            async with connect(f"ws://127.0.0.1:{app.port}/ws"):
                pass
        async with connect(f"ws://127.0.0.1:{app.port}/ws?token=k-one") as ws:
            await subscribe(ws, "ticker:BTCUSDT")
            await recv_data(ws, TICKER)
            after = await scrape_keyed()
        refused = "fastproxy_client_refused_total{'reason': 'unauthorized'}"
        assert before.get(refused, 0) == 0 and after[refused] == 1
        kid = {"key_id": app.server.keys.ids[0]}
        assert after[f"fastproxy_key_connections_total{kid}"] == 1
        assert after[f"fastproxy_key_messages_sent_total{kid}"] >= 2
        assert after[f"fastproxy_key_requests_total{kid}"] == 1


def _get_with(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


async def test_bus_owner_changes_move_and_are_logged(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cluster mode: the node that takes a stream's lease counts it and says so in its log."""
    from tests.test_cluster import unique_url
    from tests.test_cluster_bus import delete_prefix

    url = unique_url(redis_url)
    caplog.set_level(logging.INFO, logger="fastproxy.bus")
    try:
        async with running_sim() as sim, running_proxy(sim, redis_url=url) as app:
            before = await scrape(app)
            async with client(app) as ws:
                await subscribe(ws, "ticker:BTCUSDT")
                await recv_data(ws, TICKER)
                after = await scrape(app)
        won = "fastproxy_bus_leases_won_total"
        assert before[won] == 0 and after[won] == 1
        assert any(
            r.getMessage() == "stream owner: this node" and r.stream == TICKER
            for r in caplog.records
        )
    finally:
        await delete_prefix(redis_url, url.split("prefix=", 1)[1])

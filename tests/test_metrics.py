from fastproxy.metrics import metrics_renderer


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

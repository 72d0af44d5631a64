"""The per-connection Bybit protocol state, sans-I/O: requests, ack correlation, retries,
heartbeat deadlines."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastproxy.upstream.protocol import (
    FAIL_ALREADY,
    FAIL_NOT_FOUND,
    FAIL_OTHER,
    FRAME_DATA,
    FRAME_OTHER,
    FRAME_PONG,
    FRAME_RESPONSE,
    ConnectionState,
    arg_cost,
    classify,
    parse_failure,
)
from fastproxy.upstream.settings import UpstreamSettings

URL = "ws://127.0.0.1:1/v5/public/linear"


def settings(**overrides: Any) -> UpstreamSettings:
    values: dict[str, Any] = {
        "url": URL,
        "ping_interval": 20.0,
        "pong_timeout": 10.0,
        "silence_timeout": 30.0,
        "request_timeout": 10.0,
        "empty_conn_linger": 30.0,
        # no early probe pings: these tests drive the ping schedule by hand
        "stale_after": 1000.0,
    }
    values.update(overrides)
    return UpstreamSettings(**values)


def opened(topics: list[str] = (), now: float = 100.0, **overrides: Any) -> ConnectionState:  # type: ignore[assignment]
    state = ConnectionState(settings(**overrides), 1)
    for topic in topics:
        state.want(topic)
    state.opened(now, 1)
    return state


def sent(state: ConnectionState, now: float = 100.0) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in state.take_requests(now)]


def ack(req: dict[str, Any], ok: bool = True, ret_msg: str = "") -> dict[str, Any]:
    return {
        "success": ok,
        "ret_msg": ret_msg,
        "conn_id": "c-1",
        "req_id": req["req_id"],
        "op": req["op"],
    }


def data(topic: str) -> dict[str, Any]:
    return {"topic": topic, "type": "snapshot", "ts": 1, "data": {}}


TOPICS = [f"tickers.S{i}USDT" for i in range(25)]


# -- frame classification --------------------------------------------------------------------


def test_classify_follows_the_reference_rules() -> None:
    assert classify(data("tickers.BTCUSDT")) == FRAME_DATA
    linear_pong = {"success": True, "ret_msg": "pong", "conn_id": "x", "req_id": "", "op": "ping"}
    assert classify(linear_pong) == FRAME_PONG
    assert classify({"args": ["1672916271846"], "op": "pong"}) == FRAME_PONG
    assert classify({"success": False, "ret_msg": "error:invalid op", "op": ""}) == FRAME_RESPONSE
    assert classify({"hello": 1}) == FRAME_OTHER
    assert classify([1, 2]) == FRAME_OTHER


def test_parse_failure() -> None:
    assert parse_failure("error:handler not found,topic:orderbook.50.NOPEUSDT") == (
        FAIL_NOT_FOUND,
        "orderbook.50.NOPEUSDT",
    )
    assert parse_failure("error:already subscribed,topic:tickers.BTCUSDT") == (
        FAIL_ALREADY,
        "tickers.BTCUSDT",
    )
    assert parse_failure("args size >10") == (FAIL_OTHER, None)
    assert parse_failure("error:handler not found") == (FAIL_OTHER, None)
    assert parse_failure("") == (FAIL_OTHER, None)


# -- requests and acks -----------------------------------------------------------------------


def test_nothing_is_sent_before_the_connection_opens() -> None:
    state = ConnectionState(settings(), 1)
    state.want("tickers.BTCUSDT")
    assert state.take_requests(0.0) == []
    assert state.state_of("tickers.BTCUSDT") == "pending"


def test_subscribes_are_batched_with_unique_req_ids() -> None:
    state = opened(TOPICS)
    requests = sent(state)
    assert [len(r["args"]) for r in requests] == [10, 10, 5]
    assert all(r["op"] == "subscribe" and r["req_id"] for r in requests)
    assert len({r["req_id"] for r in requests}) == 3
    assert [t for r in requests for t in r["args"]] == TOPICS
    assert sent(state) == []  # nothing twice
    assert all(state.state_of(t) == "pending" for t in TOPICS)
    assert state.on_control(ack(requests[1]), 101.0) == []
    assert [state.state_of(t) for t in TOPICS[10:20]] == ["live"] * 10
    assert state.state_of(TOPICS[0]) == "pending"
    assert state.counts() == (15, 10)


def test_a_reply_matching_no_request_changes_nothing() -> None:
    state = opened(["tickers.BTCUSDT"])
    (request,) = sent(state)
    assert state.on_control({**ack(request), "req_id": "someone-else"}, 101.0) == []
    assert state.on_control({**ack(request), "req_id": 7}, 101.0) == []
    assert state.state_of("tickers.BTCUSDT") == "pending"
    state.on_control(ack(request), 101.0)
    assert state.state_of("tickers.BTCUSDT") == "live"
    state.on_control(ack(request), 101.0)  # a duplicate reply is harmless
    assert state.state_of("tickers.BTCUSDT") == "live"


def test_wanting_a_topic_twice_sends_it_once() -> None:
    state = opened(["tickers.BTCUSDT"])
    state.want("tickers.BTCUSDT")
    (request,) = sent(state)
    state.want("tickers.BTCUSDT")  # in flight
    assert sent(state) == []
    state.on_control(ack(request), 101.0)
    state.want("tickers.BTCUSDT")  # live
    assert sent(state) == []
    assert state.wanted == 1


def test_handler_not_found_fails_exactly_that_topic_and_resends_the_rest_alone() -> None:
    topics = ["tickers.BTCUSDT", "tickers.NOPEUSDT", "tickers.ETHUSDT"]
    state = opened(topics)
    (request,) = sent(state)
    failed = state.on_control(
        ack(request, False, "error:handler not found,topic:tickers.NOPEUSDT"), 101.0
    )
    assert failed == [("tickers.NOPEUSDT", "error:handler not found,topic:tickers.NOPEUSDT")]
    assert state.state_of("tickers.NOPEUSDT") is None
    assert "tickers.NOPEUSDT" not in state.topics
    retries = sent(state)
    assert sorted(r["args"][0] for r in retries) == ["tickers.BTCUSDT", "tickers.ETHUSDT"]
    assert all(len(r["args"]) == 1 for r in retries)
    # Bybit may have applied the earlier arg: "already subscribed" then means success.
    state.on_control(
        ack(retries[0], False, f"error:already subscribed,topic:{retries[0]['args'][0]}"), 102.0
    )
    state.on_control(ack(retries[1]), 102.0)
    assert state.state_of("tickers.BTCUSDT") == "live"
    assert state.state_of("tickers.ETHUSDT") == "live"
    assert state.wanted == 2


def test_already_subscribed_in_a_batch_confirms_it_and_resends_the_others() -> None:
    state = opened(["publicTrade.BTCUSDT", "publicTrade.ETHUSDT"])
    (request,) = sent(state)
    failed = state.on_control(
        ack(request, False, "error:already subscribed,topic:publicTrade.BTCUSDT"), 101.0
    )
    assert failed == []
    assert state.state_of("publicTrade.BTCUSDT") == "live"
    (retry,) = sent(state)
    assert retry["args"] == ["publicTrade.ETHUSDT"]


def test_other_batch_failures_retry_alone_then_give_up_with_the_reason() -> None:
    state = opened(["tickers.AUSDT", "tickers.BUSDT"], subscribe_tries=3)
    (request,) = sent(state)
    assert state.on_control(ack(request, False, "args size >10"), 101.0) == []
    retries = sent(state)
    assert sorted(len(r["args"]) for r in retries) == [1, 1]
    for retry in retries:
        if retry["args"] == ["tickers.BUSDT"]:
            state.on_control(ack(retry), 102.0)
        else:
            a_request = retry
    assert state.state_of("tickers.BUSDT") == "live"
    failed: list[tuple[str, str]] = []
    for _ in range(3):
        failed = state.on_control(ack(a_request, False, "error:something odd"), 103.0)
        if failed:
            break
        (a_request,) = sent(state)
        assert a_request["args"] == ["tickers.AUSDT"]
    assert failed == [("tickers.AUSDT", "error:something odd")]
    assert state.state_of("tickers.AUSDT") is None
    assert sent(state) == []


def test_failure_naming_a_topic_outside_the_request_is_a_generic_failure() -> None:
    state = opened(["tickers.AUSDT"], subscribe_tries=2)
    (request,) = sent(state)
    state.on_control(ack(request, False, "error:already subscribed,topic:tickers.ZZZ"), 101.0)
    (request,) = sent(state)
    failed = state.on_control(
        ack(request, False, "error:already subscribed,topic:tickers.ZZZ"), 101.0
    )
    assert failed and failed[0][0] == "tickers.AUSDT"


def test_data_before_the_ack_makes_the_topic_live_and_it_is_not_resent() -> None:
    state = opened(["tickers.BTCUSDT", "tickers.NOPEUSDT"])
    (request,) = sent(state)
    assert state.accept_data("tickers.BTCUSDT", 101.0)
    assert state.state_of("tickers.BTCUSDT") == "live"
    state.on_control(ack(request, False, "error:handler not found,topic:tickers.NOPEUSDT"), 101.0)
    assert sent(state) == []
    assert state.state_of("tickers.BTCUSDT") == "live"


def test_unsubscribe_of_a_live_topic_and_late_frames() -> None:
    state = opened(["tickers.BTCUSDT", "tickers.ETHUSDT"])
    (request,) = sent(state)
    state.on_control(ack(request), 101.0)
    state.unwant("tickers.BTCUSDT", 102.0)
    assert state.state_of("tickers.BTCUSDT") is None
    (leave,) = sent(state)
    assert leave["op"] == "unsubscribe" and leave["args"] == ["tickers.BTCUSDT"]
    assert not state.accept_data("tickers.BTCUSDT", 102.0)  # in-flight frame: dropped
    state.on_control(ack(leave), 102.0)
    assert "tickers.BTCUSDT" not in state.topics
    assert not state.accept_data("tickers.BTCUSDT", 102.0)
    assert state.accept_data("tickers.ETHUSDT", 102.0)
    assert state.chars == arg_cost("tickers.ETHUSDT")


def test_unsubscribe_while_the_subscribe_is_in_flight() -> None:
    state = opened(["tickers.BTCUSDT"])
    (request,) = sent(state)
    state.unwant("tickers.BTCUSDT", 101.0)
    assert sent(state) == []  # nothing until the ack says what the exchange holds
    state.on_control(ack(request), 101.0)
    (leave,) = sent(state)
    assert leave["op"] == "unsubscribe"
    state.on_control(ack(leave), 102.0)
    assert state.topics == {}


def test_unwanted_topic_of_an_unknown_batch_is_unsubscribed_to_make_sure() -> None:
    state = opened(["tickers.AUSDT", "tickers.NOPEUSDT"])
    (request,) = sent(state)
    state.unwant("tickers.AUSDT", 101.0)
    state.on_control(ack(request, False, "error:handler not found,topic:tickers.NOPEUSDT"), 101.0)
    (leave,) = sent(state)
    assert leave == {**leave, "op": "unsubscribe", "args": ["tickers.AUSDT"]}
    state.on_control(ack(leave, False, "error:not subscribed"), 102.0)
    assert state.topics == {}


def test_resubscribe_while_unsubscribing_waits_for_the_unsubscribe() -> None:
    state = opened(["tickers.BTCUSDT"])
    (request,) = sent(state)
    state.on_control(ack(request), 101.0)
    state.unwant("tickers.BTCUSDT", 102.0)
    (leave,) = sent(state)
    state.want("tickers.BTCUSDT")
    assert state.state_of("tickers.BTCUSDT") == "pending"
    assert sent(state) == []  # a subscribe now could reach Bybit as a duplicate
    assert not state.accept_data("tickers.BTCUSDT", 102.0)
    state.on_control(ack(leave), 103.0)
    (again,) = sent(state)
    assert again["op"] == "subscribe" and again["args"] == ["tickers.BTCUSDT"]


def test_unwant_then_want_before_sending_keeps_the_subscription() -> None:
    state = opened(["tickers.BTCUSDT"])
    (request,) = sent(state)
    state.on_control(ack(request), 101.0)
    state.unwant("tickers.BTCUSDT", 102.0)
    state.want("tickers.BTCUSDT")
    assert sent(state) == []
    assert state.state_of("tickers.BTCUSDT") == "live"


def test_request_timeout_is_a_failure_of_that_request() -> None:
    state = opened(["tickers.AUSDT", "tickers.BUSDT"], request_timeout=5.0, subscribe_tries=2)
    (request,) = sent(state)
    assert state.poll(104.0).failed == []
    assert sent(state, 104.0) == []
    tick = state.poll(105.5)
    assert tick.failed == [] and tick.dead is None
    retries = sent(state, 105.5)
    assert sorted(r["args"][0] for r in retries) == ["tickers.AUSDT", "tickers.BUSDT"]
    state.last_frame_at = 110.0
    tick = state.poll(111.0)  # each topic's first try alone timed out: one more
    assert tick.failed == []
    assert len(sent(state, 111.0)) == 2
    state.last_frame_at = 116.0
    tick = state.poll(116.5)
    assert sorted(t for t, _ in tick.failed) == ["tickers.AUSDT", "tickers.BUSDT"]
    assert tick.failed[0][1] == "no reply within 5 s"
    assert state.topics == {}
    assert state.on_control(ack(request), 117.0) == []  # the late reply is ignored


# -- connection lifecycle --------------------------------------------------------------------


def test_reconnect_resends_every_wanted_topic_and_forgets_unwanted_ones() -> None:
    state = opened(TOPICS[:12])
    for request in sent(state):
        state.on_control(ack(request), 101.0)
    state.unwant(TOPICS[0], 102.0)
    assert state.closed() == TOPICS[1:12]
    assert not state.open
    assert state.take_requests(103.0) == []
    assert all(state.state_of(t) == "pending" for t in TOPICS[1:12])
    state.opened(104.0, 2)
    assert state.generation == 2
    requests = sent(state, 104.0)
    assert [t for r in requests for t in r["args"]] == TOPICS[1:12]
    assert [len(r["args"]) for r in requests] == [10, 1]


def test_a_failed_topic_is_not_resent_after_reconnect() -> None:
    state = opened(["tickers.NOPEUSDT", "tickers.BTCUSDT"])
    (request,) = sent(state)
    state.on_control(ack(request, False, "error:handler not found,topic:tickers.NOPEUSDT"), 101.0)
    state.closed()
    state.opened(102.0, 2)
    (request,) = sent(state, 102.0)
    assert request["args"] == ["tickers.BTCUSDT"]


# -- heartbeat and deadlines ---------------------------------------------------------------


def test_ping_every_interval_and_pong_clears_the_deadline() -> None:
    state = opened(["tickers.BTCUSDT"], ping_interval=20.0, pong_timeout=10.0)
    assert state.poll(119.0).ping is None
    ping = state.poll(120.0).ping
    assert ping is not None
    request = orjson.loads(ping)
    assert request["op"] == "ping" and request["req_id"]
    assert state.poll(125.0).ping is None  # one outstanding ping at a time
    pong = {"success": True, "ret_msg": "pong", "conn_id": "c", "req_id": request["req_id"]}
    state.last_frame_at = 125.0
    assert state.on_control({**pong, "op": "ping"}, 125.0) == []
    assert state.pongs == 1
    assert state.poll(131.0).dead is None
    assert state.poll(140.0).ping is not None


def test_missing_pong_declares_the_connection_dead() -> None:
    state = opened([], ping_interval=20.0, pong_timeout=10.0, silence_timeout=60.0)
    assert state.poll(120.0).ping is not None
    state.last_frame_at = 125.0  # data still flows; only the pong is missing
    assert state.poll(129.9).dead is None
    assert state.poll(130.0).dead == "no pong within 10 s"


def test_silence_declares_the_connection_dead_within_the_deadline() -> None:
    state = opened(["tickers.BTCUSDT"], ping_interval=20.0, pong_timeout=10.0)
    # A half-open socket: nothing ever arrives again after t=100.
    dead_at = None
    t = 100.0
    while t < 200.0 and dead_at is None:
        tick = state.poll(t)
        if tick.dead:
            dead_at = t
        t = max(state.next_wakeup(t), t + 0.001)
    assert dead_at is not None and dead_at <= 130.0 + 1e-6


def test_pongs_count_as_traffic_for_the_silence_deadline() -> None:
    state = opened([], ping_interval=5.0, pong_timeout=2.0, silence_timeout=8.0)
    t = 100.0
    for _ in range(10):
        t += 5.0
        tick = state.poll(t)
        assert tick.dead is None and tick.ping is not None
        state.last_frame_at = t + 0.1
        state.on_control({"success": True, "ret_msg": "pong", "op": "ping", "req_id": ""}, t)


def test_next_wakeup_is_the_earliest_deadline() -> None:
    state = opened(["tickers.BTCUSDT"], ping_interval=20.0, pong_timeout=10.0, request_timeout=3.0)
    assert state.next_wakeup(100.0) == 120.0
    sent(state)
    assert state.next_wakeup(100.0) == 103.0
    closed = ConnectionState(settings(), 2)
    assert closed.next_wakeup(50.0) == 51.0


def test_an_empty_connection_is_idle_after_the_linger() -> None:
    state = opened(["tickers.BTCUSDT"], empty_conn_linger=30.0, request_timeout=60.0)
    (request,) = sent(state)
    state.on_control(ack(request), 101.0)
    state.unwant("tickers.BTCUSDT", 102.0)
    (leave,) = sent(state, 102.0)
    state.last_frame_at = 140.0
    assert not state.poll(140.0).idle  # the unsubscribe is still in flight
    state.on_control(ack(leave), 140.0)
    assert state.poll(140.0).idle
    state.want("tickers.ETHUSDT")
    assert not state.poll(140.0).idle


def test_settled_needs_acks_and_proof_of_life() -> None:
    state = opened(["tickers.BTCUSDT"])
    assert not state.settled()
    (request,) = sent(state)
    assert not state.settled()
    state.on_control(ack(request), 101.0)
    assert not state.settled()
    state.accept_data("tickers.BTCUSDT", 101.0)
    assert state.settled()


# -- capacity ------------------------------------------------------------------------------


def test_room_by_topic_count_and_by_args_characters() -> None:
    state = ConnectionState(settings(max_topics_per_conn=2), 1)
    state.want("a")
    assert state.has_room("b")
    state.want("b")
    assert not state.has_room("c")
    chars = ConnectionState(settings(max_args_chars_per_conn=30), 2)
    chars.want("x" * 20)  # costs 23
    assert chars.has_room("abcd")  # 7 -> 30
    assert not chars.has_room("abcde")


def test_silence_deadline_never_undercuts_a_ping_round() -> None:
    assert settings().silence_deadline == 30.0
    assert settings(ping_interval=40.0).silence_deadline == 50.0


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        settings(batch_size=0)
    with pytest.raises(ValueError):
        settings(ping_interval=0)
    with pytest.raises(ValueError):
        UpstreamSettings(url="http://x")

import orjson
import pytest

from fastproxy import protocol as p
from fastproxy.streams import parse_stream_arg


def parse_error(payload: bytes | str) -> p.RequestError:
    with pytest.raises(p.RequestError) as info:
        p.parse_request(payload)
    return info.value


@pytest.mark.parametrize(
    "payload", [b"nope", b"[1,2]", b'"subscribe"', b"42", b"null", b"", b"{", "\ud800"]
)
def test_not_an_object(payload: bytes | str) -> None:
    error = parse_error(payload)
    assert error.code == p.INVALID_JSON
    assert "Traceback" not in error.message and "orjson" not in error.message


@pytest.mark.parametrize("payload", [b"{}", b'{"op":"nope"}', b'{"op":null}', b'{"op":["ping"]}'])
def test_unknown_op(payload: bytes) -> None:
    assert parse_error(payload).code == p.UNKNOWN_OP


@pytest.mark.parametrize(
    "payload",
    [
        b'{"op":"subscribe"}',
        b'{"op":"subscribe","args":[]}',
        b'{"op":"subscribe","args":"ticker:BTCUSDT"}',
        b'{"op":"subscribe","args":[1]}',
        b'{"op":"unsubscribe","args":[null]}',
        b'{"op":"subscribe","args":{"a":1}}',
    ],
)
def test_invalid_args(payload: bytes) -> None:
    assert parse_error(payload).code == p.INVALID_ARGS


def test_too_many_args_per_request() -> None:
    args = [f"ticker:S{i}USDT" for i in range(p.MAX_ARGS_PER_REQUEST + 1)]
    error = parse_error(orjson.dumps({"op": "subscribe", "args": args}))
    assert error.code == p.INVALID_ARGS


def test_req_id_echoed_in_errors_and_replies() -> None:
    error = parse_error(b'{"op":"nope","req_id":"r1"}')
    assert error.req_id == "r1"
    request = p.parse_request(b'{"op":"ping","req_id":7}')
    assert orjson.loads(p.pong_reply(1, request.req_id)) == {
        "op": "pong",
        "timestamp": 1,
        "req_id": 7,
    }
    assert "req_id" not in orjson.loads(p.pong_reply(1))
    assert parse_error(b'{"op":"ping","req_id":true}').code == p.INVALID_ARGS


def test_plan_subscribe_accepts_rejects_and_dedups() -> None:
    held = {parse_stream_arg("ticker:BTCUSDT")}
    plan = p.plan_subscribe(
        ["ticker:btcusdt", "kline:1h:ETHUSDT", "kline:2h:ETHUSDT", "kline:7m:X1", "trade:NOPE"],
        held,
        10,
        symbol_known=lambda s: s != "NOPE",
    )
    assert plan.accepted == ["ticker:btcusdt", "kline:1h:ETHUSDT", "kline:2h:ETHUSDT"]
    assert [s.arg for s in plan.new_streams] == ["kline:1h:ETHUSDT", "kline:2h:ETHUSDT"]
    assert [r["arg"] for r in plan.rejected] == ["kline:7m:X1", "trade:NOPE"]
    reply = orjson.loads(p.subscribe_reply(plan, "a"))
    assert list(reply) == ["op", "success", "args", "message", "rejected", "req_id"]
    assert reply["success"] is True and reply["message"] == "Subscribed to 3 streams"


def test_plan_subscribe_unknown_catalogue_lets_it_through() -> None:
    plan = p.plan_subscribe(["ticker:NEWUSDT"], set(), 10, symbol_known=lambda s: None)
    assert plan.accepted == ["ticker:NEWUSDT"]


def test_limit_exceeded_applies_nothing() -> None:
    held = {parse_stream_arg(f"ticker:S{i}USDT") for i in range(3)}
    with pytest.raises(p.RequestError) as info:
        p.plan_subscribe(["ticker:AUSDT", "ticker:BUSDT"], held, 4)
    assert info.value.code == p.LIMIT_EXCEEDED
    # re-subscribing what is held costs nothing
    plan = p.plan_subscribe(["ticker:S0USDT", "ticker:AUSDT"], held, 4)
    assert len(plan.new_streams) == 1


def test_all_rejected_is_not_success() -> None:
    plan = p.plan_subscribe(["bad"], set(), 10)
    reply = orjson.loads(p.subscribe_reply(plan))
    assert reply["success"] is False and reply["args"] == [] and len(reply["rejected"]) == 1


def test_unsubscribe_not_subscribed() -> None:
    held = {parse_stream_arg("ticker:BTCUSDT")}
    plan = p.plan_unsubscribe(["ticker:BTCUSDT", "ticker:ETHUSDT", "bad"], held)
    reply = orjson.loads(p.unsubscribe_reply(plan))
    assert reply["args"] == ["ticker:BTCUSDT"]
    assert reply["message"] == "Unsubscribed from 1 streams"
    assert reply["rejected"][0] == {"arg": "ticker:ETHUSDT", "reason": "not subscribed"}


def test_flood_guard_warns_once_a_second_then_closes() -> None:
    guard = p.FloodGuard(rate=10, now=0.0, close_after=10.0)
    verdicts = [guard.check(0.0) for _ in range(12)]
    assert verdicts[:10] == [p.FloodGuard.OK] * 10
    assert verdicts[10:] == [p.FloodGuard.WARN, p.FloodGuard.DROP]
    t, warns, closed = 0.0, 0, False
    while t < 11.0 and not closed:  # 100 frames a second against a rate of 10
        t += 0.01
        verdict = guard.check(t)
        warns += verdict == p.FloodGuard.WARN
        closed = verdict == p.FloodGuard.CLOSE
    assert closed and 9 <= warns <= 11 and t >= 10.0


def test_flood_guard_forgives_a_calm_client() -> None:
    guard = p.FloodGuard(rate=2, now=0.0, close_after=3.0)
    for second in range(0, 40, 2):  # a burst over the rate, then a calm second
        results = [guard.check(second + i * 0.01) for i in range(3)]
        assert p.FloodGuard.WARN in results
        assert p.FloodGuard.CLOSE not in results


@pytest.mark.parametrize(
    "token", [b"1000000000000000000000000000000", b"1.50", b"1e2", b"-0.0", b"18446744073709551616"]
)
def test_numeric_req_id_is_kept_as_written(token: bytes) -> None:
    request = p.parse_request(b'{"op":"ping","req_id":' + token + b"}")
    assert p.pong_reply(1, request.req_id).endswith(b'"req_id":' + token + b"}")


def test_invalid_utf8_is_a_protocol_violation_not_a_json_error() -> None:
    with pytest.raises(p.ProtocolViolation) as info:
        p.parse_request(b'{"op":"ping","x":"\xc3"}')
    assert info.value.code == p.CLOSE_INVALID_TEXT
    assert parse_error(b'{"op":"ping",').code == p.INVALID_JSON  # valid UTF-8, bad JSON


def test_subscription_budget_refuses_whole_requests_and_charges_unsubscribes() -> None:
    budget = p.SubscriptionBudget(change_rate=10, snapshot_rate=100, cap=20, now=0.0)
    assert budget.admit(0.0, 20) is None  # the burst is the subscription cap
    refusal = budget.admit(0.0, 1)
    assert refusal is not None and refusal.code == p.SUBSCRIPTION_RATE_EXCEEDED
    assert refusal.retry_after_ms == 101 and "stream changes" in refusal.message
    assert budget.exhausted(0.0, 5) is not None  # nothing left: refused before planning
    budget.charge_unsubscribe(1.0, 20)  # never refused: 10 earned, 20 spent
    refusal = budget.admit(1.0, 5)
    assert refusal is not None and refusal.retry_after_ms == 1501
    assert budget.admit(2.5, 5) is None
    assert budget.admit(2.5, 0) is None  # nothing new costs nothing


def test_subscription_budget_names_the_snapshot_limit_when_that_is_the_one() -> None:
    budget = p.SubscriptionBudget(change_rate=1000, snapshot_rate=5, cap=10, now=0.0)
    assert budget.admit(0.0, 10) is None
    refusal = budget.admit(0.0, 10)
    assert refusal is not None and "snapshots" in refusal.message
    assert refusal.retry_after_ms == 2001
    reply = orjson.loads(refusal.reply())
    assert reply["code"] == p.SUBSCRIPTION_RATE_EXCEEDED and reply["retry_after_ms"] == 2001


def test_message_assembler_joins_discards_and_refuses() -> None:
    a = p.MessageAssembler(max_size=10)
    assert a.feed(p.OPCODE_TEXT, True, b"one") == (p.OPCODE_TEXT, b"one")
    assert a.feed(p.OPCODE_TEXT, False, b"ab") is None and a.busy
    assert a.feed(p.OPCODE_CONTINUATION, True, memoryview(b"cd")) == (p.OPCODE_TEXT, b"abcd")
    assert a.feed(p.OPCODE_BINARY, False, b"x") is None
    a.discard()
    assert a.feed(p.OPCODE_CONTINUATION, True, b"y") is None and not a.busy
    for frames, code in [
        ([(p.OPCODE_CONTINUATION, True, b"x")], p.CLOSE_PROTOCOL_ERROR),
        ([(p.OPCODE_TEXT, False, b"x"), (p.OPCODE_TEXT, True, b"y")], p.CLOSE_PROTOCOL_ERROR),
        ([(p.OPCODE_TEXT, False, b"x" * 6), (p.OPCODE_CONTINUATION, False, b"y" * 6)], 1009),
    ]:
        fresh = p.MessageAssembler(max_size=10)
        with pytest.raises(p.ProtocolViolation) as info:
            for opcode, fin, payload in frames:
                fresh.feed(opcode, fin, payload)
        assert info.value.code == code

"""History rings and the resume decision (sans-I/O), and the `resume` field of subscribe."""

from __future__ import annotations

import gc
import tracemalloc

import orjson
import pytest

from fastproxy.history import (
    ENTRY_OVERHEAD,
    RING_OVERHEAD,
    History,
    Position,
    decide,
    splice,
)
from fastproxy.protocol import (
    INVALID_ARGS,
    RequestError,
    parse_request,
    plan_subscribe,
    subscribe_reply,
)
from fastproxy.streams import parse_stream_arg

S = "mudrex.futures.trade.BTCUSDT"


def frame(seq: int, size: int = 100) -> bytes:
    return (b"%d:" % seq).ljust(size, b"x")


def filled(history: History, count: int, epoch: str = "e1", start: int = 1) -> History:
    for seq in range(start, start + count):
        history.append(S, epoch, seq, frame(seq), now=float(seq) / 100)
    return history


# -- the rings -------------------------------------------------------------------------------


def test_after_returns_every_frame_after_the_seq() -> None:
    history = filled(History(), 10)
    assert history.after(S, "e1", 7, now=1.0) == [frame(8), frame(9), frame(10)]
    assert history.after(S, "e1", 10, now=1.0) == []  # up to date: resumes with nothing
    assert history.after(S, "e1", 0, now=1.0) == [frame(s) for s in range(1, 11)]
    assert history.span(S) == ("e1", 1, 10)


def test_no_bridge_over_another_epoch_a_future_seq_or_dropped_messages() -> None:
    history = filled(History(max_messages=5), 10)
    assert history.span(S) == ("e1", 6, 10)
    assert history.after(S, "e0", 8, now=1.0) is None  # another epoch
    assert history.after(S, "e1", 11, now=1.0) is None  # a seq this stream never reached
    assert history.after(S, "e1", 4, now=1.0) is None  # 5 is gone
    assert history.after(S, "e1", 5, now=1.0) == [frame(s) for s in range(6, 11)]
    assert history.after("other", "e1", 5, now=1.0) is None


def test_a_jump_or_a_new_epoch_starts_the_ring_again_and_duplicates_are_ignored() -> None:
    history = filled(History(), 5)
    history.append(S, "e1", 3, frame(3), now=1.0)  # a duplicate delivery
    assert history.span(S) == ("e1", 1, 5)
    history.append(S, "e1", 9, frame(9), now=1.0)  # a hole: 6..8 never came
    assert history.span(S) == ("e1", 9, 9)
    assert history.after(S, "e1", 5, now=1.0) is None
    history.append(S, "e2", 1, frame(1), now=1.0)
    assert history.span(S) == ("e2", 1, 1) and history.messages == 1


def test_messages_older_than_max_age_are_dropped_and_never_replayed() -> None:
    history = History(max_age=10.0)
    for seq in range(1, 6):
        history.append(S, "e1", seq, frame(seq), now=float(seq))
    assert history.after(S, "e1", 0, now=11.5) is None  # seq 1 (t=1) is past its age
    assert history.after(S, "e1", 1, now=11.5) == [frame(s) for s in range(2, 6)]
    history.append(S, "e1", 6, frame(6), now=13.5)  # appending trims what is too old
    assert history.span(S) == ("e1", 4, 6)
    history.trim(100.0)
    assert history.span(S) is None and history.messages == 0


def test_the_byte_cap_drops_the_oldest_messages_of_the_whole_node_first() -> None:
    per = 100 + ENTRY_OVERHEAD
    history = History(max_bytes=30 * per + 2 * RING_OVERHEAD)
    for seq in range(1, 11):  # stream A first, then B: A's are the oldest
        history.append("A", "e", seq, frame(seq), now=1.0 + seq / 1000)
    for seq in range(1, 26):
        history.append("B", "e", seq, frame(seq), now=2.0 + seq / 1000)
    assert history.bytes <= history.max_bytes
    _, first, last = history.span("A")  # type: ignore[misc]
    assert first > 1 and last == 10  # A lost its oldest
    assert history.span("B") == ("e", 1, 25)  # B, younger, kept everything
    assert history.evicted == first - 1


def test_forgetting_a_stream_frees_its_bytes() -> None:
    history = filled(History(), 100)
    assert history.bytes == 100 * (100 + ENTRY_OVERHEAD) + RING_OVERHEAD
    history.forget(S)
    history.trim(2.0)
    assert history.bytes == 0 and history.messages == 0 and history.span(S) is None


def test_disabled_history_keeps_nothing() -> None:
    history = filled(History(max_messages=0), 10)
    assert history.messages == 0 and history.after(S, "e1", 5, now=1.0) is None


def test_memory_of_1000_streams_stays_under_the_cap() -> None:
    cap = 8 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        history = History(max_messages=1000, max_age=3600.0, max_bytes=cap)
        base = tracemalloc.get_traced_memory()[0]
        now = 0.0
        # 1,000 streams of ~400-byte trade frames, 60 Messages each: ~29 MB offered
        for round_ in range(60):
            for i in range(1000):
                now += 0.0001
                payload = (b"%d:%d:" % (i, round_)).ljust(400, b"x")  # a new object each
                history.append(f"stream{i}", "e", round_ + 1, payload, now)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    print(
        f"\n1,000 streams: {history.messages} Messages kept, accounted {history.bytes} B, "
        f"measured {used} B, cap {cap} B"
    )
    assert history.bytes <= cap
    assert used <= cap  # the accounting covers what Python really holds
    assert history.messages > 1000 * 10  # and the cap is spent on history, not lost


# -- the resume decision ------------------------------------------------------------------


def test_decide_resumes_only_a_current_epoch_with_everything_kept() -> None:
    history = filled(History(max_messages=5), 10)
    assert decide(history, S, Position("e1", 7), "e1", 1.0).replay == [
        frame(8),
        frame(9),
        frame(10),
    ]
    assert decide(history, S, Position("e1", 10), "e1", 1.0).resumed  # nothing to replay
    assert not decide(history, S, Position("e0", 7), "e1", 1.0).resumed  # stale epoch
    assert not decide(history, S, Position("e1", 2), "e1", 1.0).resumed  # too old a seq
    assert not decide(history, S, Position("e1", 7), None, 1.0).resumed  # stream unknown here
    assert not decide(history, S, None, "e1", 1.0).resumed  # no resume entry


def test_splice_joins_shared_history_to_what_arrived_here_meanwhile() -> None:
    # the client had seq 3; the cluster's history answered 4..9; meanwhile this node received
    # 7..12 live (the fetch and the live Messages interleaved): 4..12, each once
    local = History()
    for seq in range(7, 13):
        local.append(S, "e1", seq, frame(seq), now=1.0)
    shared = [(seq, frame(seq)) for seq in range(4, 10)]
    assert splice(local, S, Position("e1", 3), shared, 1.0) == [frame(s) for s in range(4, 13)]
    # the fetch ended before anything arrived here: shared, then local from there on
    assert splice(local, S, Position("e1", 3), [(s, frame(s)) for s in range(4, 7)], 1.0) == [
        frame(s) for s in range(4, 13)
    ]
    # up to date already: only what arrived here after it
    assert splice(local, S, Position("e1", 8), [], 1.0) == [frame(s) for s in range(9, 13)]


def test_splice_refuses_what_does_not_meet() -> None:
    local = History()
    for seq in range(7, 13):
        local.append(S, "e1", seq, frame(seq), now=1.0)
    assert splice(local, S, Position("e1", 3), None, 1.0) is None  # shared cannot bridge
    assert splice(local, S, Position("e1", 3), [(4, frame(4)), (5, frame(5))], 1.0) is None
    assert splice(local, S, Position("e1", 3), [(5, frame(5))], 1.0) is None  # not from 4
    assert splice(local, S, Position("e0", 3), [(4, frame(4))], 1.0) is None  # other epoch
    behind = History()
    behind.append(S, "e1", 3, frame(3), now=1.0)
    assert splice(behind, S, Position("e1", 3), [(4, frame(4))], 1.0) is None  # not here yet


# -- the protocol ---------------------------------------------------------------------------


def request(obj: dict) -> bytes:
    return orjson.dumps({"op": "subscribe", "args": ["trade:BTCUSDT", "ticker:ETHUSDT"], **obj})


def test_resume_is_parsed_per_arg() -> None:
    parsed = parse_request(request({"resume": {"trade:BTCUSDT": {"epoch": "ab12", "seq": 41}}}))
    assert parsed.resume == {"trade:BTCUSDT": Position("ab12", 41)}
    assert parse_request(request({})).resume is None
    assert parse_request(request({"resume": None})).resume is None


@pytest.mark.parametrize(
    ("resume", "says"),
    [
        ([], "'resume' must be an object"),
        ("trade:BTCUSDT", "'resume' must be an object"),
        ({"trade:BTCUSDT": 5}, "must be an object"),
        ({"trade:BTCUSDT": {"seq": 5}}, "epoch must be a non-empty string"),
        ({"trade:BTCUSDT": {"epoch": "", "seq": 5}}, "epoch must be a non-empty string"),
        ({"trade:BTCUSDT": {"epoch": "e" * 65, "seq": 5}}, "at most 64"),
        ({"trade:BTCUSDT": {"epoch": "e"}}, "seq must be an integer >= 0"),
        ({"trade:BTCUSDT": {"epoch": "e", "seq": -1}}, "seq must be an integer >= 0"),
        ({"trade:BTCUSDT": {"epoch": "e", "seq": 1.5}}, "seq must be an integer >= 0"),
        ({"trade:BTCUSDT": {"epoch": "e", "seq": True}}, "seq must be an integer >= 0"),
        ({"trade:BTCUSDT": {"epoch": "e", "seq": "5"}}, "seq must be an integer >= 0"),
        ({"trade:BTCUSDT": {"epoch": "e", "seq": 2**63}}, "seq must be an integer >= 0"),
        ({f"trade:S{i}": {"epoch": "e", "seq": 1} for i in range(3)}, "more streams than"),
    ],
)
def test_bad_resume_is_refused_with_a_clear_error(resume: object, says: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(request({"resume": resume, "req_id": 7}))
    assert err.value.code == INVALID_ARGS and says in err.value.message
    assert err.value.req_id == 7


def test_resume_only_with_subscribe() -> None:
    with pytest.raises(RequestError) as err:
        parse_request(orjson.dumps({"op": "unsubscribe", "args": ["trade:BTCUSDT"], "resume": {}}))
    assert "only valid with subscribe" in err.value.message


def test_plan_maps_resume_entries_to_the_new_streams_and_the_ack_lists_resumed() -> None:
    parsed = parse_request(
        orjson.dumps(
            {
                "op": "subscribe",
                "args": ["trade:btcusdt", "ticker:ETHUSDT", "ticker:NOPE!"],
                "resume": {
                    "trade:BTCUSDT": {"epoch": "e", "seq": 3},  # another spelling, same stream
                    "ticker:NOPE!": {"epoch": "e", "seq": 1},  # refused arg: nothing to resume
                },
            }
        )
    )
    plan = plan_subscribe(parsed.args, set(), 100, resume=parsed.resume)
    trade = parse_stream_arg("trade:BTCUSDT")
    assert plan.resume == {trade: Position("e", 3)}
    ack = orjson.loads(subscribe_reply(plan, resumed=[trade]))
    assert ack["resumed"] == ["trade:btcusdt"]  # as the client wrote it in args
    assert list(ack)[-1] == "resumed" and ack["args"] == ["trade:btcusdt", "ticker:ETHUSDT"]
    assert orjson.loads(subscribe_reply(plan, resumed=[]))["resumed"] == []
    plain = plan_subscribe(parsed.args, set(), 100)
    assert "resumed" not in orjson.loads(subscribe_reply(plain))


def test_resume_naming_a_stream_not_in_args_is_refused() -> None:
    with pytest.raises(RequestError) as err:
        plan_subscribe(["trade:BTCUSDT"], set(), 100, resume={"trade:ETHUSDT": Position("e", 1)})
    assert err.value.code == INVALID_ARGS and "not one of the args" in err.value.message

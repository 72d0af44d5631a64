"""The sans-I/O parts of `--workers`: IPC records, node totals, restart policy, the setting."""

from __future__ import annotations

import multiprocessing

import pytest

from fastproxy import ipc, nodestats
from fastproxy.codec import Message, ws_text_frame
from fastproxy.config import ConfigError, load, usable_cpus
from fastproxy.supervisor import NodeSeats, RestartPolicy, clear_seats


def _message(payload: bytes, seq: int = 7, kind: str = "update") -> Message:
    return Message("mudrex.futures.ticker.BTCUSDT", seq, kind, 1_700_000_000_123, payload)


@pytest.mark.parametrize("size", [10, 125, 126, 300, 65535, 65536, 200_000])
def test_message_record_carries_the_feeds_frame_bytes(size: int) -> None:
    payload = b'{"stream":"x","type":"update"' + b"x" * size + b"}"
    message = _message(payload)
    record = ipc.encode_message(message)
    (body,) = list(ipc.RecordReader().feed(record))
    fields = ipc.MessageFields(body)
    assert (fields.stream_id, fields.seq, fields.type, fields.ts) == (
        message.stream_id,
        7,
        "update",
        1_700_000_000_123,
    )
    assert fields.frame == message.frame == ws_text_frame(payload)
    assert ipc.frame_payload(fields.frame) == payload


def test_records_survive_any_chunking() -> None:
    records = [ipc.encode_message(_message(b"p" * n, seq=n)) for n in range(1, 40)]
    records.insert(5, ipc.encode_text(ipc.ACQUIRE, "ticker:BTCUSDT"))
    records.insert(9, ipc.encode_json(ipc.NODE, {"a": [1, 2]}))
    stream = b"".join(records)
    for chunk in (1, 3, 7, 64, 1000, len(stream)):
        reader = ipc.RecordReader()
        bodies = []
        for start in range(0, len(stream), chunk):
            bodies += [bytes(b) for b in reader.feed(stream[start : start + chunk])]
        assert bodies == [r[4:] for r in records]
    kinds = []
    ipc.dispatch(
        ipc.RecordReader(),
        stream,
        {
            ipc.MESSAGE: lambda b: kinds.append("M"),
            ipc.ACQUIRE: lambda b: kinds.append(ipc.decode_text(b)),
            ipc.NODE: lambda b: kinds.append(ipc.decode_json(b)),
        },
    )
    assert kinds[5] == "ticker:BTCUSDT" and kinds[9] == {"a": [1, 2]}


def test_broken_record_streams_are_refused() -> None:
    with pytest.raises(ipc.IPCError):
        list(ipc.RecordReader().feed(b"\x00\x00\x00\x00"))
    with pytest.raises(ipc.IPCError):
        ipc.dispatch(ipc.RecordReader(), ipc.encode_text(ord("?"), "x"), {})


def test_node_totals_add_workers_and_keep_the_dead_ones_counters() -> None:
    def report(connected: int, sent: int, drops: int) -> dict:
        return {
            "connections": {
                "connected": connected,
                "messages_sent": sent,
                "connections_total": connected,
                "drops": {"idle": drops},
            },
            "hub": {"subscriptions": connected, "deliveries": sent},
        }

    retired: dict = {}
    live = [report(3, 100, 1), report(2, 50, 0)]
    before = nodestats.totals(live, retired)
    assert before["connections"]["connected"] == 5
    assert before["connections"]["messages_sent"] == 150
    assert before["connections"]["drops"] == {"idle": 1}
    nodestats.retire(retired, live.pop(0))  # worker 0 died; a fresh one starts from zero
    live.append(report(0, 0, 0))
    after = nodestats.totals(live, retired)
    assert after["connections"]["messages_sent"] == 150  # counters never go backwards
    assert after["connections"]["drops"] == {"idle": 1}
    assert after["connections"]["connected"] == 2  # gauges are the living's only
    assert after["hub"]["subscriptions"] == 2


def test_restart_policy_backs_off_and_gives_up_on_a_crash_loop() -> None:
    policy = RestartPolicy(first=0.5, longest=5.0, early=30.0, give_up=5)
    assert [policy.on_death(0, 1.0) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.on_death(1, 1.0) == 0.5  # each worker slot counts its own deaths
    assert policy.on_death(0, 1.0) is None
    policy = RestartPolicy(first=0.5, longest=5.0, early=30.0, give_up=5)
    for _ in range(3):
        policy.on_death(0, 1.0)
    assert policy.on_death(0, 600.0) == 0.5  # it had run a long while: start over
    assert policy.on_death(0, 1.0) == 0.5
    assert [RestartPolicy(longest=3.0, give_up=99).on_death(0, 0) for _ in range(1)] == [0.5]


def test_node_seats_hold_the_limit_over_all_workers() -> None:
    ctx = multiprocessing.get_context("spawn")
    counts, lock = ctx.RawArray("q", 2), ctx.Lock()
    first, second = NodeSeats(counts, lock, 0, 3), NodeSeats(counts, lock, 1, 3)
    assert [first.take(), second.take(), second.take(), first.take()] == [True] * 3 + [False]
    second.give()
    assert first.take() and not second.take()
    lock.acquire()  # a worker died holding the lock
    clear_seats(counts, lock, 0)
    assert list(counts) == [0, 1]
    assert first.take() and first.take() and not second.take()


def test_workers_setting() -> None:
    assert load(environ={}).workers == 1
    assert load(environ={"WORKERS": "4"}).workers == 4
    assert load({"workers": "auto"}, environ={}).workers == usable_cpus()
    for bad in ("0", "-1", "two", "1.5", "100000"):
        with pytest.raises(ConfigError, match="WORKERS"):
            load(environ={"WORKERS": bad})

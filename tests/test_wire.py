"""The wire layer on its own: Message numbering fields, the snapshot rewrite and the one
last-value cache a node serves joiners from."""

from __future__ import annotations

import orjson

from fastproxy.wire import LastValues, Message, as_snapshot, new_epoch


def message(seq: int, mtype: str = "update", epoch: str = "e") -> Message:
    payload = orjson.dumps({"stream": "s", "type": mtype, "data": {"n": seq}, "seq": seq})
    return Message("s", seq, mtype, 7, payload, None, epoch)


def test_epochs_are_fresh_strings() -> None:
    epochs = {new_epoch() for _ in range(100)}
    assert len(epochs) == 100
    assert all(isinstance(e, str) and len(e) == 12 for e in epochs)


def test_snapshot_keeps_seq_and_epoch() -> None:
    snap = as_snapshot(message(4, epoch="abc"))
    assert (snap.seq, snap.epoch, snap.type) == (4, "abc", "snapshot")
    doc = orjson.loads(snap.payload)
    assert doc["type"] == "snapshot" and list(doc)[-1] == "epoch" and doc["epoch"] == "abc"
    assert as_snapshot(snap) is snap
    # a snapshot the codec made gets its epoch added, once
    made = as_snapshot(message(5, "snapshot", epoch="abc"))
    assert orjson.loads(made.payload)["epoch"] == "abc" and as_snapshot(made) is made


def test_last_values_builds_each_snapshot_once() -> None:
    values = LastValues()
    assert values.snapshot("s") is None
    values.put(message(1))
    first = values.snapshot("s")
    assert first is values.snapshot("s")  # cached until the next Message
    assert (first.seq, first.type) == (1, "snapshot")
    values.put(message(2))
    second = values.snapshot("s")
    assert second is not first and second.seq == 2
    values.forget("s")
    assert values.snapshot("s") is None and len(values) == 0

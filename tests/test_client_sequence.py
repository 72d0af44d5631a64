"""The client's per-stream seq/epoch checks (sans-I/O)."""

from __future__ import annotations

from fastproxy.client.sequence import Position, SequenceCheck, Verdict


def test_the_first_message_starts_the_count_and_each_next_is_plus_one():
    check = SequenceCheck(event_stream=True)
    assert check.check("snapshot", 41, "E1") is Verdict.OK
    assert check.check("update", 42) is Verdict.OK
    assert check.check("update", 43) is Verdict.OK
    assert check.position() == Position("E1", 43)


def test_a_jump_on_an_event_stream_is_a_gap_and_the_count_follows_it():
    check = SequenceCheck(event_stream=True)
    check.check("snapshot", 1, "E")
    assert check.check("update", 5) is Verdict.GAP
    assert check.gap_from == 1
    assert check.check("update", 6) is Verdict.OK


def test_a_jump_on_a_state_stream_is_conflation_not_a_gap():
    check = SequenceCheck(event_stream=False)
    check.check("snapshot", 1, "E")
    assert check.check("update", 9) is Verdict.OK
    assert check.position() == Position("E", 9)


def test_repeats_and_steps_back_are_duplicates_and_do_not_move_the_count():
    check = SequenceCheck(event_stream=True)
    check.check("snapshot", 10, "E")
    check.check("update", 11)
    assert check.check("update", 11) is Verdict.DUPLICATE
    assert check.check("update", 3) is Verdict.DUPLICATE
    assert check.check("snapshot", 11, "E") is Verdict.DUPLICATE
    assert check.check("update", 12) is Verdict.OK


def test_a_new_epoch_restarts_the_count_a_gap_on_event_streams_only():
    events, states = SequenceCheck(event_stream=True), SequenceCheck(event_stream=False)
    for check in (events, states):
        check.check("snapshot", 500, "E1")
    assert events.check("snapshot", 1, "E2") is Verdict.GAP
    assert states.check("snapshot", 1, "E2") is Verdict.OK
    assert events.position() == states.position() == Position("E2", 1)
    assert events.check("update", 2) is Verdict.OK


def test_reset_forgets_the_position():
    check = SequenceCheck(event_stream=True)
    check.check("snapshot", 100, "E")
    check.reset()
    assert check.position() is None
    assert check.check("snapshot", 3, "F") is Verdict.OK


def test_without_an_epoch_there_is_no_resume_point_but_still_a_count():
    check = SequenceCheck(event_stream=True)
    check.check("snapshot", 4)
    assert check.position() is None
    assert check.check("update", 6) is Verdict.GAP


def test_messages_without_seq_are_not_judged():
    check = SequenceCheck(event_stream=True)
    assert check.check("update", None) is Verdict.OK
    assert check.position() is None

"""The client's protocol session (sans-I/O): requests, resume, gaps, books, freshness."""

from __future__ import annotations

from typing import Any

import pytest

from fastproxy.client.core import ClientCore, Event

TRADE = "mudrex.futures.trade.BTCUSDT"
TICKER = "mudrex.futures.ticker.BTCUSDT"
BOOK = "mudrex.futures.orderbook.50.BTCUSDT"


def data(stream: str, seq: int, kind: str = "update", epoch: str | None = None, **payload: Any):
    message: dict[str, Any] = {
        "stream": stream,
        "type": kind,
        "data": payload or {"n": seq},
        "timestamp": 1,
        "source": "mudrex",
        "seq": seq,
    }
    if epoch is not None:
        message["epoch"] = epoch
    return message


def ack(request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    reply = {
        "op": "subscribe",
        "success": True,
        "args": request["args"],
        "message": "ok",
        "rejected": None,
        "req_id": request["req_id"],
    }
    reply.update(extra)
    return reply


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.arg) for e in events]


def connected(*args: str) -> ClientCore:
    """A core connected once, subscribed to `args`, acked."""
    core = ClientCore()
    assert core.connection_made() == []
    assert core.outbox == []  # nothing wanted yet: nothing sent
    req_id = core.subscribe(args)
    assert req_id is not None
    (request,) = core.outbox
    core.outbox.clear()
    assert request == {"op": "subscribe", "args": list(args), "req_id": req_id}
    assert core.receive(ack(request), 0) == []
    (reply,) = core.replies
    assert reply.req_id == req_id and reply.message is not None
    core.replies.clear()
    return core


def reconnect(core: ClientCore, now_ms: int = 5) -> dict[str, Any]:
    core.connection_lost(now_ms)
    core.connection_made()
    (request,) = core.outbox
    core.outbox.clear()
    return request


def test_subscribe_before_connecting_is_sent_with_the_first_connection():
    core = ClientCore()
    assert core.subscribe(["trade:btcusdt"]) is None
    core.connection_made()
    assert core.outbox == [{"op": "subscribe", "args": ["trade:btcusdt"], "req_id": "c1"}]


def test_bad_args_raise_before_anything_is_applied():
    core = ClientCore()
    core.connection_made()
    with pytest.raises(ValueError, match="invalid stream"):
        core.subscribe(["trade:BTCUSDT", "bogus:X"])
    assert core.outbox == [] and core.args() == []


def test_a_stream_already_held_is_not_asked_for_again():
    core = connected("trade:BTCUSDT")
    assert core.subscribe(["trade:btcusdt"]) is None
    assert core.outbox == []


def test_data_flows_and_the_state_is_the_latest_data():
    core = connected("ticker:BTCUSDT", "trade:BTCUSDT")
    events = core.receive(data(TICKER, 7, "snapshot", epoch="E", price="1"), 0)
    events += core.receive(data(TICKER, 8, price="2"), 0)
    events += core.receive(data(TRADE, 3, "snapshot", epoch="E"), 0)
    assert kinds(events) == [("data", "ticker:BTCUSDT")] * 2 + [("data", "trade:BTCUSDT")]
    assert core.state("ticker:btcusdt") == {"price": "2"}
    with pytest.raises(ValueError, match="event stream"):
        core.state("trade:BTCUSDT")
    with pytest.raises(KeyError):
        core.state("ticker:ETHUSDT")


def test_a_seq_jump_on_a_trade_stream_yields_a_gap_before_the_data():
    core = connected("trade:BTCUSDT")
    core.receive(data(TRADE, 1, "snapshot", epoch="E"), 0)
    events = core.receive(data(TRADE, 4), 0)
    assert kinds(events) == [("gap", "trade:BTCUSDT"), ("data", "trade:BTCUSDT")]
    assert events[0].message == {
        "op": "gap",
        "stream": TRADE,
        "reason": "messages are missing",
        "from": 1,
        "to": 4,
    }


def test_a_seq_jump_on_a_ticker_is_not_a_gap():
    core = connected("ticker:BTCUSDT")
    core.receive(data(TICKER, 1, "snapshot", epoch="E"), 0)
    assert kinds(core.receive(data(TICKER, 9), 0)) == [("data", "ticker:BTCUSDT")]


def test_duplicates_are_dropped():
    core = connected("trade:BTCUSDT")
    core.receive(data(TRADE, 1, "snapshot", epoch="E"), 0)
    core.receive(data(TRADE, 2), 0)
    assert core.receive(data(TRADE, 2), 0) == []
    assert core.duplicates == 1


def test_a_new_epoch_mid_stream_on_a_trade_stream_is_a_gap():
    core = connected("trade:BTCUSDT")
    core.receive(data(TRADE, 50, "snapshot", epoch="E1"), 0)
    events = core.receive(data(TRADE, 1, "snapshot", epoch="E2"), 0)
    assert kinds(events) == [("gap", "trade:BTCUSDT"), ("data", "trade:BTCUSDT")]
    assert events[0].message["reason"] == "the stream's numbering restarted"


def test_reconnect_resumes_with_epoch_and_seq_and_resumed_streams_have_no_gap():
    core = connected("trade:BTCUSDT", "ticker:BTCUSDT")
    core.receive(data(TRADE, 10, "snapshot", epoch="E"), 0)
    core.receive(data(TRADE, 11), 0)
    core.receive(data(TICKER, 3, "snapshot", epoch="T"), 0)
    stale = core.connection_lost(1000)
    assert kinds(stale) == [("status", "trade:BTCUSDT"), ("status", "ticker:BTCUSDT")]
    assert stale[0].message == {
        "op": "status",
        "stream": TRADE,
        "state": "stale",
        "reason": "disconnected from the server",
        "since": 1000,
    }
    assert core.freshness("trade:BTCUSDT") == "stale"
    core.connection_made()
    (request,) = core.outbox
    assert request["resume"] == {
        "trade:BTCUSDT": {"epoch": "E", "seq": 11},
        "ticker:BTCUSDT": {"epoch": "T", "seq": 3},
    }
    events = core.receive(ack(request, resumed=["trade:BTCUSDT", "ticker:BTCUSDT"]), 0)
    assert kinds(events) == [("reconnected", None)]
    assert core.confirm_due
    # the replay continues the count; no gap
    assert kinds(core.receive(data(TRADE, 12), 0)) == [
        ("status", "trade:BTCUSDT"),  # data on a re-acked stream means it is live
        ("data", "trade:BTCUSDT"),
    ]
    live = core.confirm_live(2000)
    assert kinds(live) == [("status", "ticker:BTCUSDT")]
    assert live[0].message["state"] == "live"
    assert core.freshness("ticker:BTCUSDT") == core.freshness("trade:BTCUSDT") == "live"


def test_a_stream_the_server_did_not_resume_gets_a_gap_then_its_snapshot():
    core = connected("trade:BTCUSDT", "ticker:BTCUSDT")
    core.receive(data(TRADE, 10, "snapshot", epoch="E"), 0)
    core.receive(data(TICKER, 3, "snapshot", epoch="T"), 0)
    request = reconnect(core)
    events = core.receive(ack(request, resumed=["ticker:BTCUSDT"]), 0)
    assert kinds(events) == [("reconnected", None), ("gap", "trade:BTCUSDT")]
    assert events[1].message["reason"].startswith("the server could not resume")
    # the new snapshot starts the count afresh: no second gap
    assert kinds(core.receive(data(TRADE, 1, "snapshot", epoch="F"), 0)) == [
        ("status", "trade:BTCUSDT"),
        ("data", "trade:BTCUSDT"),
    ]


def test_trades_the_client_has_are_not_repeated_after_an_unresumed_reconnect():
    core = connected("trade:BTCUSDT")
    core.receive(data(TRADE, 10, "snapshot", epoch="E"), 0)
    core.receive(data(TRADE, 11), 0)
    request = reconnect(core)
    events = core.receive(ack(request, resumed=[]), 0)  # history too short, same epoch
    assert kinds(events) == [("reconnected", None), ("gap", "trade:BTCUSDT")]
    assert events[1].message["from"] == 11
    # the snapshot is the latest batch: one the client had already is dropped ...
    assert kinds(core.receive(data(TRADE, 11, "snapshot", epoch="E"), 0)) == [
        ("status", "trade:BTCUSDT")
    ]
    # ... and the jump to a newer one is the gap already told, not a second one
    assert kinds(core.receive(data(TRADE, 30, "snapshot", epoch="E"), 0)) == [
        ("data", "trade:BTCUSDT")
    ]
    assert kinds(core.receive(data(TRADE, 33), 0)) == [
        ("gap", "trade:BTCUSDT"),
        ("data", "trade:BTCUSDT"),
    ]


def test_a_server_without_resume_gives_every_stream_with_data_a_gap():
    core = connected("trade:BTCUSDT", "ticker:BTCUSDT", "ticker:ETHUSDT")
    core.receive(data(TRADE, 10, "snapshot"), 0)  # no epoch: nothing to resume from
    core.receive(data(TICKER, 3, "snapshot"), 0)
    request = reconnect(core)
    assert "resume" not in request
    events = core.receive(ack(request), 0)  # no "resumed" key
    assert kinds(events) == [
        ("reconnected", None),
        ("gap", "trade:BTCUSDT"),
        ("gap", "ticker:BTCUSDT"),
    ]  # ETHUSDT had nothing yet: nothing can be missing
    # a restarted server counts from 1 again; without epochs that is no repeat
    assert kinds(core.receive(data(TRADE, 1, "snapshot"), 0)) == [
        ("status", "trade:BTCUSDT"),
        ("data", "trade:BTCUSDT"),
    ]


def test_a_stale_status_right_after_the_reconnect_ack_wins_over_the_reconnect():
    core = connected("ticker:BTCUSDT")
    request = reconnect(core)
    core.receive(ack(request), 0)
    status = {"op": "status", "stream": TICKER, "state": "stale", "reason": "x", "since": 3}
    assert kinds(core.receive(status, 0)) == [("status", "ticker:BTCUSDT")]
    assert core.confirm_live(10) == []
    assert core.freshness("ticker:BTCUSDT") == "stale"
    live = dict(status, state="live")
    assert kinds(core.receive(live, 0)) == [("status", "ticker:BTCUSDT")]
    assert core.freshness("ticker:BTCUSDT") == "live"


def test_a_reconnect_with_nothing_subscribed_is_still_announced():
    core = ClientCore()
    core.connection_made()
    core.connection_lost(0)
    assert kinds(core.connection_made()) == [("reconnected", None)]


def test_a_request_in_flight_when_the_connection_drops_is_answered_none_and_redone():
    core = connected("ticker:BTCUSDT")
    req_id = core.subscribe(["trade:BTCUSDT"])
    core.outbox.clear()
    core.connection_lost(0)
    assert [(r.req_id, r.message) for r in core.replies] == [(req_id, None)]
    core.connection_made()
    assert core.outbox[0]["args"] == ["ticker:BTCUSDT", "trade:BTCUSDT"]


def test_rejected_args_are_dropped_and_reported_to_the_caller():
    core = connected("ticker:BTCUSDT")
    core.subscribe(["trade:NOPEUSDT"])
    (request,) = core.outbox
    rejected = [{"arg": "trade:NOPEUSDT", "reason": "unknown symbol NOPEUSDT"}]
    reply = ack(request, args=[], success=False, rejected=rejected)
    core.receive(reply, 0)
    assert core.replies[0].message == reply
    assert core.args() == ["ticker:BTCUSDT"]


def test_an_error_reply_to_a_subscribe_applies_nothing_of_it():
    core = connected("ticker:BTCUSDT")
    req_id = core.subscribe(["trade:BTCUSDT"])
    error = {"op": "error", "code": "LIMIT_EXCEEDED", "message": "too many", "req_id": req_id}
    assert core.receive(error, 0) == []
    assert core.replies[0].message == error
    assert core.args() == ["ticker:BTCUSDT"]


def test_an_upstream_rejection_removes_the_stream_and_is_an_error_event():
    core = connected("ticker:BTCUSDT", "trade:BTCUSDT")
    error = {
        "op": "error",
        "code": "UPSTREAM_REJECTED",
        "message": "The exchange refused trade:BTCUSDT",
        "args": ["trade:BTCUSDT"],
    }
    assert kinds(core.receive(error, 0)) == [("error", "trade:BTCUSDT")]
    assert core.args() == ["ticker:BTCUSDT"]
    assert core.receive(data(TRADE, 1, "snapshot"), 0) == []


def test_a_stream_refused_on_reconnect_is_reported():
    core = connected("ticker:BTCUSDT", "trade:BTCUSDT")
    request = reconnect(core)
    rejected = [{"arg": "trade:BTCUSDT", "reason": "unknown symbol BTCUSDT"}]
    events = core.receive(ack(request, args=["ticker:BTCUSDT"], rejected=rejected), 0)
    assert kinds(events) == [("reconnected", None), ("error", "trade:BTCUSDT")]
    assert core.args() == ["ticker:BTCUSDT"]


def test_unsubscribe_stops_the_streams_data_at_once():
    core = connected("ticker:BTCUSDT", "trade:BTCUSDT")
    core.unsubscribe(["trade:BTCUSDT"])
    assert core.outbox[0]["op"] == "unsubscribe"
    assert core.receive(data(TRADE, 5), 0) == []


def test_a_status_is_passed_on_and_remembered():
    core = connected("ticker:BTCUSDT")
    status = {"op": "status", "stream": TICKER, "state": "stale", "reason": "silent", "since": 9}
    events = core.receive(status, 0)
    assert events == [Event("status", "ticker:BTCUSDT", status)]
    assert core.freshness("ticker:BTCUSDT") == "stale"


def test_pongs_and_unknown_ops_make_no_events():
    core = connected("ticker:BTCUSDT")
    assert core.receive({"op": "pong", "timestamp": 1}, 0) == []
    assert core.receive({"op": "something-new"}, 0) == []


# -- books ---------------------------------------------------------------------------------


def book_snapshot(update_id: int, seq: int, epoch: str = "E") -> dict[str, Any]:
    return data(
        BOOK,
        seq,
        "snapshot",
        epoch=epoch,
        symbol="BTCUSDT",
        bids=[["100", "1"], ["99", "1"]],
        asks=[["101", "1"]],
        updateId=update_id,
        time=1,
    )


def book_update(update_id: int, seq: int, bids=(), asks=()) -> dict[str, Any]:
    return data(
        BOOK,
        seq,
        symbol="BTCUSDT",
        bids=[list(b) for b in bids],
        asks=[list(a) for a in asks],
        updateId=update_id,
        time=2,
    )


def test_a_book_is_kept_from_its_snapshot_and_updates():
    core = connected("orderbook:50:BTCUSDT")
    assert core.book("orderbook:50:BTCUSDT") is None
    core.receive(book_snapshot(1000, 5), 0)
    events = core.receive(book_update(1001, 6, bids=[("100", "0")], asks=[("100.5", "2")]), 0)
    assert kinds(events) == [("data", "orderbook:50:BTCUSDT")]
    book = core.book("orderbook:50:btcusdt")
    assert book is not None
    assert (book.bids, book.asks, book.update_id) == (
        [("99", "1")],
        [("100.5", "2"), ("101", "1")],
        1001,
    )
    assert core.state("orderbook:50:BTCUSDT")["updateId"] == 1001
    with pytest.raises(ValueError, match="not an order book"):
        connected("ticker:BTCUSDT").book("ticker:BTCUSDT")


@pytest.mark.parametrize(
    "bad",
    [
        book_update(1003, 6),  # an updateId skipped
        book_update(1001, 6, bids=[("101.5", "1")]),  # crossed
    ],
)
def test_a_broken_book_resubscribes_and_yields_a_gap_then_the_fresh_snapshot(bad):
    core = connected("orderbook:50:BTCUSDT")
    core.receive(book_snapshot(1000, 5), 0)
    events = core.receive(bad, 0)
    assert kinds(events) == [("gap", "orderbook:50:BTCUSDT")]
    assert events[0].message["reason"].startswith("book resynchronised")
    assert core.book("orderbook:50:BTCUSDT") is None
    unsubscribe, subscribe = core.outbox
    assert unsubscribe["op"] == "unsubscribe" and subscribe["op"] == "subscribe"
    assert unsubscribe["args"] == subscribe["args"] == ["orderbook:50:BTCUSDT"]
    assert "resume" not in subscribe
    core.outbox.clear()
    # what was in flight before the server saw the unsubscribe is dropped
    assert core.receive(book_update(1004, 7), 0) == []
    core.receive({"op": "unsubscribe", "success": True, "req_id": unsubscribe["req_id"]}, 0)
    assert core.receive(ack(subscribe), 0) == []
    events = core.receive(book_snapshot(2000, 9), 0)
    assert kinds(events) == [("data", "orderbook:50:BTCUSDT")]
    assert core.book("orderbook:50:BTCUSDT").update_id == 2000  # type: ignore[union-attr]
    assert core.resyncs == 1


def test_a_book_that_was_not_resumed_waits_for_its_snapshot():
    core = connected("orderbook:50:BTCUSDT")
    core.receive(book_snapshot(1000, 5), 0)
    request = reconnect(core)
    assert request["resume"] == {"orderbook:50:BTCUSDT": {"epoch": "E", "seq": 5}}
    events = core.receive(ack(request, resumed=[]), 0)
    assert kinds(events) == [("reconnected", None), ("gap", "orderbook:50:BTCUSDT")]
    assert core.book("orderbook:50:BTCUSDT") is None
    assert core.receive(book_update(1001, 6), 0) == [
        Event(
            "status",
            "orderbook:50:BTCUSDT",
            {
                "op": "status",
                "stream": BOOK,
                "state": "live",
                "reason": "reconnected",
                "since": 0,
            },
        )
    ]  # the delta cannot apply to a book we do not have
    core.receive(book_snapshot(3000, 1, epoch="F"), 0)
    assert core.book("orderbook:50:BTCUSDT").update_id == 3000  # type: ignore[union-attr]


def test_a_resumed_book_continues_across_the_reconnect():
    core = connected("orderbook:50:BTCUSDT")
    core.receive(book_snapshot(1000, 5), 0)
    request = reconnect(core)
    core.receive(ack(request, resumed=["orderbook:50:BTCUSDT"]), 0)
    core.receive(book_update(1001, 6, asks=[("102", "3")]), 0)
    book = core.book("orderbook:50:BTCUSDT")
    assert book is not None and book.update_id == 1001 and book.asks[-1] == ("102", "3")

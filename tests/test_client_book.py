"""The client's order book (sans-I/O): snapshots, deltas, updateId and crossed-book checks."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.client.book import Book, BookError, OrderBook


def snapshot(bids, asks, update_id=100, time=1):
    return {"symbol": "BTCUSDT", "bids": bids, "asks": asks, "updateId": update_id, "time": time}


def update(bids, asks, update_id, time=2):
    return {"symbol": "BTCUSDT", "bids": bids, "asks": asks, "updateId": update_id, "time": time}


def test_snapshot_orders_levels_best_first_and_keeps_the_strings():
    book = OrderBook(50)
    book.apply(
        "snapshot",
        snapshot([["99.5", "1.000"], ["100.0", "2"]], [["101.10", "3"], ["100.5", "0.5"]]),
    )
    view = book.view()
    assert view == Book(
        bids=[("100.0", "2"), ("99.5", "1.000")],
        asks=[("100.5", "0.5"), ("101.10", "3")],
        update_id=100,
        time=1,
    )


def test_updates_apply_and_size_zero_removes_a_level():
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["100", "1"], ["99", "1"]], [["101", "1"], ["102", "1"]]))
    book.apply("update", update([["100", "0"], ["98", "4"]], [["101", "7"]], 101))
    book.apply("update", update([], [["102", "0"], ["103", "1"]], 102, time=9))
    view = book.view()
    assert view is not None
    assert view.bids == [("99", "1"), ("98", "4")]
    assert view.asks == [("101", "7"), ("103", "1")]
    assert (view.update_id, view.time) == (102, 9)


def test_removing_a_level_the_book_does_not_hold_changes_nothing():
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"]]))
    book.apply("update", update([["90", "0"]], [], 101))
    assert book.view().bids == [("100", "1")]  # type: ignore[union-attr]


def test_numeric_order_not_text_order():
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["9.5", "1"], ["10.25", "1"]], [["100", "1"], ["11", "1"]]))
    view = book.view()
    assert [p for p, _ in view.bids] == ["10.25", "9.5"]  # type: ignore[union-attr]
    assert [p for p, _ in view.asks] == ["11", "100"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("update_id", "why"), [(102, "skipped"), (100, "repeated"), (99, "backwards"), (1, "restart")]
)
def test_an_update_id_that_does_not_follow_breaks_the_book(update_id, why):
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"]]))
    with pytest.raises(BookError, match="does not follow"):
        book.apply("update", update([["100", "2"]], [], update_id))
    assert book.view() is None and not book.ready
    # only a snapshot brings it back
    with pytest.raises(BookError, match="before any snapshot"):
        book.apply("update", update([], [], update_id + 1))
    book.apply("snapshot", snapshot([["100", "3"]], [["101", "1"]], update_id=500))
    assert book.view().bids == [("100", "3")]  # type: ignore[union-attr]


def test_an_update_before_any_snapshot_is_an_error():
    with pytest.raises(BookError, match="before any snapshot"):
        OrderBook(50).apply("update", update([["100", "1"]], [], 1))


def test_a_crossed_book_after_a_delta_is_an_error():
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"], ["102", "1"]]))
    with pytest.raises(BookError, match="crossed"):
        book.apply("update", update([["101.5", "1"]], [], 101))
    assert book.view() is None


def test_a_locked_book_counts_as_crossed():
    with pytest.raises(BookError, match="crossed"):
        OrderBook(50).apply("snapshot", snapshot([["100", "1"]], [["100", "1"]]))


def test_a_crossing_delta_that_also_removes_the_other_side_is_fine():
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"], ["103", "1"]]))
    book.apply("update", update([["102", "1"]], [["101", "0"]], 101))
    assert book.view().bids[0] == ("102", "1")  # type: ignore[union-attr]


def test_the_book_holds_at_most_depth_levels_a_side():
    book = OrderBook(2)
    book.apply(
        "snapshot",
        snapshot([["100", "1"], ["99", "1"], ["98", "1"]], [["101", "1"], ["102", "1"]]),
    )
    assert book.view().bids == [("100", "1"), ("99", "1")]  # type: ignore[union-attr]
    book.apply("update", update([["100.5", "1"]], [["100.8", "1"]], 101))
    view = book.view()
    assert view.bids == [("100.5", "1"), ("100", "1")]  # type: ignore[union-attr]
    assert view.asks == [("100.8", "1"), ("101", "1")]  # type: ignore[union-attr]


def test_depth_one_messages_are_complete_and_may_repeat_their_update_id():
    book = OrderBook(1)
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"]], update_id=7))
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"]], update_id=7))
    book.apply("update", snapshot([["100.5", "2"]], [["101", "1"]], update_id=8))
    assert book.view() == Book([("100.5", "2")], [("101", "1")], 8, 1)


@pytest.mark.parametrize(
    "data",
    [
        "not an object",
        {"bids": [["100", "1"]], "asks": [], "updateId": "7"},
        {"bids": [["100", "1"]], "asks": []},
        {"bids": [["100"]], "asks": [], "updateId": 7},
        {"bids": [[100, "1"]], "asks": [], "updateId": 7},
        {"bids": [["abc", "1"]], "asks": [], "updateId": 7},
        {"bids": [["100", "-1"]], "asks": [], "updateId": 7},
        {"bids": "100", "asks": [], "updateId": 7},
        {"bids": [["-5", "1"]], "asks": [], "updateId": 7},
    ],
)
def test_malformed_messages_are_errors_not_silent_damage(data):
    with pytest.raises(BookError):
        OrderBook(50).apply("snapshot", data)


def test_the_view_is_a_copy():
    book = OrderBook(50)
    book.apply("snapshot", snapshot([["100", "1"]], [["101", "1"]]))
    view = book.view()
    book.apply("update", update([["100", "9"]], [], 101))
    assert view.bids == [("100", "1")]  # type: ignore[union-attr]


# -- property: any sequence of deltas gives the same book as a plain reference model ---------

prices = st.integers(min_value=1, max_value=60)
sizes = st.sampled_from(["0", "0", "1", "2.5", "10"])
sides = st.lists(st.tuples(prices, sizes), max_size=6)


def _fmt(ticks: int) -> str:
    return f"{ticks / 10:.1f}"


class ReferenceBook:
    """The obvious model: a dict per side, sorted on demand, truncated to depth."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}

    def apply(self, bids, asks) -> None:
        for side, changes in ((self.bids, bids), (self.asks, asks)):
            for price, size in changes:
                if size == "0":
                    side.pop(price, None)
                else:
                    side[price] = size
        self.bids = dict(self.sorted(self.bids, True)[: self.depth])
        self.asks = dict(self.sorted(self.asks, False)[: self.depth])

    @staticmethod
    def sorted(side, high_first):
        return sorted(side.items(), key=lambda kv: Decimal(kv[0]), reverse=high_first)

    def crossed(self) -> bool:
        if not self.bids or not self.asks:
            return False
        return max(map(Decimal, self.bids)) >= min(map(Decimal, self.asks))


@settings(max_examples=200, deadline=None)
@given(
    depth=st.sampled_from([3, 5, 50]),
    deltas=st.lists(st.tuples(sides, sides), max_size=30),
)
def test_property_book_equals_reference_model(depth, deltas):
    # bids live below 3.1, asks above 3.0 by construction; deltas may cross them
    book, model = OrderBook(depth), ReferenceBook(depth)
    initial_bids = [[_fmt(p), "1"] for p in range(1, 31)]
    initial_asks = [[_fmt(p), "1"] for p in range(31, 61)]
    book.apply("snapshot", snapshot(initial_bids, initial_asks, update_id=10))
    model.apply([(p, s) for p, s in initial_bids], [(p, s) for p, s in initial_asks])
    update_id = 10
    for bid_changes, ask_changes in deltas:
        bids = [[_fmt(p), s] for p, s in bid_changes]
        asks = [[_fmt(p), s] for p, s in ask_changes]
        update_id += 1
        model.apply([tuple(x) for x in bids], [tuple(x) for x in asks])
        if model.crossed():
            with pytest.raises(BookError, match="crossed"):
                book.apply("update", update(bids, asks, update_id))
            return
        book.apply("update", update(bids, asks, update_id))
        view = book.view()
        assert view is not None
        assert view.bids == model.sorted(model.bids, True)
        assert view.asks == model.sorted(model.asks, False)
        assert view.update_id == update_id

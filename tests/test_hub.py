"""The hub without sockets: registry, corked fan-out, snapshots for late joiners, linger."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from fastproxy.codec import Message, new_codec
from fastproxy.history import Position
from fastproxy.hub import Backlog, Hub
from fastproxy.streams import Stream, parse_stream_arg

TICKER = parse_stream_arg("ticker:BTCUSDT")
SNAPSHOT = {
    "topic": "tickers.BTCUSDT",
    "type": "snapshot",
    "data": {"symbol": "BTCUSDT", "lastPrice": "100.0", "bid1Price": "99.9", "ask1Price": "100.1"},
    "cs": 1,
    "ts": 1000,
}


def delta(price: str, ts: int) -> dict[str, Any]:
    return {
        "topic": "tickers.BTCUSDT",
        "type": "delta",
        "data": {"symbol": "BTCUSDT", "lastPrice": price},
        "cs": ts,
        "ts": ts,
    }


class FakeBus:
    name = "fake"
    healthy = True

    def __init__(self) -> None:
        self.acquired: list[Stream] = []
        self.released: list[Stream] = []

    def attach(self, handler: Any) -> None:
        self.handler = handler

    def acquire(self, stream: Stream) -> None:
        self.acquired.append(stream)

    def release(self, stream: Stream) -> None:
        self.released.append(stream)

    def status(self) -> dict[str, Any]:
        return {}


class FakeSession:
    def __init__(self, deflate: bool = False) -> None:
        self.deflate = deflate
        self.out: list[bytes] = []
        self.streams: set[Stream] = set()
        self.writes: list[bytes] = []
        self.backlog: Backlog | None = None
        self.paused = False
        self.resumed_at = 0.0
        self.caught_up_calls = 0

    def flush(self) -> None:
        self.writes.append(b"".join(self.out))
        self.out.clear()

    def caught_up(self) -> None:
        self.caught_up_calls += 1

    def messages(self) -> list[dict[str, Any]]:
        """Decode the frames written so far (server frames: 0x81 + length + payload)."""
        result = []
        for data in self.writes:
            pos = 0
            while pos < len(data):
                length, pos = data[pos + 1] & 0x7F, pos + 2
                if length == 126:
                    length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
                result.append(orjson.loads(data[pos : pos + length]))
                pos += length
        return result


async def tick() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def feed(codec: Any, frame: dict[str, Any], hub: Hub) -> list[Message]:
    messages = codec.feed(frame)
    for message in messages:
        hub.deliver(message)
    return messages


async def test_first_subscriber_acquires_and_one_write_per_tick() -> None:
    bus = FakeBus()
    hub = Hub(bus, linger=0)
    codec = new_codec(TICKER)
    a, b = FakeSession(), FakeSession()
    hub.subscribe(a, [TICKER])
    hub.subscribe(b, [TICKER])
    assert bus.acquired == [TICKER]
    feed(codec, SNAPSHOT, hub)
    for i in range(5):
        feed(codec, delta(f"10{i}.0", 2000 + i), hub)
    await tick()
    assert len(a.writes) == 1 and a.writes == b.writes  # six frames, one write, same bytes
    assert [m["seq"] for m in a.messages()] == [1, 2, 3, 4, 5, 6]
    assert a.messages()[0]["type"] == "snapshot"
    assert hub.deliveries == 12


async def test_late_joiner_snapshot_joins_without_gap() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    early, late = FakeSession(), FakeSession()
    hub.subscribe(early, [TICKER])
    feed(codec, SNAPSHOT, hub)
    feed(codec, delta("101.0", 2000), hub)
    hub.subscribe(late, [TICKER])
    feed(codec, delta("102.0", 3000), hub)
    await tick()
    got = late.messages()
    assert [(m["type"], m["seq"]) for m in got] == [("snapshot", 2), ("update", 3)]
    assert got[0]["data"]["price"] == "101.0"
    assert got[0]["data"] == early.messages()[1]["data"]


async def test_last_unsubscribe_releases_after_linger_unless_someone_returns() -> None:
    bus = FakeBus()
    hub = Hub(bus, linger=0.05)
    session = FakeSession()
    hub.subscribe(session, [TICKER])
    hub.unsubscribe(session, [TICKER])
    hub.subscribe(session, [TICKER])  # back within the linger
    await asyncio.sleep(0.1)
    assert bus.released == [] and bus.acquired == [TICKER]
    hub.drop(session)
    await asyncio.sleep(0.1)
    assert bus.released == [TICKER] and not hub.holds(TICKER)


async def test_reject_tells_every_holder_and_forgets_the_stream() -> None:
    hub = Hub(FakeBus(), linger=0)
    a, b = FakeSession(), FakeSession()
    hub.subscribe(a, [TICKER])
    hub.subscribe(b, [TICKER])
    hub.reject(TICKER, "error:handler not found,topic:tickers.BTCUSDT")
    await tick()
    for session in (a, b):
        (error,) = session.messages()
        assert error["code"] == "UPSTREAM_REJECTED" and error["args"] == ["ticker:BTCUSDT"]
        assert session.streams == set()
    assert not hub.holds(TICKER)


async def test_reset_forgets_the_snapshot_until_fresh_state_arrives() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    early, late = FakeSession(), FakeSession()
    hub.subscribe(early, [TICKER])
    feed(codec, SNAPSHOT, hub)
    codec.reset()
    hub.reset(TICKER)
    hub.subscribe(late, [TICKER])
    await tick()
    assert late.messages() == []  # nothing stale
    feed(codec, SNAPSHOT, hub)
    await tick()
    assert [m["type"] for m in late.messages()] == ["snapshot"]


# -- freshness and resume ------------------------------------------------------------------


async def test_status_goes_to_every_holder_and_to_a_joiner_before_its_snapshot() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    early, late = FakeSession(), FakeSession()
    hub.subscribe(early, [TICKER])
    feed(codec, SNAPSHOT, hub)
    hub.status(TICKER, "nothing received from the exchange for 3 s", 1000)
    hub.status(TICKER, "upstream connection down; reconnecting", 2000)  # same stale period
    hub.subscribe(late, [TICKER])
    assert hub.stats()["stale_streams"] == 1
    hub.status(TICKER, None, 3000)
    feed(codec, delta("101.0", 4000), hub)
    feed(codec, delta("102.0", 5000), hub)
    await tick()
    kinds = [m.get("state") or m["type"] for m in early.messages()]
    assert kinds == ["snapshot", "stale", "live", "snapshot", "update"]
    assert [m.get("state") or m["type"] for m in late.messages()] == [
        "stale",  # right after the ack (sent by the server before subscribe)
        "snapshot",  # the last known state
        "live",
        "snapshot",
        "update",
    ]
    stale = early.messages()[1]
    assert (stale["since"], stale["reason"]) == (1000, "nothing received from the exchange for 3 s")
    seqs = [m["seq"] for m in early.messages() if "seq" in m]
    assert seqs == [1, 2, 3]  # the snapshot after live is the next Message, no repeat
    assert hub.stats()["stale_streams"] == 0


async def test_resume_replays_what_was_missed_then_live_in_the_same_tick() -> None:
    hub = Hub(FakeBus(), linger=5)
    codec = new_codec(TICKER)
    holder, back = FakeSession(), FakeSession()
    hub.subscribe(holder, [TICKER])
    first = feed(codec, SNAPSHOT, hub)[0]
    for i in range(5):
        feed(codec, delta(f"10{i}.0", 2000 + i), hub)
    replays = hub.resume({TICKER: Position(first.epoch, 2)})
    assert list(replays) == [TICKER] and len(replays[TICKER]) == 4  # seq 3..6
    hub.subscribe(back, [TICKER], replays)
    feed(codec, delta("200.0", 3000), hub)
    await tick()
    got = back.messages()
    assert [(m["type"], m["seq"]) for m in got] == [("update", s) for s in range(3, 8)]
    assert hub.resume({TICKER: Position("another", 2)}) == {}  # stale epoch
    assert hub.resume({TICKER: Position(first.epoch, 99)}) == {}  # a seq from the future
    assert hub.resume({TICKER: Position(first.epoch, 7)}) == {TICKER: []}  # up to date


# -- clients that fall behind ---------------------------------------------------------------

TRADE = parse_stream_arg("trade:BTCUSDT")


def trade(n: int) -> dict[str, Any]:
    fill = {"T": n, "s": "BTCUSDT", "S": "Buy", "v": "1", "p": f"{100 + n}", "i": f"t-{n}"}
    return {"topic": "publicTrade.BTCUSDT", "type": "snapshot", "ts": n, "data": [fill]}


def behind(hub: Hub, session: FakeSession) -> None:
    """What the server does when the session's transport says it holds too much."""
    session.paused = True
    hub.fall_behind(session)


def drain(hub: Hub, session: FakeSession) -> None:
    session.paused = False
    session.resumed_at = time.monotonic()
    hub.drained(session)


async def test_client_behind_gets_newest_state_and_every_event() -> None:
    hub = Hub(FakeBus(), linger=0)
    tickers, trades = new_codec(TICKER), new_codec(TRADE)
    fast, slow = FakeSession(), FakeSession()
    for session in (fast, slow):
        hub.subscribe(session, [TICKER, TRADE])
    feed(tickers, SNAPSHOT, hub)
    await tick()
    behind(hub, slow)
    for i in range(5):
        feed(tickers, delta(f"10{i}.0", 2000 + i), hub)
        feed(trades, trade(i), hub)
    await tick()
    assert len(slow.writes) == 1  # the snapshot, before it fell behind; nothing since
    assert hub.stats()["clients_conflating"] == 1
    drain(hub, slow)
    await tick()
    got = [(m["stream"].split(".")[2], m["seq"]) for m in slow.messages()[1:]]
    # the ticker's place is where its first waiting update came, filled with the newest one
    assert got == [
        ("ticker", 6),
        ("trade", 1),
        ("trade", 2),
        ("trade", 3),
        ("trade", 4),
        ("trade", 5),
    ]
    assert slow.messages()[1]["data"]["price"] == "104.0"
    assert hub.conflated == 4
    fast_seqs = [m["seq"] for m in fast.messages() if m["stream"].endswith("ticker.BTCUSDT")]
    assert fast_seqs == [1, 2, 3, 4, 5, 6]  # the shared path lost nothing
    assert hub.stats()["subscriptions"] == 4


async def test_delta_stream_behind_gets_a_fresh_snapshot(monkeypatch: Any) -> None:
    # Order books are the delta streams; a ticker stands in for one here.
    monkeypatch.setattr("fastproxy.hub.DELTA_KINDS", frozenset({"ticker"}))
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    session = FakeSession()
    hub.subscribe(session, [TICKER])
    feed(codec, SNAPSHOT, hub)
    await tick()
    behind(hub, session)
    feed(codec, delta("101.0", 2000), hub)
    drain(hub, session)
    await tick()
    behind(hub, session)
    for i in range(3):
        feed(codec, delta(f"11{i}.0", 3000 + i), hub)
    drain(hub, session)
    await tick()
    got = [(m["type"], m["seq"]) for m in session.messages()]
    # one waiting update goes as it is; updates merged collapse into the stream's snapshot
    assert got == [("snapshot", 1), ("update", 2), ("snapshot", 5)]
    assert session.messages()[-1]["data"]["price"] == "112.0"


async def test_client_behind_returns_to_the_shared_path_once_it_keeps_up() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    session = FakeSession()
    hub.subscribe(session, [TICKER])
    feed(codec, SNAPSHOT, hub)
    behind(hub, session)
    hub.send_payload(session, b'{"op":"pong"}')  # replies wait in order too
    feed(codec, delta("101.0", 2000), hub)
    drain(hub, session)  # written, but it was behind a moment ago: stays behind
    await tick()
    assert session.backlog is not None and session.caught_up_calls == 0
    session.resumed_at -= 2  # nothing left unwritten for a while
    hub.drained(session)
    assert session.backlog is None and session.caught_up_calls == 1
    feed(codec, delta("102.0", 3000), hub)
    assert session.out  # the shared path again
    await tick()
    got = [m.get("seq", m.get("op")) for m in session.messages()]
    assert got == [1, "pong", 2, 3]


async def test_dropping_a_client_behind_forgets_its_backlog() -> None:
    bus = FakeBus()
    hub = Hub(bus, linger=0)
    codec = new_codec(TICKER)
    session = FakeSession()
    hub.subscribe(session, [TICKER])
    behind(hub, session)
    feed(codec, SNAPSHOT, hub)
    hub.drop(session)
    assert session.backlog is None and hub.clients_behind == 0
    assert bus.released == [TICKER]


async def test_client_behind_still_gets_a_snapshot_when_the_stream_restarts() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    session = FakeSession()
    hub.subscribe(session, [TICKER])
    feed(codec, SNAPSHOT, hub)
    await tick()
    behind(hub, session)
    feed(codec, delta("101.0", 2000), hub)
    codec.reset()
    hub.reset(TICKER)
    feed(codec, SNAPSHOT, hub)  # the upstream restarted: a snapshot, then an update
    feed(codec, delta("103.0", 4000), hub)
    drain(hub, session)
    await tick()
    last = session.messages()[-1]
    assert last["type"] == "snapshot" and last["data"]["price"] == "103.0"


# -- residence and flush counters --------------------------------------------------------------


def residence_count(hub: Hub, kind: str) -> int:
    return sum(hub.residence[kind].counts)


async def test_residence_and_flushes_counted_on_the_shared_path() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    a, b = FakeSession(), FakeSession()
    hub.subscribe(a, [TICKER])
    hub.subscribe(b, [TICKER])
    feed(codec, SNAPSHOT, hub)
    for i in range(3):
        feed(codec, delta(f"10{i}.0", 2000 + i), hub)
    await tick()
    # one observation per Message (not per client), one flush per session written
    assert residence_count(hub, "ticker") == 4
    assert hub.flushes == 2 and len(a.writes) == len(b.writes) == 1
    assert hub.residence["ticker"].total >= 0


async def test_residence_and_flushes_counted_for_a_client_behind() -> None:
    hub = Hub(FakeBus(), linger=0)
    tickers, trades = new_codec(TICKER), new_codec(TRADE)
    slow = FakeSession()
    hub.subscribe(slow, [TICKER, TRADE])
    feed(tickers, SNAPSHOT, hub)
    await tick()
    before, flushes = residence_count(hub, "ticker"), hub.flushes
    behind(hub, slow)  # the only subscriber is behind: Messages go to its Backlog alone
    feed(tickers, delta("101.0", 2000), hub)
    feed(trades, trade(1), hub)
    await tick()
    assert residence_count(hub, "ticker") == before + 1
    assert residence_count(hub, "trade") == 1
    assert hub.flushes == flushes  # paused: nothing written yet
    drain(hub, slow)
    await tick()
    assert hub.flushes == flushes + 1 and len(slow.writes) == 2


async def test_a_held_stream_then_subscribed_observes_residence() -> None:
    hub = Hub(FakeBus(), linger=0)
    codec = new_codec(TICKER)
    hub.hold([TICKER])  # a resume being prepared: no subscriber yet
    feed(codec, SNAPSHOT, hub)
    assert residence_count(hub, "ticker") == 0  # nobody to write it to
    session = FakeSession()
    hub.subscribe(session, [TICKER])
    feed(codec, delta("101.0", 2000), hub)
    await tick()
    assert residence_count(hub, "ticker") == 1

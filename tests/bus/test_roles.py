"""The Redis engine's ownership machine on its own: no Redis, no sockets, time passed in.

Each case is a script of events with the actions each one must produce, then what the node's
hub must have seen. Together they cover every transition of `roles.Roles`.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastproxy.bus.delivery import Delivery
from fastproxy.bus.redis.codec import (
    KIND_BEAT,
    KIND_HANDOVER,
    KIND_REJECT,
    KIND_RESET,
    KIND_STATUS,
    encode_marker,
    encode_message,
)
from fastproxy.bus.redis.liveness import REASON_OWNER_SILENT, SILENCE, status_text
from fastproxy.bus.redis.roles import (
    BUFFER_MAX,
    FEED_ADD,
    FEED_REMOVE,
    FEED_RENUMBER,
    FETCH,
    FOLLOWER,
    LOCAL,
    NONE,
    OWNER,
    OWNER_SILENT,
    PUBLISH,
    SUBSCRIBE,
    SYNC,
    UNSUBSCRIBE,
    Roles,
    status_marker,
)
from fastproxy.codec import new_codec
from fastproxy.streams import Stream, parse_stream_arg
from tests.bus.fakes import Recorder, make_message

ME, OTHER = b"me", b"other"
LEASE = 2.0
S = Stream("ticker", "BTCUSDT")
SID = S.stream_id
ANY = object()  # the actions of this step are not what the case is about
GONE = "gone"  # the machine forgot the stream


def msg(seq: int) -> Any:
    return make_message(S, seq, epoch="e1")


def blob(seq: int) -> bytes:
    return encode_message(msg(seq))


RESET = encode_marker(KIND_RESET)
HANDOVER = encode_marker(KIND_HANDOVER)
REJECT = encode_marker(KIND_REJECT, "topic unknown")


def live(at: float) -> tuple[Any, ...]:
    """The status marker a new owner publishes (its freshness is its own, live)."""
    return (PUBLISH, SID, status_marker(None, int(at * 1000)))


# Steps: (event, arguments, the actions it must produce). The events are Roles' methods; `feed`
# is feed_message (its answer is one action kind or None) and `chan` is channel_data.
UP = ("redis_up", (), ANY)
HOLD = ("acquire", (S,), [(SYNC, SID)])
WON = ("held_result", (SID, ME, 10, "e0", 0.0), [(FEED_ADD, S, 10, "e0"), live(0.0)])
FOLLOW = ("held_result", (SID, OTHER, 10, "e0", 0.0), [])
SUBSCRIBED = [
    ("reconcile", ([SID],), [(SUBSCRIBE, SID)]),
    ("subscribing", (SID,), None),
    ("confirmed", (SID,), [(FETCH, SID)]),
]
OWNING = [UP, HOLD, WON]
FOLLOWING = [UP, HOLD, FOLLOW, *SUBSCRIBED, ("fetched", (SID, blob(10)), [])]

CASES: dict[str, tuple[list[tuple[str, tuple[Any, ...], Any]], str, list[int]]] = {
    # name: (steps, the stream's role after them, seqs the hub got)
    "acquire while healthy waits for the election": ([UP, HOLD], NONE, []),
    "acquire twice is one acquire": ([UP, HOLD, ("acquire", (S,), [])], NONE, []),
    "acquire while Redis is down serves locally": (
        [("acquire", (S,), [(FEED_ADD, S, 0, None)]), ("feed", (msg(1), 0.0), None)],
        LOCAL,
        [1],
    ),
    "win the lease: own, continue the stored numbering and epoch": (
        [*OWNING, ("feed", (msg(11), 1.0), PUBLISH), ("feed", (msg(12), 1.5), PUBLISH)],
        OWNER,
        [11, 12],
    ),
    "an owner past its lease by its own clock withholds everything": (
        [*OWNING, ("feed", (msg(11), 1.0), PUBLISH), ("feed", (msg(12), LEASE), SYNC)],
        OWNER,
        [11],
    ),
    "a confirmed renewal lets a withheld owner deliver again, as a snapshot": (
        [
            *OWNING,
            ("feed", (msg(11), 5.0), SYNC),
            ("held_result", (SID, ME, 10, "e0", 5.0), []),
            ("feed", (msg(12), 5.5), PUBLISH),
        ],
        OWNER,
        [12],
    ),
    "lose the lease to another node: stop upstream, follow": (
        [*OWNING, ("held_result", (SID, OTHER, 12, "e1", 1.0), [(FEED_REMOVE, S)])],
        FOLLOWER,
        [],
    ),
    "lease lost while publishing: fenced, nothing more goes out, then follow": (
        [
            *OWNING,
            ("feed", (msg(11), 0.5), PUBLISH),
            ("fenced", (SID,), [(SYNC, SID)]),
            ("feed", (msg(12), 0.6), SYNC),
            ("held_result", (SID, OTHER, 40, "e9", 1.0), [(FEED_REMOVE, S)]),
            *SUBSCRIBED,
            ("fetched", (SID, encode_message(make_message(S, 40, epoch="e9"))), []),
        ],
        FOLLOWER,
        [11, 40],
    ),
    "follow: the channel's Messages wait for the stored snapshot": (
        [
            UP,
            HOLD,
            FOLLOW,
            *SUBSCRIBED,
            ("chan", (SID, blob(11)), []),
            ("chan", (SID, blob(12)), []),
            ("fetched", (SID, blob(10)), []),
            ("chan", (SID, blob(13)), []),
        ],
        FOLLOWER,
        [10, 11, 12, 13],
    ),
    "a stored snapshot older than what the channel delivered is not served": (
        [
            UP,
            HOLD,
            FOLLOW,
            *SUBSCRIBED,
            ("chan", (SID, blob(11)), []),
            ("fetched", (SID, None), []),
            ("chan", (SID, blob(12)), []),
        ],
        FOLLOWER,
        [11, 12],
    ),
    "no fetch while a subscribe confirmation is still due": (
        [
            UP,
            HOLD,
            FOLLOW,
            ("reconcile", ([SID],), [(SUBSCRIBE, SID)]),
            ("subscribing", (SID,), None),
            ("subscribing", (SID,), None),
            ("confirmed", (SID,), []),
            ("fetched", (SID, blob(10)), []),
            ("confirmed", (SID,), [(FETCH, SID)]),
            ("fetched", (SID, blob(10)), []),
        ],
        FOLLOWER,
        [10],
    ),
    "duplicates and jumps on the channel: dropped, a snapshot": (
        [*FOLLOWING, ("chan", (SID, blob(10)), []), ("chan", (SID, blob(15)), [])],
        FOLLOWER,
        [10, 15],
    ),
    "channel data for a stream we do not follow is ignored": (
        [*OWNING, ("chan", (SID, blob(30)), []), ("chan", (SID, RESET), [])],
        OWNER,
        [],
    ),
    "a reset on the channel reaches the hub": (
        [*FOLLOWING, ("chan", (SID, RESET), [])],
        FOLLOWER,
        [10],
    ),
    "the owner's feed resets: the hub is told, the channel too": (
        [*OWNING, ("feed_reset", (S,), [(PUBLISH, SID, ("-", "", RESET))])],
        OWNER,
        [],
    ),
    "a handover marker makes a holder stand for election at once": (
        [*FOLLOWING, ("chan", (SID, HANDOVER), [(SYNC, SID)])],
        FOLLOWER,
        [10],
    ),
    "the owner left and we won: follower to owner, past what we delivered": (
        [
            *FOLLOWING,
            ("chan", (SID, blob(11)), []),
            ("held_result", (SID, ME, 10, "e1", 2.0), [(FEED_ADD, S, 11, None), live(2.0)]),
            ("feed", (msg(12), 2.5), PUBLISH),
        ],
        OWNER,
        [10, 11, 12],
    ),
    "reject during takeover: the feed refuses the stream we just won": (
        [
            *FOLLOWING,
            ("held_result", (SID, ME, 10, "e1", 2.0), [(FEED_ADD, S, 10, "e1"), live(2.0)]),
            ("feed_reject", (S, "topic unknown"), [(SYNC, SID)]),
            ("call_for", (SID,), ("leave", True, REJECT)),
            ("left_result", (SID, b""), []),
            ("idle", (SID,), False),  # its channel is still open
            ("reconcile", ([SID],), [(UNSUBSCRIBE, SID)]),
            ("channel_closed", (SID,), []),
            ("idle", (SID,), True),
            ("forget", (SID,), None),
        ],
        GONE,
        [10],
    ),
    "the owner's exchange refused the stream: followers' clients are told": (
        [
            *FOLLOWING,
            ("chan", (SID, REJECT), [(SYNC, SID)]),
            ("call_for", (SID,), ("leave", False, b"")),
        ],
        NONE,
        [10],
    ),
    "a lease we hold without a feed is given up": (
        [
            *FOLLOWING,
            ("release", (S,), [(SYNC, SID)]),
            ("left_result", (SID, ME), [(SYNC, SID)]),
            ("call_for", (SID,), ("leave", True, HANDOVER)),
            ("left_result", (SID, b""), []),
            ("reconcile", ([SID],), [(UNSUBSCRIBE, SID)]),
            ("channel_closed", (SID,), []),
            ("idle", (SID,), True),
        ],
        NONE,
        [10],
    ),
    "an owner whose clients left keeps the lease while others need it": (
        [
            *OWNING,
            ("release", (S,), [(SYNC, SID)]),
            ("call_for", (SID,), ("leave", False, b"")),
            ("left_result", (SID, ME), []),
            ("feed", (msg(11), 1.0), PUBLISH),
        ],
        OWNER,
        [],
    ),
    "an owner whose clients left, nobody else interested: released": (
        [
            *OWNING,
            ("release", (S,), [(SYNC, SID)]),
            ("left_result", (SID, b""), [(FEED_REMOVE, S)]),
        ],
        NONE,
        [],
    ),
    "an owner that left and lost the lease meanwhile stops upstream": (
        [
            *OWNING,
            ("release", (S,), [(SYNC, SID)]),
            ("left_result", (SID, OTHER), [(FEED_REMOVE, S)]),
        ],
        NONE,
        [],
    ),
    "a follower that releases unsubscribes": (
        [
            *FOLLOWING,
            ("release", (S,), [(SYNC, SID)]),
            ("reconcile", ([SID],), [(UNSUBSCRIBE, SID)]),
            ("channel_closed", (SID,), []),
            ("left_result", (SID, OTHER), []),
            ("idle", (SID,), True),
        ],
        NONE,
        [10],
    ),
    "a lost pub/sub connection: resubscribe": (
        [
            *FOLLOWING,
            ("channel_closed", (SID, True), [(SYNC, SID)]),
            ("reconcile", ([SID],), [(SUBSCRIBE, SID)]),
        ],
        FOLLOWER,
        [10],
    ),
    "Redis drops mid-fetch: local at once, the late fetch is ignored": (
        [
            UP,
            HOLD,
            FOLLOW,
            *SUBSCRIBED,
            ("chan", (SID, blob(11)), []),
            ("redis_down", (), [(FEED_ADD, S, 0, None)]),
            ("fetched", (SID, blob(10)), []),
            ("chan", (SID, blob(12)), []),
            ("feed", (msg(1), 3.0), None),
        ],
        LOCAL,
        [1],
    ),
    "Redis drops while owning: the owner serves its own clients, publishes nothing": (
        [*OWNING, ("redis_down", (), [(FEED_RENUMBER, S)]), ("feed", (msg(11), 99.0), None)],
        LOCAL,
        [11],
    ),
    "Redis drops while owning: the line goes under an epoch of its own, from a snapshot": (
        [
            *OWNING,
            ("feed", (msg(11), 0.5), PUBLISH),
            ("redis_down", (), [(FEED_RENUMBER, S)]),
            ("feed", (msg(12), 0.6), None),
            ("feed", (msg(13), 0.7), None),
        ],
        LOCAL,
        [11, 12, 13],
    ),
    "back from an owner's local line, another node numbered the cluster's: we restart past it": (
        [
            *OWNING,
            ("feed", (msg(11), 0.5), PUBLISH),
            ("redis_down", (), [(FEED_RENUMBER, S)]),
            ("feed", (msg(12), 0.6), None),
            UP,
            (
                "held_result",
                (SID, ME, 40, "e0", 9.0, 12),
                [(FEED_REMOVE, S), (FEED_ADD, S, 40, "e0"), live(9.0)],
            ),
        ],
        OWNER,
        [11, 12],
    ),
    "back from an owner's local line that is ahead: its own epoch continues": (
        [
            *OWNING,
            ("feed", (msg(11), 0.5), PUBLISH),
            ("redis_down", (), [(FEED_RENUMBER, S)]),
            ("feed", (msg(12), 0.6), None),
            UP,
            ("held_result", (SID, ME, 11, "e0", 9.0, 12), [live(9.0)]),
        ],
        OWNER,
        [11, 12],
    ),
    "Redis drops: an owner nobody here holds stops upstream and forgets": (
        [
            *OWNING,
            ("release", (S,), ANY),
            ("left_result", (SID, ME), []),
            ("redis_down", (), [(FEED_REMOVE, S)]),
        ],
        GONE,
        [],
    ),
    "Redis down twice is one outage": (
        [*OWNING, ("redis_down", (), [(FEED_RENUMBER, S)]), ("redis_down", (), [])],
        LOCAL,
        [],
    ),
    "Redis back: every stream stands for election": (
        [("acquire", (S,), ANY), ("redis_up", (), [(SYNC, SID)])],
        LOCAL,
        [],
    ),
    "back from local, we win: the local line continues when it is ahead": (
        [
            ("acquire", (S,), ANY),
            UP,
            ("held_result", (SID, ME, 3, "e0", 0.0, 5), [live(0.0)]),
        ],
        OWNER,
        [],
    ),
    "back from local, we win: a local line behind the cluster's restarts past it": (
        [
            ("acquire", (S,), ANY),
            UP,
            (
                "held_result",
                (SID, ME, 30, "e0", 0.0, 5),
                [(FEED_REMOVE, S), (FEED_ADD, S, 30, "e0"), live(0.0)],
            ),
        ],
        OWNER,
        [],
    ),
    "back from local, another node won: stop upstream, follow behind a snapshot": (
        [
            ("acquire", (S,), ANY),
            ("feed", (msg(1), 0.0), None),
            UP,
            ("held_result", (SID, OTHER, 30, "e0", 0.0, 1), [(FEED_REMOVE, S)]),
            *SUBSCRIBED,
            ("fetched", (SID, blob(30)), []),
        ],
        FOLLOWER,
        [1, 30],
    ),
    "release while local: stop upstream and forget": (
        [("acquire", (S,), ANY), ("release", (S,), [(FEED_REMOVE, S)])],
        GONE,
        [],
    ),
    "release of a stream not held does nothing": ([UP, ("release", (S,), [])], GONE, []),
    "a holder runs the hold script": (
        [UP, HOLD, ("call_for", (SID,), ("hold", False, b""))],
        NONE,
        [],
    ),
    "the node's own feed data for a stream it follows, or does not know, is dropped": (
        [
            *FOLLOWING,
            ("feed", (msg(11), 3.0), None),
            ("feed", (make_message(Stream("ticker", "ETHUSDT"), 1), 3.0), None),
            ("feed_reset", (S,), []),
        ],
        FOLLOWER,
        [10],
    ),
    "back from local with no upstream line left: subscribe again": (
        [
            ("acquire", (S,), ANY),
            UP,
            (
                "held_result",
                (SID, ME, 3, "e0", 0.0, None),
                [(FEED_ADD, S, 3, "e0"), live(0.0)],
            ),
        ],
        OWNER,
        [],
    ),
    "the feed refuses a stream we follow: told, our interest dropped": (
        [
            *FOLLOWING,
            ("feed_reject", (S, "topic unknown"), [(SYNC, SID)]),
            ("call_for", (SID,), ("leave", False, b"")),
        ],
        NONE,
        [10],
    ),
    "ready for a resume: a follower once its stored state is served": (
        [
            UP,
            HOLD,
            ("ready", (SID,), False),
            FOLLOW,
            ("ready", (SID,), False),
            *SUBSCRIBED,
            ("ready", (SID,), False),
            ("fetched", (SID, blob(10)), []),
            ("ready", (SID,), True),
        ],
        FOLLOWER,
        [10],
    ),
    "ready for a resume: an owner at once, nobody while Redis is down": (
        [*OWNING, ("ready", (SID,), True), ("redis_down", (), ANY), ("ready", (SID,), False)],
        LOCAL,
        [],
    ),
    "the feed refuses a stream while Redis is down: told, forgotten": (
        [("acquire", (S,), ANY), ("feed_reject", (S, "topic unknown"), [])],
        GONE,
        [],
    ),
}


def run_steps(roles: Roles, steps: list[tuple[str, tuple[Any, ...], Any]]) -> None:
    for event, args, expected in steps:
        if event == "feed":
            got: Any = roles.feed_message(*args)
        elif event == "chan":
            got = roles.channel_data(*args)
        else:
            got = getattr(roles, event)(*args)
        if expected is not ANY:
            assert got == expected, f"{event}{args!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_transition(name: str) -> None:
    steps, role, seqs = CASES[name]
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    run_steps(roles, steps)
    state = roles.states.get(SID)
    assert (GONE if state is None else state.role) == role
    assert hub.seqs(S) == seqs
    first = hub.got.get(SID, [None])[0]
    if first is not None:
        assert first.type == "snapshot"  # whatever a hub gets first for a stream is a snapshot


def test_an_owner_serving_alone_gives_its_clients_a_snapshot_of_the_new_line() -> None:
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    run_steps(roles, [*OWNING, ("feed", (msg(11), 0.5), PUBLISH)])
    assert roles.redis_down() == [(FEED_RENUMBER, S)]
    # the feed renumbered: its next Message is seq 12 of another epoch, a new line for clients
    roles.feed_message(make_message(S, 12, epoch="local"), 0.6)
    roles.feed_message(make_message(S, 13, epoch="local"), 0.7)
    got = hub.got[SID]
    assert [(m.seq, m.type, m.epoch) for m in got] == [
        (11, "snapshot", "e1"),
        (12, "snapshot", "local"),
        (13, "update", "local"),
    ]


def test_back_in_the_cluster_a_stored_state_older_than_what_was_served_alone_is_skipped() -> None:
    """Redis refused writes, so what it stores is older than what this node served alone; a
    new owner (whose own line is ahead) has not stored its state yet. The follower must not
    hand its clients that old state: the owner's next Message comes as the snapshot."""
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    run_steps(roles, [*OWNING, ("feed", (msg(20), 0.5), PUBLISH)])
    roles.redis_down()
    for seq in range(21, 58):
        roles.feed_message(make_message(S, seq, epoch="alone"), 0.6)
    roles.redis_up()
    run_steps(
        roles,
        [
            ("held_result", (SID, OTHER, 20, "e1", 1.0), [(FEED_REMOVE, S)]),
            *SUBSCRIBED,
            ("fetched", (SID, blob(20)), []),
            ("chan", (SID, encode_message(make_message(S, 59, epoch="owner"))), []),
        ],
    )
    got = [(m.seq, m.type, m.epoch) for m in hub.got[SID]]
    assert got[-1] == (59, "snapshot", "owner")
    assert (20, "snapshot", "e1") not in got[2:]  # never the old stored state again
    assert [seq for seq, _, _ in got] == sorted(seq for seq, _, _ in got)


AHEAD = 100  # a small AHEAD_MAX, so the seqs stay readable


@pytest.mark.parametrize(
    ("steps", "seqs"),
    [
        # a node continuing the stored line starts AHEAD past it: the last owner may have
        # served its own clients seqs it never got to publish
        ([*OWNING[:2], ("held_result", (SID, ME, 10, "e0", 0.0), ANY)], []),
        # an owner never gets AHEAD past what the cluster stored: it withholds until it stores
        (
            [
                *OWNING[:2],
                ("held_result", (SID, ME, 10, "e0", 0.0), ANY),
                ("feed", (msg(111), 0.1), PUBLISH),
                ("feed", (msg(210), 0.2), PUBLISH),
                ("feed", (msg(211), 0.3), SYNC),
                ("published", (SID, 111), None),
                ("feed", (msg(211), 0.4), PUBLISH),
            ],
            [111, 210, 211],
        ),
        # a new epoch (nothing stored to continue) starts where it is, with no jump
        ([*OWNING[:2], ("held_result", (SID, ME, 0, "", 0.0), ANY)], []),
    ],
)
def test_a_new_owner_starts_past_what_the_last_one_may_have_served(
    steps: list[Any], seqs: list[int]
) -> None:
    hub = Recorder()
    feed: list[Any] = []
    roles = Roles(ME, Delivery(hub), LEASE, ahead=AHEAD)
    for event, args, expected in steps:
        if event == "feed":
            got: Any = roles.feed_message(*args)
        else:
            got = getattr(roles, event)(*args)
        if event == "held_result":
            feed += [a for a in got if a[0] is FEED_ADD]
        if expected is not ANY:
            assert got == expected, f"{event}{args!r}"
    assert hub.seqs(S) == seqs
    if steps[-1][0] == "held_result":
        stored_seq, stored_epoch = steps[-1][1][2:4]
        start = stored_seq + AHEAD if stored_epoch else stored_seq
        assert feed == [(FEED_ADD, S, start, stored_epoch or None)]


def test_withheld_messages_are_counted() -> None:
    roles = Roles(ME, Delivery(Recorder()), LEASE, ahead=0)
    for event, args, _ in OWNING:
        getattr(roles, event)(*args)
    for seq in range(11, 14):
        roles.feed_message(msg(seq), LEASE + seq)
    assert roles.unconfirmed == 3


def test_rejections_reach_the_hub() -> None:
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    for event, args, _ in FOLLOWING:
        getattr(roles, event)(*args)
    roles.channel_data(SID, REJECT)
    assert hub.rejects == [(SID, "topic unknown")]
    assert not roles.states[SID].held


def test_a_follower_buffer_is_bounded() -> None:
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    for event, args, _ in [UP, HOLD, FOLLOW, *SUBSCRIBED]:
        getattr(roles, event)(*args)
    for seq in range(11, 11 + BUFFER_MAX + 10):
        roles.channel_data(SID, blob(seq))
    roles.fetched(SID, blob(10))
    assert len(hub.seqs(S)) == BUFFER_MAX + 1


# -- freshness: beats, a silent owner, status markers ------------------------------------------

BEAT = (PUBLISH, SID, ("", "", encode_marker(KIND_BEAT)))
STALE = "nothing received from the exchange for 5 s"
STALE_MARKER = encode_marker(KIND_STATUS, status_text(STALE, 1234))
LIVE_MARKER = encode_marker(KIND_STATUS, status_text(None, 5678))


def never_live(stream: Stream) -> bool:
    return False


def always_live(stream: Stream) -> bool:
    return True


SILENT = ("tick", (SILENCE, never_live), [(OWNER_SILENT, SID)])
WATCHED = ("tick", (0.0, never_live), [])  # a follower starts watching its owner
TOLD_SILENT = (SID, REASON_OWNER_SILENT, 0)

FRESHNESS: dict[str, tuple[list[tuple[str, tuple[Any, ...], Any]], list[int], list[Any]]] = {
    # name: (steps, seqs the hub got, statuses the hub got: (sid, reason, since ms))
    "an owner beats on a quiet stream only": (
        [
            *OWNING,
            ("feed", (msg(11), 0.5), PUBLISH),
            ("tick", (1.0, never_live), []),
            ("tick", (1.5, never_live), [BEAT]),
            ("tick", (2.0, never_live), []),
        ],
        [11],
        [],
    ),
    "no beats while Redis is down": (
        [*OWNING, ("redis_down", (), ANY), ("tick", (5.0, never_live), [])],
        [],
        [],
    ),
    "a silent owner: the follower's clients are told stale once, live on its next Message": (
        [
            *FOLLOWING,
            WATCHED,
            ("tick", (SILENCE - 0.1, never_live), []),
            SILENT,
            ("tick", (SILENCE + 0.5, never_live), []),
            ("chan", (SID, blob(11), 4.0), []),
        ],
        [10, 11],
        [TOLD_SILENT, (SID, None, 4000)],
    ),
    "an owner's beat keeps its followers live": (
        [
            *FOLLOWING,
            WATCHED,
            ("chan", (SID, encode_marker(KIND_BEAT), 2.5), []),
            ("tick", (SILENCE, never_live), []),
            ("tick", (2.5 + SILENCE, never_live), [(OWNER_SILENT, SID)]),
        ],
        [10],
        [(SID, REASON_OWNER_SILENT, 2500)],
    ),
    "a follower still behind its stored state is not watched": (
        [UP, HOLD, FOLLOW, *SUBSCRIBED, WATCHED, ("tick", (10.0, never_live), [])],
        [],
        [],
    ),
    "taken over from a silent owner: live once our own upstream has the stream": (
        [
            *FOLLOWING,
            WATCHED,
            SILENT,
            ("held_result", (SID, ME, 10, "e1", 3.5), [(FEED_ADD, S, 10, "e1"), live(3.5)]),
            ("tick", (4.0, never_live), [BEAT]),
            ("tick", (4.25, always_live), []),
            ("tick", (4.5, always_live), []),
        ],
        [10],
        [TOLD_SILENT, (SID, None, 4250)],
    ),
    "taken over from a silent owner: its first own Message makes it live": (
        [
            *FOLLOWING,
            WATCHED,
            SILENT,
            ("held_result", (SID, ME, 10, "e1", 3.5), ANY),
            ("heard", (SID, 4.0), None),
            ("feed", (msg(11), 4.0), PUBLISH),
            ("heard", (SID, 4.5), None),
        ],
        [10, 11],
        [TOLD_SILENT, (SID, None, 4000)],
    ),
    "status markers: the owner's upstream freshness reaches a follower's clients": (
        [
            *FOLLOWING,
            ("chan", (SID, STALE_MARKER), []),
            ("chan", (SID, encode_marker(KIND_STATUS, "not a status")), []),
            ("chan", (SID, LIVE_MARKER), []),
        ],
        [10],
        [(SID, STALE, 1234), (SID, None, 5678)],
    ),
    "a status marker for a stream we own is ours to send, not to take": (
        [*OWNING, ("chan", (SID, STALE_MARKER), [])],
        [],
        [],
    ),
    "the owner's upstream goes stale: its clients and the channel are told, no beat due": (
        [
            *OWNING,
            (
                "feed_status",
                (S, STALE, 1234, 1.0),
                [(PUBLISH, SID, status_marker(STALE, 1234))],
            ),
            ("tick", (1.5, never_live), []),
        ],
        [],
        [(SID, STALE, 1234)],
    ),
    "upstream freshness while Redis is down: the node's own clients only": (
        [("acquire", (S,), ANY), ("feed_status", (S, STALE, 1234, 1.0), [])],
        [],
        [(SID, STALE, 1234)],
    ),
    "a follower's own feed has no say in the stream's freshness": (
        [*FOLLOWING, ("feed_status", (S, STALE, 1234, 1.0), [])],
        [10],
        [],
    ),
    "a joining follower hears the stored stale status with the stored state": (
        [UP, HOLD, FOLLOW, *SUBSCRIBED, ("fetched", (SID, blob(10), STALE_MARKER), [])],
        [10],
        [(SID, STALE, 1234)],
    ),
    "a stored live status tells a joining follower nothing": (
        [UP, HOLD, FOLLOW, *SUBSCRIBED, ("fetched", (SID, blob(10), LIVE_MARKER), [])],
        [10],
        [],
    ),
}


@pytest.mark.parametrize("name", list(FRESHNESS))
def test_freshness(name: str) -> None:
    steps, seqs, statuses = FRESHNESS[name]
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    run_steps(roles, steps)
    assert hub.seqs(S) == seqs
    assert hub.statuses == statuses


def test_a_forgotten_stream_is_not_watched() -> None:
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE, ahead=0)
    run_steps(roles, [*FOLLOWING, WATCHED, ("release", (S,), ANY), ("forget", (SID,), None)])
    assert roles.tick(SILENCE * 2, never_live) == []
    assert roles.watch.silent_count == 0


# -- books: a follower's own copy -----------------------------------------------------------

B = parse_stream_arg("orderbook:50:BTCUSDT")
BSID = B.stream_id


def book_frame(kind: str, u: int, bids: list[list[str]]) -> dict[str, Any]:
    return {
        "topic": B.topic,
        "type": kind,
        "ts": 1_700_000_000_000 + u,
        "data": {"s": "BTCUSDT", "b": bids, "a": [["105.0", "1"]], "u": u, "seq": u},
        "cts": 1_700_000_000_000 + u,
    }


def _book_line() -> tuple[list[Any], dict[int, Any]]:
    """The owner's Messages (seq 11 the snapshot, 12-14 updates) and its book at each seq."""
    codec = new_codec(B, 10, "e1")
    out = [codec.feed(book_frame("snapshot", 100, [["100.0", "1"]]))[0]]
    books = {11: codec.snapshot()}
    for u, size in ((101, "2"), (102, "3"), (103, "4")):
        out += codec.feed(book_frame("delta", u, [["100.0", size], [f"99.{u - 100}", "1"]]))
        books[out[-1].seq] = codec.snapshot()
    return out, books


BOOK, OWNER_BOOKS = _book_line()
STORED = OWNER_BOOKS[13]


def bblob(i: int) -> bytes:
    return encode_message(BOOK[i])


B_FOLLOW = [
    UP,
    ("acquire", (B,), [(SYNC, BSID)]),
    ("held_result", (BSID, OTHER, 10, "e1", 0.0), []),
    ("reconcile", ([BSID],), [(SUBSCRIBE, BSID)]),
    ("subscribing", (BSID,), None),
    ("confirmed", (BSID,), [(FETCH, BSID)]),
]

BOOKS: dict[str, tuple[list[tuple[str, tuple[Any, ...], Any]], list[int], int | None]] = {
    # name: (steps, seqs the hub got, the seq of the follower's copy of the book, None: none)
    "a follower keeps its own copy of the book, fed with what it delivers": (
        [*B_FOLLOW, ("fetched", (BSID, bblob(0)), []), ("chan", (BSID, bblob(1)), [])],
        [11, 12],
        12,
    ),
    "an update that does not follow the copy: back to the stored book, the channel held": (
        [
            *B_FOLLOW,
            ("fetched", (BSID, bblob(0)), []),
            ("chan", (BSID, bblob(2)), [(FETCH, BSID)]),
            ("chan", (BSID, bblob(3)), []),
            ("fetched", (BSID, encode_message(STORED)), []),
        ],
        [11, 13, 14],
        14,
    ),
    "an update with no book kept yet is not delivered: the stored book is fetched": (
        [
            *B_FOLLOW,
            ("fetched", (BSID, None), []),
            ("chan", (BSID, bblob(1)), [(FETCH, BSID)]),
            ("fetched", (BSID, encode_message(STORED)), []),
        ],
        [13],
        13,
    ),
    "a reset on the channel drops the copy; the next update refetches": (
        [
            *B_FOLLOW,
            ("fetched", (BSID, bblob(0)), []),
            ("chan", (BSID, RESET), []),
            ("chan", (BSID, bblob(1)), [(FETCH, BSID)]),
        ],
        [11],
        None,
    ),
    "a follower that releases keeps no copy": (
        [*B_FOLLOW, ("fetched", (BSID, bblob(0)), []), ("release", (B,), [(SYNC, BSID)])],
        [11],
        None,
    ),
}


@pytest.mark.parametrize("name", list(BOOKS))
def test_book_copy(name: str) -> None:
    steps, seqs, book_seq = BOOKS[name]
    hub = Recorder()
    roles: Roles
    delivery = Delivery(hub, state=lambda stream: roles.follower_book(stream.stream_id))
    roles = Roles(ME, delivery, LEASE, ahead=0)
    run_steps(roles, steps)
    assert hub.seqs(B) == seqs
    got = hub.got.get(BSID, [])
    assert [m.type for m in got[:1]] == ["snapshot"][: len(got)]  # the first is the book
    book = roles.follower_book(BSID)
    assert (None if book is None else book.seq) == book_seq
    if book is not None:  # the copy is the owner's book at that seq
        assert (
            orjson.loads(book.payload)["data"]
            == orjson.loads(OWNER_BOOKS[book_seq].payload)["data"]
        )

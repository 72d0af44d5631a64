"""The Redis engine's ownership machine on its own: no Redis, no sockets, time passed in.

Each case is a script of events with the actions each one must produce, then what the node's
hub must have seen. Together they cover every transition of `roles.Roles`.
"""

from __future__ import annotations

from typing import Any

import pytest

from fastproxy.bus.delivery import Delivery
from fastproxy.bus.redis.codec import (
    KIND_HANDOVER,
    KIND_REJECT,
    KIND_RESET,
    encode_marker,
    encode_message,
)
from fastproxy.bus.redis.roles import (
    BUFFER_MAX,
    FEED_ADD,
    FEED_REMOVE,
    FETCH,
    FOLLOWER,
    LOCAL,
    NONE,
    OWNER,
    PUBLISH,
    SUBSCRIBE,
    SYNC,
    UNSUBSCRIBE,
    Roles,
)
from fastproxy.streams import Stream
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

# Steps: (event, arguments, the actions it must produce). The events are Roles' methods; `feed`
# is feed_message (its answer is one action kind or None) and `chan` is channel_data.
UP = ("redis_up", (), ANY)
HOLD = ("acquire", (S,), [(SYNC, SID)])
WON = ("held_result", (SID, ME, 10, "e0", 0.0), [(FEED_ADD, S, 10, "e0")])
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
            ("held_result", (SID, ME, 10, "e1", 2.0), [(FEED_ADD, S, 11, None)]),
            ("feed", (msg(12), 2.5), PUBLISH),
        ],
        OWNER,
        [10, 11, 12],
    ),
    "reject during takeover: the feed refuses the stream we just won": (
        [
            *FOLLOWING,
            ("held_result", (SID, ME, 10, "e1", 2.0), [(FEED_ADD, S, 10, "e1")]),
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
        [*OWNING, ("redis_down", (), []), ("feed", (msg(11), 99.0), None)],
        LOCAL,
        [11],
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
        [*OWNING, ("redis_down", (), []), ("redis_down", (), [])],
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
            ("held_result", (SID, ME, 3, "e0", 0.0, 5), []),
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
                [(FEED_REMOVE, S), (FEED_ADD, S, 30, "e0")],
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
            ("held_result", (SID, ME, 3, "e0", 0.0, None), [(FEED_ADD, S, 3, "e0")]),
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
    "the feed refuses a stream while Redis is down: told, forgotten": (
        [("acquire", (S,), ANY), ("feed_reject", (S, "topic unknown"), [])],
        GONE,
        [],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transition(name: str) -> None:
    steps, role, seqs = CASES[name]
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE)
    for event, args, expected in steps:
        if event == "feed":
            got: Any = roles.feed_message(*args)
        elif event == "chan":
            got = roles.channel_data(*args)
        else:
            got = getattr(roles, event)(*args)
        if expected is not ANY:
            assert got == expected, f"{event}{args!r}"
    state = roles.states.get(SID)
    assert (GONE if state is None else state.role) == role
    assert hub.seqs(S) == seqs
    first = hub.got.get(SID, [None])[0]
    if first is not None:
        assert first.type == "snapshot"  # whatever a hub gets first for a stream is a snapshot


def test_withheld_messages_are_counted() -> None:
    roles = Roles(ME, Delivery(Recorder()), LEASE)
    for event, args, _ in OWNING:
        getattr(roles, event)(*args)
    for seq in range(11, 14):
        roles.feed_message(msg(seq), LEASE + seq)
    assert roles.unconfirmed == 3


def test_rejections_reach_the_hub() -> None:
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE)
    for event, args, _ in FOLLOWING:
        getattr(roles, event)(*args)
    roles.channel_data(SID, REJECT)
    assert hub.rejects == [(SID, "topic unknown")]
    assert not roles.states[SID].held


def test_a_follower_buffer_is_bounded() -> None:
    hub = Recorder()
    roles = Roles(ME, Delivery(hub), LEASE)
    for event, args, _ in [UP, HOLD, FOLLOW, *SUBSCRIBED]:
        getattr(roles, event)(*args)
    for seq in range(11, 11 + BUFFER_MAX + 10):
        roles.channel_data(SID, blob(seq))
    roles.fetched(SID, blob(10))
    assert len(hub.seqs(S)) == BUFFER_MAX + 1

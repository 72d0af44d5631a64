"""Who serves each stream on this node in cluster mode, as a state machine with no I/O.

`Roles` is told what happened (the node's clients acquired or released a stream, a hold/leave
script or a snapshot fetch returned, a channel carried data, Redis went down or came back, a
publish was fenced, the feed refused a stream) and answers with what the engine must do, as
actions. It never touches Redis, the feed or a socket; time is passed in. What reaches the
hub goes through a `Delivery` (the rules every engine shares), which is the machine's one
output that is performed in place: the hub is a synchronous Handler.

Roles of a stream on this node:

    NONE ──hold: lease is ours──► OWNER ──hold/leave: someone else's──► NONE ─► FOLLOWER
    NONE ──hold: someone else's─► FOLLOWER ──its owner left; we win──► OWNER
    any ───Redis down, held────► LOCAL ──Redis up, hold──► OWNER | FOLLOWER

OWNER: subscribed upstream, delivers to its own hub, publishes to the channel; only while
the lease it last renewed is still valid by this node's own clock (a node that was frozen or
cut off may have lost it, and then delivers nothing until a renewal is confirmed).
FOLLOWER: delivers what the channel carries, behind the stored snapshot (the channel's
Messages wait in a buffer until the subscription is confirmed and the snapshot fetched).
LOCAL: Redis is unreachable: subscribed upstream for this node's clients only, numbered under
an epoch of its own (a FOLLOWER starts a new line, an OWNER renumbers its line), so no
(epoch, seq) this node serves alone can be one another node gives other data.

Delta streams (books): a follower keeps its own copy of the book (`book`), fed with every
Message it delivers, so its late joiners get the whole book; an update that does not follow
the copy sends it back to the stored book (FETCH, the channel buffered meanwhile).

Freshness: the owner's upstream freshness goes to the followers as a status marker; an owner
beats on quiet streams, and a follower that hears nothing from its owner for a while tells its
clients the stream is stale (`tick`, timing in `liveness`). `wall_ms` turns a monotonic time
(the `now` events are given) into the epoch ms the hub is told.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastproxy.bus.redis.codec import (
    KIND_BEAT,
    KIND_HANDOVER,
    KIND_MESSAGE,
    KIND_REJECT,
    KIND_RESET,
    KIND_STATUS,
    decode_message,
    encode_marker,
    marker_text,
)
from fastproxy.bus.redis.liveness import REASON_OWNER_SILENT, OwnerWatch, parse_status, status_text
from fastproxy.codec import new_codec
from fastproxy.wire import SNAPSHOT

# Ownership changes are what an operator looks for first after a failover.
log = logging.getLogger("fastproxy.bus.redis")

if TYPE_CHECKING:
    from fastproxy.bus.delivery import Delivery
    from fastproxy.streams import Stream
    from fastproxy.wire import Message

NONE = "none"  # nothing to do with it (waiting for an election result, or being forgotten)
OWNER = "owner"  # holds the lease: subscribed upstream, publishes
FOLLOWER = "follower"  # receives the owner's Messages from the channel
LOCAL = "local"  # Redis is unreachable: subscribed upstream for its own clients only

# Actions: tuples whose first item is one of these.
FEED_ADD = "feed_add"  # (FEED_ADD, stream, seq, epoch or None): subscribe upstream
FEED_REMOVE = "feed_remove"  # (FEED_REMOVE, stream): unsubscribe upstream
FEED_RENUMBER = "feed_renumber"  # (FEED_RENUMBER, stream): a new epoch, subscription kept
SYNC = "sync"  # (SYNC, sid): run the stream's hold or leave script at the next pass
FETCH = "fetch"  # (FETCH, sid): read the stored snapshot
PUBLISH = "publish"  # (PUBLISH, sid, marker triple): a control marker for the channel
SUBSCRIBE = "subscribe"  # (SUBSCRIBE, sid): open the stream's channel subscription
UNSUBSCRIBE = "unsubscribe"  # (UNSUBSCRIBE, sid): close it
OWNER_SILENT = "owner_silent"  # (OWNER_SILENT, sid): told stale, its owner is silent (a log)

BUFFER_MAX = 4096  # channel Messages held while the snapshot is fetched
# An owner delivers to its own clients before its publish is confirmed, so when it is cut off
# (a frozen process, a broken link) it may have served seqs the cluster never stored. It never
# gets more than AHEAD_MAX past its last confirmed publish (it withholds beyond), and a node that
# continues the stored line starts AHEAD_MAX past the stored seq: the seqs an owner served
# unpublished are never given other data. (Seqs are 64-bit; the jump is a snapshot to clients.)
AHEAD_MAX = 100_000
_NO_LIMIT = 2**63

Action = tuple[Any, ...]

_RESET_MARKER = ("-", "", encode_marker(KIND_RESET))
_BEAT_MARKER = ("", "", encode_marker(KIND_BEAT))


def status_marker(reason: str | None, since: int) -> tuple[str, str, bytes]:
    """The owner's freshness for the channel (and stored for nodes that join later)."""
    return ("!", "", encode_marker(KIND_STATUS, status_text(reason, since)))


class StreamRole:
    """What this node knows and does about one stream."""

    __slots__ = (
        "book",
        "buffer",
        "channel",
        "confirms",
        "force",
        "held",
        "lease_until",
        "limit",
        "rebase",
        "reject_reason",
        "role",
        "sid",
        "stream",
    )

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.sid = stream.stream_id
        self.held = False  # local clients hold it
        self.role = NONE
        self.rebase = False  # the coming stored snapshot starts a new seq line here
        self.buffer: list[Message] | None = None  # channel Messages held until the snapshot
        self.channel = False  # a channel subscription is open or opening
        self.confirms = 0  # subscribe confirmations still due
        self.force = False  # give the lease up at the next pass (we hold it without a feed)
        self.reject_reason: str | None = None
        self.lease_until = 0.0  # OWNER: our clock's latest moment the lease is surely ours
        self.limit = 0  # OWNER: the last seq it may deliver before more is stored (AHEAD_MAX)
        # a follower's copy of a delta stream's state (a book), fed with every Message it
        # delivers, so that its own late joiners get the whole book; None: not known here
        self.book: Any = None


class Roles:
    """The ownership machine of one node. See the module docstring."""

    def __init__(
        self,
        node: bytes,
        delivery: Delivery,
        lease: float,
        wall_ms: Callable[[float], int] = lambda now: int(now * 1000),
        ahead: int = AHEAD_MAX,
    ) -> None:
        self.node = node
        self.ahead = ahead  # AHEAD_MAX; 0: no bound and no jump (the table tests' small seqs)
        self.delivery = delivery
        self.lease = lease
        self.wall_ms = wall_ms  # a monotonic time (as events give `now`) as epoch ms
        self.watch = OwnerWatch()  # is each followed stream's owner still publishing?
        self.states: dict[str, StreamRole] = {}
        self.healthy = False  # Redis answers: the cluster decides who owns what
        self.leases_won = 0
        self.leases_lost = 0
        self.received = 0
        self.unconfirmed = 0  # upstream Messages withheld: our lease was not confirmed in time

    # -- the node's clients ---------------------------------------------------------------

    def acquire(self, stream: Stream) -> list[Action]:
        st = self.states.get(stream.stream_id)
        if st is None:
            st = self.states[stream.stream_id] = StreamRole(stream)
        if st.held:
            return []
        st.held = True
        # the hub has no state for a stream it did not hold: whatever comes next (a kept
        # subscription's update, an owner's update) goes to it as a snapshot
        self.delivery.hold(st.sid, stream)
        if self.healthy:
            return [(SYNC, st.sid)]
        if st.role is NONE:
            return self._own_locally(st)
        return []

    def release(self, stream: Stream) -> list[Action]:
        st = self.states.get(stream.stream_id)
        if st is None or not st.held:
            return []
        actions: list[Action] = []
        st.held = False
        self.delivery.unhold(st.sid)
        if st.role is FOLLOWER:
            st.role = NONE
            st.buffer = None
            st.book = None
        elif st.role is LOCAL:
            actions.append((FEED_REMOVE, stream))
            st.role = NONE
        if self.healthy:
            actions.append((SYNC, st.sid))  # drop our interest; an owner keeps a needed lease
        elif st.role is NONE and not st.channel:
            self.forget(st.sid)  # our interest lapses with its TTL
        return actions

    def follower_book(self, sid: str) -> Message | None:
        """A follower's copy of a book, as a snapshot at its last seq (None: none kept)."""
        st = self.states.get(sid)
        if st is None or st.role is not FOLLOWER or st.book is None:
            return None
        return st.book.snapshot()

    def ready(self, sid: str) -> bool:
        """This node receives every Message of the stream from here on (its own feed's, or
        the channel's with the stored state served): what a resume from history needs."""
        st = self.states.get(sid)
        if st is None or not self.healthy:
            return False
        if st.role is FOLLOWER:  # subscribed, confirmed, and the stored state served
            return st.channel and st.buffer is None and not st.confirms
        return st.role is OWNER

    # -- the feed (this node's upstream) ----------------------------------------------------

    def heard(self, sid: str, now: float) -> None:
        """A Message of the stream arrived from our feed: one told stale (its owner went
        silent, and we took it over) is live again. Call only while `watch.silent_count`."""
        st = self.states.get(sid)
        if st is not None and self.watch.heard(sid, now):
            self.delivery.status(st.stream, None, self.wall_ms(now))  # a new owner publishes

    def feed_message(self, message: Message, now: float) -> str | None:
        """The hot path: deliver the node's own Message; PUBLISH when it goes to the channel
        too, SYNC when it was withheld because the lease is unconfirmed."""
        st = self.states.get(message.stream_id)
        if st is None:
            return None
        role = st.role
        if role is OWNER:
            if now >= st.lease_until or message.seq > st.limit:
                # frozen or cut off past the lease: another node may own the stream and number
                # it; nothing goes out until a renewal is confirmed (or, far ahead of what the
                # cluster stored, until it stores more: see AHEAD_MAX)
                self.unconfirmed += 1
                return SYNC
            if self.delivery.deliver(message) and self.healthy:
                self.watch.published(st.sid, now)
                return PUBLISH
        elif role is LOCAL:
            self.delivery.deliver(message)
        return None

    def published(self, sid: str, seq: int) -> None:
        """The cluster stored our publish of the stream's Messages up to `seq`."""
        st = self.states.get(sid)
        if st is not None and st.role is OWNER and seq + self.ahead > st.limit:
            st.limit = seq + self.ahead

    def feed_reset(self, stream: Stream) -> list[Action]:
        self.delivery.reset(stream)
        st = self.states.get(stream.stream_id)
        if st is not None and st.role is OWNER and self.healthy:
            return [(PUBLISH, st.sid, _RESET_MARKER)]
        return []

    def feed_status(
        self, stream: Stream, reason: str | None, since: int, now: float
    ) -> list[Action]:
        """Our upstream's freshness of the stream changed (`since`: epoch ms)."""
        st = self.states.get(stream.stream_id)
        if st is None or st.role not in (OWNER, LOCAL):
            return []
        self.delivery.status(stream, reason, since)
        if st.role is OWNER and self.healthy:  # the followers' clients are told too
            self.watch.published(st.sid, now)
            return [(PUBLISH, st.sid, status_marker(reason, since))]
        return []

    def feed_reject(self, stream: Stream, reason: str) -> list[Action]:
        """The exchange refused the stream (the feed has dropped it already)."""
        self.delivery.reject(stream, reason)
        st = self.states.get(stream.stream_id)
        if st is None:
            return []
        was_owner = st.role is OWNER
        st.held = False
        st.role = NONE
        st.buffer = None
        if not self.healthy:
            if not st.channel:
                self.forget(st.sid)
            return []
        if was_owner:
            st.reject_reason = reason  # the leave script tells the other nodes
        return [(SYNC, st.sid)]

    # -- the channel ------------------------------------------------------------------------

    def channel_data(self, sid: str, data: bytes, now: float = 0.0) -> list[Action]:
        st = self.states.get(sid)
        if st is None:
            return []
        kind = data[0]
        if st.role is FOLLOWER and self.watch.heard(sid, now):
            self.delivery.status(st.stream, None, self.wall_ms(now))  # the owner speaks again
        if kind == KIND_MESSAGE:
            if st.role is not FOLLOWER:
                return []
            self.received += 1
            message = decode_message(sid, data)
            buffer = st.buffer
            if buffer is None:
                return self._follow(st, message)
            if len(buffer) < BUFFER_MAX:
                buffer.append(message)
            return []
        if kind == KIND_RESET:
            st.book = None
            if st.role is FOLLOWER:
                self.delivery.reset(st.stream)
        elif kind == KIND_REJECT:
            if st.role is FOLLOWER:
                return self._rejected(st, marker_text(data))
        elif kind == KIND_HANDOVER and st.held:
            return [(SYNC, sid)]  # the lease is free: stand for election now
        elif kind == KIND_STATUS and st.role is FOLLOWER:
            report = parse_status(marker_text(data))
            if report is not None:
                self.delivery.status(st.stream, *report)
        return []

    def _follow(self, st: StreamRole, message: Message) -> list[Action]:
        """A follower's delivery. A book's update is applied to this node's copy of the book
        first (its late joiners are served from that copy); one that does not follow the copy
        sends the follower back to the stored book."""
        if not st.stream.is_delta:
            self.delivery.deliver(message)
            return []
        last = self.delivery.last_seq(st.sid)
        if last is not None and message.seq <= last:
            self.delivery.deliver(message)  # a duplicate: counted and dropped
            return []
        if message.type == SNAPSHOT:
            if st.book is None:
                st.book = new_codec(st.stream)
            st.book.follow(message)
        elif st.book is not None and last is not None and message.seq == last + 1:
            st.book.follow(message)
        else:
            return self._refetch(st, message)
        self.delivery.deliver(message)
        return []

    def _refetch(self, st: StreamRole, message: Message) -> list[Action]:
        """A follower's book lost its chain: hold the channel's Messages again and fetch the
        stored book (the owner keeps it current), then carry on from there."""
        st.book = None
        self.delivery.rebase(st.sid)  # whatever the stored book's seq, the hub gets it next
        actions: list[Action] = []
        if st.buffer is None:
            st.buffer = []
            actions.append((FETCH, st.sid))
        if len(st.buffer) < BUFFER_MAX:
            st.buffer.append(message)
        return actions

    # -- liveness ---------------------------------------------------------------------------

    def tick(self, now: float, is_live: Callable[[Stream], bool]) -> list[Action]:
        """Every `liveness.CHECK_EVERY`: owners beat on quiet streams (PUBLISH of a beat
        marker); a followed stream whose owner was silent too long is told stale; one we took
        over from a silent owner is live once our own upstream has it (`is_live`), even if it
        is too quiet to publish anything yet."""
        watch = self.watch
        owned = []
        for sid, st in self.states.items():
            if st.role is OWNER:
                owned.append(sid)
                watch.unfollow(sid)
            elif st.role is FOLLOWER and st.held and st.buffer is None and not st.confirms:
                watch.follow(sid, now)
            else:
                watch.unfollow(sid)
        actions: list[Action] = []
        if self.healthy:
            actions += [(PUBLISH, sid, _BEAT_MARKER) for sid in watch.beats_due(owned, now)]
        for sid in owned:
            st = self.states[sid]
            if watch.is_silent(sid) and is_live(st.stream):
                watch.heard(sid, now)
                self.delivery.status(st.stream, None, self.wall_ms(now))
        for sid, since in watch.due(now):
            st = self.states.get(sid)
            if st is not None and st.held:
                actions.append((OWNER_SILENT, sid))
                self.delivery.status(st.stream, REASON_OWNER_SILENT, self.wall_ms(since))
        return actions

    def reconcile(self, sids: list[str]) -> list[Action]:
        """Channel subscriptions for these streams: each one this node follows, only those.
        SUBSCRIBE is asked for every followed stream (the shell skips one already open on the
        right connection)."""
        actions: list[Action] = []
        for sid in sids:
            st = self.states.get(sid)
            if st is None:
                continue
            if st.held and st.role is FOLLOWER:
                actions.append((SUBSCRIBE, sid))
            elif st.channel:
                actions.append((UNSUBSCRIBE, sid))
        return actions

    def subscribing(self, sid: str) -> None:
        """A subscribe was sent for the stream's channel: Messages wait until the snapshot."""
        st = self.states[sid]
        st.channel = True
        st.confirms += 1
        st.buffer = []

    def confirmed(self, sid: str) -> list[Action]:
        st = self.states.get(sid)
        if st is None:
            return []
        if st.confirms > 0:
            st.confirms -= 1
        if st.confirms == 0 and st.buffer is not None:
            # subscribed: from here on nothing is missed, so the stored state can be fetched
            return [(FETCH, sid)]
        return []

    def channel_closed(self, sid: str, lost: bool = False) -> list[Action]:
        """The subscription was closed (or, `lost`, its connection failed: resubscribe)."""
        st = self.states.get(sid)
        if st is None:
            return []
        st.channel = False
        st.confirms = 0
        st.buffer = None
        # after a loss, a jump in seq after the gap is delivered as a snapshot
        return [(SYNC, sid)] if lost else []

    # -- results of the scripts and fetches ------------------------------------------------

    def call_for(self, sid: str) -> tuple[str, bool, bytes]:
        """Which script the stream's SYNC runs: ("hold", ...) or ("leave", force, marker)."""
        st = self.states[sid]
        if st.held and not st.force:
            return "hold", False, b""
        force = st.force or st.reject_reason is not None
        marker = b""
        if st.reject_reason is not None:
            marker = encode_marker(KIND_REJECT, st.reject_reason)
        elif force:
            marker = encode_marker(KIND_HANDOVER)
        return "leave", force, marker

    def held_result(
        self,
        sid: str,
        owner: bytes,
        stored_seq: int,
        stored_epoch: str,
        sent_at: float,
        feed_seq: int | None = None,
        now: float | None = None,
    ) -> list[Action]:
        """The hold script's answer; `sent_at` is when it was sent (our clock): a renewal
        made then lasts at least until `sent_at + lease`. `feed_seq`: the last seq our feed
        made for the stream (None when it is not subscribed)."""
        st = self.states.get(sid)
        if st is None:
            return []
        if owner == self.node:
            st.lease_until = sent_at + self.lease
            if st.role is not OWNER:
                at = sent_at if now is None else now
                return self._become_owner(st, stored_seq, stored_epoch, feed_seq, at)
            return []
        actions: list[Action] = []
        if st.role is OWNER or st.role is LOCAL:
            actions += self._lose_ownership(st)
        if st.held and st.role is NONE:
            # a new seq line for this node: the stored snapshot is delivered whatever its seq
            st.role = FOLLOWER
            st.rebase = True
        return actions

    def left_result(self, sid: str, owner: bytes) -> list[Action]:
        st = self.states.get(sid)
        if st is None:
            return []
        st.reject_reason = None
        if owner == self.node:
            if st.role is not OWNER:
                st.force = True  # a lease without a feed would starve everyone: give it up
                return [(SYNC, sid)]
            return []
        actions: list[Action] = []
        if st.force:
            st.force = False
            if st.held:
                actions.append((SYNC, sid))  # stand for election like any holder
        if st.role is OWNER:
            if owner:
                actions += self._lose_ownership(st)
            else:  # released: nobody in the cluster holds the stream any more
                actions.append((FEED_REMOVE, st.stream))
                st.role = NONE
        return actions

    def fetched(self, sid: str, blob: bytes | None, status: bytes | None = None) -> list[Action]:
        """The stored state (`blob`, the last Message or a whole book) and the owner's last
        freshness marker (`status`) were read."""
        st = self.states.get(sid)
        if st is None or st.role is not FOLLOWER or st.buffer is None or st.confirms:
            return []
        buffered, st.buffer = st.buffer, None
        delivery = self.delivery
        report = parse_status(marker_text(status)) if status else None
        if report is not None and report[0] is not None:  # the owner's upstream is stale now
            delivery.status(st.stream, *report)
        if st.rebase:
            st.rebase = False
            delivery.rebase(sid)
        actions: list[Action] = []
        if blob:
            kept = decode_message(sid, blob)
            last = delivery.last_seq(sid)
            # A stored state older (by the exchange's clock) than what this node already served
            # is stale: a new owner has not stored its own yet (after Redis refused writes, say).
            # The owner's next Message on the channel comes as the snapshot instead.
            if (last is None or kept.seq > last) and kept.ts >= delivery.last_ts(sid):
                delivery.resync(sid)
                actions += self._follow(st, kept)
        for message in buffered:
            actions += self._follow(st, message)
        return actions

    def fenced(self, sid: str) -> list[Action]:
        """A publish was refused: another node has the lease. Until the next hold says so,
        nothing more goes out under a lease we no longer have."""
        st = self.states.get(sid)
        if st is None:
            return []
        if st.role is OWNER:
            st.lease_until = 0.0
        return [(SYNC, sid)]

    def idle(self, sid: str) -> bool:
        """Nothing left to do about the stream: it can be forgotten."""
        st = self.states.get(sid)
        return (
            st is not None and not st.held and st.role is NONE and not st.channel and not st.force
        )

    def forget(self, sid: str) -> None:
        del self.states[sid]
        self.delivery.forget(sid)
        self.watch.forget(sid)

    # -- Redis down and up -----------------------------------------------------------------

    def redis_down(self) -> list[Action]:
        """Redis is unreachable: every held stream is served by this node for its clients."""
        actions: list[Action] = []
        was_healthy, self.healthy = self.healthy, False
        if not was_healthy:
            return actions
        for st in list(self.states.values()):
            st.channel = False
            st.confirms = 0
            st.force = False
            st.reject_reason = None
            st.rebase = False
            if st.held:
                if st.role is OWNER:
                    # The cluster's line (epoch, seq) may be continued by another node from
                    # what was stored while we cannot tell it what we number: what this node
                    # serves alone goes under an epoch of its own (its clients get a snapshot)
                    actions.append((FEED_RENUMBER, st.stream))
                    self.delivery.rebase(st.sid)
                actions += self._own_locally(st)
            else:
                if st.role is OWNER:
                    # the nodes that hold it now own it themselves
                    actions.append((FEED_REMOVE, st.stream))
                self.forget(st.sid)
        return actions

    def redis_up(self) -> list[Action]:
        """Redis answers again: rejoin, every stream stands for election."""
        self.healthy = True
        return [(SYNC, sid) for sid in self.states]

    # -- transitions ------------------------------------------------------------------------

    def _own_locally(self, st: StreamRole) -> list[Action]:
        st.buffer = None
        actions: list[Action] = []
        if st.role is not OWNER and st.role is not LOCAL:
            actions.append((FEED_ADD, st.stream, self.delivery.last_seq(st.sid) or 0, None))
        st.role = LOCAL
        return actions

    def _become_owner(
        self,
        st: StreamRole,
        stored_seq: int,
        stored_epoch: str,
        feed_seq: int | None,
        now: float,
    ) -> list[Action]:
        # Continue the numbering past anything published or delivered: dedupe by seq must
        # never swallow the new owner's Messages on any node. Continuing the stored line
        # exactly keeps its epoch too; going past it starts a new one.
        base = max(stored_seq, self.delivery.last_seq(st.sid) or 0)
        epoch = stored_epoch if stored_epoch and base == stored_seq else None
        if epoch is not None:
            base += self.ahead  # past anything the last owner served unpublished
        actions: list[Action] = []
        if st.role is LOCAL:
            if feed_seq is None:
                actions.append((FEED_ADD, st.stream, base, epoch))
            elif feed_seq < stored_seq:
                # our degraded-mode line is behind what the cluster saw: restart it past that
                actions.append((FEED_REMOVE, st.stream))
                actions.append((FEED_ADD, st.stream, base, epoch))
        elif st.role is not OWNER:
            actions.append((FEED_ADD, st.stream, base, epoch))
        st.role = OWNER
        st.buffer = None
        # what our line continues from counts as stored: a local line ahead of the stored seq
        # is in this node's own epoch, which nobody else numbers
        start = base if feed_seq is None else max(base, feed_seq)
        st.limit = start + self.ahead if self.ahead else _NO_LIMIT
        self.leases_won += 1
        log.info("stream owner: this node", extra={"stream": st.sid, "seq": base})
        if self.healthy:  # whatever freshness the last owner stored is not ours
            actions.append((PUBLISH, st.sid, status_marker(None, self.wall_ms(now))))
        return actions

    def _lose_ownership(self, st: StreamRole) -> list[Action]:
        if st.role is OWNER:
            self.leases_lost += 1
            log.info("stream owner: another node", extra={"stream": st.sid})
        st.role = NONE
        st.lease_until = 0.0
        return [(FEED_REMOVE, st.stream)]

    def _rejected(self, st: StreamRole, reason: str) -> list[Action]:
        """The owner's exchange refused the stream: our clients are told, as the owner's are."""
        if st.held:
            self.delivery.reject(st.stream, reason)
        else:
            self.delivery.forget(st.sid)
        st.held = False
        st.role = NONE
        st.buffer = None
        return [(SYNC, st.sid)]

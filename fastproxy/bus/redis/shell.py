"""Cluster mode: the bus on Redis (one server or a Redis Cluster).

Each node keeps, per stream its clients hold, a heartbeat-renewed entry in the stream's interest
set; the one node holding the stream's lease subscribes upstream, delivers to its own hub
directly and publishes every Message to the stream's channel; the other interested nodes
subscribe to that channel. Nodes that die simply stop renewing: their interest and leases expire
within the TTL with no cleanup step by anyone, and an interested node takes the lease over.

Three background tasks, and nothing on the hot path awaits Redis:
- control: acquire/release, heartbeats, elections, snapshot fetches and (un)subscriptions, all
  batched into pipelines, so a burst of 1000 subscribes costs a few round trips;
- publisher: the owner's Messages, queued (bounded, drops counted) and pipelined;
- one reader per pub/sub connection (one per shard on a cluster).

Connections: commands (scripts, pipelines) go through a pool of REDIS_MAX_CONNECTIONS (per shard
on a cluster) behind a semaphore of the same size, so a burst waits instead of failing; only two
tasks send commands, so few are ever in use. Pub/sub has one dedicated connection per shard.

If Redis is unreachable the node serves its own clients by owning every stream they hold itself
(degraded: `healthy` is False and `status()` says why); when Redis answers again it rejoins and
re-elects, and a node that lost an election switches back to the channel behind a snapshot.

The URL may carry three options of the bus (removed before redis-py sees the URL):
`cluster=yes|no` (default: ask the server, `INFO cluster`), `prefix=` (key and channel prefix,
default `fp`) and `ttl=` (seconds a dead node's interest and leases outlive it, default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from fastproxy.bus import Callbacks
from fastproxy.bus.delivery import Delivery
from fastproxy.bus.redis import lua
from fastproxy.bus.redis.codec import (
    KIND_BEAT,
    KIND_HANDOVER,
    KIND_MESSAGE,
    KIND_REJECT,
    KIND_RESET,
    KIND_STATUS,
    decode_message,
    encode_marker,
    encode_message,
    marker_text,
)
from fastproxy.bus.redis.liveness import (
    CHECK_EVERY,
    REASON_OWNER_SILENT,
    OwnerWatch,
    parse_status,
    status_text,
)
from fastproxy.bus.redis.options import parse_redis_url, with_host, without_db
from fastproxy.codec import Message, new_codec
from fastproxy.config import Config
from fastproxy.streams import Stream
from fastproxy.wire import SNAPSHOT

if TYPE_CHECKING:
    from fastproxy.bus import Handler, Source

log = logging.getLogger("fastproxy.bus")
_T = TypeVar("_T")

# Roles of a stream on this node.
NONE = "none"  # nothing to do with it (waiting for an election result, or being forgotten)
OWNER = "owner"  # holds the lease: subscribed upstream, publishes
FOLLOWER = "follower"  # receives the owner's Messages from the channel
LOCAL = "local"  # Redis is unreachable: subscribed upstream for its own clients only

_KEEP_LAST_MS = 24 * 3600 * 1000  # stored seq outlives a quiet stream so numbering continues
_QUEUE_MAX = 20000
_BUFFER_MAX = 4096
_PIPELINE_MAX = 2000


class _StreamState:
    """What this node knows and does about one stream."""

    __slots__ = (
        "book",
        "buffer",
        "channel",
        "confirms",
        "force",
        "held",
        "k_hist",
        "k_interest",
        "k_last",
        "k_lease",
        "rebase",
        "reject_reason",
        "role",
        "sid",
        "stream",
        "sub",
    )

    def __init__(self, stream: Stream, prefix: str) -> None:
        self.stream = stream
        self.sid = sid = stream.stream_id
        tag = f"{prefix}:{{{sid}}}"
        self.k_interest = f"{tag}:interest"
        self.k_lease = f"{tag}:lease"
        self.k_last = f"{tag}:last"
        self.k_hist = f"{tag}:hist"
        self.channel = f"{tag}:ch".encode()
        self.held = False  # local clients hold it
        self.role = NONE
        self.rebase = False  # the coming stored snapshot starts a new seq line here
        self.buffer: list[Message] | None = None  # channel Messages held until the snapshot
        self.sub: _Subscriber | None = None  # the pub/sub connection carrying its channel
        self.confirms = 0  # subscribe confirmations still due
        self.force = False  # give the lease up at the next pass (we hold it without a feed)
        self.reject_reason: str | None = None
        # a follower's copy of a delta stream's state (a book), fed with every Message it
        # delivers, so that its own late joiners get the whole book; None: not known here
        self.book: Any = None


class _Subscriber:
    """One pub/sub connection (one per shard on a cluster) and the task reading it."""

    def __init__(self, bus: RedisBus, name: str, client: Redis, sharded: bool) -> None:
        self.bus = bus
        self.name = name
        self.client = client
        self.pubsub = client.pubsub()
        self.sharded = sharded
        self.channels: dict[bytes, _StreamState] = {}
        self.task: asyncio.Task[None] | None = None
        self.last_seen = 0.0
        self.closed = False

    async def open(self, timeout: float) -> None:
        await _within(timeout, self.pubsub.connect())
        self.last_seen = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(self._read(), name=f"redis-bus-reader{self.name}")

    async def subscribe(self, states: list[_StreamState], timeout: float) -> None:
        for st in states:
            self.channels[st.channel] = st
            st.sub = self
            st.confirms += 1
        channels = [st.channel for st in states]
        if self.sharded:
            # one SSUBSCRIBE per channel: the channels of one shard span many slots
            for channel in channels:
                await _within(timeout, self.pubsub.ssubscribe(channel))
        else:
            await _within(timeout, self.pubsub.subscribe(*channels))

    async def unsubscribe(self, states: list[_StreamState], timeout: float) -> None:
        channels = []
        for st in states:
            if self.channels.get(st.channel) is st:
                del self.channels[st.channel]
                channels.append(st.channel)
            st.sub = None
            st.confirms = 0
            st.buffer = None
        if not channels:
            return
        if self.sharded:
            for channel in channels:
                await _within(timeout, self.pubsub.sunsubscribe(channel))
        else:
            await _within(timeout, self.pubsub.unsubscribe(*channels))

    async def ping(self, timeout: float) -> None:
        await _within(timeout, self.pubsub.ping())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        pubsub = self.pubsub
        on_data = self.bus._on_channel_data
        try:
            while not self.closed:
                response = await pubsub.parse_response(block=True)
                self.last_seen = loop.time()
                if response is None:
                    continue
                if isinstance(response, list) and response[0] in (b"message", b"smessage"):
                    st = self.channels.get(response[1])
                    if st is not None:
                        on_data(st, response[2])
                    continue
                # subscribe confirmations and pongs: redis-py keeps its bookkeeping
                await pubsub.handle_message(response)
                if isinstance(response, list) and response[0] in (b"subscribe", b"ssubscribe"):
                    st = self.channels.get(response[1])
                    if st is not None:
                        self.bus._on_confirmed(st)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.closed:
                self.bus._on_subscriber_failed(self, exc)

    def detach(self) -> list[_StreamState]:
        """Forget every channel (the connection is going away); return their streams."""
        states = [st for st in self.channels.values() if st.sub is self]
        for st in states:
            st.sub = None
            st.confirms = 0
            st.buffer = None
        self.channels.clear()
        return states

    async def close(self) -> None:
        self.closed = True
        task = self.task
        # closing the connection ends the reader's read; the cancel is only a fallback
        with contextlib.suppress(Exception):
            await _within(2.0, self.pubsub.aclose())
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(Exception):
            await _within(2.0, self.client.aclose())


class RedisBus:
    """The Bus on Redis. See the module docstring for the design."""

    name = "redis"
    # the owner writes each stream's history to Redis with the publish: any node can resume
    shared_history = True

    def __init__(self, feed: Source, config: Config, *, node_id: str | None = None) -> None:
        self._feed = feed
        self._url, self.options = parse_redis_url(config.redis_url)
        self.ttl = self.options.ttl
        self.prefix = self.options.prefix
        self.max_connections = config.redis_max_connections
        # resumes on any node read the history the owner writes with each publish
        self.history_max_messages = config.history_max_messages
        self.history_max_age = config.history_max_age
        # Interest is renewed three times per TTL; a lease lasts two renewal periods, so one
        # missed heartbeat does not lose it, and a dead owner is replaced within one TTL: the
        # lease lapses (2/3 TTL) and an interested node's next heartbeat (1/3 TTL) takes it.
        self.beat = self.ttl / 3
        self.lease = self.ttl * 2 / 3
        self.op_timeout = min(3.0, max(1.0, self.ttl / 3))
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._node = self.node_id.encode()
        self._k_nodes = f"{self.prefix}:nodes"
        # what reaches the hub passes the delivery rules every engine shares
        self._delivery = Delivery(state=self.snapshot)
        feed.attach(
            Callbacks(
                self._on_feed_message,
                self._on_feed_reset,
                self._on_feed_reject,
                self._on_feed_status,
            )
        )
        self._watch = OwnerWatch()  # is each followed stream's owner still publishing?
        self._states: dict[str, _StreamState] = {}
        self._dirty: set[str] = set()  # streams whose interest/lease need a script this pass
        self._fetch: set[str] = set()  # followers whose subscription is confirmed: snapshot
        self._client: Any = None  # Redis or RedisCluster
        self._cluster = False
        self._subs: dict[str, _Subscriber] = {}
        self._sem = asyncio.Semaphore(self.max_connections)
        self._queue: deque[tuple[_StreamState, Any]] = deque(maxlen=_QUEUE_MAX)
        self._wake = asyncio.Event()
        self._pub_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._healthy = False
        self._reason = "not started"
        self._stopping = False
        self.nodes_alive = 0
        self.published = 0
        self.publish_dropped = 0
        self.publish_fenced = 0
        self.received = 0
        self.leases_won = 0
        self.leases_lost = 0
        self.redis_errors = 0
        self.reconnects = 0
        self.last_error = ""

    # -- the Bus interface ---------------------------------------------------------------

    def attach(self, handler: Handler) -> None:
        self._delivery.attach(handler)

    async def start(self) -> None:
        try:
            await self._connect()
        except Exception as exc:  # a node starts and serves even when Redis is down
            self._fail(exc)
        else:
            self._rejoin()
        self._tasks = [
            asyncio.create_task(self._control(), name="redis-bus-control"),
            asyncio.create_task(self._publisher(), name="redis-bus-publisher"),
            asyncio.create_task(self._liveness(), name="redis-bus-liveness"),
        ]

    async def stop(self) -> None:
        await self._halt()
        if self._healthy and self._client is not None:
            try:
                await _within(self.op_timeout * 2, self._goodbye())
            except Exception as exc:
                log.warning("could not hand streams over on stop", extra={"error": repr(exc)})
        await self._drop_connections()

    async def _halt(self) -> None:
        """Stop the background tasks: they see `_stopping` and leave at their next step.

        Cancellation is only the fallback, bounded in time: redis-py (8.1) can swallow a
        cancel that lands while a pipeline returns its connection, and a stop that waits on
        such a task forever would hang the node's shutdown.
        """
        self._stopping = True
        self._wake.set()
        self._pub_wake.set()
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.op_timeout + 1.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self._tasks = []

    def acquire(self, stream: Stream) -> None:
        st = self._states.get(stream.stream_id)
        if st is None:
            st = self._states[stream.stream_id] = _StreamState(stream, self.prefix)
        if st.held:
            return
        st.held = True
        # the hub has no state for a stream it did not hold: whatever comes next (a kept
        # subscription's update, an owner's update) goes to it as a snapshot
        self._delivery.hold(st.sid, stream)
        if self._healthy:
            self._mark(st)
        elif st.role == NONE:
            self._own_locally(st)

    def release(self, stream: Stream) -> None:
        st = self._states.get(stream.stream_id)
        if st is None or not st.held:
            return
        st.held = False
        self._delivery.unhold(st.sid)
        if st.role == FOLLOWER:
            st.role = NONE
            st.buffer = None
            st.book = None
        elif st.role == LOCAL:
            self._feed.remove(stream)
            st.role = NONE
        if self._healthy:
            self._mark(st)  # drop our interest; an owner decides whether to keep the lease
        elif st.role == NONE and st.sub is None:
            self._forget(st)  # our interest lapses with its TTL

    def snapshot(self, stream: Stream) -> Message | None:
        st = self._states.get(stream.stream_id)
        if st is None:
            return None
        if st.role is OWNER or st.role is LOCAL:
            return self._feed.snapshot(stream)
        if st.role is FOLLOWER and st.book is not None:
            return st.book.snapshot()
        return None

    def status(self) -> dict[str, Any]:
        roles = dict.fromkeys((OWNER, FOLLOWER, LOCAL), 0)
        for st in self._states.values():
            if st.role in roles:
                roles[st.role] += 1
        status: dict[str, Any] = {
            "engine": self.name,
            "healthy": self._healthy,
            "mode": "cluster" if self._cluster else "standalone",
            "node_id": self.node_id,
            "nodes": self.nodes_alive,
            "ttl": self.ttl,
            "streams_owned": roles[OWNER],
            "streams_following": roles[FOLLOWER],
            "streams_local": roles[LOCAL],
            "published": self.published,
            "publish_queue": len(self._queue),
            "publish_dropped": self.publish_dropped,
            "publish_fenced": self.publish_fenced,
            "received": self.received,
            "duplicates_dropped": self._delivery.duplicates,
            "gaps": self._delivery.gaps,
            "leases_won": self.leases_won,
            "leases_lost": self.leases_lost,
            "redis_errors": self.redis_errors,
            "reconnects": self.reconnects,
        }
        if not self._healthy:
            status["reason"] = self._reason
        if self.last_error:
            status["last_error"] = self.last_error
        return status

    @property
    def healthy(self) -> bool:
        return self._healthy

    def ready(self, stream: Stream) -> bool:
        """This node receives every Message of `stream` from here on (its own feed's, or the
        channel's with the stored state served): what a resume from history needs."""
        st = self._states.get(stream.stream_id)
        if st is None or not self._healthy:
            return False
        if st.role is FOLLOWER:  # subscribed, confirmed, and the stored state served
            return st.sub is not None and st.buffer is None and not st.confirms
        return st.role is OWNER

    async def history_after(
        self, stream: Stream, epoch: str, seq: int
    ) -> list[tuple[int, bytes]] | None:
        """(seq, frame) of every Message the stream published after `seq` in `epoch`, from the
        history the owner writes with each publish; None when it cannot bridge the gap (another
        epoch, Messages after `seq` already trimmed or too old, Redis unreachable)."""
        if not self._healthy or self._client is None or self.history_max_messages <= 0:
            return None
        tag = f"{self.prefix}:{{{stream.stream_id}}}"
        async with self._sem:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(f"{tag}:last", "epoch", "seq")
            pipe.xrange(f"{tag}:hist", f"0-{seq + 1}", "+", count=self.history_max_messages + 1)
            (kept_epoch, kept_seq), entries = await _within(self.op_timeout, pipe.execute())
        if kept_epoch is None or kept_epoch.decode() != epoch:
            return None
        if not entries:
            return [] if kept_seq is not None and int(kept_seq) == seq else None
        horizon = (time.time() - self.history_max_age) * 1000
        out = []
        for entry_id, fields in entries:
            n = int(entry_id.split(b"-", 1)[1])
            if n != seq + 1 + len(out) or int(fields[b"t"]) < horizon:
                return None  # trimmed, or past its age
            out.append((n, decode_message(stream.stream_id, fields[b"m"]).frame))
        return out

    def role(self, stream: Stream) -> str:
        st = self._states.get(stream.stream_id)
        return NONE if st is None else st.role

    # -- the hot path: Messages in from the feed or a channel ------------------------------

    def _on_feed_message(self, message: Message) -> None:
        st = self._states.get(message.stream_id)
        if st is None:
            return
        role = st.role
        if self._watch.silent_count and self._watch.heard(st.sid, time.monotonic()):
            self._delivery.status(st.stream, None, _wall_ms())  # a new owner publishes: live
        if role is OWNER:
            if self._delivery.deliver(message) and self._healthy:
                self._enqueue(st, message)
                self._watch.published(st.sid, time.monotonic())
        elif role is LOCAL:
            self._delivery.deliver(message)

    def _on_channel_data(self, st: _StreamState, data: bytes) -> None:
        kind = data[0]
        if st.role is FOLLOWER and self._watch.heard(st.sid, time.monotonic()):
            self._delivery.status(st.stream, None, _wall_ms())  # the owner speaks again
        if kind == KIND_MESSAGE:
            if st.role is not FOLLOWER:
                return
            self.received += 1
            message = decode_message(st.sid, data)
            buffer = st.buffer
            if buffer is None:
                self._follow(st, message)
            elif len(buffer) < _BUFFER_MAX:
                buffer.append(message)
            return
        if kind == KIND_RESET:
            st.book = None
            if st.role is FOLLOWER:
                self._delivery.reset(st.stream)
        elif kind == KIND_REJECT:
            if st.role is FOLLOWER:
                self._rejected(st, marker_text(data))
        elif kind == KIND_HANDOVER and st.held:
            self._mark(st)  # the lease is free: stand for election now
        elif kind == KIND_STATUS and st.role is FOLLOWER:
            report = parse_status(marker_text(data))
            if report is not None:
                self._delivery.status(st.stream, *report)

    def _follow(self, st: _StreamState, message: Message) -> None:
        """A follower's delivery. A book's update is applied to this node's copy of the book
        first (its late joiners are served from that copy); one that does not follow the copy
        sends the follower back to the stored book."""
        if not st.stream.is_delta:
            self._delivery.deliver(message)
            return
        last = self._delivery.last_seq(st.sid)
        if last is not None and message.seq <= last:
            self._delivery.deliver(message)  # a duplicate: counted and dropped
            return
        if message.type == SNAPSHOT:
            if st.book is None:
                st.book = new_codec(st.stream)
            st.book.follow(message)
        elif st.book is not None and last is not None and message.seq == last + 1:
            st.book.follow(message)
        else:
            self._refetch(st, message)
            return
        self._delivery.deliver(message)

    def _refetch(self, st: _StreamState, message: Message) -> None:
        """A follower's book lost its chain: hold the channel's Messages again and fetch the
        stored book (the owner keeps it current), then carry on from there."""
        st.book = None
        self._delivery.rebase(st.sid)  # whatever the stored book's seq, the hub gets it next
        if st.buffer is None:
            st.buffer = []
            self._fetch.add(st.sid)
            self._wake.set()
        if len(st.buffer) < _BUFFER_MAX:
            st.buffer.append(message)

    def _enqueue(self, st: _StreamState, item: Any) -> None:
        queue = self._queue
        if len(queue) == _QUEUE_MAX:
            self.publish_dropped += 1  # the deque drops the oldest
        queue.append((st, item))
        if not self._pub_wake.is_set():
            self._pub_wake.set()

    def _on_feed_reset(self, stream: Stream) -> None:
        self._delivery.reset(stream)
        st = self._states.get(stream.stream_id)
        if st is not None and st.role is OWNER and self._healthy:
            self._enqueue(st, ("-", "", encode_marker(KIND_RESET)))

    def _on_feed_status(self, stream: Stream, reason: str | None, since: int) -> None:
        st = self._states.get(stream.stream_id)
        if st is None or st.role not in (OWNER, LOCAL):
            return
        self._delivery.status(stream, reason, since)
        if st.role is OWNER and self._healthy:  # the followers' clients are told too
            self._enqueue(st, ("!", "", encode_marker(KIND_STATUS, status_text(reason, since))))
            self._watch.published(st.sid, time.monotonic())

    def _on_feed_reject(self, stream: Stream, reason: str) -> None:
        self._delivery.reject(stream, reason)
        st = self._states.get(stream.stream_id)
        if st is None:
            return
        was_owner = st.role is OWNER
        st.held = False
        st.role = NONE  # the feed has dropped the topic already
        st.buffer = None
        if not self._healthy:
            if st.sub is None:
                self._forget(st)
            return
        if was_owner:
            st.reject_reason = reason
        self._mark(st)

    def _rejected(self, st: _StreamState, reason: str) -> None:
        """The owner's exchange refused the stream: our clients are told, as the owner's are."""
        if st.held:
            self._delivery.reject(st.stream, reason)
        else:
            self._delivery.forget(st.sid)
        st.held = False
        st.role = NONE
        st.buffer = None
        self._mark(st)

    def _on_confirmed(self, st: _StreamState) -> None:
        if st.confirms > 0:
            st.confirms -= 1
        if st.confirms == 0 and st.buffer is not None:
            # subscribed: from here on nothing is missed, so the stored state can be fetched
            self._fetch.add(st.sid)
            self._wake.set()

    def _on_subscriber_failed(self, sub: _Subscriber, exc: BaseException) -> None:
        self.redis_errors += 1
        self.last_error = f"pub/sub connection lost: {exc!r}"
        log.warning("redis pub/sub connection lost", extra={"error": repr(exc)})
        if self._subs.get(sub.name) is sub:
            del self._subs[sub.name]
        for st in sub.detach():
            self._mark(st)  # resubscribe; a jump in seq after the gap is sent as a snapshot
        task = asyncio.get_running_loop().create_task(sub.close())
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)
        self._wake.set()

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    # -- roles ----------------------------------------------------------------------------

    def _forget(self, st: _StreamState) -> None:
        del self._states[st.sid]
        self._delivery.forget(st.sid)
        self._watch.forget(st.sid)

    async def _liveness(self) -> None:
        """Owners beat on quiet streams; followers that hear nothing from an owner tell their
        clients the stream is stale (fastproxy.bus.redis.liveness)."""
        watch = self._watch
        beat = encode_marker(KIND_BEAT)
        while not self._stopping:
            await asyncio.sleep(CHECK_EVERY)
            now = time.monotonic()
            owned = []
            for sid, st in self._states.items():
                if st.role is OWNER:
                    owned.append(sid)
                    watch.unfollow(sid)
                elif st.role is FOLLOWER and st.held and st.buffer is None and not st.confirms:
                    watch.follow(sid, now)
                else:
                    watch.unfollow(sid)
            if self._healthy:
                for sid in watch.beats_due(owned, now):
                    self._enqueue(self._states[sid], ("", "", beat))
            for sid in owned:
                # taken over from a silent owner: live once our own upstream has it, even if
                # the stream is too quiet to publish anything yet
                st = self._states[sid]
                if watch.is_silent(sid) and self._feed.is_live(st.stream):
                    watch.heard(sid, now)
                    self._delivery.status(st.stream, None, _wall_ms())
            for sid, since in watch.due(now):
                st = self._states.get(sid)
                if st is not None and st.held:
                    log.warning("stream owner silent", extra={"stream": sid})
                    self._delivery.status(st.stream, REASON_OWNER_SILENT, _wall_ms(since))

    def _mark(self, st: _StreamState) -> None:
        self._dirty.add(st.sid)
        self._wake.set()

    def _own_locally(self, st: _StreamState) -> None:
        """Degraded: this node subscribes upstream for its own clients."""
        st.buffer = None
        if st.role is not OWNER and st.role is not LOCAL:
            self._feed.add(st.stream, self._delivery.last_seq(st.sid) or 0)
        st.role = LOCAL

    def _become_owner(self, st: _StreamState, stored_seq: int, stored_epoch: str) -> None:
        # Continue the numbering past anything published or delivered: dedupe by seq must
        # never swallow the new owner's Messages on any node. Continuing the stored line
        # exactly keeps its epoch too; going past it starts a new one.
        base = max(stored_seq, self._delivery.last_seq(st.sid) or 0)
        epoch = stored_epoch if stored_epoch and base == stored_seq else None
        if st.role is LOCAL:
            current = self._feed.seq(st.stream)
            if current is None:
                self._feed.add(st.stream, base, epoch)
            elif current < stored_seq:
                # our degraded-mode line is behind what the cluster saw: restart it past that
                self._feed.remove(st.stream)
                self._feed.add(st.stream, base, epoch)
        elif st.role is not OWNER:
            self._feed.add(st.stream, base, epoch)
        st.role = OWNER
        st.buffer = None
        self.leases_won += 1
        if self._healthy:  # whatever freshness the last owner stored is not ours
            marker = encode_marker(KIND_STATUS, status_text(None, _wall_ms()))
            self._enqueue(st, ("!", "", marker))

    def _lose_ownership(self, st: _StreamState) -> None:
        if st.role is OWNER:
            self.leases_lost += 1
        self._feed.remove(st.stream)
        st.role = NONE

    def _apply_hold(
        self, st: _StreamState, owner: bytes, stored_seq: int, stored_epoch: str
    ) -> None:
        if owner == self._node:
            if st.role is not OWNER:
                self._become_owner(st, stored_seq, stored_epoch)
            return
        if st.role is OWNER or st.role is LOCAL:
            self._lose_ownership(st)
        if st.held and st.role is NONE:
            # a new seq line for this node: the stored snapshot is delivered whatever its seq
            st.role = FOLLOWER
            st.rebase = True

    def _apply_leave(self, st: _StreamState, owner: bytes) -> None:
        st.reject_reason = None
        if owner == self._node:
            if st.role is not OWNER:
                st.force = True  # a lease without a feed would starve everyone: give it up
                self._mark(st)
            return
        if st.force:
            st.force = False
            if st.held:
                self._mark(st)  # stand for election like any holder
        if st.role is OWNER:
            if owner:
                self._lose_ownership(st)
            else:  # released: nobody in the cluster holds the stream any more
                self._feed.remove(st.stream)
                st.role = NONE

    def _apply_fetch(self, st: _StreamState, stored: list[bytes | None]) -> None:
        if st.role is not FOLLOWER or st.buffer is None or st.confirms:
            return
        blob, status = stored
        buffered, st.buffer = st.buffer, None
        delivery = self._delivery
        report = parse_status(marker_text(status)) if status else None
        if report is not None and report[0] is not None:  # the owner's upstream is stale now
            delivery.status(st.stream, *report)
        if st.rebase:
            st.rebase = False
            delivery.rebase(st.sid)
        if blob:
            kept = decode_message(st.sid, blob)
            last = delivery.last_seq(st.sid)
            if last is None or kept.seq > last:
                delivery.resync(st.sid)
                self._follow(st, kept)
        for message in buffered:
            self._follow(st, message)

    # -- control: interest, leases, subscriptions ----------------------------------------

    async def _control(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        backoff = 0.25
        while not self._stopping:
            delay = next_beat - loop.time()
            if delay > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await _within(delay, self._wake.wait())
            self._wake.clear()
            try:
                if not self._healthy:
                    await self._connect()
                    self._rejoin()
                    next_beat = 0.0
                beat = loop.time() >= next_beat
                if beat:
                    next_beat = loop.time() + self.beat
                await self._pass(beat)
                backoff = 0.25
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(exc)
                await self._drop_connections()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _pass(self, beat: bool) -> None:
        states = self._states
        if beat:
            work = list(states.values())
            self._dirty.clear()
            await self._check_subscribers()
        else:
            work = [states[sid] for sid in self._dirty if sid in states]
            self._dirty.clear()
        fetch = [states[sid] for sid in self._fetch if sid in states]
        self._fetch.clear()
        calls: list[tuple[str, _StreamState | None, tuple[Any, ...]]] = []
        if beat:
            calls.append(
                ("node", None, (lua.NODE, [self._k_nodes], [self._node, self._ms(self.ttl), "0"]))
            )
        for st in work:
            keys = [st.k_interest, st.k_lease, st.k_last]
            if st.held and not st.force:
                args = [self._node, self._ms(self.ttl), self._ms(self.lease)]
                calls.append(("hold", st, (lua.HOLD, keys, args)))
            else:
                force = st.force or st.reject_reason is not None
                marker = b""
                if st.reject_reason is not None:
                    marker = encode_marker(KIND_REJECT, st.reject_reason)
                elif force:
                    marker = encode_marker(KIND_HANDOVER)
                args = [
                    self._node,
                    self._ms(self.lease),
                    "1" if force else "0",
                    self._pub_command,
                    st.channel,
                    marker,
                ]
                calls.append(("leave", st, (lua.LEAVE, keys, args)))
        for st in fetch:
            calls.append(("fetch", st, ()))
        for start in range(0, len(calls), _PIPELINE_MAX):
            await self._run_calls(calls[start : start + _PIPELINE_MAX])
        if not self._healthy:
            return
        touched = {id(st): st for _, st, _ in calls if st is not None}
        await self._reconcile(list(touched.values()) if not beat else list(states.values()))
        for st in list(touched.values()):
            if (
                not st.held
                and st.role is NONE
                and st.sub is None
                and not st.force
                and st.sid not in self._dirty
                and states.get(st.sid) is st
            ):
                self._forget(st)

    async def _run_calls(
        self, calls: list[tuple[str, _StreamState | None, tuple[Any, ...]]]
    ) -> None:
        pipe = self._client.pipeline(transaction=False)
        for kind, st, spec in calls:
            if kind == "fetch":
                assert st is not None
                pipe.hmget(st.k_last, "msg", "status")
            else:
                script, keys, args = spec
                _evalsha(pipe, script, keys, args)
        results = await self._execute(pipe)
        if not self._healthy:
            return  # failed meanwhile (publisher, reader): the rejoin redoes all of this
        reload = False
        for (kind, st, _), result in zip(calls, results, strict=True):
            if st is not None and self._states.get(st.sid) is not st:
                continue  # forgotten while the pipeline ran
            if isinstance(result, NoScriptError):
                reload = True
                if st is not None:
                    self._dirty.add(st.sid)
                    if kind == "fetch":
                        self._fetch.add(st.sid)
                continue
            if isinstance(result, ResponseError):
                self.redis_errors += 1
                self.last_error = f"{kind}: {result}"
                log.error(
                    "redis refused a bus script", extra={"script": kind, "error": str(result)}
                )
                continue
            if isinstance(result, BaseException):
                raise result
            if kind == "node":
                self.nodes_alive = int(result)
                continue
            assert st is not None
            if kind == "hold":
                owner, seq, _count, epoch = result
                self._apply_hold(st, owner, int(seq), epoch.decode())
            elif kind == "leave":
                self._apply_leave(st, result[0])
            else:
                self._apply_fetch(st, result)
        if reload:
            await self._load_scripts()
            self._wake.set()

    async def _reconcile(self, states: list[_StreamState]) -> None:
        """Subscribe to the channel of each stream this node follows, and only those."""
        subscribe: dict[str, list[_StreamState]] = {}
        unsubscribe: dict[_Subscriber, list[_StreamState]] = {}
        for st in states:
            want = st.held and st.role is FOLLOWER
            sub = st.sub
            if want:
                name = self._node_for(st.channel)
                if sub is not None and sub.name != name:  # the slot moved to another shard
                    unsubscribe.setdefault(sub, []).append(st)
                    sub = None
                if sub is None:
                    subscribe.setdefault(name, []).append(st)
            elif sub is not None:
                unsubscribe.setdefault(sub, []).append(st)
        for sub, group in unsubscribe.items():
            await sub.unsubscribe(group, self.op_timeout)
        for name, group in subscribe.items():
            sub = await self._subscriber(name)
            for st in group:
                st.buffer = []  # until the stored snapshot is in, Messages wait here
            await sub.subscribe(group, self.op_timeout)

    def _node_for(self, channel: bytes) -> str:
        if not self._cluster:
            return ""
        return self._client.get_node_from_key(channel).name

    async def _subscriber(self, name: str) -> _Subscriber:
        sub = self._subs.get(name)
        if sub is not None:
            return sub
        if self._cluster:
            node = self._client.get_node(node_name=name)
            url = with_host(self._url, node.host, node.port)
        else:
            url = self._url
        client = Redis.from_url(url, **self._connection_options(retries=0))
        sub = _Subscriber(self, name, client, sharded=self._cluster)
        try:
            await sub.open(self.op_timeout)
        except BaseException:
            await sub.close()
            raise
        self._subs[name] = sub
        return sub

    async def _check_subscribers(self) -> None:
        """A pub/sub connection that stopped answering pings is treated as lost."""
        now = asyncio.get_running_loop().time()
        for sub in list(self._subs.values()):
            if now - sub.last_seen > 3 * self.beat + self.op_timeout:
                self._on_subscriber_failed(sub, TimeoutError("no answer to PING"))
                continue
            try:
                await sub.ping(self.op_timeout)
            except Exception as exc:
                self._on_subscriber_failed(sub, exc)

    # -- publisher ------------------------------------------------------------------------

    async def _publisher(self) -> None:
        queue = self._queue
        while not self._stopping:
            await self._pub_wake.wait()
            self._pub_wake.clear()
            while queue and not self._stopping:
                if not self._healthy or self._client is None:
                    queue.clear()
                    break
                batch = [queue.popleft() for _ in range(min(len(queue), 4096))]
                client = self._client
                try:
                    await self._publish(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.publish_dropped += len(batch)
                    if self._client is client:  # not an old client the control replaced
                        self._fail(exc)
                    break

    async def _publish(self, batch: list[tuple[_StreamState, Any]]) -> None:
        groups: dict[str, tuple[_StreamState, list[Any]]] = {}
        for st, item in batch:
            group = groups.get(st.sid)
            if group is None:
                group = groups[st.sid] = (st, [])
            group[1].append(item)
        pipe = self._client.pipeline(transaction=False)
        command, keep = self._pub_command, str(_KEEP_LAST_MS)
        kept = self.history_max_messages if self.history_max_age > 0 else 0
        hist = (str(kept), self._ms(self.history_max_age))
        now = str(int(time.time() * 1000))
        for st, items in groups.values():
            args: list[Any] = [self._node, command, st.channel, keep, *hist, now]
            delta = st.stream.is_delta
            for item in items:
                if isinstance(item, Message):
                    # a book's update is published, and the stored state is the whole book
                    tag = f"+{item.seq}" if delta else str(item.seq)
                    args += (tag, item.epoch, encode_message(item))
                else:
                    args += item
            if delta and st.role is OWNER:
                book = self._feed.snapshot(st.stream)
                if book is not None:  # else the book is being rebuilt: a reset marker follows
                    args += (f"={book.seq}", book.epoch, encode_message(book))
            _evalsha(pipe, lua.PUBLISH, [st.k_lease, st.k_last, st.k_hist], args)
        results = await self._execute(pipe)
        reload = False
        for (st, items), result in zip(groups.values(), results, strict=True):
            if isinstance(result, NoScriptError):
                reload = True
                self.publish_dropped += len(items)
            elif isinstance(result, BaseException):
                raise result
            elif result == 1:
                self.published += len(items)
            else:
                # fenced: another node has the lease; the control task finds out and follows
                self.publish_fenced += len(items)
                if self._states.get(st.sid) is st:
                    self._mark(st)
        if reload:
            await self._load_scripts()

    # -- connection, outage, rejoin -------------------------------------------------------

    @property
    def _pub_command(self) -> str:
        return "SPUBLISH" if self._cluster else "PUBLISH"

    def _ms(self, seconds: float) -> str:
        return str(int(seconds * 1000))

    def _connection_options(self, retries: int) -> dict[str, Any]:
        return {
            "socket_timeout": self.op_timeout,
            "socket_connect_timeout": self.op_timeout,
            "retry": Retry(NoBackoff(), retries),
            "health_check_interval": 0,
        }

    async def _execute(self, pipe: Any) -> list[Any]:
        async with self._sem:
            return await _within(self.op_timeout, pipe.execute(raise_on_error=False))

    async def _connect(self) -> None:
        """(Re)build the client, learn whether the server is a cluster, load the scripts."""
        await self._drop_connections()
        cluster = self.options.cluster
        if cluster is None:
            probe = Redis.from_url(self._url, **self._connection_options(retries=0))
            try:
                info = await _within(self.op_timeout, probe.info("cluster"))
            except ResponseError:
                info = {}  # INFO renamed or refused (some managed services): not a cluster
            finally:
                with contextlib.suppress(Exception):
                    await probe.aclose()
            cluster = bool(int(info.get("cluster_enabled", 0) or 0))
        if cluster:
            client: Any = RedisCluster.from_url(
                without_db(self._url),
                max_connections=self.max_connections,
                **self._connection_options(retries=1),
            )
            try:
                await _within(self.op_timeout, client.initialize())
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.aclose()
                raise
        else:
            pool = BlockingConnectionPool.from_url(
                self._url,
                max_connections=self.max_connections,
                timeout=self.op_timeout,
                **self._connection_options(retries=1),
            )
            client = Redis(connection_pool=pool)
        self._client, self._cluster = client, cluster
        await self._load_scripts()

    async def _load_scripts(self) -> None:
        for script in lua.SCRIPTS:
            async with self._sem:
                await _within(self.op_timeout, self._client.script_load(script.body))

    async def _drop_connections(self) -> None:
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.detach()
            await sub.close()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await _within(2.0, client.aclose())

    def _fail(self, exc: BaseException) -> None:
        self.redis_errors += 1
        reason = f"redis unreachable: {exc!r}"
        self.last_error = reason
        self._wake.set()
        if not self._healthy:
            self._reason = reason
            return
        self._healthy = False
        self._reason = reason
        log.warning(
            "redis unreachable: serving local clients alone until it returns",
            extra={"error": repr(exc), "streams": sum(st.held for st in self._states.values())},
        )
        self._queue.clear()
        self._dirty.clear()
        self._fetch.clear()
        for st in list(self._states.values()):
            st.sub = None
            st.confirms = 0
            st.force = False
            st.reject_reason = None
            st.rebase = False
            if st.held:
                self._own_locally(st)
            else:
                if st.role is OWNER:
                    self._feed.remove(st.stream)  # the nodes that hold it now own it themselves
                self._forget(st)

    def _rejoin(self) -> None:
        if self._reason != "not started":
            self.reconnects += 1
            log.info("redis reachable again: rejoining the cluster", extra={"mode": self._mode})
        self._healthy = True
        self._reason = ""
        for sid in self._states:
            self._dirty.add(sid)

    @property
    def _mode(self) -> str:
        return "cluster" if self._cluster else "standalone"

    async def _goodbye(self) -> None:
        """Graceful stop: flush what is queued, hand leases over, withdraw interest."""
        if self._queue:
            batch = list(self._queue)
            self._queue.clear()
            await self._publish(batch)
        pipe = self._client.pipeline(transaction=False)
        handover = encode_marker(KIND_HANDOVER)
        for st in self._states.values():
            owner = st.role is OWNER
            args = [
                self._node,
                self._ms(self.lease),
                "1" if owner else "0",
                self._pub_command,
                st.channel,
                handover if owner else b"",
            ]
            _evalsha(pipe, lua.LEAVE, [st.k_interest, st.k_lease, st.k_last], args)
        _evalsha(pipe, lua.NODE, [self._k_nodes], [self._node, self._ms(self.ttl), "1"])
        await self._execute(pipe)


def _evalsha(pipe: Any, script: lua.Script, keys: list[str], args: list[Any]) -> None:
    # through execute_command: redis-py's cluster pipeline blocks its evalsha() method (it
    # cannot reload scripts on NOSCRIPT), but routes EVALSHA by its keys; NOSCRIPT is handled
    # here (the scripts are reloaded and the work redone)
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def _wall_ms(monotonic: float | None = None) -> int:
    """Epoch ms now, or of an earlier monotonic time."""
    now = time.time()
    if monotonic is not None:
        now -= time.monotonic() - monotonic
    return int(now * 1000)


async def _within(seconds: float, awaitable: Awaitable[_T]) -> _T:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives
    # as the awaited thing completes, and a bus that ignores its stop() would hang shutdown
    async with asyncio.timeout(seconds):
        return await awaitable

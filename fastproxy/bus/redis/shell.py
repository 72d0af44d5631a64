"""Cluster mode: the bus on Redis (one server or a Redis Cluster).

Each node keeps, per stream its clients hold, a heartbeat-renewed entry in the stream's interest
set; the one node holding the stream's lease subscribes upstream, delivers to its own hub
directly and publishes every Message to the stream's channel; the other interested nodes
subscribe to that channel. Nodes that die simply stop renewing: their interest and leases expire
within the TTL with no cleanup step by anyone, and an interested node takes the lease over.

Who does what about each stream is decided by `roles.Roles`, a state machine with no I/O; this
module is the shell that feeds it events and performs its actions. Four background tasks, and
nothing on the hot path awaits Redis:
- control: acquire/release, heartbeats, elections, snapshot fetches and (un)subscriptions, all
  batched into pipelines, so a burst of 1000 subscribes costs a few round trips;
- publisher: the owner's Messages, queued (bounded, drops counted) and pipelined;
- liveness: every CHECK_EVERY, the owners' heartbeats and the followers' silence check
  (`Roles.tick`, timing in `liveness`);
- one reader per pub/sub connection (one per shard on a cluster; see `pubsub`).

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
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from fastproxy.bus import Callbacks
from fastproxy.bus.delivery import Delivery
from fastproxy.bus.redis import lua
from fastproxy.bus.redis.codec import (
    KIND_HANDOVER,
    decode_message,
    encode_marker,
    encode_message,
)
from fastproxy.bus.redis.liveness import CHECK_EVERY
from fastproxy.bus.redis.options import parse_redis_url, with_host, without_db
from fastproxy.bus.redis.pubsub import Channels, within
from fastproxy.bus.redis.roles import (
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
    Action,
    Roles,
    StreamRole,
)
from fastproxy.codec import Message
from fastproxy.config import Config, ConfigError
from fastproxy.streams import Stream

if TYPE_CHECKING:
    from fastproxy.bus import Handler, Source

log = logging.getLogger("fastproxy.bus")

_KEEP_LAST_MS = 24 * 3600 * 1000  # stored seq outlives a quiet stream so numbering continues
_QUEUE_MAX = 20000
_PIPELINE_MAX = 2000

_Call = tuple[str, StreamRole | None, tuple[Any, ...]]


class _Keys:
    """A stream's keys and channel in Redis (see lua.py)."""

    __slots__ = ("channel", "hist", "interest", "last", "lease")

    def __init__(self, prefix: str, sid: str) -> None:
        tag = f"{prefix}:{{{sid}}}"
        self.interest = f"{tag}:interest"
        self.lease = f"{tag}:lease"
        self.last = f"{tag}:last"
        self.hist = f"{tag}:hist"
        self.channel = f"{tag}:ch".encode()

    @property
    def script_keys(self) -> list[str]:
        return [self.interest, self.lease, self.last]


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
        self._roles = Roles(self._node, self._delivery, self.lease, _wall_ms)
        feed.attach(
            Callbacks(
                self._on_feed_message,
                self._on_feed_reset,
                self._on_feed_reject,
                self._on_feed_status,
            )
        )
        self._keys: dict[str, _Keys] = {}
        self._dirty: set[str] = set()  # streams whose interest/lease need a script this pass
        self._fetch: set[str] = set()  # followers whose subscription is confirmed: snapshot
        self._client: Any = None  # Redis or RedisCluster
        self._cluster = False
        self._channels: Channels | None = None
        self._sem = asyncio.Semaphore(self.max_connections)
        self._queue: deque[tuple[str, Any]] = deque(maxlen=_QUEUE_MAX)
        self._wake = asyncio.Event()
        self._pub_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reason = "not started"
        self._settled = False  # a pass went through since the last (re)join
        self._stopping = False
        self.nodes_alive = 0
        self.published = 0
        self.publish_dropped = 0
        self.publish_fenced = 0
        self.redis_errors = 0
        self.reconnects = 0
        self.last_error = ""

    # -- the Bus interface ---------------------------------------------------------------

    def attach(self, handler: Handler) -> None:
        self._delivery.attach(handler)

    async def start(self) -> None:
        try:
            await self._connect()
        except ConfigError:
            raise  # a Redis that would corrupt the cluster's state: refuse to start
        except Exception as exc:  # a node starts and serves even when Redis is down
            self._fail(exc)
        else:
            self._rejoin()
            # connected and scripts loaded: healthy at once, as a first pass that fails says
            # otherwise (after an outage, health waits for a pass that went through)
            self._settled = True
            self._reason = ""
        self._tasks = [
            asyncio.create_task(self._control(), name="redis-bus-control"),
            asyncio.create_task(self._publisher(), name="redis-bus-publisher"),
            asyncio.create_task(self._liveness(), name="redis-bus-liveness"),
        ]

    async def stop(self) -> None:
        await self._halt()
        if self._roles.healthy and self._client is not None:
            try:
                await within(self.op_timeout * 2, self._goodbye())
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
        self._perform(self._roles.acquire(stream))

    def release(self, stream: Stream) -> None:
        self._perform(self._roles.release(stream))

    def snapshot(self, stream: Stream) -> Message | None:
        st = self._roles.states.get(stream.stream_id)
        if st is None:
            return None
        if st.role is OWNER or st.role is LOCAL:
            return self._feed.snapshot(stream)
        return self._roles.follower_book(st.sid)

    def ready(self, stream: Stream) -> bool:
        """This node receives every Message of `stream` from here on (see Roles.ready)."""
        return self._roles.ready(stream.stream_id)

    async def history_after(
        self, stream: Stream, epoch: str, seq: int
    ) -> list[tuple[int, bytes]] | None:
        """(seq, frame) of every Message the stream published after `seq` in `epoch`, from the
        history the owner writes with each publish; None when it cannot bridge the gap (another
        epoch, Messages after `seq` already trimmed or too old, Redis unreachable)."""
        if not self._roles.healthy or self._client is None or self.history_max_messages <= 0:
            return None
        keys = _Keys(self.prefix, stream.stream_id)
        async with self._sem:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(keys.last, "epoch", "seq")
            pipe.xrange(keys.hist, f"0-{seq + 1}", "+", count=self.history_max_messages + 1)
            (kept_epoch, kept_seq), entries = await within(self.op_timeout, pipe.execute())
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

    def status(self) -> dict[str, Any]:
        roles = dict.fromkeys((OWNER, FOLLOWER, LOCAL), 0)
        for st in self._roles.states.values():
            if st.role in roles:
                roles[st.role] += 1
        status: dict[str, Any] = {
            "engine": self.name,
            "healthy": self.healthy,
            "mode": self._mode,
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
            "received": self._roles.received,
            "duplicates_dropped": self._delivery.duplicates,
            "gaps": self._delivery.gaps,
            "leases_won": self._roles.leases_won,
            "leases_lost": self._roles.leases_lost,
            "lease_withheld": self._roles.unconfirmed,
            "redis_errors": self.redis_errors,
            "reconnects": self.reconnects,
        }
        if not self.healthy:
            status["reason"] = self._reason
        if self.last_error:
            status["last_error"] = self.last_error
        return status

    @property
    def healthy(self) -> bool:
        """Redis answers and the bus's last pass since (re)joining went through."""
        return self._roles.healthy and self._settled

    def role(self, stream: Stream) -> str:
        st = self._roles.states.get(stream.stream_id)
        return NONE if st is None else st.role

    # -- events in, actions out ----------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            kind = action[0]
            if kind is SYNC:
                self._sync(action[1])
            elif kind is FEED_ADD:
                self._feed.add(action[1], action[2], action[3])
            elif kind is FEED_REMOVE:
                self._feed.remove(action[1])
            elif kind is FEED_RENUMBER:
                self._feed.renumber(action[1])
            elif kind is FETCH:
                self._fetch.add(action[1])
                self._wake.set()
            elif kind is PUBLISH:
                self._enqueue(action[1], action[2])
            elif kind is OWNER_SILENT:
                log.warning("stream owner silent", extra={"stream": action[1]})
            else:  # pragma: no cover - (un)subscriptions are performed by _reconcile
                raise AssertionError(f"unexpected action {action!r}")

    def _sync(self, sid: str) -> None:
        self._dirty.add(sid)
        self._wake.set()

    def _keys_of(self, sid: str) -> _Keys:
        keys = self._keys.get(sid)
        if keys is None:
            keys = self._keys[sid] = _Keys(self.prefix, sid)
        return keys

    # -- the hot path: Messages in from the feed or a channel ------------------------------

    def _on_feed_message(self, message: Message) -> None:
        roles = self._roles
        now = time.monotonic()
        if roles.watch.silent_count:
            roles.heard(message.stream_id, now)
        action = roles.feed_message(message, now)
        if action is PUBLISH:
            self._enqueue(message.stream_id, message)
        elif action is SYNC:
            self._sync(message.stream_id)

    def _on_channel_data(self, sid: str, data: bytes) -> None:
        self._perform(self._roles.channel_data(sid, data, time.monotonic()))

    def _enqueue(self, sid: str, item: Any) -> None:
        queue = self._queue
        if len(queue) == _QUEUE_MAX:
            self.publish_dropped += 1  # the deque drops the oldest
        queue.append((sid, item))
        if not self._pub_wake.is_set():
            self._pub_wake.set()

    def _on_feed_reset(self, stream: Stream) -> None:
        self._perform(self._roles.feed_reset(stream))

    def _on_feed_status(self, stream: Stream, reason: str | None, since: int) -> None:
        self._perform(self._roles.feed_status(stream, reason, since, time.monotonic()))

    def _on_feed_reject(self, stream: Stream, reason: str) -> None:
        self._perform(self._roles.feed_reject(stream, reason))

    def _on_confirmed(self, sid: str) -> None:
        self._perform(self._roles.confirmed(sid))

    def _on_channels_failed(self, exc: BaseException, sids: list[str]) -> None:
        self.redis_errors += 1
        self.last_error = f"pub/sub connection lost: {exc!r}"
        log.warning("redis pub/sub connection lost", extra={"error": repr(exc)})
        for sid in sids:
            self._perform(self._roles.channel_closed(sid, lost=True))
        self._wake.set()

    # -- control: interest, leases, subscriptions ----------------------------------------

    async def _control(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        backoff = 0.25
        while not self._stopping:
            delay = next_beat - loop.time()
            if delay > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await within(delay, self._wake.wait())
            self._wake.clear()
            try:
                if not self._roles.healthy:
                    await self._connect()
                    self._rejoin()
                    next_beat = 0.0
                beat = loop.time() >= next_beat
                if beat:
                    next_beat = loop.time() + self.beat
                await self._pass(beat)
                if not self._settled and self._roles.healthy:
                    self._settled = True
                    self._reason = ""
                    log.info("redis usable again: rejoined the cluster", extra={"mode": self._mode})
                backoff = 0.25
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(exc)
                await self._drop_connections()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _pass(self, beat: bool) -> None:
        roles = self._roles
        states = roles.states
        if beat:
            work = list(states.values())
            self._dirty.clear()
            if self._channels is not None:
                await self._channels.check(3 * self.beat + self.op_timeout)
        else:
            work = [states[sid] for sid in self._dirty if sid in states]
            self._dirty.clear()
        fetch = [states[sid] for sid in self._fetch if sid in states]
        self._fetch.clear()
        calls: list[_Call] = []
        if beat:
            calls.append(
                ("node", None, (lua.NODE, [self._k_nodes], [self._node, self._ms(self.ttl), "0"]))
            )
        for st in work:
            keys = self._keys_of(st.sid)
            script, force, marker = roles.call_for(st.sid)
            if script == "hold":
                args = [self._node, self._ms(self.ttl), self._ms(self.lease)]
                calls.append(("hold", st, (lua.HOLD, keys.script_keys, args)))
            else:
                args = [
                    self._node,
                    self._ms(self.lease),
                    "1" if force else "0",
                    self._pub_command,
                    keys.channel,
                    marker,
                ]
                calls.append(("leave", st, (lua.LEAVE, keys.script_keys, args)))
        for st in fetch:
            calls.append(("fetch", st, ()))
        for start in range(0, len(calls), _PIPELINE_MAX):
            await self._run_calls(calls[start : start + _PIPELINE_MAX])
        if not self._roles.healthy:
            return
        touched = {id(st): st for _, st, _ in calls if st is not None}
        await self._reconcile([st.sid for st in touched.values()] if not beat else list(states))
        for st in list(touched.values()):
            sid = st.sid
            if roles.idle(sid) and sid not in self._dirty and states.get(sid) is st:
                self._forget(sid)

    def _forget(self, sid: str) -> None:
        self._roles.forget(sid)
        self._keys.pop(sid, None)

    async def _run_calls(self, calls: list[_Call]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for kind, st, spec in calls:
            if kind == "fetch":
                assert st is not None
                pipe.hmget(self._keys_of(st.sid).last, "msg", "status")
            else:
                script, keys, args = spec
                _evalsha(pipe, script, keys, args)
        sent_at = time.monotonic()  # a lease renewed by this pipeline lasts from here at least
        results = await self._execute(pipe)
        if not self._roles.healthy:
            return  # failed meanwhile (publisher, reader): the rejoin redoes all of this
        roles = self._roles
        reload = False
        for (kind, st, _), result in zip(calls, results, strict=True):
            if st is not None and roles.states.get(st.sid) is not st:
                continue  # forgotten while the pipeline ran
            if isinstance(result, NoScriptError):
                reload = True
                if st is not None:
                    self._dirty.add(st.sid)
                    if kind == "fetch":
                        self._fetch.add(st.sid)
                continue
            if isinstance(result, BaseException):
                # a refusal (OOM, READONLY, LOADING, ...) leaves the cluster unable to agree on
                # owners just as an outage does, and is handled as one
                raise result
            if kind == "node":
                self.nodes_alive = int(result)
                continue
            assert st is not None
            if kind == "hold":
                owner, seq, _count, epoch = result
                feed_seq = self._feed.seq(st.stream) if st.role is LOCAL else None
                actions = roles.held_result(
                    st.sid, owner, int(seq), epoch.decode(), sent_at, feed_seq, time.monotonic()
                )
            elif kind == "leave":
                actions = roles.left_result(st.sid, result[0])
            else:
                actions = roles.fetched(st.sid, *result)
            self._perform(actions)
        if reload:
            await self._load_scripts()
            self._wake.set()

    async def _reconcile(self, sids: list[str]) -> None:
        """Subscribe to the channel of each stream this node follows, and only those."""
        channels = self._channels
        assert channels is not None
        roles = self._roles
        subscribe: dict[str, list[tuple[str, bytes]]] = {}
        unsubscribe: list[str] = []
        for kind, sid in roles.reconcile(sids):
            current = channels.on(sid)
            if kind is SUBSCRIBE:
                channel = self._keys_of(sid).channel
                name = self._node_for(channel)
                if current == name:
                    continue
                if current is not None:  # the slot moved to another shard
                    unsubscribe.append(sid)
                subscribe.setdefault(name, []).append((sid, channel))
            else:
                unsubscribe.append(sid)
        if unsubscribe:
            for sid in unsubscribe:
                roles.channel_closed(sid)
            await channels.unsubscribe(unsubscribe)
        for name, group in subscribe.items():
            for sid, _ in group:
                roles.subscribing(sid)
            await channels.subscribe(name, group)

    def _node_for(self, channel: bytes) -> str:
        if not self._cluster:
            return ""
        return self._client.get_node_from_key(channel).name

    def _pubsub_client(self, name: str) -> Redis:
        if self._cluster:
            node = self._client.get_node(node_name=name)
            url = with_host(self._url, node.host, node.port)
        else:
            url = self._url
        return Redis.from_url(url, **self._connection_options(retries=0))

    # -- publisher ------------------------------------------------------------------------

    async def _publisher(self) -> None:
        queue = self._queue
        while not self._stopping:
            await self._pub_wake.wait()
            self._pub_wake.clear()
            while queue and not self._stopping:
                if not self._roles.healthy or self._client is None:
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

    async def _publish(self, batch: list[tuple[str, Any]]) -> None:
        groups: dict[str, list[Any]] = {}
        for sid, item in batch:
            group = groups.get(sid)
            if group is None:
                group = groups[sid] = []
            group.append(item)
        pipe = self._client.pipeline(transaction=False)
        command, keep = self._pub_command, str(_KEEP_LAST_MS)
        kept = self.history_max_messages if self.history_max_age > 0 else 0
        hist = (str(kept), self._ms(self.history_max_age))
        now = str(int(time.time() * 1000))
        states = self._roles.states
        for sid, items in groups.items():
            keys = self._keys_of(sid)
            args: list[Any] = [self._node, command, keys.channel, keep, *hist, now]
            st = states.get(sid)
            delta = st is not None and st.stream.is_delta
            for item in items:
                if isinstance(item, Message):
                    # a book's update is published, and the stored state is the whole book
                    tag = f"+{item.seq}" if delta else str(item.seq)
                    args += (tag, item.epoch, encode_message(item))
                else:
                    args += item
            if delta and st is not None and st.role is OWNER:
                book = self._feed.snapshot(st.stream)
                if book is not None:  # else the book is being rebuilt: a reset marker follows
                    args += (f"={book.seq}", book.epoch, encode_message(book))
            _evalsha(pipe, lua.PUBLISH, [keys.lease, keys.last, keys.hist], args)
        results = await self._execute(pipe)
        reload = False
        for (sid, items), result in zip(groups.items(), results, strict=True):
            if isinstance(result, NoScriptError):
                reload = True
                self.publish_dropped += len(items)
            elif isinstance(result, BaseException):
                raise result
            elif result == 1:
                self.published += len(items)
                last = [item.seq for item in items if isinstance(item, Message)]
                if last:
                    self._roles.published(sid, max(last))
            else:
                # fenced: another node has the lease; the control task finds out and follows
                self.publish_fenced += len(items)
                self._perform(self._roles.fenced(sid))
        if reload:
            await self._load_scripts()

    # -- liveness -------------------------------------------------------------------------

    async def _liveness(self) -> None:
        """Owners beat on quiet streams; followers that hear nothing from an owner tell their
        clients the stream is stale (Roles.tick, fastproxy.bus.redis.liveness)."""
        while not self._stopping:
            await asyncio.sleep(CHECK_EVERY)
            self._perform(self._roles.tick(time.monotonic(), self._feed.is_live))

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
            return await within(self.op_timeout, pipe.execute(raise_on_error=False))

    async def _connect(self) -> None:
        """(Re)build the client, learn whether the server is a cluster, load the scripts."""
        await self._drop_connections()
        cluster = self.options.cluster
        probe = Redis.from_url(self._url, **self._connection_options(retries=0))
        try:
            memory = await _info(probe, "memory", self.op_timeout)
            check_eviction_policy(memory.get("maxmemory_policy"))
            if cluster is None:
                info = await _info(probe, "cluster", self.op_timeout)
                cluster = bool(int(info.get("cluster_enabled", 0) or 0))
        finally:
            with contextlib.suppress(Exception):
                await probe.aclose()
        if cluster:
            client: Any = RedisCluster.from_url(
                without_db(self._url),
                max_connections=self.max_connections,
                **self._connection_options(retries=1),
            )
            try:
                await within(self.op_timeout, client.initialize())
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
        self._channels = Channels(
            self._pubsub_client,
            cluster,
            self.op_timeout,
            self._on_channel_data,
            self._on_confirmed,
            self._on_channels_failed,
        )
        await self._load_scripts()

    async def _load_scripts(self) -> None:
        for script in lua.SCRIPTS:
            async with self._sem:
                await within(self.op_timeout, self._client.script_load(script.body))

    async def _drop_connections(self) -> None:
        channels, self._channels = self._channels, None
        if channels is not None:
            for sid in await channels.close():
                self._roles.channel_closed(sid)
            await channels.drain(1.0)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await within(2.0, client.aclose())

    def _fail(self, exc: BaseException) -> None:
        self.redis_errors += 1
        reason = _reason_of(exc)
        self.last_error = reason
        self._reason = reason
        was_settled, self._settled = self._settled, False
        self._wake.set()
        if not self._roles.healthy:
            return
        # a rejoin that fails at once (Redis answers but refuses) is the same outage going on
        (log.warning if was_settled else log.debug)(
            "redis not usable: serving local clients alone until it is",
            extra={
                "error": repr(exc),
                "streams": sum(st.held for st in self._roles.states.values()),
            },
        )
        self._queue.clear()
        self._dirty.clear()
        self._fetch.clear()
        self._perform(self._roles.redis_down())
        for sid in [sid for sid in self._keys if sid not in self._roles.states]:
            del self._keys[sid]

    def _rejoin(self) -> None:
        if self._reason != "not started":
            self.reconnects += 1
            log.debug("redis answers again: rejoining the cluster", extra={"mode": self._mode})
        self._perform(self._roles.redis_up())

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
        for st in self._roles.states.values():
            owner = st.role is OWNER
            keys = self._keys_of(st.sid)
            args = [
                self._node,
                self._ms(self.lease),
                "1" if owner else "0",
                self._pub_command,
                keys.channel,
                handover if owner else b"",
            ]
            _evalsha(pipe, lua.LEAVE, keys.script_keys, args)
        _evalsha(pipe, lua.NODE, [self._k_nodes], [self._node, self._ms(self.ttl), "1"])
        await self._execute(pipe)


# Every key the bus writes carries a TTL, so a policy that evicts volatile keys evicts ours too:
# a lease or interest entry gone early splits ownership, a stored seq gone restarts numbering.
SAFE_POLICIES = ("noeviction",)


def check_eviction_policy(policy: str | None) -> None:
    """Refuse a Redis that may evict the bus's keys (None: the server does not say)."""
    if policy is not None and policy not in SAFE_POLICIES:
        raise ConfigError(
            f"REDIS_URL: the server's maxmemory-policy is {policy}, which may evict the bus's "
            "keys; cluster mode needs maxmemory-policy noeviction"
        )


async def _info(client: Redis, section: str, timeout: float) -> dict[str, Any]:
    try:
        return await within(timeout, client.info(section))
    except ResponseError:
        return {}  # INFO renamed or refused (some managed services)


def _reason_of(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, ResponseError):
        return f"redis refuses the bus's commands: {type(exc).__name__}: {exc}"
    return f"redis unreachable: {exc!r}"


def _wall_ms(monotonic: float | None = None) -> int:
    """Epoch ms now, or of an earlier monotonic time."""
    now = time.time()
    if monotonic is not None:
        now -= time.monotonic() - monotonic
    return int(now * 1000)


def _evalsha(pipe: Any, script: lua.Script, keys: list[str], args: list[Any]) -> None:
    # through execute_command: redis-py's cluster pipeline blocks its evalsha() method (it
    # cannot reload scripts on NOSCRIPT), but routes EVALSHA by its keys; NOSCRIPT is handled
    # here (the scripts are reloaded and the work redone)
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

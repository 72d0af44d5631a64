"""The Redis engine's channel subscriptions: one pub/sub connection per shard (one in all on a
single server), each with a task reading it, and which stream's channel is on which.

What the connections carry goes to the engine as three calls: `on_data(sid, data)` (a channel
message), `on_confirmed(sid)` (a subscribe was confirmed) and `on_failed(exc, sids)` (a
connection failed or stopped answering; the streams it carried).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

_T = TypeVar("_T")


async def within(seconds: float, awaitable: Awaitable[_T]) -> _T:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives
    # as the awaited thing completes, and a bus that ignores its stop() would hang shutdown
    async with asyncio.timeout(seconds):
        return await awaitable


class Subscriber:
    """One pub/sub connection (one per shard on a cluster) and the task reading it."""

    def __init__(self, owner: Channels, name: str, client: Redis, sharded: bool) -> None:
        self.owner = owner
        self.name = name
        self.client = client
        self.pubsub = client.pubsub()
        self.sharded = sharded
        self.channels: dict[bytes, str] = {}  # channel -> stream id
        self.task: asyncio.Task[None] | None = None
        self.last_seen = 0.0
        self.closed = False

    async def open(self, timeout: float) -> None:
        await within(timeout, self.pubsub.connect())
        self.last_seen = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(self._read(), name=f"redis-bus-reader{self.name}")

    async def subscribe(self, channels: list[bytes], timeout: float) -> None:
        if self.sharded:
            # one SSUBSCRIBE per channel: the channels of one shard span many slots
            for channel in channels:
                await within(timeout, self.pubsub.ssubscribe(channel))
        else:
            await within(timeout, self.pubsub.subscribe(*channels))

    async def unsubscribe(self, channels: list[bytes], timeout: float) -> None:
        if self.sharded:
            for channel in channels:
                await within(timeout, self.pubsub.sunsubscribe(channel))
        else:
            await within(timeout, self.pubsub.unsubscribe(*channels))

    async def ping(self, timeout: float) -> None:
        await within(timeout, self.pubsub.ping())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        pubsub = self.pubsub
        owner = self.owner
        on_data = owner.on_data
        try:
            while not self.closed:
                response = await pubsub.parse_response(block=True)
                self.last_seen = loop.time()
                if response is None:
                    continue
                if isinstance(response, list) and response[0] in (b"message", b"smessage"):
                    sid = self.channels.get(response[1])
                    if sid is not None:
                        on_data(sid, response[2])
                    continue
                # subscribe confirmations and pongs: redis-py keeps its bookkeeping
                await pubsub.handle_message(response)
                if isinstance(response, list) and response[0] in (b"subscribe", b"ssubscribe"):
                    sid = self.channels.get(response[1])
                    if sid is not None:
                        owner.on_confirmed(sid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.closed:
                owner.failed(self, exc)

    async def close(self) -> None:
        self.closed = True
        task = self.task
        # closing the connection ends the reader's read; the cancel is only a fallback
        with contextlib.suppress(Exception):
            await within(2.0, self.pubsub.aclose())
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(Exception):
            await within(2.0, self.client.aclose())


class Channels:
    """Which stream's channel is subscribed on which connection; opens them as needed."""

    def __init__(
        self,
        connect: Callable[[str], Redis],
        sharded: bool,
        timeout: float,
        on_data: Callable[[str, bytes], object],
        on_confirmed: Callable[[str], object],
        on_failed: Callable[[BaseException, list[str]], object],
    ) -> None:
        self._connect = connect  # a client for the connection of one shard (by its name)
        self.sharded = sharded
        self.timeout = timeout
        self.on_data = on_data
        self.on_confirmed = on_confirmed
        self._on_failed = on_failed
        self._subs: dict[str, Subscriber] = {}
        self._where: dict[str, tuple[Subscriber, bytes]] = {}  # sid -> its connection, channel
        self._closing: set[asyncio.Task[None]] = set()

    def on(self, sid: str) -> str | None:
        """The name of the connection carrying the stream's channel, None if none does."""
        where = self._where.get(sid)
        return None if where is None else where[0].name

    async def subscribe(self, name: str, group: list[tuple[str, bytes]]) -> None:
        """Subscribe these (stream id, channel) pairs on the connection `name`."""
        sub = self._subs.get(name)
        if sub is None:
            sub = Subscriber(self, name, self._connect(name), self.sharded)
            try:
                await sub.open(self.timeout)
            except BaseException:
                await sub.close()
                raise
            self._subs[name] = sub
        for sid, channel in group:
            sub.channels[channel] = sid
            self._where[sid] = (sub, channel)
        await sub.subscribe([channel for _, channel in group], self.timeout)

    async def unsubscribe(self, sids: list[str]) -> None:
        groups: dict[Subscriber, list[bytes]] = {}
        for sid in sids:
            where = self._where.pop(sid, None)
            if where is None:
                continue
            sub, channel = where
            if sub.channels.get(channel) == sid:
                del sub.channels[channel]
                groups.setdefault(sub, []).append(channel)
        for sub, channels in groups.items():
            await sub.unsubscribe(channels, self.timeout)

    async def check(self, silence: float) -> None:
        """A connection that stopped answering pings (for `silence` seconds) is lost."""
        now = asyncio.get_running_loop().time()
        for sub in list(self._subs.values()):
            if now - sub.last_seen > silence:
                self.failed(sub, TimeoutError("no answer to PING"))
                continue
            try:
                await sub.ping(self.timeout)
            except Exception as exc:
                self.failed(sub, exc)

    def failed(self, sub: Subscriber, exc: BaseException) -> None:
        if self._subs.get(sub.name) is sub:
            del self._subs[sub.name]
        sids = self._detach(sub)
        task = asyncio.get_running_loop().create_task(sub.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._on_failed(exc, sids)

    async def close(self) -> list[str]:
        """Close every connection; return the streams they carried."""
        subs, self._subs = list(self._subs.values()), {}
        sids: list[str] = []
        for sub in subs:
            sids += self._detach(sub)
            await sub.close()
        return sids

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the connections being closed after a failure."""
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=timeout)

    def _detach(self, sub: Subscriber) -> list[str]:
        sids = [sid for sid in sub.channels.values() if self._where.get(sid, (None,))[0] is sub]
        for sid in sids:
            del self._where[sid]
        sub.channels.clear()
        return sids

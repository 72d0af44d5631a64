"""Redis faults in cluster mode, end to end: proxy processes, the simulator, real clients, and a
relay (tests.proxyutil.TcpRelay) between one node and Redis to cut or slow that node's link.

What every test checks is the numbering contract across the cluster: no (epoch, seq) pair is
given different data on different nodes, and within an epoch a client's seq only rises. Times
are printed (run with -s); nothing asserts a timing beyond generous deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson

from fastproxy.sim import Simulator
from tests.proxyutil import TcpRelay, running_sim
from tests.test_cluster import (  # noqa: F401 (shared_url is a fixture)
    BTC,
    Client,
    Proxy,
    SubscriptionWatch,
    shared_url,
    until,
    until_async,
)

TOPIC = "tickers.BTCUSDT"


def numbered(client: Client, stream: str) -> list[tuple[str, int, bytes]]:
    """(epoch, seq, the message without its type and epoch) of each data message in order; an
    update belongs to the epoch of the snapshot before it."""
    epoch = ""
    out = []
    for _, _, m in client.got:
        if m["stream"] != stream:
            continue
        if m["type"] == "snapshot":
            epoch = m["epoch"]
        body = orjson.dumps({k: v for k, v in m.items() if k not in ("type", "epoch")})
        out.append((epoch, m["seq"], body))
    return out


def assert_one_numbering(everyone: list[Client], stream: str) -> int:
    """No (epoch, seq) carries different data on two clients; within an epoch each client's
    seq rises. Returns how many (epoch, seq) pairs several clients shared."""
    seen: dict[tuple[str, int], bytes] = {}
    conflicts: list[tuple[str, int]] = []
    shared = 0
    for c in everyone:
        last: dict[str, int] = {}
        line_of = c.of(stream)
        for epoch, seq, body in numbered(c, stream):
            assert seq > last.get(epoch, -1), (
                f"seq went back in epoch {epoch}: {seq} after {last[epoch]}; the client got "
                + " ".join(f"{m['type'][0]}{m['seq']}@{m.get('epoch', '')[:4]}" for m in line_of)
            )
            last[epoch] = seq
            known = seen.setdefault((epoch, seq), body)
            if known != body:
                conflicts.append((epoch, seq))
            elif known is not body:
                shared += 1
    assert not conflicts, (
        f"{len(conflicts)} (epoch, seq) pairs carry different data on different nodes, "
        f"first {conflicts[:3]}"
    )
    return shared


def via(relay: TcpRelay, url: str) -> str:
    """The bus URL `url` with its Redis reached through `relay`."""
    return relay.url(url.partition("?")[2])


@asynccontextmanager
async def cluster_with_relay(
    sim: Simulator, url: str, count: int
) -> AsyncIterator[tuple[TcpRelay, list[Proxy], list[Client]]]:
    """`count` nodes, the first behind a relay, each with one client on BTCUSDT's ticker; the
    first node owns the stream (its client subscribed first)."""
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    relay = await TcpRelay(port).start()
    nodes = [Proxy(sim, via(relay, url)), *(Proxy(sim, url) for _ in range(count - 1))]
    everyone: list[Client] = []
    try:
        await asyncio.gather(*(n.wait_ready() for n in nodes))
        everyone = list(await asyncio.gather(*(Client.open(n) for n in nodes)))
        await everyone[0].subscribe("ticker:BTCUSDT")
        await until_async(
            lambda: _owns(nodes[0]), 30, "the node behind the relay to own the stream"
        )
        for c in everyone[1:]:
            await c.subscribe("ticker:BTCUSDT")
        await until(lambda: all(len(c.of(BTC)) >= 10 for c in everyone), 60, "data everywhere")
        yield relay, nodes, everyone
    except BaseException:
        for node in nodes:
            print(f"--- node :{node.port} log ---\n{node.tail(40)}")
        raise
    finally:
        await asyncio.gather(*(c.close() for c in everyone), return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))
        await relay.stop()


async def _owns(node: Proxy) -> bool:
    return (await node.bus())["streams_owned"] == 1


async def _healthy(nodes: list[Proxy]) -> bool:
    return [(await n.http("/health"))[0] for n in nodes] == [200] * len(nodes)


async def _served(everyone: list[Client], more: int, timeout: float, what: str) -> None:
    counts = [len(c.of(BTC)) for c in everyone]
    await until(
        lambda: all(len(c.of(BTC)) >= n + more for c, n in zip(everyone, counts, strict=True)),
        timeout,
        what,
    )


async def test_an_owner_cut_off_from_redis_serves_alone_under_an_epoch_of_its_own(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    """The owner loses Redis while the others keep it: they take the stream over and continue
    the stored line; what the cut-off node serves its own clients meanwhile must not reuse it."""
    async with (
        running_sim() as sim,
        cluster_with_relay(sim, shared_url(ttl=3), 3) as (relay, nodes, everyone),
    ):
        loop = asyncio.get_running_loop()
        cut_at = loop.time()
        relay.cut_link()
        await until_async(lambda: _any_owns(nodes[1:]), 30, "a survivor to own the stream")
        await _served(everyone, 20, 30, "every client served while the owner is cut off")
        relay.restore()
        restored_at = loop.time()
        await until_async(lambda: _healthy(nodes), 30, "every node back in the cluster")
        await until(lambda: sim.subscription_counts().get(TOPIC) == 1, 30, "one upstream again")
        one_at = loop.time()
        await _served(everyone, 20, 30, "every client served after the rejoin")
        print(
            f"\ncut {restored_at - cut_at:.1f} s; one upstream subscription "
            f"{one_at - restored_at:.1f} s after the link came back"
        )
        shared = assert_one_numbering(everyone, BTC)
        assert shared > 20
        # the cut-off node's clients were told of a new line: a snapshot with another epoch
        epochs = {epoch for epoch, _, _ in numbered(everyone[0], BTC)}
        assert len(epochs) >= 2


async def _any_owns(nodes: list[Proxy]) -> bool:
    return any([await _owns(n) for n in nodes])


async def test_a_slow_redis_link_returns_to_one_upstream_subscription(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    """Every chunk between the owner and Redis held back 1.5 s for a while, then the delay is
    removed: the cluster is back to one upstream subscription per topic within seconds, and
    the numbering never diverges."""
    async with (
        running_sim() as sim,
        cluster_with_relay(sim, shared_url(ttl=3), 2) as (relay, nodes, everyone),
    ):
        loop = asyncio.get_running_loop()
        watch = SubscriptionWatch(sim, TOPIC)
        slow_at = loop.time()
        relay.delay = 1.5
        await asyncio.sleep(8.0)
        slow_samples = list(watch.samples)
        relay.restore()
        fast_at = loop.time()
        await until(lambda: sim.subscription_counts().get(TOPIC) == 1, 20, "one upstream again")
        one_at = loop.time()
        await until_async(lambda: _healthy(nodes), 30, "every node back in the cluster")
        await _served(everyone, 20, 30, "every client served after the delay")
        samples = watch.stop()
        doubled = sum(1 for s in samples if s > 1) * 0.05
        print(
            f"\nslow link {fast_at - slow_at:.1f} s: max {max(slow_samples)} upstream "
            f"subscriptions, {doubled:.1f} s with more than one; one again "
            f"{one_at - fast_at:.1f} s after the delay was removed"
        )
        assert_one_numbering(everyone, BTC)

"""Order books in cluster mode: two proxy processes on one Redis, the simulator as the exchange.

The node that owns the topic keeps the book in its codec and stores the whole book in Redis; a
follower's late joiners (the first one, served from the stored book, and later ones, served from
the follower's own copy) get the whole current book, and every client's book stays the exchange's
at every updateId, through a resync of the owner's book too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.proxyutil import running_sim
from tests.test_books_e2e import STREAM, TOPIC, BookClient
from tests.test_cluster import Client, proxies, shared_url, until  # noqa: F401 (a fixture)

ARG = "orderbook:50:BTCUSDT"


def replay(book: BookClient, client: Client) -> None:
    """Check every message `client` got so far that `book` has not seen yet."""
    messages = client.of(STREAM)
    for message in messages[book.seen :]:
        book.take(message)
    book.seen = len(messages)


def snapshots(client: Client) -> int:
    return sum(m["type"] == "snapshot" for m in client.of(STREAM))


def checker(truth: dict[int, Any]) -> BookClient:
    book = BookClient(truth)
    book.seen = 0  # type: ignore[attr-defined]
    return book


async def test_a_followers_joiners_get_the_whole_book_and_keep_it(
    shared_url: Callable[..., str],  # noqa: F811
) -> None:
    async with running_sim() as sim, proxies(sim, shared_url(), 2) as (owner, follower):
        truth = sim.record_books(TOPIC)
        first = await Client.open(owner)
        try:
            await first.subscribe(ARG)
            await until(lambda: len(first.of(STREAM)) >= 10, what="the owner's updates")

            joiner = await Client.open(follower)
            await joiner.subscribe(ARG)
            await until(lambda: len(joiner.of(STREAM)) >= 10, what="the follower's updates")
            bus = await follower.bus()
            assert bus.get("streams_following") == 1, bus  # really served from the channel
            opening = joiner.of(STREAM)[0]
            assert opening["type"] == "snapshot"
            assert len(opening["data"]["bids"]) == 50 and len(opening["data"]["asks"]) == 50

            # a second joiner on the follower gets the follower's own copy of the book
            later = await Client.open(follower)
            await later.subscribe(ARG)
            await until(lambda: len(later.of(STREAM)) >= 5, what="the second joiner's updates")
            assert later.of(STREAM)[0]["type"] == "snapshot"
            assert len(later.of(STREAM)[0]["data"]["bids"]) == 50

            # the owner's book breaks: everyone gets a fresh snapshot, then updates again
            everyone = (first, joiner, later)
            seen = [snapshots(c) for c in everyone]
            sim.skip_u(TOPIC)
            for c, before in zip(everyone, seen, strict=True):
                await until(lambda c=c, n=before: snapshots(c) > n, what="a snapshot after it")
            await asyncio.sleep(0.5)

            for c in (first, joiner, later):
                book = checker(truth)
                replay(book, c)
                assert book.updates >= 5 and len(book.snapshots) >= 2
            _, stats = await owner.http("/stats")
            assert stats["feed"]["book_resyncs"]["gap"] >= 1
            await later.close()
        finally:
            await first.close()
            await joiner.close()

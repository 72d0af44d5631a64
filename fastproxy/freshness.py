"""Freshness of the streams a node serves: live or stale, and the `status` message. Sans-I/O.

A stream is stale while the data a client holds for it may no longer be current: the upstream
connection carrying it is lost, silent, or not yet confirmed after a reconnect, or (cluster) the
node that owns it stopped publishing. The board keeps, per stream this node holds, whether it is
stale, why and since when; the hub tells each change to every subscriber and tells a new
subscriber of a stale stream right after the ack.

The message, exactly:
`{"op":"status","stream":"mudrex.futures.ticker.BTCUSDT","state":"stale","reason":"...","since":MS}`
and the same with `"state":"live"`; `since` is epoch ms of when that state began.
"""

from __future__ import annotations

import orjson

STALE = "stale"
LIVE = "live"
REASON_LIVE = "data flowing from the exchange"


def status_payload(stream_id: str, reason: str | None, since: int) -> bytes:
    """The status message: stale for a reason, or live (`reason` None) again."""
    return orjson.dumps(
        {
            "op": "status",
            "stream": stream_id,
            "state": LIVE if reason is None else STALE,
            "reason": REASON_LIVE if reason is None else reason,
            "since": since,
        }
    )


class FreshnessBoard:
    """Which held streams are stale now: stream id -> (reason, since epoch ms)."""

    __slots__ = ("_stale", "changes")

    def __init__(self) -> None:
        self._stale: dict[str, tuple[str, int]] = {}
        self.changes = 0

    def update(self, stream_id: str, reason: str | None, since: int) -> bool:
        """Record a report (stale with `reason`, or live when None). True when the stream's
        state changed, i.e. subscribers must be told; a stale report for a stream already stale
        keeps the first `since` (the stale period started then)."""
        if reason is None:
            if self._stale.pop(stream_id, None) is None:
                return False
        else:
            if stream_id in self._stale:
                return False
            self._stale[stream_id] = (reason, since)
        self.changes += 1
        return True

    def stale(self, stream_id: str) -> tuple[str, int] | None:
        return self._stale.get(stream_id)

    def forget(self, stream_id: str) -> None:
        self._stale.pop(stream_id, None)

    def stale_ids(self) -> list[str]:
        return list(self._stale)

    def __len__(self) -> int:
        return len(self._stale)

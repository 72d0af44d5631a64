"""Owner liveness on the Redis engine, sans-I/O: is the node that owns a stream still there?

A follower hears of its owner only through the stream's channel, and a quiet stream says
nothing for long stretches. So an owner sends a heartbeat marker on every stream it owns that
published nothing for `BEAT` seconds, and a follower that heard nothing at all on a stream's
channel for `SILENCE` seconds tells its clients the stream is stale ("the owner node stopped
publishing"); the first thing heard again (a Message from the next owner after failover, or
the same owner back) makes it live. A killed owner is noticed within SILENCE + the check period,
long before its lease lapses and another node takes the stream over.

The owner's upstream freshness travels the same channel as a status marker (`status_text`), so
followers' clients hear of a silent exchange as the owner's do.
"""

from __future__ import annotations

# An owner beats on streams quiet this long; a follower waits this long for anything.
BEAT = 1.0
SILENCE = 3.0
# How often the shell runs `due` (the worst case adds this to SILENCE).
CHECK_EVERY = 0.25
REASON_OWNER_SILENT = "the node that owns this stream stopped publishing; taking it over"


class OwnerWatch:
    """Per stream: when the owner last published (owner side) or was last heard (follower)."""

    __slots__ = ("_heard", "_sent", "_silent")

    def __init__(self) -> None:
        self._sent: dict[str, float] = {}  # owned: last publish (Message or beat)
        self._heard: dict[str, float] = {}  # followed: last thing heard on the channel
        self._silent: dict[str, float] = {}  # followed streams told stale: silent since

    # -- owner side --------------------------------------------------------------------------

    def published(self, sid: str, now: float) -> None:
        self._sent[sid] = now

    def beats_due(self, owned: list[str], now: float) -> list[str]:
        """Owned streams quiet for BEAT: each gets a heartbeat now."""
        sent = self._sent
        due = [sid for sid in owned if now - sent.get(sid, -BEAT) >= BEAT]
        for sid in due:
            sent[sid] = now
        return due

    def disown(self, sid: str) -> None:
        self._sent.pop(sid, None)

    # -- follower side -----------------------------------------------------------------------

    def follow(self, sid: str, now: float) -> None:
        """Start watching (the channel is subscribed and the stored state served)."""
        self._heard.setdefault(sid, now)

    def heard(self, sid: str, now: float) -> bool:
        """Something arrived for the stream. True when it had been told stale: now live."""
        if sid in self._heard:
            self._heard[sid] = now
        return self._silent.pop(sid, None) is not None

    def unfollow(self, sid: str) -> None:
        """No longer a follower of it (released, owner now, degraded). Its stale state, if
        any, stays until something is heard: becoming its owner is not yet publishing."""
        self._heard.pop(sid, None)

    def forget(self, sid: str) -> None:
        self._heard.pop(sid, None)
        self._silent.pop(sid, None)
        self._sent.pop(sid, None)

    def due(self, now: float) -> list[tuple[str, float]]:
        """Followed streams silent for SILENCE, newly: (stream id, silent since)."""
        out = []
        for sid, at in self._heard.items():
            if now - at >= SILENCE and sid not in self._silent:
                self._silent[sid] = at
                out.append((sid, at))
        return out

    def is_silent(self, sid: str) -> bool:
        return sid in self._silent

    @property
    def silent_count(self) -> int:
        return len(self._silent)


def status_text(reason: str | None, since: int) -> str:
    """An owner's freshness report as a marker's text: `since|reason` (reason empty: live)."""
    return f"{since}|{reason or ''}"


def parse_status(text: str) -> tuple[str | None, int] | None:
    since, sep, reason = text.partition("|")
    if not sep or not since.isdigit():
        return None
    return (reason or None), int(since)

"""The pure-Python book and liquidation codecs (the Cython twins are in ext/_codec.pyx).

A book codec keeps the exchange's book of one `orderbook.{DEPTH}.{SYMBOL}` topic and turns its
frames into Messages: a `snapshot` (the whole book) or an `update` (exactly the levels the delta
changed). Every accepted delta's `u` is the previous one + 1, so a client applying the updates to
its snapshot holds the same book as the codec. When that chain breaks (a lost, repeated or older
`u`, `u=1`, a book that crosses or outgrows its depth after a delta, a frame that cannot be
read) the codec drops its book, emits nothing more from it and raises `resync`, asking the feed
to subscribe the topic again; the exchange's next snapshot starts a new book and reaches every
client as a `snapshot`. A snapshot in the middle of the stream is taken as it comes (also a
resync, counted, with nothing to resubscribe).

Depth 1 is snapshot-only on Bybit and repeats an unchanged book every 3 s with the same `u`:
there every Message is a complete `snapshot`, and a repeated `u` is a heartbeat.

Levels are keyed by the price's exact decimal value (see `price_key`) and keep the exchange's
strings unchanged.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

import orjson

from fastproxy.codec.tables import (
    DECIMAL_RE,
    LIQUIDATION_SIDES,
    PRICE_FRACTION,
    PRICE_INT_DIGITS,
    RESYNC_BACKWARD,
    RESYNC_CROSSED,
    RESYNC_GAP,
    RESYNC_MALFORMED,
    RESYNC_OVERFLOW,
    RESYNC_REPEAT,
    RESYNC_RESTART,
    RESYNC_SNAPSHOT,
    CodecError,
    check_ms,
    check_str,
)
from fastproxy.streams import LIQUIDATION, ORDERBOOK, Stream
from fastproxy.wire import SNAPSHOT, SOURCE, UPDATE, Message, as_snapshot, new_epoch, ws_text_frame

_dumps = orjson.dumps
_decimal = DECIMAL_RE.fullmatch


Key = tuple[int, int]


def price_key(price: Any, what: str) -> Key:
    """A level's price as its exact value: (integer part, fraction in PRICE_FRACTION digits)."""
    m = _decimal(price) if type(price) is str else None
    if m is None:
        raise CodecError(f"a price of {what} must be a decimal string")
    whole, fraction = m.group(1).lstrip("0"), m.group(2) or ""
    if len(whole) > PRICE_INT_DIGITS or len(fraction) > PRICE_FRACTION:
        raise CodecError(f"a price of {what} is out of range")
    return int(whole or "0"), int(fraction.ljust(PRICE_FRACTION, "0"))


def _levels(side: Any, what: str) -> list[tuple[Key, str, str, bool]]:
    """A frame's `b` or `a`: (price key, price, size, deletes) per level, in frame order."""
    if type(side) is not list:
        raise CodecError(f"{what} must be a JSON array")
    out = []
    for level in side:
        if type(level) is not list or len(level) != 2:
            raise CodecError(f"a level of {what} must be [price, size]")
        price, size = level
        key = price_key(price, what)
        if type(size) is not str or _decimal(size) is None:
            raise CodecError(f"a size of {what} must be a decimal string")
        out.append((key, price, size, size.strip("0.") == ""))
    return out


class _Side:
    """One side of a book: price keys ascending (`keys`) and price key -> [price, size]."""

    __slots__ = ("keys", "levels")

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.levels: dict[Key, list[str]] = {}

    def clear(self) -> None:
        self.keys.clear()
        self.levels.clear()

    def apply(self, key: Key, price: str, size: str, deletes: bool) -> None:
        levels = self.levels
        if deletes:
            if levels.pop(key, None) is not None:
                keys = self.keys
                del keys[bisect_left(keys, key)]
        else:
            level = levels.get(key)
            if level is None:
                levels[key] = [price, size]
                insort(self.keys, key)
            else:
                level[0] = price
                level[1] = size

    def __len__(self) -> int:
        return len(self.keys)


class PyBookCodec:
    """The book of one orderbook topic; see the module docstring for the rules."""

    __slots__ = (
        "_asks",
        "_bids",
        "_cts",
        "_depth",
        "_resubscribe",
        "_sid",
        "_snap",
        "_ts",
        "_u",
        "epoch",
        "resync",
        "seq",
        "stream",
    )

    kind = ORDERBOOK

    def __init__(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        if stream.kind != ORDERBOOK:
            raise ValueError(f"{type(self).__name__} serves orderbook streams, not {stream!r}")
        self.stream = stream
        self.seq = seq
        self.epoch = new_epoch() if epoch is None else epoch
        self._sid = stream.stream_id
        self._depth: int = stream.depth  # type: ignore[assignment]
        self._bids = _Side()
        self._asks = _Side()
        self._u: int | None = None  # None: no book; waiting for the exchange's snapshot
        self._cts = 0
        self._ts = 0
        self._snap: Message | None = None
        self.resync: str | None = None  # why the last feed() rebuilt or dropped the book
        self._resubscribe = False

    # -- the codec interface -------------------------------------------------------------

    def feed(self, frame: dict) -> list[Message]:
        """Apply one Bybit orderbook frame; the Message it makes (none while the book is being
        rebuilt). A frame that cannot be read raises CodecError and drops the book."""
        try:
            return self._feed(frame)
        except CodecError:
            if self._u is not None:
                self._untrust(RESYNC_MALFORMED)
            raise

    def snapshot(self) -> Message | None:
        """The whole book as a `snapshot` Message at the last seq, or None while there is none.
        Built once per change of the book."""
        if self._u is None:
            return None
        snap = self._snap
        if snap is None:
            snap = self._snap = self._message(SNAPSHOT, self._book_data())
        return snap

    def reset(self) -> None:
        """Upstream state is gone (reconnect): drop the book and wait for the next snapshot."""
        self._drop()

    def renumber(self, epoch: str | None = None) -> None:
        """A new numbering from here, the book and seq kept (see the ticker codec's)."""
        self.epoch = new_epoch() if epoch is None else epoch
        self._snap = None

    def take_resync(self) -> tuple[str, bool]:
        """The pending resync's reason and whether the topic must be subscribed again; clears it."""
        reason, again = self.resync, self._resubscribe
        self.resync = None
        self._resubscribe = False
        return reason or "", again

    def follow(self, message: Message) -> None:
        """Take a Message of this stream made by another node's codec (a cluster follower keeps
        the book this way to serve its own late joiners)."""
        doc = orjson.loads(message.payload)
        data = doc["data"]
        if message.type == SNAPSHOT:
            self._bids.clear()
            self._asks.clear()
        for side, levels in ((self._bids, data["bids"]), (self._asks, data["asks"])):
            for price, size in levels:
                side.apply(price_key(price, "a followed book"), price, size, size.strip("0.") == "")
        self._u = data["updateId"]
        self._cts = data["time"]
        self._ts = message.ts
        self.seq = message.seq
        self.epoch = message.epoch
        self._snap = message if message.type == SNAPSHOT else None

    # -- the rules -----------------------------------------------------------------------

    def _feed(self, frame: Any) -> list[Message]:
        if type(frame) is not dict:
            raise CodecError("frame must be a JSON object")
        data = frame.get("data")
        if type(data) is not dict:
            raise CodecError("data must be a JSON object")
        ts = check_ms(frame.get("ts"), "ts")
        cts = frame.get("cts")
        cts = ts if cts is None else check_ms(cts, "cts")
        u = check_ms(data.get("u"), "u")
        ftype = frame.get("type")
        if ftype != SNAPSHOT and ftype != "delta":
            raise CodecError("orderbook frame type must be snapshot or delta")
        bids = _levels(data.get("b"), "b")
        asks = _levels(data.get("a"), "a")
        last = self._u

        if ftype == SNAPSHOT:
            if last is not None:
                if self._depth == 1:
                    # snapshot-only: each frame is the book; a repeated u is the 3 s heartbeat
                    reason = RESYNC_RESTART if u == 1 and last != 1 else None
                    if reason is None and u < last:
                        reason = RESYNC_BACKWARD
                else:
                    reason = RESYNC_RESTART if u == 1 else RESYNC_SNAPSHOT
                if reason is not None:
                    self.resync = reason  # taken as it came: nothing to subscribe again
            self._replace(bids, asks)
            self._u, self._cts, self._ts = u, cts, ts
            self.seq += 1
            self._snap = None
            return [self.snapshot()]  # type: ignore[list-item]

        if last is None:
            return []  # an old subscription's delta, or one before the first snapshot
        if u != last + 1:
            if u == 1:
                self._untrust(RESYNC_RESTART)
            elif u == last:
                self._untrust(RESYNC_REPEAT)
            elif u < last:
                self._untrust(RESYNC_BACKWARD)
            else:
                self._untrust(RESYNC_GAP)
            return []
        side = self._bids
        for key, price, size, deletes in bids:
            side.apply(key, price, size, deletes)
        side = self._asks
        for key, price, size, deletes in asks:
            side.apply(key, price, size, deletes)
        b, a = self._bids, self._asks
        if b.keys and a.keys and b.keys[-1] >= a.keys[0]:
            self._untrust(RESYNC_CROSSED)
            return []
        if len(b) > self._depth or len(a) > self._depth:
            self._untrust(RESYNC_OVERFLOW)
            return []
        self._u, self._cts, self._ts = u, cts, ts
        self.seq += 1
        self._snap = None
        if self._depth == 1:
            return [self.snapshot()]  # type: ignore[list-item]
        levels = (data["b"], data["a"])  # exactly as applied: validated [price, size] pairs
        return [self._message(UPDATE, self._data(levels[0], levels[1]))]

    def _replace(self, bids: list, asks: list) -> None:
        depth = self._depth
        for side, levels in ((self._bids, bids), (self._asks, asks)):
            side.clear()
            for key, price, size, deletes in levels:
                side.apply(key, price, size, deletes)
        # an exchange snapshot deeper than the topic keeps its best DEPTH levels
        b, a = self._bids, self._asks
        while len(b) > depth:
            del b.levels[b.keys.pop(0)]
        while len(a) > depth:
            del a.levels[a.keys.pop()]

    def _untrust(self, reason: str) -> None:
        self._drop()
        self.resync = reason
        self._resubscribe = True

    def _drop(self) -> None:
        self._bids.clear()
        self._asks.clear()
        self._u = None
        self._snap = None

    def _book_data(self) -> dict[str, Any]:
        bids = self._bids.levels
        asks = self._asks.levels
        return self._data(
            [bids[k] for k in reversed(self._bids.keys)], [asks[k] for k in self._asks.keys]
        )

    def _data(self, bids: list, asks: list) -> dict[str, Any]:
        return {
            "symbol": self.stream.symbol,
            "bids": bids,
            "asks": asks,
            "updateId": self._u,
            "time": self._cts,
        }

    def _message(self, mtype: str, data: dict[str, Any]) -> Message:
        seq = self.seq
        payload = _dumps(
            {
                "stream": self._sid,
                "type": mtype,
                "data": data,
                "timestamp": self._ts,
                "source": SOURCE,
                "seq": seq,
            }
        )
        return Message(self._sid, seq, mtype, self._ts, payload, ws_text_frame(payload), self.epoch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stream!r}, seq={self.seq}, u={self._u})"


class PyLiquidationCodec:
    """One Message per Bybit allLiquidation frame; its data lists the events in exchange order."""

    __slots__ = ("_fresh", "_last", "_sid", "_symbol", "epoch", "seq", "stream")

    kind = LIQUIDATION

    def __init__(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        if stream.kind != LIQUIDATION:
            raise ValueError(f"{type(self).__name__} serves liquidation streams, not {stream!r}")
        self.stream = stream
        self.seq = seq
        self.epoch = new_epoch() if epoch is None else epoch
        self._sid = stream.stream_id
        self._symbol = stream.symbol
        self._fresh = True
        self._last: Message | None = None

    def feed(self, frame: dict) -> list[Message]:
        if type(frame) is not dict:
            raise CodecError("frame must be a JSON object")
        data = frame.get("data")
        if type(data) is not list:
            raise CodecError("data must be a JSON array")
        ts = check_ms(frame.get("ts"), "ts")
        events = []
        for event in data:
            if type(event) is not dict:
                raise CodecError("a liquidation must be a JSON object")
            get = event.get
            symbol = get("s")
            symbol = self._symbol if symbol is None else check_str(symbol, "s")
            side = LIQUIDATION_SIDES.get(get("S")) if type(get("S")) is str else None
            if side is None:
                raise CodecError("liquidation side S must be Buy or Sell")
            events.append(
                {
                    "symbol": symbol,
                    "side": side,
                    "price": check_str(get("p"), "p"),
                    "quantity": check_str(get("v"), "v"),
                    "time": check_ms(get("T"), "T"),
                }
            )
        if not events:
            return []
        seq = self.seq + 1
        mtype = SNAPSHOT if self._fresh else UPDATE
        payload = _dumps(
            {
                "stream": self._sid,
                "type": mtype,
                "data": events,
                "timestamp": ts,
                "source": SOURCE,
                "seq": seq,
            }
        )
        message = Message(self._sid, seq, mtype, ts, payload, ws_text_frame(payload), self.epoch)
        self.seq = seq
        self._fresh = False
        self._last = message
        return [message]

    def snapshot(self) -> Message | None:
        """The last events for a new subscriber (type snapshot, the seq of its last update)."""
        return None if self._last is None else as_snapshot(self._last)

    def reset(self) -> None:
        self._fresh = True
        self._last = None

    def renumber(self, epoch: str | None = None) -> None:
        """A new numbering from here, the last events and seq kept."""
        self.epoch = new_epoch() if epoch is None else epoch
        if self._last is not None:
            m = self._last
            self._last = Message(m.stream_id, m.seq, m.type, m.ts, m.payload, m.frame, self.epoch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stream!r}, seq={self.seq})"

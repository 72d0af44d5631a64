"""The pure-Python codecs: the reference the Cython twin is tested against, and the fallback
where the extension is not built.

One codec per stream. `feed` takes one parsed Bybit data frame and returns the Messages it
makes; it validates the whole frame before changing any state, so a CodecError leaves the
codec exactly as it was.
"""

from __future__ import annotations

from typing import Any

import orjson

from fastproxy.codec.tables import (
    KLINE_CONFIRMED,
    KLINE_TIMES,
    KLINE_VALUES,
    TICKER_ASK_PRICE,
    TICKER_ASK_SIZE,
    TICKER_BID_PRICE,
    TICKER_BID_SIZE,
    TICKER_FIELDS,
    TICKER_NSLOTS,
    TICKER_PCT,
    TICKER_SLOT,
    TICKER_SYMBOL,
    TRADE_BLOCK,
    TRADE_ID,
    TRADE_SIDE,
    TRADE_SIDES,
    TRADE_SYMBOL,
    TRADE_TIME,
    TRADE_VALUES,
    CodecError,
    check_ms,
    check_str,
    percent_2dp,
)
from fastproxy.streams import KLINE, TICKER, TRADE, Stream
from fastproxy.wire import SNAPSHOT, SOURCE, UPDATE, Message, as_snapshot, new_epoch, ws_text_frame

_dumps = orjson.dumps

# Flat slots in output order, with the nested bid/ask objects placed between them.
_FLAT_HEAD = tuple(
    (slot, TICKER_FIELDS[slot][1]) for slot in range(TICKER_SYMBOL, TICKER_BID_PRICE)
)
_FLAT_TAIL = tuple(
    (slot, TICKER_FIELDS[slot][1]) for slot in range(TICKER_ASK_SIZE + 1, TICKER_NSLOTS)
)


def _frame_parts(frame: Any, data_type: type) -> tuple[Any, int]:
    if type(frame) is not dict:
        raise CodecError("frame must be a JSON object")
    data = frame.get("data")
    if type(data) is not data_type:
        raise CodecError(f"data must be a JSON {'object' if data_type is dict else 'array'}")
    return data, check_ms(frame.get("ts"), "ts")


def _with_epoch(message: Message | None, epoch: str) -> Message | None:
    if message is None:
        return None
    m = message
    return Message(m.stream_id, m.seq, m.type, m.ts, m.payload, m.frame, epoch)


class _PyCodec:
    __slots__ = ("_fresh", "_last", "_stream_id", "epoch", "seq", "stream")

    kind = ""

    def __init__(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        if stream.kind != self.kind:
            raise ValueError(f"{type(self).__name__} serves {self.kind} streams, not {stream!r}")
        self.stream = stream
        self.seq = seq
        self.epoch = new_epoch() if epoch is None else epoch
        self._stream_id = stream.stream_id
        self._fresh = True  # the next Message out is a snapshot
        self._last: Message | None = None

    def snapshot(self) -> Message | None:
        """The current state for a new subscriber (type snapshot, seq of its last update).

        Built on each call: the node's last-value cache (the hub) keeps the one it serves.
        """
        return None if self._last is None else as_snapshot(self._last)

    def reset(self) -> None:
        """Upstream state is gone (reconnect): forget it; the next Message is a snapshot."""
        self._fresh = True
        self._last = None
        self._clear()

    def _clear(self) -> None:
        return None

    def renumber(self, epoch: str | None = None) -> None:
        """A new numbering from here, state and seq kept (a node that serves the stream on its
        own, out of the cluster's line): the next Messages, and the snapshot, carry `epoch`."""
        self.epoch = new_epoch() if epoch is None else epoch
        self._last = _with_epoch(self._last, self.epoch)

    def _message(self, seq: int, mtype: str, ts: int, data: Any) -> Message:
        payload = _dumps(
            {
                "stream": self._stream_id,
                "type": mtype,
                "data": data,
                "timestamp": ts,
                "source": SOURCE,
                "seq": seq,
            }
        )
        return Message(self._stream_id, seq, mtype, ts, payload, ws_text_frame(payload), self.epoch)

    def _commit(self, messages: list[Message]) -> list[Message]:
        if messages:
            self._last = messages[-1]
            self.seq = messages[-1].seq
            self._fresh = False
        return messages

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stream!r}, seq={self.seq}, epoch={self.epoch!r})"


class PyTickerCodec(_PyCodec):
    """Merges Bybit's ticker snapshot and deltas; every Message carries the complete ticker."""

    __slots__ = ("_vals",)

    kind = TICKER

    def __init__(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        super().__init__(stream, seq, epoch)
        self._vals = self._empty()

    def _empty(self) -> list[str | None]:
        # The symbol is known from the topic; every other field waits for the exchange.
        vals: list[str | None] = [None] * TICKER_NSLOTS
        vals[TICKER_SYMBOL] = self.stream.symbol
        return vals

    def _clear(self) -> None:
        self._vals = self._empty()

    def feed(self, frame: dict) -> list[Message]:
        data, ts = _frame_parts(frame, dict)
        ftype = frame.get("type")
        if ftype == SNAPSHOT:
            replace = True
        elif ftype == "delta":
            replace = False
        else:
            raise CodecError("ticker frame type must be snapshot or delta")
        changes = []
        slot_of = TICKER_SLOT
        for key, value in data.items():
            slot = slot_of.get(key)
            if slot is None:
                continue  # a field the Mudrex ticker does not carry
            check_str(value, key)
            if slot == TICKER_PCT:
                value = percent_2dp(value)
            changes.append((slot, value))

        vals = self._empty() if replace else self._vals
        for slot, value in changes:
            vals[slot] = value
        self._vals = vals

        out: dict[str, Any] = {}
        for slot, key in _FLAT_HEAD:
            if vals[slot] is not None:
                out[key] = vals[slot]
        for name, p, s in (
            ("bid", TICKER_BID_PRICE, TICKER_BID_SIZE),
            ("ask", TICKER_ASK_PRICE, TICKER_ASK_SIZE),
        ):
            side = {}
            if vals[p] is not None:
                side["price"] = vals[p]
            if vals[s] is not None:
                side["size"] = vals[s]
            if side:
                out[name] = side
        for slot, key in _FLAT_TAIL:
            if vals[slot] is not None:
                out[key] = vals[slot]

        mtype = SNAPSHOT if replace or self._fresh else UPDATE
        return self._commit([self._message(self.seq + 1, mtype, ts, out)])


class PyKlineCodec(_PyCodec):
    """One Message per candle in a Bybit kline frame, in order."""

    __slots__ = ("_interval", "_symbol")

    kind = KLINE

    def __init__(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        super().__init__(stream, seq, epoch)
        self._symbol = stream.symbol
        self._interval = stream.interval

    def feed(self, frame: dict) -> list[Message]:
        data, ts = _frame_parts(frame, list)
        candles = []
        for candle in data:
            if type(candle) is not dict:
                raise CodecError("a kline must be a JSON object")
            get = candle.get
            out: dict[str, Any] = {"symbol": self._symbol, "interval": self._interval}
            for field, key in KLINE_TIMES:
                out[key] = check_ms(get(field), field)
            for field, key in KLINE_VALUES:
                out[key] = check_str(get(field), field)
            field, key = KLINE_CONFIRMED
            out[key] = _check_bool(get(field), field)
            candles.append(out)
        messages = []
        seq = self.seq
        fresh = self._fresh
        for candle_out in candles:
            seq += 1
            messages.append(self._message(seq, SNAPSHOT if fresh else UPDATE, ts, candle_out))
            fresh = False
        return self._commit(messages)


class PyTradeCodec(_PyCodec):
    """One Message per Bybit trade frame; its data lists the frame's trades in order."""

    __slots__ = ("_symbol",)

    kind = TRADE

    def __init__(self, stream: Stream, seq: int = 0, epoch: str | None = None) -> None:
        super().__init__(stream, seq, epoch)
        self._symbol = stream.symbol

    def feed(self, frame: dict) -> list[Message]:
        data, ts = _frame_parts(frame, list)
        trades = []
        for trade in data:
            if type(trade) is not dict:
                raise CodecError("a trade must be a JSON object")
            get = trade.get
            field, key = TRADE_ID
            out: dict[str, Any] = {key: check_str(get(field), field)}
            field, key = TRADE_SYMBOL
            symbol = get(field)
            out[key] = self._symbol if symbol is None else check_str(symbol, field)
            for field, key in TRADE_VALUES:
                out[key] = check_str(get(field), field)
            field, key = TRADE_SIDE
            side = get(field)
            side = TRADE_SIDES.get(side) if type(side) is str else None
            if side is None:
                raise CodecError(f"trade side {field} must be Buy or Sell")
            out[key] = side
            field, key = TRADE_TIME
            out[key] = check_ms(get(field), field)
            field, key = TRADE_BLOCK
            block = get(field)
            if block is not None:  # left out rather than guessed when the exchange omits it
                out[key] = _check_bool(block, field)
            trades.append(out)
        if not trades:
            return []
        mtype = SNAPSHOT if self._fresh else UPDATE
        return self._commit([self._message(self.seq + 1, mtype, ts, trades)])


def _check_bool(value: Any, what: str) -> bool:
    if value is True or value is False:
        return value
    raise CodecError(f"{what} must be a boolean")


PY_CODECS: dict[str, type[_PyCodec]] = {
    TICKER: PyTickerCodec,
    KLINE: PyKlineCodec,
    TRADE: PyTradeCodec,
}

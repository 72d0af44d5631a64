"""The pure-Python codecs: the reference the Cython twin is tested against, and the fallback
where the extension is not built.

One codec per stream. `feed` takes one parsed Bybit data frame and returns the Messages it
makes; it validates the whole frame before changing any state, so a CodecError leaves the
codec exactly as it was.
"""

from __future__ import annotations

from typing import Any

import orjson

from fastproxy.codec._common import (
    SNAPSHOT,
    SOURCE,
    TICKER_ASK_PRICE,
    TICKER_ASK_SIZE,
    TICKER_BID_PRICE,
    TICKER_BID_SIZE,
    TICKER_FIELDS,
    TICKER_NSLOTS,
    TICKER_PCT,
    TICKER_SLOT,
    TICKER_SYMBOL,
    TRADE_SIDES,
    UPDATE,
    CodecError,
    Message,
    as_snapshot,
    check_ms,
    check_str,
    percent_2dp,
    ws_text_frame,
)
from fastproxy.streams import KLINE, TICKER, TRADE, Stream

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


class _PyCodec:
    __slots__ = ("_fresh", "_last", "_snap", "_stream_id", "seq", "stream")

    kind = ""

    def __init__(self, stream: Stream, seq: int = 0) -> None:
        if stream.kind != self.kind:
            raise ValueError(f"{type(self).__name__} serves {self.kind} streams, not {stream!r}")
        self.stream = stream
        self.seq = seq
        self._stream_id = stream.stream_id
        self._fresh = True  # the next Message out is a snapshot
        self._last: Message | None = None
        self._snap: Message | None = None

    def snapshot(self) -> Message | None:
        """The current state for a new subscriber (type snapshot, seq of its last update)."""
        snap = self._snap
        if snap is None and self._last is not None:
            snap = self._snap = as_snapshot(self._last)
        return snap

    def reset(self) -> None:
        """Upstream state is gone (reconnect): forget it; the next Message is a snapshot."""
        self._fresh = True
        self._last = None
        self._snap = None
        self._clear()

    def _clear(self) -> None:
        return None

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
        return Message(self._stream_id, seq, mtype, ts, payload, ws_text_frame(payload))

    def _commit(self, messages: list[Message]) -> list[Message]:
        if messages:
            self._last = messages[-1]
            self._snap = None
            self.seq = messages[-1].seq
            self._fresh = False
        return messages

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stream!r}, seq={self.seq})"


class PyTickerCodec(_PyCodec):
    """Merges Bybit's ticker snapshot and deltas; every Message carries the complete ticker."""

    __slots__ = ("_vals",)

    kind = TICKER

    def __init__(self, stream: Stream, seq: int = 0) -> None:
        super().__init__(stream, seq)
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

    def __init__(self, stream: Stream, seq: int = 0) -> None:
        super().__init__(stream, seq)
        self._symbol = stream.symbol
        self._interval = stream.interval

    def feed(self, frame: dict) -> list[Message]:
        data, ts = _frame_parts(frame, list)
        candles = []
        for candle in data:
            if type(candle) is not dict:
                raise CodecError("a kline must be a JSON object")
            get = candle.get
            candles.append(
                {
                    "symbol": self._symbol,
                    "interval": self._interval,
                    "openTime": check_ms(get("start"), "start"),
                    "closeTime": check_ms(get("end"), "end"),
                    "open": check_str(get("open"), "open"),
                    "high": check_str(get("high"), "high"),
                    "low": check_str(get("low"), "low"),
                    "close": check_str(get("close"), "close"),
                    "volume": check_str(get("volume"), "volume"),
                    "turnover": check_str(get("turnover"), "turnover"),
                    "confirmed": _check_bool(get("confirm"), "confirm"),
                }
            )
        messages = []
        seq = self.seq
        fresh = self._fresh
        for out in candles:
            seq += 1
            messages.append(self._message(seq, SNAPSHOT if fresh else UPDATE, ts, out))
            fresh = False
        return self._commit(messages)


class PyTradeCodec(_PyCodec):
    """One Message per Bybit trade frame; its data lists the frame's trades in order."""

    __slots__ = ("_symbol",)

    kind = TRADE

    def __init__(self, stream: Stream, seq: int = 0) -> None:
        super().__init__(stream, seq)
        self._symbol = stream.symbol

    def feed(self, frame: dict) -> list[Message]:
        data, ts = _frame_parts(frame, list)
        trades = []
        for trade in data:
            if type(trade) is not dict:
                raise CodecError("a trade must be a JSON object")
            get = trade.get
            tid = check_str(get("i"), "i")
            symbol = get("s")
            symbol = self._symbol if symbol is None else check_str(symbol, "s")
            price = check_str(get("p"), "p")
            qty = check_str(get("v"), "v")
            side = TRADE_SIDES.get(get("S")) if type(get("S")) is str else None
            if side is None:
                raise CodecError("trade side S must be Buy or Sell")
            out = {
                "id": tid,
                "symbol": symbol,
                "price": price,
                "quantity": qty,
                "side": side,
                "time": check_ms(get("T"), "T"),
            }
            block = get("BT")
            if block is not None:  # left out rather than guessed when the exchange omits it
                out["isBlockTrade"] = _check_bool(block, "BT")
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

"""The codec: Bybit V5 public data frames in, Mudrex stream Messages out.

One codec per stream keeps that stream's state (the merged ticker, the last candle, the last
trades) and numbers its updates (`seq`, within the codec's `epoch`; see fastproxy.wire). Each
Message is serialized exactly once, payload and WebSocket frame, and then shared by every client
and node.

Two implementations with byte-identical output: the Cython extension `fastproxy.codec._codec`
(built from ext/_codec.pyx) and the pure-Python reference in `fastproxy.codec.pure`; both build
their output from the key tables in `fastproxy.codec.tables`. `new_codec` uses the extension when
it imports and `FASTPROXY_PURE` is not `"1"`. Both concrete sets of classes are exported whatever
the environment says, so tests can run them side by side. `Message` is the class of the
implementation in use (`CyMessage` or `PyMessage`, which is `fastproxy.wire.Message`: the same
constructor and fields; the Cython one keeps its per-message cost down).

Decisions the protocol leaves open, the same in both implementations:
- Every field the codec copies must be exactly a JSON string (times: an int in 0..2**63-1,
  flags: a boolean); anything else is a CodecError and the frame is dropped whole.
- `change24hPercent` is left out when `price24hPcnt` is not a plain decimal (see
  `percent_2dp`); the frame is still used.
- The ticker `symbol` is the stream's symbol until the exchange sends one.
- Books: see fastproxy.codec.book (snapshot/update, u continuity, resync reasons).
- A trade's `symbol` is its `s`, else the stream's; `isBlockTrade` is left out when `BT` is
  missing or null. A trade or kline frame with an empty `data` list yields no Message.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from fastproxy.codec.book import PyBookCodec, PyLiquidationCodec
from fastproxy.codec.pure import PY_CODECS, PyKlineCodec, PyTickerCodec, PyTradeCodec
from fastproxy.codec.tables import RESYNC_REASONS, CodecError, percent_2dp
from fastproxy.streams import KLINE, LIQUIDATION, ORDERBOOK, TICKER, TRADE, Stream
from fastproxy.wire import Message as PyMessage
from fastproxy.wire import as_snapshot
from fastproxy.wire import ws_text_frame as py_ws_text_frame

PY_CODECS = {**PY_CODECS, ORDERBOOK: PyBookCodec, LIQUIDATION: PyLiquidationCodec}

try:
    from fastproxy.codec import _codec as _ext
except ImportError as exc:  # not built here (no compiler, FASTPROXY_NO_EXT=1, ...)
    _ext = None
    CYTHON_IMPORT_ERROR: str | None = f"fastproxy.codec._codec not importable: {exc}"
else:
    CYTHON_IMPORT_ERROR = None


class Codec(Protocol):
    """What `new_codec` returns, in either implementation."""

    @property
    def stream(self) -> Any: ...

    @property
    def seq(self) -> int:
        """The last seq assigned (the start value until the first Message)."""
        ...

    @property
    def epoch(self) -> str:
        """The numbering this codec's Messages belong to (fastproxy.wire)."""
        ...

    def feed(self, frame: dict) -> list[Any]:
        """Apply one parsed Bybit data frame; the Messages it makes, seq +1 each."""
        ...

    def snapshot(self) -> Any:
        """The current state for a new subscriber, or None when nothing is known yet."""
        ...

    def reset(self) -> None:
        """Upstream state is gone; the next Message out is a snapshot."""
        ...

    def renumber(self, epoch: str | None = None) -> None:
        """A new numbering (`epoch`, None: a fresh one) from here; state and seq are kept."""
        ...


if _ext is not None:
    CyTickerCodec = _ext.TickerCodec
    CyKlineCodec = _ext.KlineCodec
    CyTradeCodec = _ext.TradeCodec
    CyBookCodec = _ext.BookCodec
    CyLiquidationCodec = _ext.LiquidationCodec
    cy_ws_text_frame = _ext.ws_text_frame
    CyMessage = _ext.Message
    CY_CODECS: dict[str, type] | None = {
        TICKER: CyTickerCodec,
        KLINE: CyKlineCodec,
        TRADE: CyTradeCodec,
        ORDERBOOK: CyBookCodec,
        LIQUIDATION: CyLiquidationCodec,
    }
else:
    CyTickerCodec = CyKlineCodec = CyTradeCodec = CyMessage = cy_ws_text_frame = None  # type: ignore[assignment,misc]
    CyBookCodec = CyLiquidationCodec = None  # type: ignore[assignment,misc]
    CY_CODECS = None

CYTHON_AVAILABLE = CY_CODECS is not None

if CY_CODECS is not None and os.environ.get("FASTPROXY_PURE") != "1":
    IMPLEMENTATION = "cython"
    _CODECS: dict[str, type] = CY_CODECS
    Message = CyMessage
    ws_text_frame = cy_ws_text_frame
else:
    IMPLEMENTATION = "python"
    _CODECS = PY_CODECS  # type: ignore[assignment]
    Message = PyMessage  # type: ignore[misc]
    ws_text_frame = py_ws_text_frame


def new_codec(stream: Stream, seq: int = 0, epoch: str | None = None) -> Codec:
    """A codec for `stream` whose next Message is `seq + 1`, from the chosen implementation.

    `epoch` continues a numbering (a cluster's stored one, on failover); None starts a new one.
    """
    return _CODECS[stream.kind](stream, seq, epoch)


__all__ = [
    "CYTHON_AVAILABLE",
    "CYTHON_IMPORT_ERROR",
    "CY_CODECS",
    "IMPLEMENTATION",
    "PY_CODECS",
    "RESYNC_REASONS",
    "Codec",
    "CodecError",
    "CyBookCodec",
    "CyKlineCodec",
    "CyLiquidationCodec",
    "CyMessage",
    "CyTickerCodec",
    "CyTradeCodec",
    "Message",
    "PyBookCodec",
    "PyKlineCodec",
    "PyLiquidationCodec",
    "PyMessage",
    "PyTickerCodec",
    "PyTradeCodec",
    "as_snapshot",
    "cy_ws_text_frame",
    "new_codec",
    "percent_2dp",
    "py_ws_text_frame",
    "ws_text_frame",
]

"""JSON encoding the way Bybit's Go servers do it.

Go's encoding/json escapes ``<``, ``>`` and ``&`` (and U+2028/U+2029) inside strings by default,
and Bybit's frames show it (``"args size \\u003e10"``). orjson never escapes them; since those
characters can only occur inside JSON strings, a byte-level replacement after orjson is exact.
"""

from __future__ import annotations

from typing import Any

import orjson

_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def go_dumps(obj: Any) -> bytes:
    """Serialize like Go's encoding/json: compact, insertion key order, HTML-safe strings."""
    data = orjson.dumps(obj)
    for raw, escaped in _ESCAPES:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def dumps(obj: Any) -> bytes:
    """Serialize data frames: their strings are numbers and symbols, which never need escaping."""
    return orjson.dumps(obj)

"""Named faults, shared by the CLI (``--fault name[=value]``) and the HTTP control API
(``GET /_sim/fault?name=...&...``), applied through the simulator's Python handle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

FAULT_HELP = """\
drop_all                      abort every connection (client sees 1006)
half_dead[=on|off]            keep TCP open but send nothing, answer no pings of any kind
pong_delay=SECONDS            delay JSON and RFC 6455 pongs (0 = off)
refuse=STATUS[:COUNT]         refuse WS handshakes with HTTP STATUS (502/403/429...), optionally
                              only the next COUNT; refuse=off accepts again
restart_books                 every book re-snapshots with u=1
skip_u=TOPIC                  the next book frame of TOPIC skips one u
repeat_u=TOPIC                the next book frame of TOPIC repeats the last u
backward_u=TOPIC              the next book frame of TOPIC steps u back by one
drop_delta=TOPIC              the next delta of TOPIC is lost (the book changes, no frame)
crossed_delta=TOPIC           the next book frame of TOPIC is a delta that crosses the book
resend_snapshot=TOPIC         push a mid-stream snapshot of a ticker, book or kline TOPIC
inject_trades=SYMBOL:COUNT    one taker order with COUNT fills (split into <=1024-trade frames)
inject_liquidation=SYMBOL     one allLiquidation event now
snapshot_before_ack[=on|off]  chaos: send new topics' snapshots before the ack
keep_earlier_args[=on|off]    keep args before the first bad one of a failed subscribe
clear                         turn off half_dead, pong_delay, refusals and chaos switches
HTTP parameters: value=..., or the named forms on=, seconds=, status=, count=, topic=,
symbol=, category= (default linear)."""


class FaultTarget(Protocol):
    def drop_all(self) -> int: ...
    def set_half_dead(self, on: bool) -> None: ...
    def set_pong_delay(self, seconds: float) -> None: ...
    def refuse_handshakes(self, status: int | None, count: int | None = None) -> None: ...
    def restart_books(self) -> int: ...
    def skip_u(self, topic: str, category: str = "linear") -> None: ...
    def repeat_u(self, topic: str, category: str = "linear") -> None: ...
    def backward_u(self, topic: str, category: str = "linear") -> None: ...
    def drop_delta(self, topic: str, category: str = "linear") -> None: ...
    def crossed_delta(self, topic: str, category: str = "linear") -> None: ...
    def resend_snapshot(self, topic: str, category: str = "linear") -> None: ...
    def inject_trades(self, symbol: str, count: int, category: str = "linear") -> None: ...
    def inject_liquidation(self, symbol: str, category: str = "linear") -> None: ...
    def set_snapshot_before_ack(self, on: bool) -> None: ...
    def set_keep_earlier_args(self, on: bool) -> None: ...
    def clear_faults(self) -> None: ...


def _flag(text: str | None, default: bool = True) -> bool:
    if text is None or text == "":
        return default
    lowered = text.strip().lower()
    if lowered in ("1", "on", "true", "yes"):
        return True
    if lowered in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"expected on/off, got {text!r}")


def _required(params: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = params.get(name)
        if value:
            return value
    raise ValueError(f"missing parameter: {' or '.join(names)}")


FAULT_NAMES = frozenset(
    {
        "drop_all",
        "half_dead",
        "pong_delay",
        "refuse",
        "restart_books",
        "skip_u",
        "repeat_u",
        "backward_u",
        "drop_delta",
        "crossed_delta",
        "resend_snapshot",
        "inject_trades",
        "inject_liquidation",
        "snapshot_before_ack",
        "keep_earlier_args",
        "clear",
    }
)


def parse_fault_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"refuse=502:3"`` -> ``("refuse", {"value": "502:3"})``; rejects unknown names."""
    name, sep, value = spec.strip().partition("=")
    name = name.strip()
    if name not in FAULT_NAMES:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(sorted(FAULT_NAMES))})")
    return name, ({"value": value.strip()} if sep else {})


def apply_fault(sim: FaultTarget, name: str, params: Mapping[str, str]) -> dict[str, Any]:
    """Apply one named fault; raises ValueError for unknown names or bad parameters."""
    value = params.get("value")
    category = params.get("category") or "linear"
    if name == "drop_all":
        return {"dropped": sim.drop_all()}
    if name == "half_dead":
        on = _flag(params.get("on", value))
        sim.set_half_dead(on)
        return {"half_dead": on}
    if name == "pong_delay":
        seconds = float(_required(params, "seconds", "value"))
        if seconds < 0:
            raise ValueError("pong_delay must be >= 0")
        sim.set_pong_delay(seconds)
        return {"pong_delay": seconds}
    if name == "refuse":
        status_text = params.get("status", "")
        count_text = params.get("count", "")
        if value:
            status_text, _, inline_count = value.partition(":")
            count_text = count_text or inline_count
        if status_text.lower() in ("", "off", "none", "0"):
            sim.refuse_handshakes(None)
            return {"refuse": None}
        status = int(status_text)
        if not 400 <= status <= 599:
            raise ValueError("refusal status must be an HTTP error (400-599)")
        count = int(count_text) if count_text else None
        sim.refuse_handshakes(status, count)
        return {"refuse": status, "count": count}
    if name == "restart_books":
        return {"books": sim.restart_books()}
    if name in (
        "skip_u",
        "repeat_u",
        "backward_u",
        "drop_delta",
        "crossed_delta",
        "resend_snapshot",
    ):
        topic = _required(params, "topic", "value")
        getattr(sim, name)(topic, category)
        return {name: topic, "category": category}
    if name == "inject_trades":
        if value and ":" in value:
            symbol, _, count_text = value.partition(":")
        else:
            symbol = _required(params, "symbol", "value")
            count_text = params.get("count", "1")
        sim.inject_trades(symbol, int(count_text), category)
        return {"inject_trades": symbol, "count": int(count_text)}
    if name == "inject_liquidation":
        symbol = _required(params, "symbol", "value")
        sim.inject_liquidation(symbol, category)
        return {"inject_liquidation": symbol}
    if name == "snapshot_before_ack":
        on = _flag(params.get("on", value))
        sim.set_snapshot_before_ack(on)
        return {"snapshot_before_ack": on}
    if name == "keep_earlier_args":
        on = _flag(params.get("on", value))
        sim.set_keep_earlier_args(on)
        return {"keep_earlier_args": on}
    if name == "clear":
        sim.clear_faults()
        return {"cleared": True}
    raise ValueError(f"unknown fault {name!r}")

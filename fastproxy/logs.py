"""Logging setup: one JSON object per line (default) or plain text."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed with extra= and belongs in the line.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """Plain lines with the extra= fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


# Lines that clients can trigger at will (bad frames, floods, drops): at most CLIENT_LOG_BURST
# of each kind per CLIENT_LOG_INTERVAL seconds, never above WARNING.
CLIENT_LOG_INTERVAL = 10.0
CLIENT_LOG_BURST = 5


class LogLimiter:
    """At most `burst` lines per key in each window of `interval` seconds. The first line let
    through after some were held back carries their count (`suppressed=N`)."""

    __slots__ = ("_clock", "_windows", "burst", "interval")

    def __init__(
        self,
        interval: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.burst = burst
        self._clock = clock
        # key -> [window start, lines let through in it, lines held back since the last one]
        self._windows: dict[object, list[float]] = {}

    def allow(self, key: object) -> int | None:
        """None: hold this line back. Else the number held back before it (0 for none)."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) > 1000:  # keys are message templates; bound them anyway
                self._windows.clear()
            window = self._windows[key] = [now, 0, 0]
        elif now - window[0] >= self.interval:
            window[0], window[1] = now, 0
        if window[1] >= self.burst:
            window[2] += 1
            return None
        window[1] += 1
        held, window[2] = int(window[2]), 0
        return held


class ThrottledLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger for lines clients can cause at will: rate-limited per message template (and
    `reason`, when one is given), and never above `ceiling`: a client's bad bytes are a
    WARNING, not our ERROR. picows gets one too, for its handshake and frame-parser lines."""

    def __init__(self, logger: logging.Logger, ceiling: int = logging.WARNING) -> None:
        super().__init__(logger, {})
        self.ceiling = ceiling
        self.limiter = LogLimiter(CLIENT_LOG_INTERVAL, CLIENT_LOG_BURST)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level > self.ceiling:
            level = self.ceiling
        if not self.isEnabledFor(level):
            return
        extra = kwargs.get("extra")
        reason = extra.get("reason") if extra else None
        held = self.limiter.allow(msg if reason is None else (msg, reason))
        if held is None:
            return
        if held:
            kwargs["extra"] = {**(extra or {}), "suppressed": held}
        self.logger.log(level, msg, *args, **kwargs)


def setup_logging(fmt: str = "json", debug: bool = False, environment: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # picows logs every handshake failure at INFO; that is client noise, not ours.
    logging.getLogger("picows").setLevel(logging.DEBUG if debug else logging.WARNING)

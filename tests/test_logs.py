import logging

import orjson

from fastproxy.logs import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "fastproxy.x", "levelname": "WARNING", "msg": "m %s"})
    rec.args = ("a",)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_extra_fields() -> None:
    line = orjson.loads(JsonFormatter().format(record(topic="tickers.X", count=3)))
    assert line["msg"] == "m a" and line["topic"] == "tickers.X" and line["count"] == 3
    assert line["level"] == "warning" and line["logger"] == "fastproxy.x"


def test_text_lines_carry_the_extra_fields() -> None:
    line = TextFormatter().format(record(topic="tickers.X"))
    assert line.endswith("fastproxy.x: m a topic=tickers.X")


def test_log_limiter_lets_a_burst_through_and_counts_the_rest() -> None:
    from fastproxy.logs import LogLimiter

    now = [0.0]
    limiter = LogLimiter(interval=10.0, burst=2, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(5)] == [0, 0, None, None, None]
    assert limiter.allow("b") == 0  # each kind has its own budget
    now[0] = 10.0
    assert limiter.allow("a") == 3  # the first line of the next window says what was held back
    assert limiter.allow("a") == 0


def test_throttled_log_caps_the_level_and_reports_the_suppressed(caplog: object) -> None:
    from fastproxy import logs

    logger = logging.getLogger("fastproxy.test.throttled")
    throttled = logs.ThrottledLog(logger)
    now = [0.0]
    throttled.limiter = logs.LogLimiter(10.0, 1, clock=lambda: now[0])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(4):
            throttled.error("bad frame from %s", "x", extra={"peer": "p"})
        now[0] = 11.0
        throttled.error("bad frame from %s", "y")
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    assert records[0].peer == "p"  # type: ignore[attr-defined]
    assert records[1].suppressed == 3  # type: ignore[attr-defined]
    assert records[1].getMessage() == "bad frame from y"

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

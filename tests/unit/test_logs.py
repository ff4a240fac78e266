"""relay/logs.py: what a log line keeps whatever text it carries."""

from __future__ import annotations

import json
import logging

import pytest

from relay.logs import JsonFormatter, TextFormatter, redact


def _record(key: str) -> logging.LogRecord:
    record = logging.LogRecord("relay.test", logging.INFO, "", 0, "published %s", (key,), None)
    record.effect_id = 7
    record.state = "PUBLISHED"
    return record


@pytest.mark.parametrize(
    "key", ["k-password='abc def", 'k password="x', "k passwd: ", "k\npassword=x y"]
)
def test_hostile_text_never_removes_the_structured_fields(key: str) -> None:
    """Issue 18 item 8e: a key holding "password=" masked the rest of the text line."""
    line = TextFormatter().format(_record(key))
    assert line.endswith("[effect_id=7 state=PUBLISHED]"), line
    assert "\n" not in line
    doc = json.loads(JsonFormatter().format(_record(key)))
    assert (doc["effect_id"], doc["state"]) == (7, "PUBLISHED")


def test_secrets_never_reach_a_log_line() -> None:
    assert "hunter2" not in redact("postgresql://app:hunter2@db:5432/app")
    assert "postgresql://app:***@db" in redact("postgresql://app:hunter2@db:5432/app")
    assert "hunter2" not in redact("host=db password=hunter2 user=app")
    assert "hunter2" not in redact("{'sasl_plain_password': 'hunter2'}")
    record = logging.LogRecord("relay", logging.INFO, "", 0, "url %s", ("x://u:pw@h",), None)
    record.operation_key = "k1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "url x://u:***@h"
    assert line["operation_key"] == "k1"
    assert "pw@" not in TextFormatter().format(record)

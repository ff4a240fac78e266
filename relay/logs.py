"""Log set-up: one line per event, plain text or JSON, with no secrets in any line.

A text line escapes control characters in everything it shows (an operation key with a newline
cannot forge a second line); a JSON line redacts each value before encoding, so it stays valid
JSON whatever the values hold.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any

from relay.redaction import escape_controls, redact

__all__ = ["JsonFormatter", "TextFormatter", "configure", "redact"]

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # Each part is redacted on its own: hostile text in one part (a key holding
        # "password='") can mask the rest of that part, never the line's other fields.
        extras = " ".join(f"{_clean(str(k))}={_clean(str(v))}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {_clean(record.getMessage())}"
        if extras:
            line = f"{line} [{extras}]"
        if record.exc_info:
            trace = redact(self.formatException(record.exc_info))
            line = f"{line}\n{escape_controls(trace, keep_newlines=True)}"
        return line


def _clean(text: str) -> str:
    return escape_controls(redact(text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps({redact(str(k)): _safe(v) for k, v in doc.items()})


def _safe(value: Any, depth: int = 0) -> Any:
    """A JSON-ready value with secrets masked: numbers and booleans as they are, containers
    walked (to a bounded depth), everything else as redacted text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 8 and isinstance(value, dict):
        return {redact(str(k)): _safe(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, list | tuple):
        return [_safe(v, depth + 1) for v in value]
    return redact(value if isinstance(value, str) else str(value))


class _QuietTopicCreation(logging.Filter):
    """kafka-python logs an ERROR each time a topic is about to be auto-created; it is not one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "kafka.cluster"
            and str(record.msg).startswith("Topic %s not found in cluster metadata")
        )


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_QuietTopicCreation())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs its whole configuration (SASL password included) at DEBUG.
    logging.getLogger("kafka").setLevel(logging.WARNING)

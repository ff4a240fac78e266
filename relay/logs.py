"""Log set-up: one line per event, plain text or JSON, with no secrets in any line."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# user:password@ in URLs, and password=... in conninfo strings.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://[^:/@\s]+):[^@\s]*@", re.IGNORECASE)
_KV_PASSWORD = re.compile(
    r"(?P<key>password|sasl_plain_password|passwd)(?P<sep>['\"]?\s*[=:]\s*['\"]?)[^'\"\s,}]+",
    re.IGNORECASE,
)
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<scheme>:***@", text)
    return _KV_PASSWORD.sub(r"\g<key>\g<sep>***", text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line} [{extras}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return redact(line)


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
        return redact(json.dumps(doc, default=str))


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

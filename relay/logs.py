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
import threading
import time
from datetime import UTC, datetime
from typing import Any

from relay.redaction import escape_controls, redact

__all__ = ["KAFKA", "ConnectionState", "JsonFormatter", "TextFormatter", "configure", "redact"]

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


class ConnectionState:
    """Up or down, logged once per change: a client that retries every few milliseconds while
    a server is down must not turn the log into a list of its retries.

    ``down(why)`` logs one WARNING when the state changes to down (later calls only at DEBUG);
    ``up()`` logs one INFO line, with how long it was down, when it changes back.
    """

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self.name = name
        self._log = logger
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def down(self, why: str) -> None:
        with self._lock:
            changed = self._down_since is None
            if changed:
                self._down_since = time.monotonic()
        if changed:
            self._log.warning("%s unavailable: %s; retrying until it is back", self.name, why)
        else:
            self._log.debug("%s still unavailable: %s", self.name, why)

    def up(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            self._log.info("%s available again after %.1fs", self.name, time.monotonic() - since)

    def reset(self) -> None:
        with self._lock:
            self._down_since = None


KAFKA = ConnectionState("Kafka", logging.getLogger("relay.kafka"))
"""The state of the connection to the Kafka brokers, as the relay's clients meet it."""

# kafka-python reports its connection state only in its log: these records move KAFKA.
_KAFKA_DOWN = ("Connection failed", "Bootstrap")
_KAFKA_UP = ("%s: Connected", "Bootstrap complete: %s")


class _KafkaChatter(logging.Filter):
    """kafka-python's records are DEBUG records whatever their level (a broker that is down makes
    it log several errors a second): shown only at DEBUG, through the redacting formatters (its
    own DEBUG records are not made at all: ``configure`` holds the logger at INFO). Its
    connection errors and reconnections move :data:`KAFKA`, which says so once per change."""

    def __init__(self, show: bool) -> None:
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "kafka" and not record.name.startswith("kafka."):
            return True
        template = str(record.msg)
        if record.levelno >= logging.WARNING and template.startswith(_KAFKA_DOWN):
            KAFKA.down(record.getMessage())
        elif record.levelno == logging.INFO and template in _KAFKA_UP:
            KAFKA.up()
        if record.levelno >= logging.CRITICAL:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.show


class _QuietTopicCreation(logging.Filter):
    """kafka-python logs an ERROR each time a topic is about to be auto-created; it is not one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "kafka.cluster"
            and str(record.msg).startswith("Topic %s not found in cluster metadata")
        )


def configure(level: str = "INFO", fmt: str = "text") -> None:
    level = level.upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_QuietTopicCreation())
    handler.addFilter(_KafkaChatter(show=logging.getLevelName(level) == logging.DEBUG))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python's own DEBUG records (its whole configuration, SASL password included; every
    # record sent, payload included) are never made. Its INFO records (connected) move KAFKA.
    logging.getLogger("kafka").setLevel(logging.INFO)

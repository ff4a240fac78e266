"""What an intent is, what is refused before the database sees it, and how the database's refusals
become the relay's exceptions: written once for every way an application writes intents.

No I/O here. :mod:`relay.connector` runs these around a driver's few methods, for the psycopg 3
face (:mod:`relay.outbox`) and the integrations (:mod:`relay.contrib`) alike. The checks that need
no database (payload shape, depth and size, text PostgreSQL cannot store, key length, traceparent
format) raise before anything is sent, so the caller's transaction stays usable; the rest (an
undeclared type, a reserved name, a business-key template, a key reused for another intent) is
the SQL function's, and arrives as a driver error carrying one of the relay's SQLSTATEs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.errors import (
    EnqueueError,
    InvalidIntentError,
    PayloadTooLargeError,
    RelayError,
    UnknownEffectTypeError,
    relay_error,
)
from relay.states import EffectState

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_PAYLOAD_DEPTH",
    "Effect",
    "Enqueued",
    "Intent",
    "as_effect",
    "as_enqueued",
    "check_intent",
    "intent_params",
    "translate_errors",
]

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_COMPENSATION_KEY = re.compile(r"#compensation(-[0-9]+)?$")


@dataclass(frozen=True)
class Intent:
    """What the application wants done, identified by its caller-chosen operation key."""

    effect_type: str
    operation_key: str
    payload: Mapping[str, Any]
    business_key: str | None = None
    traceparent: str | None = None
    available_at: datetime | None = None
    ordering_group: str | None = None


@dataclass(frozen=True)
class Enqueued:
    effect_id: int
    operation_key: str
    state: EffectState
    created: bool


@dataclass(frozen=True)
class Effect:
    """An effect row as the relay sees it."""

    id: int
    operation_key: str
    effect_type: str
    topic: str
    payload: dict[str, Any]
    business_key: str | None
    traceparent: str | None
    state: EffectState
    attempts: int
    available_at: datetime
    created_at: datetime
    updated_at: datetime
    reason: str | None
    published_partition: int | None
    published_offset: int | None
    published_at: datetime | None
    outcome_deadline: datetime | None
    owner: str | None = None
    owner_epoch: int | None = None
    lease_until: datetime | None = None
    ordering_group: str | None = None
    group_released_at: datetime | None = None  # `relay unblock` let its group go on without it


MAX_PAYLOAD_BYTES = 1_000_000
"""Default limit on a payload's JSON text (UTF-8 bytes); below the brokers' 1 MiB default so that
the record and its headers still fit."""
MAX_PAYLOAD_DEPTH = 100
"""Deepest nesting of objects and arrays accepted in a payload: deeper documents are far more
likely an attack or a bug than an intent, and would exhaust Python's recursion on the way."""


# One encoder for every payload (json.dumps with an option builds a new one at every call).
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _bad_char(text: str) -> str | None:
    """Why PostgreSQL could not store ``text`` (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character (U+0000), which PostgreSQL cannot store"
    if text.isascii():  # known without a scan: no surrogate can be in it
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode text)"
    return None


def _check_text(key: str, what: str, text: str) -> None:
    why = _bad_char(text)
    if why is not None:
        raise InvalidIntentError(f"intent {key!r}: {what} {why}")


# JSON's scalars other than strings: nothing to check in them (their exact types, the common case,
# answered before the abstract Mapping check, which costs several times as much).
_SCALARS = frozenset({int, float, bool, type(None)})


def _check_payload(key: str, value: Any, depth: int = 0) -> None:
    """Walk the payload once, bounded by :data:`MAX_PAYLOAD_DEPTH` (which also ends a cycle)."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is str or isinstance(value, str):
        _check_text(key, "a payload string", value)
        return
    if kind is dict or isinstance(value, Mapping):
        children: Iterable[Any] = value.values()
        for name in value:
            if isinstance(name, str):
                _check_text(key, "a payload field name", name)
    elif isinstance(value, list | tuple):
        children = value
    else:
        return
    if depth >= MAX_PAYLOAD_DEPTH:
        raise InvalidIntentError(
            f"intent {key!r}: payload nests deeper than {MAX_PAYLOAD_DEPTH} levels"
        )
    for child in children:
        _check_payload(key, child, depth + 1)


def intent_params(intent: Intent, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """The enqueue statement's parameters, after every check that needs no database: a refusal
    here raises an :class:`EnqueueError` and leaves the caller's transaction untouched."""
    key = intent.operation_key
    if not isinstance(key, str) or not 1 <= len(key) <= 512:
        raise InvalidIntentError("operation key must be a string of 1 to 512 characters")
    why = _bad_char(key)
    if why is not None:
        raise InvalidIntentError(f"operation key {why}")
    if _COMPENSATION_KEY.search(key):
        raise InvalidIntentError(
            f"operation key {key!r} is reserved for the relay's own compensations"
        )
    if not isinstance(intent.effect_type, str) or not intent.effect_type:
        raise InvalidIntentError(f"intent {key!r}: effect type must be a non-empty string")
    _check_text(key, "effect type", intent.effect_type)
    if intent.effect_type.startswith("relay."):
        raise UnknownEffectTypeError(
            f"effect type {intent.effect_type!r} is reserved for the relay"
        )
    if intent.business_key is not None:
        if not isinstance(intent.business_key, str) or not 1 <= len(intent.business_key) <= 512:
            raise InvalidIntentError(
                f"intent {key!r}: business key must be a string of 1 to 512 characters"
            )
        _check_text(key, "business key", intent.business_key)
    group = intent.ordering_group
    if group is not None:
        if not isinstance(group, str) or not 1 <= len(group) <= 512:
            raise InvalidIntentError(
                f"intent {key!r}: ordering group must be a string of 1 to 512 characters"
            )
        _check_text(key, "ordering group", group)
    if not isinstance(intent.payload, Mapping):
        raise InvalidIntentError(
            f"intent {key!r}: payload must be a JSON object (a mapping), "
            f"not {type(intent.payload).__name__}"
        )
    _check_payload(key, intent.payload)
    try:
        payload = _JSON.encode(intent.payload)
    except (TypeError, ValueError) as exc:
        raise InvalidIntentError(
            f"intent {key!r}: payload is not JSON-serialisable: {exc}"
        ) from None
    size = len(payload)  # ASCII (non-ASCII characters are escaped): one byte a character
    if size > max_payload_bytes:
        raise PayloadTooLargeError(
            f"intent {key!r}: payload is {size} bytes of JSON, over the limit of "
            f"{max_payload_bytes} (max_payload_bytes)"
        )
    if intent.traceparent is not None and (
        not isinstance(intent.traceparent, str) or not _TRACEPARENT.fullmatch(intent.traceparent)
    ):
        raise InvalidIntentError(
            f"intent {key!r}: traceparent {intent.traceparent!r} is not a W3C traceparent"
        )
    return {
        "operation_key": key,
        "effect_type": intent.effect_type,
        "payload": payload,
        "business_key": intent.business_key,
        "traceparent": intent.traceparent,
        "available_at": intent.available_at,
        "ordering_group": group,
    }


def check_intent(intent: Intent, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
    """Raise the :class:`EnqueueError` that :func:`relay.enqueue` would raise before reaching the
    database, so that a command can refuse bad input before it connects."""
    intent_params(intent, max_payload_bytes)


def as_enqueued(operation_key: str, row: Mapping[str, Any] | None) -> Enqueued:
    """The enqueue statement's row (``effect_id, state, created``) as an :class:`Enqueued`."""
    if row is None:  # pragma: no cover - the function always returns one row
        raise EnqueueError(f"enqueue of {operation_key!r} returned nothing")
    return Enqueued(
        int(row["effect_id"]), operation_key, EffectState(row["state"]), bool(row["created"])
    )


def as_effect(row: Mapping[str, Any]) -> Effect:
    """The ``get_effect`` statement's row as an :class:`Effect`."""
    return Effect(**{**row, "state": EffectState(row["state"])})


def _sqlstate(exc: BaseException) -> tuple[str | None, BaseException]:
    """The first SQLSTATE in the exception's chain, and the exception that carried it.

    Frameworks wrap the driver's exception (SQLAlchemy in ``.orig``, Django in ``__cause__``);
    psycopg 3 and asyncpg name the code ``sqlstate``, psycopg 2 ``pgcode``.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for attr in ("sqlstate", "pgcode"):
            code = getattr(current, attr, None)
            if isinstance(code, str) and len(code) == 5:
                return code, current
        orig = getattr(current, "orig", None)
        pending.extend([orig if isinstance(orig, BaseException) else None, current.__cause__])
    return None, exc


def _message(exc: BaseException) -> str:
    """The server's own message: psycopg's primary message, asyncpg's ``message``, else the
    first line of the text (psycopg 2 outside a result)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if isinstance(primary, str) and primary:
        return primary
    message = getattr(exc, "message", None)  # asyncpg
    if isinstance(message, str) and message:
        return message
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def translate_errors() -> Iterator[None]:
    """A driver error with one of the relay's SQLSTATEs (RL001...) or a missing-schema one becomes
    the relay's own exception; any other error passes through unchanged.

    The driver's error that carried the code is replaced, its message being the new one's; a
    framework's wrapper around it (which names the statement) is kept as the ``__cause__``.
    """
    try:
        yield
    except RelayError:
        raise
    except Exception as exc:
        code, carrier = _sqlstate(exc)
        error = relay_error(code, _message(carrier))
        if error is None:
            raise
        raise error from (None if carrier is exc else exc)

"""The application side: write intents inside the caller's own transaction.

Every function takes the caller's psycopg connection and never commits or rolls back: the intent
becomes visible exactly when the caller's transaction commits, and vanishes with its rollback.
An :class:`~relay.errors.EnqueueError` raised by the database leaves that transaction aborted, as
any failed statement does in PostgreSQL; checks that can be made without the database (payload
shape, key length, traceparent format) are made first and leave the transaction untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.errors import EnqueueError, InvalidIntentError, PayloadTooLargeError, relay_error
from relay.sql import query
from relay.states import EffectState

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


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


def _bad_char(text: str) -> str | None:
    """Why PostgreSQL could not store ``text`` (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character (U+0000), which PostgreSQL cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode text)"
    return None


def _check_text(key: str, what: str, text: str) -> None:
    why = _bad_char(text)
    if why is not None:
        raise InvalidIntentError(f"intent {key!r}: {what} {why}")


def _check_payload(key: str, value: Any, depth: int = 0) -> None:
    """Walk the payload once, bounded by :data:`MAX_PAYLOAD_DEPTH` (which also ends a cycle)."""
    if isinstance(value, str):
        _check_text(key, "a payload string", value)
        return
    if isinstance(value, Mapping):
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


def _params(intent: Intent, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """The statement's parameters, after every check that needs no database: a refusal here
    raises an :class:`EnqueueError` and leaves the caller's transaction untouched."""
    key = intent.operation_key
    if not isinstance(key, str) or not 1 <= len(key) <= 512:
        raise InvalidIntentError("operation key must be a string of 1 to 512 characters")
    why = _bad_char(key)
    if why is not None:
        raise InvalidIntentError(f"operation key {why}")
    if not isinstance(intent.effect_type, str) or not intent.effect_type:
        raise InvalidIntentError(f"intent {key!r}: effect type must be a non-empty string")
    _check_text(key, "effect type", intent.effect_type)
    if intent.business_key is not None:
        if not isinstance(intent.business_key, str):
            raise InvalidIntentError(f"intent {key!r}: business key must be a string")
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
        payload = json.dumps(intent.payload, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidIntentError(
            f"intent {key!r}: payload is not JSON-serialisable: {exc}"
        ) from None
    size = len(payload.encode("utf-8"))
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
    """Raise the :class:`EnqueueError` that :func:`enqueue` would raise before reaching the
    database, so that a command can refuse bad input before it connects."""
    _params(intent, max_payload_bytes)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn the SQL functions' own SQLSTATEs (RL001...) into the relay's exceptions."""
    try:
        yield
    except psycopg.Error as exc:
        sqlstate = exc.sqlstate or ""
        diag = exc.diag.message_primary or str(exc)
        error = relay_error(sqlstate, diag)
        if error is not None:
            raise error from None
        raise


def _result(key: str, row: tuple[Any, ...] | None) -> Enqueued:
    if row is None:  # pragma: no cover - the function always returns one row
        raise EnqueueError(f"enqueue of {key!r} returned nothing")
    return Enqueued(int(row[0]), key, EffectState(row[1]), bool(row[2]))


def _effect(row: dict[str, Any]) -> Effect:
    return Effect(**{**row, "state": EffectState(row["state"])})


def enqueue(
    conn: psycopg.Connection[Any],
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    *,
    business_key: str | None = None,
    traceparent: str | None = None,
    available_at: datetime | None = None,
    ordering_group: str | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> Enqueued:
    """Record one intent in the caller's transaction; the same key again returns the first one.

    Effects of one ``ordering_group`` are published one at a time, in the order their enqueues
    commit, to one partition; concurrent transactions of a group wait for each other here (an
    advisory lock held until commit), so enqueue grouped intents late in a transaction.
    """
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    params = _params(intent, max_payload_bytes)
    with translate_errors(), conn.cursor() as cur:
        cur.execute(query("enqueue"), params)
        return _result(operation_key, cur.fetchone())


def enqueue_many(
    conn: psycopg.Connection[Any],
    intents: Iterable[Intent],
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[Enqueued]:
    """Record many intents in the caller's transaction with one pipelined round trip."""
    batch = list(intents)
    params = [_params(intent, max_payload_bytes) for intent in batch]
    results: list[Enqueued] = []
    if not params:
        return results
    with translate_errors(), conn.cursor() as cur:
        cur.executemany(query("enqueue"), params, returning=True)
        for intent in batch:
            results.append(_result(intent.operation_key, cur.fetchone()))
            cur.nextset()
    return results


def get_effect(conn: psycopg.Connection[Any], operation_key: str) -> Effect | None:
    with translate_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("get_effect"), {"operation_key": operation_key})
        row = cur.fetchone()
    return _effect(row) if row else None


def cancel(
    conn: psycopg.Connection[Any],
    operation_key: str,
    *,
    reason: str = "cancelled by the application",
    actor: str = "application",
) -> None:
    """Withdraw a PENDING intent; any other state raises :class:`InvalidTransitionError`."""
    with translate_errors():
        conn.execute(
            query("cancel"), {"operation_key": operation_key, "reason": reason, "actor": actor}
        )


async def enqueue_async(
    conn: psycopg.AsyncConnection[Any],
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    *,
    business_key: str | None = None,
    traceparent: str | None = None,
    available_at: datetime | None = None,
    ordering_group: str | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> Enqueued:
    """:func:`enqueue` for an asyncio application's :class:`psycopg.AsyncConnection`."""
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    params = _params(intent, max_payload_bytes)
    with translate_errors():
        async with conn.cursor() as cur:
            await cur.execute(query("enqueue"), params)
            return _result(operation_key, await cur.fetchone())


async def enqueue_many_async(
    conn: psycopg.AsyncConnection[Any],
    intents: Iterable[Intent],
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[Enqueued]:
    batch = list(intents)
    params = [_params(intent, max_payload_bytes) for intent in batch]
    results: list[Enqueued] = []
    if not params:
        return results
    with translate_errors():
        async with conn.cursor() as cur:
            await cur.executemany(query("enqueue"), params, returning=True)
            for intent in batch:
                results.append(_result(intent.operation_key, await cur.fetchone()))
                cur.nextset()
    return results


async def get_effect_async(conn: psycopg.AsyncConnection[Any], operation_key: str) -> Effect | None:
    with translate_errors():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query("get_effect"), {"operation_key": operation_key})
            row = await cur.fetchone()
    return _effect(row) if row else None


async def cancel_async(
    conn: psycopg.AsyncConnection[Any],
    operation_key: str,
    *,
    reason: str = "cancelled by the application",
    actor: str = "application",
) -> None:
    with translate_errors():
        await conn.execute(
            query("cancel"), {"operation_key": operation_key, "reason": reason, "actor": actor}
        )

"""The application face written once: enqueue, enqueue many, read and cancel over a driver's two
methods, so that every way into the database checks, writes and fails alike.

A driver (psycopg 3 in :mod:`relay.outbox`, SQLAlchemy, Django and asyncpg in :mod:`relay.contrib`)
implements :class:`Connector` or :class:`AsyncConnector`: run one of the named queries of
:mod:`relay.sql` in the caller's transaction and return its row as a mapping. Everything else (the
checks made before anything is sent, the rows turned into values, the driver's errors turned into
the relay's) is here and in :mod:`relay.intents`, once; the async functions are the sync ones with
``await``. A connector never commits nor rolls back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from relay.intents import (
    MAX_PAYLOAD_BYTES,
    Effect,
    Enqueued,
    Intent,
    as_effect,
    as_enqueued,
    intent_params,
    translate_errors,
)

__all__ = [
    "AsyncConnector",
    "Connector",
    "Params",
    "Row",
    "cancel",
    "cancel_async",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "get_effect",
    "get_effect_async",
]

Params = Mapping[str, Any]
"""A query's parameters by name."""
Row = Mapping[str, Any]
"""A result row by column name."""


class Connector(Protocol):
    """What a synchronous driver provides; ``query_name`` names a query of :mod:`relay.sql`
    (``enqueue``, ``get_effect``, ``cancel``), written in the driver's own placeholder style."""

    def execute_one(self, query_name: str, params: Params) -> Row | None:
        """Run the query once; its first row, or None when it returned none."""
        ...

    def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        """Run the query once per parameter set, in order; the first row of each."""
        ...


class AsyncConnector(Protocol):
    """:class:`Connector` for an asyncio driver."""

    async def execute_one(self, query_name: str, params: Params) -> Row | None: ...

    async def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]: ...


def _cancel_params(operation_key: str, reason: str, actor: str) -> dict[str, Any]:
    return {"operation_key": operation_key, "reason": reason, "actor": actor}


def _query_name(params: Params) -> str:
    """An ungrouped intent is one plain INSERT into the intake; a grouped one goes through the SQL
    function, which takes its group's lock before the id is drawn."""
    return "enqueue" if params["ordering_group"] is not None else "enqueue_intake"


def _runs(params: Sequence[Params]) -> list[tuple[str, list[Params]]]:
    """Consecutive intents that take the same statement, in order (one round trip each)."""
    runs: list[tuple[str, list[Params]]] = []
    for p in params:
        name = _query_name(p)
        if runs and runs[-1][0] == name:
            runs[-1][1].append(p)
        else:
            runs.append((name, [p]))
    return runs


def _many(intents: Iterable[Intent], max_payload_bytes: int) -> tuple[list[str], list[Any]]:
    """Every intent checked first, so that one bad intent refuses the batch before any is sent."""
    batch = list(intents)
    return (
        [intent.operation_key for intent in batch],
        [intent_params(intent, max_payload_bytes) for intent in batch],
    )


def enqueue(
    db: Connector, intent: Intent, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES
) -> Enqueued:
    """Record one intent in the connector's transaction; the same key again returns the first."""
    params = intent_params(intent, max_payload_bytes)
    with translate_errors():
        row = db.execute_one(_query_name(params), params)
        if row is None:  # the key is taken: the function compares and returns the first intent
            row = db.execute_one("enqueue", params)
    return as_enqueued(intent.operation_key, row)


def enqueue_many(
    db: Connector, intents: Iterable[Intent], *, max_payload_bytes: int = MAX_PAYLOAD_BYTES
) -> list[Enqueued]:
    keys, params = _many(intents, max_payload_bytes)
    if not params:
        return []
    rows: list[Row | None] = []
    with translate_errors():
        for name, run in _runs(params):
            found = db.execute_many(name, run)
            rows.extend(
                row if row is not None else db.execute_one("enqueue", p)
                for row, p in zip(found, run, strict=True)
            )
    return [as_enqueued(key, row) for key, row in zip(keys, rows, strict=True)]


def get_effect(db: Connector, operation_key: str) -> Effect | None:
    """The effect, or an intent without an effect row yet (PENDING, or DISPATCHING in a
    batch). Its row may be written between the two reads: then the first is asked again."""
    params = {"operation_key": operation_key}
    with translate_errors():
        row = (
            db.execute_one("get_effect", params)
            or db.execute_one("get_intake_effect", params)
            or db.execute_one("get_effect", params)
        )
    return as_effect(row) if row else None


def cancel(db: Connector, operation_key: str, *, reason: str, actor: str) -> None:
    with translate_errors():
        db.execute_one("cancel", _cancel_params(operation_key, reason, actor))


async def enqueue_async(
    db: AsyncConnector, intent: Intent, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES
) -> Enqueued:
    params = intent_params(intent, max_payload_bytes)
    with translate_errors():
        row = await db.execute_one(_query_name(params), params)
        if row is None:
            row = await db.execute_one("enqueue", params)
    return as_enqueued(intent.operation_key, row)


async def enqueue_many_async(
    db: AsyncConnector, intents: Iterable[Intent], *, max_payload_bytes: int = MAX_PAYLOAD_BYTES
) -> list[Enqueued]:
    keys, params = _many(intents, max_payload_bytes)
    if not params:
        return []
    rows: list[Row | None] = []
    with translate_errors():
        for name, run in _runs(params):
            found = await db.execute_many(name, run)
            for row, p in zip(found, run, strict=True):
                rows.append(row if row is not None else await db.execute_one("enqueue", p))
    return [as_enqueued(key, row) for key, row in zip(keys, rows, strict=True)]


async def get_effect_async(db: AsyncConnector, operation_key: str) -> Effect | None:
    params = {"operation_key": operation_key}
    with translate_errors():
        row = await db.execute_one("get_effect", params)
        if row is None:
            row = await db.execute_one("get_intake_effect", params)
        if row is None:  # its row written between the two reads (see get_effect)
            row = await db.execute_one("get_effect", params)
    return as_effect(row) if row else None


async def cancel_async(db: AsyncConnector, operation_key: str, *, reason: str, actor: str) -> None:
    with translate_errors():
        await db.execute_one("cancel", _cancel_params(operation_key, reason, actor))

"""The application side on psycopg 3: write intents inside the caller's own transaction.

Every function takes the caller's psycopg connection and never commits or rolls back: the intent
becomes visible exactly when the caller's transaction commits, and vanishes with its rollback.
An :class:`~relay.errors.EnqueueError` raised by the database leaves that transaction aborted, as
any failed statement does in PostgreSQL; checks that can be made without the database (payload
shape, key length, traceparent format) are made first and leave the transaction untouched.

The logic is :mod:`relay.connector`'s, shared with :mod:`relay.contrib`; this module is the
psycopg 3 connector (sync and async) and the public signatures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay import connector
from relay.connector import Params, Row
from relay.intents import (
    MAX_PAYLOAD_BYTES,
    Effect,
    Enqueued,
    Intent,
    check_intent,
    translate_errors,
)
from relay.sql import query

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "Effect",
    "Enqueued",
    "Intent",
    "cancel",
    "cancel_async",
    "check_intent",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "get_effect",
    "get_effect_async",
    "translate_errors",
]


class _Psycopg:
    """:class:`relay.connector.Connector` on the caller's psycopg connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute_one(self, query_name: str, params: Params) -> Row | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query(query_name), params)
            return cur.fetchone()

    def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        """One pipelined round trip for the whole batch."""
        rows: list[Row | None] = []
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.executemany(query(query_name), params, returning=True)
            for _ in params:
                rows.append(cur.fetchone())
                cur.nextset()
        return rows


class _AsyncPsycopg:
    """:class:`relay.connector.AsyncConnector` on the caller's psycopg async connection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def execute_one(self, query_name: str, params: Params) -> Row | None:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query(query_name), params)
            return await cur.fetchone()

    async def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        rows: list[Row | None] = []
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.executemany(query(query_name), params, returning=True)
            for _ in params:
                rows.append(await cur.fetchone())
                cur.nextset()
        return rows


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
    commit, to one partition; concurrent transactions of a group wait for each other here (the
    group's row in ``relay.ordering_group``, locked until commit), so enqueue grouped intents late
    in a transaction.
    """
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    return connector.enqueue(_Psycopg(conn), intent, max_payload_bytes=max_payload_bytes)


def enqueue_many(
    conn: psycopg.Connection[Any],
    intents: Iterable[Intent],
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[Enqueued]:
    """Record many intents in the caller's transaction with one pipelined round trip."""
    return connector.enqueue_many(_Psycopg(conn), intents, max_payload_bytes=max_payload_bytes)


def get_effect(conn: psycopg.Connection[Any], operation_key: str) -> Effect | None:
    return connector.get_effect(_Psycopg(conn), operation_key)


def cancel(
    conn: psycopg.Connection[Any],
    operation_key: str,
    *,
    reason: str = "cancelled by the application",
    actor: str = "application",
) -> None:
    """Withdraw a PENDING intent; any other state raises :class:`InvalidTransitionError`."""
    connector.cancel(_Psycopg(conn), operation_key, reason=reason, actor=actor)


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
    return await connector.enqueue_async(
        _AsyncPsycopg(conn), intent, max_payload_bytes=max_payload_bytes
    )


async def enqueue_many_async(
    conn: psycopg.AsyncConnection[Any],
    intents: Iterable[Intent],
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[Enqueued]:
    return await connector.enqueue_many_async(
        _AsyncPsycopg(conn), intents, max_payload_bytes=max_payload_bytes
    )


async def get_effect_async(conn: psycopg.AsyncConnection[Any], operation_key: str) -> Effect | None:
    return await connector.get_effect_async(_AsyncPsycopg(conn), operation_key)


async def cancel_async(
    conn: psycopg.AsyncConnection[Any],
    operation_key: str,
    *,
    reason: str = "cancelled by the application",
    actor: str = "application",
) -> None:
    await connector.cancel_async(_AsyncPsycopg(conn), operation_key, reason=reason, actor=actor)

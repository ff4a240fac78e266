"""Write intents through a SQLAlchemy 2 ``Session`` / ``AsyncSession`` (or ``Connection``).

The intent joins whatever transaction the session is in (SQLAlchemy begins one on first use), and
becomes visible exactly when the caller commits. Works with the ``postgresql+psycopg``,
``postgresql+psycopg2`` and ``postgresql+asyncpg`` drivers: the statement uses bound parameters
only, and errors are mapped to the relay's exceptions by SQLSTATE whatever the driver.

Checks that need no database run first: when they refuse, nothing was sent and the session's
transaction is as usable as before. A refusal by the database (an undeclared type, a key reused
for another intent) aborts the transaction, as any failed statement does in PostgreSQL: roll back,
or call inside ``session.begin_nested()`` to keep the rest of the transaction.

Alembic: :func:`run_relay_migrations` applies the relay's migrations (and, given settings, syncs
the effect types) on an Alembic connection, so an Alembic revision can include the relay's schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import DateTime, Engine, Text, TextClause, bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from relay.config import Settings
from relay.contrib._driver import intent_params, many_params, result, translate_errors
from relay.errors import MigrationError
from relay.migrations import migrate, sync_effect_types
from relay.outbox import Enqueued, Intent
from relay.sql import query

__all__ = [
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "run_relay_migrations",
]

SyncTarget = Session | Connection
AsyncTarget = AsyncSession | AsyncConnection


def _statement() -> TextClause:
    # Typed binds: a NULL business key, traceparent or available_at is still sent with a type.
    return text(query("enqueue_named")).bindparams(
        bindparam("operation_key", type_=Text()),
        bindparam("effect_type", type_=Text()),
        bindparam("payload", type_=Text()),
        bindparam("business_key", type_=Text()),
        bindparam("traceparent", type_=Text()),
        bindparam("available_at", type_=DateTime(timezone=True)),
        bindparam("ordering_group", type_=Text()),
    )


def enqueue(
    session: SyncTarget,
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    *,
    business_key: str | None = None,
    traceparent: str | None = None,
    available_at: datetime | None = None,
    ordering_group: str | None = None,
) -> Enqueued:
    """:func:`relay.enqueue` in the session's current transaction."""
    params = intent_params(
        effect_type,
        operation_key,
        payload,
        business_key,
        traceparent,
        available_at,
        ordering_group,
    )
    with translate_errors():
        row = session.execute(_statement(), params).one_or_none()
    return result(operation_key, row)


def enqueue_many(session: SyncTarget, intents: Iterable[Intent]) -> list[Enqueued]:
    """Every intent checked first, then written in order (one statement each)."""
    checked = many_params(intents)
    statement = _statement()
    out: list[Enqueued] = []
    with translate_errors():
        for key, params in checked:
            out.append(result(key, session.execute(statement, params).one_or_none()))
    return out


async def enqueue_async(
    session: AsyncTarget,
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    *,
    business_key: str | None = None,
    traceparent: str | None = None,
    available_at: datetime | None = None,
    ordering_group: str | None = None,
) -> Enqueued:
    """:func:`enqueue` for an ``AsyncSession`` or ``AsyncConnection``."""
    params = intent_params(
        effect_type,
        operation_key,
        payload,
        business_key,
        traceparent,
        available_at,
        ordering_group,
    )
    with translate_errors():
        row = (await session.execute(_statement(), params)).one_or_none()
    return result(operation_key, row)


async def enqueue_many_async(session: AsyncTarget, intents: Iterable[Intent]) -> list[Enqueued]:
    checked = many_params(intents)
    statement = _statement()
    out: list[Enqueued] = []
    with translate_errors():
        for key, params in checked:
            out.append(result(key, (await session.execute(statement, params)).one_or_none()))
    return out


def run_relay_migrations(bind: Connection | Engine, settings: Settings | None = None) -> int:
    """Apply the relay's pending migrations on a ``postgresql+psycopg`` connection (Alembic's
    ``op.get_bind()``), inside its transaction; sync ``settings``' effect types when given.

    Returns how many migrations were applied. Safe to call again: applied ones are skipped.
    """
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return run_relay_migrations(conn, settings)
    raw = bind.connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise MigrationError(
            f"run_relay_migrations needs the postgresql+psycopg driver, not {bind.dialect.driver};"
            " run 'relay migrate' separately instead"
        )
    applied = migrate(raw)
    if settings is not None:
        sync_effect_types(raw, settings)
    return len(applied)

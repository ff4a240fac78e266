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

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import BindParameter, DateTime, Engine, Text, TextClause, bindparam, text
from sqlalchemy import Row as SARow
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from relay import connector
from relay.config import Settings
from relay.connector import Params, Row
from relay.errors import MigrationError
from relay.intents import Enqueued, Intent
from relay.migrations import migrate, sync_effect_types
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


def _statement(query_name: str) -> TextClause:
    """The query in SQLAlchemy's named style; only the enqueue statements are offered here."""
    if query_name not in ("enqueue", "enqueue_intake"):  # pragma: no cover
        raise NotImplementedError(f"relay.contrib.sqlalchemy does not run {query_name!r}")
    # Typed binds: a NULL business key, traceparent or available_at is still sent with a type.
    binds: list[BindParameter[Any]] = [
        bindparam("operation_key", type_=Text()),
        bindparam("effect_type", type_=Text()),
        bindparam("payload", type_=Text()),
        bindparam("business_key", type_=Text()),
        bindparam("traceparent", type_=Text()),
        bindparam("available_at", type_=DateTime(timezone=True)),
    ]
    if query_name == "enqueue":  # the intake's INSERT takes no group
        binds.append(bindparam("ordering_group", type_=Text()))
    return text(query(f"{query_name}_named")).bindparams(*binds)


def _row(row: SARow[Any] | None) -> Row | None:
    return None if row is None else row._asdict()


class _Session:
    """:class:`relay.connector.Connector` on a ``Session`` or ``Connection``."""

    def __init__(self, session: SyncTarget) -> None:
        self.session = session

    def execute_one(self, query_name: str, params: Params) -> Row | None:
        return _row(self.session.execute(_statement(query_name), params).one_or_none())

    def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        """One statement each, in order."""
        statement = _statement(query_name)
        return [_row(self.session.execute(statement, p).one_or_none()) for p in params]


class _AsyncSession:
    """:class:`relay.connector.AsyncConnector` on an ``AsyncSession`` or ``AsyncConnection``."""

    def __init__(self, session: AsyncTarget) -> None:
        self.session = session

    async def execute_one(self, query_name: str, params: Params) -> Row | None:
        result = await self.session.execute(_statement(query_name), params)
        return _row(result.one_or_none())

    async def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        statement = _statement(query_name)
        return [_row((await self.session.execute(statement, p)).one_or_none()) for p in params]


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
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    return connector.enqueue(_Session(session), intent)


def enqueue_many(session: SyncTarget, intents: Iterable[Intent]) -> list[Enqueued]:
    """Every intent checked first, then written in order (one statement each)."""
    return connector.enqueue_many(_Session(session), intents)


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
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    return await connector.enqueue_async(_AsyncSession(session), intent)


async def enqueue_many_async(session: AsyncTarget, intents: Iterable[Intent]) -> list[Enqueued]:
    return await connector.enqueue_many_async(_AsyncSession(session), intents)


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

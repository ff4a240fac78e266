"""Write intents through a bare asyncpg connection, in the caller's ``conn.transaction()``.

asyncpg runs each statement in its own transaction unless the caller opened one: call these
inside ``async with conn.transaction():`` so that the intent commits or rolls back with the rest.
Errors raised by the SQL function arrive as asyncpg exceptions with the relay's SQLSTATEs and
leave as the relay's own exceptions; checks that need no database run first and send nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from relay import connector
from relay.connector import Params, Row
from relay.intents import Enqueued, Intent
from relay.sql import query

__all__ = ["enqueue", "enqueue_many"]


class Fetcher(Protocol):
    """What is used of ``asyncpg.Connection`` (a pool's ``acquire()`` connection fits too)."""

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...


def _args(params: Params) -> tuple[Any, ...]:
    """The parameters in the order of ``enqueue_numbered``'s ``$1...$7``."""
    return (
        params["operation_key"],
        params["effect_type"],
        params["payload"],
        params["business_key"],
        params["traceparent"],
        params["available_at"],
        params["ordering_group"],
    )


class _Asyncpg:
    """:class:`relay.connector.AsyncConnector` on an asyncpg connection; only the enqueue
    statements are offered here, in asyncpg's numbered style (one prepared statement, reused)."""

    def __init__(self, conn: Fetcher) -> None:
        self.conn = conn

    async def execute_one(self, query_name: str, params: Params) -> Row | None:
        if query_name == "enqueue_intake":  # ungrouped: $7 (the group) is not in the statement
            intake: Row | None = await self.conn.fetchrow(
                query("enqueue_intake_numbered"), *_args(params)[:6]
            )
            return intake
        if query_name != "enqueue":  # pragma: no cover - the connector asks for nothing else
            raise NotImplementedError(f"relay.contrib.asyncpg does not run {query_name!r}")
        row: Row | None = await self.conn.fetchrow(query("enqueue_numbered"), *_args(params))
        return row  # an asyncpg Record: read by column name like a mapping

    async def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        return [await self.execute_one(query_name, p) for p in params]


async def enqueue(
    conn: Fetcher,
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    *,
    business_key: str | None = None,
    traceparent: str | None = None,
    available_at: datetime | None = None,
    ordering_group: str | None = None,
) -> Enqueued:
    """:func:`relay.enqueue` on an asyncpg connection."""
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    return await connector.enqueue_async(_Asyncpg(conn), intent)


async def enqueue_many(conn: Fetcher, intents: Iterable[Intent]) -> list[Enqueued]:
    """Every intent checked first, then written in order (one prepared statement, reused)."""
    return await connector.enqueue_many_async(_Asyncpg(conn), intents)

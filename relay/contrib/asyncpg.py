"""Write intents through a bare asyncpg connection, in the caller's ``conn.transaction()``.

asyncpg runs each statement in its own transaction unless the caller opened one: call these
inside ``async with conn.transaction():`` so that the intent commits or rolls back with the rest.
Errors raised by the SQL function arrive as asyncpg exceptions with the relay's SQLSTATEs and
leave as the relay's own exceptions; checks that need no database run first and send nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from relay.contrib._driver import intent_params, many_params, result, translate_errors
from relay.outbox import Enqueued, Intent
from relay.sql import query

__all__ = ["enqueue", "enqueue_many"]


class Fetcher(Protocol):
    """What is used of ``asyncpg.Connection`` (a pool's ``acquire()`` connection fits too)."""

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...


def _args(params: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        params["operation_key"],
        params["effect_type"],
        params["payload"],
        params["business_key"],
        params["traceparent"],
        params["available_at"],
        params["ordering_group"],
    )


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
        row = await conn.fetchrow(query("enqueue_numbered"), *_args(params))
    return result(operation_key, row)


async def enqueue_many(conn: Fetcher, intents: Iterable[Intent]) -> list[Enqueued]:
    """Every intent checked first, then written in order (one prepared statement, reused)."""
    checked = many_params(intents)
    out: list[Enqueued] = []
    with translate_errors():
        for key, params in checked:
            out.append(result(key, await conn.fetchrow(query("enqueue_numbered"), *_args(params))))
    return out

"""Write intents from Django, inside ``transaction.atomic()``, on Django's own connection.

Add ``"relay.contrib.django"`` to ``INSTALLED_APPS`` for ``manage.py relay_migrate``. The
functions work with Django's ``postgresql`` backend on psycopg 3 or psycopg 2. Outside an atomic
block Django is in autocommit mode and the intent is committed at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from relay import connector
from relay.connector import Params, Row
from relay.intents import Enqueued, Intent
from relay.sql import query

__all__ = ["enqueue", "enqueue_many"]


def _row(cur: Any) -> Row | None:
    """The cursor's next row by column name (Django's cursors return tuples)."""
    row = cur.fetchone()
    return None if row is None else dict(zip([c[0] for c in cur.description], row, strict=True))


class _Django:
    """:class:`relay.connector.Connector` on ``connections[using]``, in its current transaction;
    psycopg 3 and psycopg 2 both take the queries' ``%(name)s`` placeholders."""

    def __init__(self, using: str) -> None:
        self.using = using

    def execute_one(self, query_name: str, params: Params) -> Row | None:
        return self.execute_many(query_name, [params])[0]

    def execute_many(self, query_name: str, params: Sequence[Params]) -> list[Row | None]:
        """In order, on one cursor."""
        from django.db import connections

        rows: list[Row | None] = []
        with connections[self.using].cursor() as cur:
            for p in params:
                cur.execute(query(query_name), p)
                rows.append(_row(cur))
        return rows


def enqueue(
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    *,
    business_key: str | None = None,
    traceparent: str | None = None,
    available_at: datetime | None = None,
    ordering_group: str | None = None,
    using: str = "default",
) -> Enqueued:
    """:func:`relay.enqueue` on ``connections[using]``, in its current transaction."""
    intent = Intent(
        effect_type, operation_key, payload, business_key, traceparent, available_at, ordering_group
    )
    return connector.enqueue(_Django(using), intent)


def enqueue_many(intents: Iterable[Intent], *, using: str = "default") -> list[Enqueued]:
    """Every intent checked first, then written in order on one cursor."""
    return connector.enqueue_many(_Django(using), intents)

"""Write intents from Django, inside ``transaction.atomic()``, on Django's own connection.

Add ``"relay.contrib.django"`` to ``INSTALLED_APPS`` for ``manage.py relay_migrate``. The
functions work with Django's ``postgresql`` backend on psycopg 3 or psycopg 2. Outside an atomic
block Django is in autocommit mode and the intent is committed at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from relay.contrib._driver import intent_params, many_params, result, translate_errors
from relay.outbox import Enqueued, Intent
from relay.sql import query

__all__ = ["enqueue", "enqueue_many"]


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
    from django.db import connections

    params = intent_params(
        effect_type,
        operation_key,
        payload,
        business_key,
        traceparent,
        available_at,
        ordering_group,
    )
    with translate_errors(), connections[using].cursor() as cur:
        cur.execute(query("enqueue"), params)
        return result(operation_key, cur.fetchone())


def enqueue_many(intents: Iterable[Intent], *, using: str = "default") -> list[Enqueued]:
    """Every intent checked first, then written in order on one cursor."""
    from django.db import connections

    checked = many_params(intents)
    out: list[Enqueued] = []
    with translate_errors(), connections[using].cursor() as cur:
        for key, params in checked:
            cur.execute(query("enqueue"), params)
            out.append(result(key, cur.fetchone()))
    return out

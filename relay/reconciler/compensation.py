"""Compensations: an extra execution is undone by a new effect, tracked like any other.

A compensation has its own operation key derived from the original (``KEY#compensation``, then
``KEY#compensation-2``...; made by the SQL function ``relay.enqueue_compensation``, and refused
to applications), its own topic and lifecycle, and ``parent_effect_id`` pointing at the effect
it undoes; its payload is the original's plus ``compensates`` and ``compensation`` (built in
SQL, so no payload is ever decoded here). How many are needed is computed from the evidence
(distinct committed external ids, the largest count an observer reported), never from how often
we were asked, so a replayed result or a repeated observation never creates a second
compensation for the same extra.

At most ``MAX_COMPENSATIONS`` are made per effect: an observer answering "a billion executions"
must not enqueue a billion effects in one transaction; above it a person decides.
"""

from __future__ import annotations

from typing import Any

import psycopg

from relay import outbox
from relay.config import Settings
from relay.errors import CompensationLimitError, EffectTypeError
from relay.reconciler.effects import LockedEffect
from relay.sql import query

MAX_COMPENSATIONS = 10


def ensure_compensations(
    conn: psycopg.Connection[Any],
    settings: Settings,
    effect: LockedEffect,
    *,
    actor: str,
    why: str,
    at_least: int = 0,
) -> list[str]:
    """Create the compensations the evidence calls for that do not exist yet; returns their keys.

    Runs in the caller's transaction, with ``effect`` locked. Raises EffectTypeError when the
    type declares no compensation, CompensationLimitError (before creating any) when the evidence
    calls for more than MAX_COMPENSATIONS, and EnqueueError when one cannot be enqueued (then the
    caller's transaction is aborted unless this ran in a savepoint).
    """
    spec = settings.effect_type(effect.effect_type)
    if spec is None or spec.compensation is None:
        raise EffectTypeError(f"effect type {effect.effect_type!r} declares no compensation")
    if at_least > MAX_COMPENSATIONS:  # before the query: it may not even fit its integer
        raise _too_many(effect, at_least)
    row = conn.execute(
        query("compensation_needs"), {"id": effect.id, "at_least": at_least}
    ).fetchone()
    assert row is not None
    extra, existing = int(row[0]), int(row[1])
    if extra > MAX_COMPENSATIONS:
        raise _too_many(effect, extra)
    made: list[str] = []
    for index in range(existing, extra):
        with outbox.translate_errors():
            row = conn.execute(
                query("enqueue_compensation"),
                {
                    "parent_id": effect.id,
                    "index": index,
                    "effect_type": spec.compensation,
                    "reason": f"compensation {index + 1} of {effect.operation_key}: {why}",
                    "actor": actor,
                },
            ).fetchone()
        assert row is not None
        made.append(str(row[1]))
    return made


def _too_many(effect: LockedEffect, extra: int) -> CompensationLimitError:
    return CompensationLimitError(
        f"{extra + 1} executions of {effect.operation_key!r} reported: {extra} compensations "
        f"would be needed, more than the {MAX_COMPENSATIONS} made automatically"
    )

"""The few row operations every part of the reconciler shares: lock an effect, move it."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row

from relay import observability
from relay.config import Settings
from relay.sql import query
from relay.states import EffectState


def reconciler_actor(settings: Settings) -> str:
    return f"reconciler:{settings.replica_id}"


def operator_actor(explicit: str | None = None) -> str:
    """Who decided: ``--actor``, else the login name, else 'operator'."""
    return explicit or os.environ.get("USER") or os.environ.get("LOGNAME") or "operator"


class LockedEffect(NamedTuple):
    """An effect row locked ``FOR UPDATE`` by the current transaction. Without its payload: no
    decision about an effect needs it, and one that cannot be decoded must not stop any. A
    NamedTuple: made twice a result, and a frozen dataclass costs four times more to make."""

    id: int
    operation_key: str
    effect_type: str
    state: EffectState
    attempts: int
    external_id: str | None
    business_key: str | None
    published_offset: int | None
    traceparent: str | None = None  # the request's trace, for the reconciler's spans


def lock_effect(conn: psycopg.Connection[Any], operation_key: str) -> LockedEffect | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("lock_effect"), {"operation_key": operation_key})
        row = cur.fetchone()
    if row is None:
        return None
    return LockedEffect(**{**row, "state": EffectState(row["state"])})


def move(
    conn: psycopg.Connection[Any],
    effect_id: int,
    from_state: EffectState,
    to_state: EffectState,
    *,
    reason: str,
    actor: str,
    attempt: int | None = None,
    external_id: str | None = None,
    delay_s: float = 0.0,
) -> bool:
    """Compare-and-set the state and append the transition (its status event is made from it).

    Returns False when the effect was no longer in ``from_state`` (or at ``attempt``). Every move
    written is counted here, the one place all of the reconciler's moves pass through.
    """
    row = conn.execute(
        query("move_effect"),
        {
            "id": effect_id,
            "from_state": from_state.value,
            "to_state": to_state.value,
            "reason": reason,
            "actor": actor,
            "attempt": attempt,
            "external_id": external_id,
            "delay_s": delay_s,
        },
    ).fetchone()
    if row is None:
        return False
    observability.record_transition(from_state.value, to_state.value)
    return True


def clean_text(value: str | None, limit: int = 4096) -> str | None:
    """PostgreSQL text cannot hold NUL; evidence must be storable whatever a producer sent."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")[:limit]

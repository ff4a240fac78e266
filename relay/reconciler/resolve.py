"""People decide what observation could not: ``relay resolve KEY --confirm|--reject|...``.

Only an UNKNOWN or STUCK effect can be resolved (anything else has an outcome already, or is
still moving). The decision, who made it and why are recorded as a transition and as evidence,
in one transaction with the change and its status event.
"""

from __future__ import annotations

import getpass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.config import Settings
from relay.errors import EffectNotFoundError, InvalidIntentError, InvalidTransitionError
from relay.reconciler.compensation import ensure_compensations
from relay.reconciler.effects import clean_text, lock_effect, move
from relay.sql import query
from relay.states import EffectState


class Decision(StrEnum):
    CONFIRM = "confirm"
    REJECT = "reject"
    REDISPATCH = "redispatch"
    COMPENSATE = "compensate"


RESOLVABLE = (EffectState.UNKNOWN, EffectState.STUCK)
TARGET = {
    Decision.CONFIRM: EffectState.CONFIRMED,
    Decision.REJECT: EffectState.REJECTED,
    Decision.REDISPATCH: EffectState.PENDING,
    # It happened (or may have) and must be undone: the original is done, the compensation is a
    # new effect with its own lifecycle.
    Decision.COMPENSATE: EffectState.CONFIRMED,
}


def os_user() -> str | None:
    """The operating-system user running this command, if it can be told."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def resolve(
    conn: psycopg.Connection[Any],
    settings: Settings,
    operation_key: str,
    decision: Decision,
    *,
    reason: str,
    actor: str,
) -> tuple[EffectState, list[str]]:
    """Apply an operator's decision; returns the new state and any compensation keys made."""
    if not reason.strip():
        raise InvalidIntentError("a resolution needs a reason (--reason)")
    with conn.transaction():
        effect = lock_effect(conn, operation_key)
        if effect is None:
            # An intent without an effect row (not read yet, in a batch, or published in one)
            # is in no state a person resolves: say which.
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query("get_intake_effect"), {"operation_key": operation_key})
                found = cur.fetchone()
            if found is None:
                raise EffectNotFoundError(f"no effect has operation key {operation_key!r}")
            raise InvalidTransitionError(
                f"effect {operation_key!r} is {found['state']}: only an UNKNOWN or STUCK effect "
                "can be resolved"
            )
        if effect.state not in RESOLVABLE:
            raise InvalidTransitionError(
                f"effect {operation_key!r} is {effect.state.value}: only an UNKNOWN or STUCK "
                "effect can be resolved"
            )
        spec = settings.effect_type(effect.effect_type)
        if decision is Decision.COMPENSATE and (spec is None or spec.compensation is None):
            raise InvalidTransitionError(
                f"effect type {effect.effect_type!r} declares no compensation: cannot compensate"
            )
        target = TARGET[decision]
        why = clean_text(f"operator decided to {decision.value}: {reason}") or ""
        conn.execute(
            query("insert_evidence"),
            {
                "kind": "operator",
                "effect_id": effect.id,
                "operation_key": operation_key,
                "outcome": decision.value,
                "external_id": None,
                "observed_count": None,
                "detail": clean_text(reason),
                "attempt": effect.attempts,
                "verdict": "applied",
                "reason": why,
                "actor": actor,
                # The claimed actor is free text: the login (recorded by the database) and the
                # OS user are kept beside it.
                "os_user": os_user(),
            },
        )
        if effect.state is EffectState.UNKNOWN and decision is Decision.CONFIRM:
            # It happened, so its record is in Kafka with the status events that rode in its
            # transaction: the log must not tell that story a second time. (A compensation
            # asserts only that it may have happened: the held events then go, as before.)
            conn.execute(query("told_by_its_transaction"), {"effect_id": effect.id})
        moved = move(conn, effect.id, effect.state, target, reason=why, actor=actor)
        assert moved, "the effect is locked by this transaction"
        made: list[str] = []
        if decision is Decision.COMPENSATE:
            made = ensure_compensations(conn, settings, effect, actor=actor, why=why, at_least=1)
    return target, made

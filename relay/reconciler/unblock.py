"""Ordering groups: what parks a group, and an operator releasing it (``relay unblock``).

A group is parked when its latest effect in a REJECTED, UNKNOWN or STUCK state (not released)
has later effects waiting. Settling that effect (CONFIRMED by a result, an observation or
``relay resolve``) releases the group by itself; ``unblock`` lets it go on without the effect,
which is then never published again, and records who decided and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from relay.errors import EffectNotFoundError, InvalidIntentError, InvalidTransitionError
from relay.reconciler.effects import clean_text
from relay.reconciler.resolve import os_user
from relay.sql import query
from relay.states import EffectState


@dataclass(frozen=True)
class Released:
    """The effect a group was parked behind, and how many effects it held back."""

    operation_key: str
    state: EffectState
    waiting: int


def unblock(
    conn: psycopg.Connection[Any],
    group: str,
    *,
    skip: str | None,
    reason: str,
    actor: str,
) -> Released:
    """Release a parked group. Without ``skip`` only a REJECTED blocker (it provably did not
    happen) is released; an UNKNOWN or STUCK one may have happened, so the operator must name it."""
    if not reason.strip():
        raise InvalidIntentError("releasing a group needs a reason (--reason)")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("group_blocker"), {"group": group})
        row = cur.fetchone()
        if row is None:
            cur.execute(query("group_head"), {"group": group})
            head = cur.fetchone()
            if head is not None and int(head[2]) > 0:
                head_key, due, waiting_behind = head
                raise EffectNotFoundError(
                    f"ordering group {group!r} is not parked, but {waiting_behind} effect(s) wait "
                    f"behind its head {head_key!r}, which is PENDING and not due until "
                    f"{due.isoformat()}: it goes then; cancel it (relay cancel {head_key}) to "
                    "let the others go without it"
                )
            raise EffectNotFoundError(
                f"ordering group {group!r} is not parked: none of its effects is REJECTED, "
                "UNKNOWN or STUCK without having been released"
            )
        effect_id, key, state_text, _why, attempts, waiting = row
        state = EffectState(state_text)
        if skip is None and state is not EffectState.REJECTED:
            raise InvalidTransitionError(
                f"group {group!r} waits behind {key!r}, which is {state.value}: it may have "
                f"happened. Resolve it (relay resolve), or give it up with --skip {key!r}"
            )
        if skip is not None and skip != key:
            raise InvalidTransitionError(
                f"group {group!r} waits behind {key!r} ({state.value}), not {skip!r}"
            )
        verb = "skip" if skip is not None else "release"
        cur.execute(
            query("insert_evidence"),
            {
                "kind": "operator",
                "effect_id": effect_id,
                "operation_key": key,
                "outcome": verb,
                "external_id": None,
                "observed_count": None,
                "detail": clean_text(reason),
                "attempt": attempts,
                "verdict": "applied",
                "reason": clean_text(
                    f"operator released ordering group {group} from this {state.value} effect "
                    f"({waiting} waiting): {reason}"
                ),
                "actor": actor,
                "os_user": os_user(),
            },
        )
        cur.execute(query("release_group"), {"id": effect_id})
    return Released(key, state, int(waiting))

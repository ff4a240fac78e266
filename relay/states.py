"""Effect states and the transitions the design allows between them."""

from __future__ import annotations

from enum import StrEnum


class EffectState(StrEnum):
    PENDING = "PENDING"
    DISPATCHING = "DISPATCHING"
    PUBLISHED = "PUBLISHED"
    CONFIRMED = "CONFIRMED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"
    STUCK = "STUCK"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({EffectState.CONFIRMED, EffectState.REJECTED, EffectState.CANCELLED})

ALLOWED_TRANSITIONS: dict[EffectState, frozenset[EffectState]] = {
    EffectState.PENDING: frozenset(
        {
            EffectState.DISPATCHING,
            EffectState.CANCELLED,
            # Re-dispatch waiting, and the downstream's result of an earlier attempt arrives late:
            # it happened (or was refused) after all, so no new attempt is made.
            EffectState.CONFIRMED,
            EffectState.REJECTED,
        }
    ),
    EffectState.DISPATCHING: frozenset(
        {
            EffectState.PUBLISHED,
            EffectState.REJECTED,
            EffectState.UNKNOWN,
            # Released on shutdown, or never handed to the Kafka client (provably not sent).
            EffectState.PENDING,
        }
    ),
    EffectState.PUBLISHED: frozenset(
        {EffectState.CONFIRMED, EffectState.REJECTED, EffectState.UNKNOWN}
    ),
    EffectState.UNKNOWN: frozenset(
        {
            EffectState.PUBLISHED,
            EffectState.CONFIRMED,
            EffectState.REJECTED,
            EffectState.PENDING,
            EffectState.STUCK,
        }
    ),
    EffectState.STUCK: frozenset(
        {EffectState.CONFIRMED, EffectState.REJECTED, EffectState.PENDING}
    ),
    # Final, but for one case. CONFIRMED says "happened exactly once"; a second execution that
    # cannot be compensated (no compensation declared, the payload cannot make one, too many
    # reported) proves otherwise. A person must undo it, and STUCK is how a person is asked;
    # `relay resolve --confirm` ends it.
    EffectState.CONFIRMED: frozenset({EffectState.STUCK}),
    # Final, but for one case: REJECTED says "did not happen", and the downstream then reports
    # a commit. A person decides.
    EffectState.REJECTED: frozenset({EffectState.STUCK}),
    EffectState.CANCELLED: frozenset(),
}


def is_allowed(source: EffectState, target: EffectState) -> bool:
    return target in ALLOWED_TRANSITIONS[source]

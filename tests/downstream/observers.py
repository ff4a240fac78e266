"""A Python observer for the tests, named by import path in an effect type's config."""

from __future__ import annotations

from relay.reconciler.observers import Observation, ObservedEffect

ANSWERS: dict[str, Observation | str] = {}
ASKED: list[str] = []


def observe(effect: ObservedEffect) -> Observation | str:
    """Answer what the test put in ANSWERS for the operation key; raise when it put nothing."""
    ASKED.append(effect.operation_key)
    return ANSWERS[effect.operation_key]

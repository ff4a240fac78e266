"""A Python observer for the tests, named by import path in an effect type's config."""

from __future__ import annotations

import threading

from relay.reconciler.observers import Observation, ObservedEffect

ANSWERS: dict[str, Observation | str] = {}
ASKED: list[str] = []
HOLD: dict[str, threading.Event] = {}  # an observer that hangs until the test sets the event


def observe(effect: ObservedEffect) -> Observation | str:
    """Answer what the test put in ANSWERS for the operation key; raise when it put nothing."""
    ASKED.append(effect.operation_key)
    hold = HOLD.get(effect.operation_key)
    if hold is not None:
        hold.wait(60)
    return ANSWERS[effect.operation_key]

"""relay/states.py: the transition table."""

from __future__ import annotations

from relay.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, EffectState, is_allowed


def test_terminal_states_lead_nowhere() -> None:
    for state in TERMINAL_STATES:
        # An extra execution that cannot be compensated; a commit reported for a rejection.
        if state in (EffectState.CONFIRMED, EffectState.REJECTED):
            assert ALLOWED_TRANSITIONS[state] == {EffectState.STUCK}
        else:
            assert not ALLOWED_TRANSITIONS[state]
    assert not is_allowed(EffectState.UNKNOWN, EffectState.DISPATCHING)
    assert is_allowed(EffectState.DISPATCHING, EffectState.UNKNOWN)


def test_late_results_may_settle_a_waiting_redispatch() -> None:
    assert is_allowed(EffectState.PENDING, EffectState.CONFIRMED)
    assert not is_allowed(EffectState.CONFIRMED, EffectState.PENDING)

"""The result rules as pure functions: which result, in which state, gives which verdict and move.

(How they are written, in a batch or one by one, and their compensations are tested against the
real database in tests/integration/test_reconciler_results.py and its neighbours.)
"""

from __future__ import annotations

import itertools

import pytest

from relay.messages import ResultMessage, ResultOutcome
from relay.reconciler.effects import LockedEffect
from relay.reconciler.results import (
    QUARANTINED,
    Decision,
    Move,
    Verdict,
    decide,
    misrouting,
    move_waves,
)
from relay.states import EffectState, is_allowed

S = EffectState
COMMITTED, REJECTED, UNKNOWN = (
    ResultOutcome.COMMITTED,
    ResultOutcome.REJECTED,
    ResultOutcome.UNKNOWN,
)


def effect(state: EffectState, attempts: int = 1, external_id: str | None = None) -> LockedEffect:
    return LockedEffect(
        id=7,
        operation_key="k",
        effect_type="wire",
        state=state,
        attempts=attempts,
        external_id=external_id,
        business_key=None,
        published_offset=3,
    )


def result(
    outcome: ResultOutcome, external_id: str | None = None, detail: str | None = None
) -> ResultMessage:
    return ResultMessage(operation_key="k", outcome=outcome, external_id=external_id, detail=detail)


def test_a_published_effect_moves_as_the_downstream_says() -> None:
    committed = decide(effect(S.PUBLISHED), result(COMMITTED, "bank-1", "booked"))
    assert committed == Decision(
        Verdict("applied", "downstream committed as bank-1: booked", 7, 1),
        Move(7, S.PUBLISHED, S.CONFIRMED, "downstream committed as bank-1: booked", "bank-1"),
    )
    rejected = decide(effect(S.PUBLISHED, attempts=2), result(REJECTED, detail="no funds"))
    assert rejected == Decision(
        Verdict("applied", "downstream rejected: no funds", 7, 2),
        Move(7, S.PUBLISHED, S.REJECTED, "downstream rejected: no funds"),
    )
    unknown = decide(effect(S.PUBLISHED), result(UNKNOWN))
    assert unknown.move == Move(7, S.PUBLISHED, S.UNKNOWN, "downstream does not know the outcome")
    assert unknown.name == "applied"


@pytest.mark.parametrize("state", [S.UNKNOWN, S.STUCK, S.PENDING])
def test_an_undecided_or_waiting_effect_takes_a_commit_or_a_rejection(state: EffectState) -> None:
    assert decide(effect(state), result(COMMITTED)).move == Move(
        7, state, S.CONFIRMED, "downstream committed"
    )
    assert decide(effect(state), result(REJECTED)).move == Move(
        7, state, S.REJECTED, "downstream rejected"
    )
    ignored = decide(effect(state), result(UNKNOWN))
    assert (ignored.name, ignored.move) == ("ignored", None)
    assert ignored.verdict.reason == f"'unknown' adds nothing to an effect already {state.value}"


def test_results_that_come_too_early_wait() -> None:
    early = decide(effect(S.DISPATCHING), result(COMMITTED))
    assert early == Decision(
        Verdict("deferred", "the relay has not recorded the publication yet", 7, 1)
    )
    behind = decide(effect(S.PUBLISHED), result(COMMITTED), waits_behind=True)
    assert behind == Decision(
        Verdict("deferred", "an earlier result of this effect waits to be applied first", 7, 1)
    )


def test_results_without_an_attempted_effect_are_orphaned() -> None:
    assert decide(None, result(COMMITTED)) == Decision(
        Verdict("orphaned", "no effect has this operation key")
    )
    never = decide(effect(S.PENDING, attempts=0), result(COMMITTED))
    assert never == Decision(Verdict("orphaned", "the effect was never attempted", 7, 0))


def test_a_confirmed_effect_only_hears_repeats_or_a_second_execution() -> None:
    confirmed = effect(S.CONFIRMED, external_id="bank-1")
    assert decide(confirmed, result(COMMITTED, "bank-1")) == Decision(
        Verdict("repeated", "the same commit reported again", 7, 1)
    )
    assert decide(confirmed, result(COMMITTED)).name == "repeated"
    second = decide(confirmed, result(COMMITTED, "bank-2"))
    assert second.name == "conflicting" and second.move is None
    assert "external id bank-2" in second.verdict.reason and "compensated" in second.verdict.reason
    for outcome in (REJECTED, UNKNOWN):
        late = decide(confirmed, result(outcome))
        assert late == Decision(
            Verdict("late", f"'{outcome.value}' for an effect already CONFIRMED", 7, 1)
        )


def test_a_confirmed_effect_without_an_external_id_adopts_the_first_reported() -> None:
    adopted = decide(effect(S.CONFIRMED), result(COMMITTED, "bank-9"))
    assert adopted == Decision(
        Verdict("repeated", "confirms the CONFIRMED effect; external id bank-9", 7, 1),
        adopt_external_id="bank-9",
    )


def test_a_commit_of_a_rejected_effect_goes_to_a_person() -> None:
    found = decide(effect(S.REJECTED), result(COMMITTED, "bank-3"))
    assert found.name == "conflicting"
    assert found.move is not None
    assert (found.move.from_state, found.move.to_state) == (S.REJECTED, S.STUCK)
    assert found.move.external_id == "bank-3"
    assert "committed as bank-3 an effect recorded REJECTED" in found.verdict.reason


FINISHED = [(S.REJECTED, REJECTED), (S.REJECTED, UNKNOWN), (S.CANCELLED, COMMITTED)]


@pytest.mark.parametrize(("state", "outcome"), [*FINISHED, (S.CANCELLED, UNKNOWN)])
def test_finished_effects_take_no_more_results(state: EffectState, outcome: ResultOutcome) -> None:
    late = decide(effect(state), result(outcome))
    assert late == Decision(
        Verdict("late", f"'{outcome.value}' for an effect already {state.value}", 7, 1)
    )


def test_an_uncompensated_extra_execution_is_left_to_the_person_undoing_it() -> None:
    stuck = effect(S.STUCK, external_id="bank-1")
    assert decide(stuck, result(COMMITTED, "bank-1")).name == "repeated"
    assert decide(stuck, result(REJECTED)).verdict.reason == (
        "'rejected' for an effect confirmed as bank-1"
    )
    another = decide(stuck, result(COMMITTED, "bank-2"))
    assert (another.name, another.move) == ("conflicting", None)


def test_text_from_the_downstream_is_kept_storable() -> None:
    found = decide(effect(S.PUBLISHED), result(COMMITTED, "a\x00b"))
    assert found.move is not None and found.move.external_id == "a\ufffdb"
    assert found.verdict.reason == "downstream committed as a\ufffdb"


def test_every_move_is_one_the_design_allows() -> None:
    for state, outcome, extra, waits in itertools.product(
        S, ResultOutcome, (None, "bank-1", "bank-2"), (False, True)
    ):
        for known in (None, "bank-1"):
            found = decide(
                effect(state, external_id=known), result(outcome, extra), waits_behind=waits
            )
            assert found.verdict.effect_id == 7
            if found.move is not None:
                assert found.move.from_state is state
                assert is_allowed(state, found.move.to_state), (state, found.move)
                assert found.name in {"applied", "conflicting"}
            if found.name in QUARANTINED - {"conflicting"} or found.name == "deferred":
                assert found.move is None and found.adopt_external_id is None


def test_a_result_on_another_types_topic_is_misrouted() -> None:
    wire = effect(S.PUBLISHED)
    assert misrouting(wire, "wire-results", "wire-results") is None
    found = misrouting(wire, "wire-results", "ship-results")
    assert found is not None and found.move is None
    assert found.verdict == Verdict(
        "misrouted",
        "arrived on 'ship-results', but effect type 'wire' has its result topic 'wire-results'",
        7,
        1,
    )
    fire_and_forget = misrouting(wire, None, "ship-results")
    assert fire_and_forget is not None and "has no result topic" in fire_and_forget.verdict.reason
    assert "misrouted" in QUARANTINED


def test_an_effects_moves_are_written_in_order_one_wave_each() -> None:
    def move(effect_id: int, reason: str) -> Move:
        return Move(effect_id, S.PUBLISHED, S.CONFIRMED, reason)

    moves = [move(1, "a"), move(2, "b"), move(1, "c"), move(1, "d"), move(3, "e"), move(2, "f")]
    waves = move_waves(moves)
    assert [[m.reason for m in wave] for wave in waves] == [["a", "b", "e"], ["c", "f"], ["d"]]
    for wave in waves:
        assert len({m.effect_id for m in wave}) == len(wave)
    assert move_waves([]) == []
    many = [move(i, str(i)) for i in range(5000)]
    assert move_waves(many) == [many]

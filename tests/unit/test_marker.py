"""The marker's decisions (relay/dispatch/marker.py), as plain functions: no database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.config import Settings
from relay.dispatch.marker import (
    gave_up,
    not_sent_delay,
    quiet_batch_statement,
    quiet_batches,
    reason_of,
    state_after,
    written,
)
from relay.dispatch.outcomes import AttemptOutcome
from relay.dispatch.publisher import ClaimedEffect, PublishResult
from relay.dispatch.stage import Identity
from relay.states import EffectState

SETTINGS = Settings(max_publish_attempts=3, not_sent_backoff_s=1.0, not_sent_backoff_max_s=8.0)


def result(
    outcome: AttemptOutcome,
    *,
    attempt: int = 1,
    reason: str | None = "why",
    suspect: bool = True,
    effect_id: int = 1,
) -> PublishResult:
    effect = ClaimedEffect(
        effect_id,
        f"op-{effect_id}",
        f"op-{effect_id}",
        "wire",
        "wires",
        "{}",
        None,
        None,
        attempt,
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    return PublishResult(effect, outcome, reason, suspect=suspect)


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        (AttemptOutcome.ACKED, EffectState.PUBLISHED),
        (AttemptOutcome.REJECTED, EffectState.REJECTED),
        (AttemptOutcome.UNKNOWN, EffectState.UNKNOWN),
        (AttemptOutcome.NOT_SENT, EffectState.PENDING),
        (AttemptOutcome.RELEASED, EffectState.PENDING),
        (AttemptOutcome.ABORTED, EffectState.PENDING),
    ],
)
def test_the_state_after_each_outcome(outcome: AttemptOutcome, state: EffectState) -> None:
    assert state_after(SETTINGS, result(outcome)) is state


def test_attempts_that_published_nothing_give_up_at_the_last_allowed_attempt() -> None:
    for outcome in (AttemptOutcome.NOT_SENT, AttemptOutcome.ABORTED):
        assert not gave_up(SETTINGS, result(outcome, attempt=2))
        assert state_after(SETTINGS, result(outcome, attempt=2)) is EffectState.PENDING
        assert gave_up(SETTINGS, result(outcome, attempt=3))
        assert state_after(SETTINGS, result(outcome, attempt=3)) is EffectState.REJECTED


def test_only_suspects_of_a_retriable_outcome_give_up() -> None:
    # An innocent record of an aborted transaction, and one given back unsent, go again forever.
    assert not gave_up(SETTINGS, result(AttemptOutcome.ABORTED, attempt=9, suspect=False))
    assert not gave_up(SETTINGS, result(AttemptOutcome.RELEASED, attempt=9, suspect=False))
    # Outcomes that end the attempt otherwise never "give up".
    assert not gave_up(SETTINGS, result(AttemptOutcome.UNKNOWN, attempt=9))
    assert state_after(SETTINGS, result(AttemptOutcome.UNKNOWN, attempt=9)) is EffectState.UNKNOWN
    assert state_after(SETTINGS, result(AttemptOutcome.ACKED, attempt=9)) is EffectState.PUBLISHED


def test_the_reason_says_when_retries_gave_up() -> None:
    assert reason_of(SETTINGS, result(AttemptOutcome.NOT_SENT, attempt=1, reason="no leader")) == (
        "no leader"
    )
    assert reason_of(SETTINGS, result(AttemptOutcome.NOT_SENT, attempt=3, reason="no leader")) == (
        "gave up after 3 attempts that published nothing; last: no leader"
    )
    assert reason_of(SETTINGS, result(AttemptOutcome.ACKED, reason=None)) is None


def test_the_reason_holds_no_nul_character() -> None:
    stored = reason_of(SETTINGS, result(AttemptOutcome.REJECTED, reason="bad\x00byte"))
    assert stored == "bad\ufffdbyte"


def test_not_sent_delay_doubles_per_attempt_with_jitter_up_to_its_cap() -> None:
    def low(a: float, b: float) -> float:
        return a

    def high(a: float, b: float) -> float:
        return b

    def attempt(n: int) -> PublishResult:
        return result(AttemptOutcome.NOT_SENT, attempt=n)

    assert not_sent_delay(SETTINGS, attempt(1), low) == pytest.approx(0.5)
    assert not_sent_delay(SETTINGS, attempt(1), high) == pytest.approx(1.5)
    assert not_sent_delay(SETTINGS, attempt(3), high) == pytest.approx(6.0)  # 1 s x 2^2 x 1.5
    assert not_sent_delay(SETTINGS, attempt(40), high) == pytest.approx(12.0)  # 8 s cap x 1.5
    for _ in range(50):  # the default jitter stays within half to one and a half
        assert 2.0 <= not_sent_delay(SETTINGS, attempt(3)) <= 6.0


def test_no_delay_for_innocents_and_outcomes_that_are_not_retried() -> None:
    innocent = result(AttemptOutcome.ABORTED, attempt=2, suspect=False)
    assert not_sent_delay(SETTINGS, innocent) == 0.0
    for outcome in (AttemptOutcome.ACKED, AttemptOutcome.REJECTED, AttemptOutcome.UNKNOWN):
        assert not_sent_delay(SETTINGS, result(outcome, attempt=2)) == 0.0


def test_written_counts_only_the_rows_really_marked() -> None:
    results = [
        result(AttemptOutcome.ACKED, effect_id=10),
        result(AttemptOutcome.ACKED, effect_id=11),
        result(AttemptOutcome.UNKNOWN, effect_id=12),
    ]
    # Effect 11 lost its lease: compare-and-set skipped it.
    counts = written(results, ["PUBLISHED", "PUBLISHED", "UNKNOWN"], [10, 12])
    assert counts == {"PUBLISHED": 1, "UNKNOWN": 1}
    assert written(results, ["PUBLISHED", "PUBLISHED", "UNKNOWN"], []) == {}


def _in_batch(
    effect_type: str, batch: int, effect_id: int, outcome: AttemptOutcome
) -> PublishResult:
    effect = ClaimedEffect(
        effect_id,
        f"op-{effect_id}",
        f"op-{effect_id}",
        effect_type,
        "t",
        "{}",
        None,
        None,
        1,
        datetime(2026, 1, 1, tzinfo=UTC),
        batch=batch,
    )
    acked = outcome is AttemptOutcome.ACKED
    return PublishResult(effect, outcome, "why", 0 if acked else None, effect_id if acked else None)


def test_a_batch_is_quiet_only_whole_acknowledged_and_awaiting_nothing() -> None:
    quiet = Settings.model_validate(
        {
            "status_events": False,
            "effect_types": {
                "email": {"topic": "emails", "idempotent": True},
                "wire": {"topic": "wires", "idempotent": True, "result_topic": "wire-results"},
            },
        }
    )
    results = [
        _in_batch("email", 1, 1, AttemptOutcome.ACKED),
        _in_batch("email", 1, 2, AttemptOutcome.ACKED),
        _in_batch("email", 2, 3, AttemptOutcome.ACKED),
        _in_batch("email", 2, 4, AttemptOutcome.UNKNOWN),  # spoils batch 2
        _in_batch("wire", 3, 5, AttemptOutcome.ACKED),  # awaits a result
        _in_batch("undeclared", 4, 6, AttemptOutcome.ACKED),
        result(AttemptOutcome.ACKED, effect_id=7),  # a claimed row, no batch
    ]
    found = quiet_batches(quiet, results)
    assert {b: [r.effect.id for r in m] for b, m in found.items()} == {1: [1, 2]}
    # With status events on, a batch is quiet only when every intent's events rode in its
    # Kafka transaction; otherwise its transitions are published from their rows.
    loud = quiet.model_copy(update={"status_events": True})
    assert quiet_batches(loud, results) == {}
    in_txn = [r._replace(effect=r.effect._replace(status_in_txn=r.effect.id != 2)) for r in results]
    assert quiet_batches(loud, in_txn) == {}  # intent 2's events went through the log
    in_txn[1] = in_txn[1]._replace(effect=in_txn[1].effect._replace(status_in_txn=True))
    assert {b: [r.effect.id for r in m] for b, m in quiet_batches(loud, in_txn).items()} == {
        1: [1, 2]
    }


def test_a_quiet_batch_of_one_type_takes_the_statement_without_per_intent_work() -> None:
    who = Identity("r", 7)
    # Out of id order on purpose: the arrays go in id order, side by side.
    members = [_in_batch("email", 3, i, AttemptOutcome.ACKED) for i in (12, 10, 11)]
    placed = zip(members, (2, 0, 1), strict=True)
    members = [m._replace(partition=p, offset=100 + p) for m, p in placed]
    name, params = quiet_batch_statement(who, 3, members)
    assert name == "mark_quiet_batch_of_one_type"
    assert (params["effect_type"], params["owner"], params["epoch"], params["batch"]) == (
        "email",
        "r",
        7,
        3,
    )
    assert (params["ids"], params["partitions"], params["offsets"]) == (
        "{10,11,12}",
        "{0,1,2}",
        "{100,101,102}",
    )
    assert "types" not in params
    mixed = [*members, _in_batch("sms", 3, 9, AttemptOutcome.ACKED)]
    name, params = quiet_batch_statement(who, 3, mixed)
    assert name == "mark_quiet_batch"
    assert (params["ids"], params["types"]) == (
        "{9,10,11,12}",
        '{"sms","email","email","email"}',
    )
    assert "effect_type" not in params

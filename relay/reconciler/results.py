"""What a downstream result does to its effect: pure rules, and one way of writing what they say.

The rules (:func:`decide`) take the effect as locked (or none), the result, and whether an
earlier result of the same effect still waits, and return a :class:`Decision`: the verdict kept
on the evidence row and what to write for it (a :class:`Move`, or the downstream's id of a
CONFIRMED effect's execution), as data. :func:`apply_results` is the only route from stored
results to state changes, for a batch of records as for one (a record retried alone, a result
that waited): it locks the effects up front, decides in arrival order on its own up-to-date copy
of each effect, and writes the moves and verdicts together. A second execution (another commit
of a CONFIRMED effect) is compensated at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg

from relay import observability, tracing
from relay.config import Settings
from relay.errors import RelayError
from relay.messages import ResultMessage, ResultOutcome
from relay.reconciler.compensation import ensure_compensations
from relay.reconciler.effects import LockedEffect, clean_text, lock_effect, move
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)

_STATES = {state.value: state for state in EffectState}
QUARANTINED = frozenset({"malformed", "orphaned", "conflicting", "late", "misrouted"})
ORPHANED = "no effect has this operation key"
WAITS_BEHIND = "an earlier result of this effect waits to be applied first"


class Verdict(NamedTuple):
    """What became of a result, as its evidence row keeps it. (This module's value types are
    NamedTuples: several are made for every result, and a frozen dataclass costs four times
    more to make.)"""

    verdict: str
    reason: str
    effect_id: int | None = None
    attempt: int | None = None


class Move(NamedTuple):
    """A state change a result calls for: compare-and-set on ``from_state``."""

    effect_id: int
    from_state: EffectState
    to_state: EffectState
    reason: str
    external_id: str | None = None


class Decision(NamedTuple):
    """A rule's answer: the verdict, and what to write for it (at most one of a move and an
    external id the CONFIRMED effect adopts)."""

    verdict: Verdict
    move: Move | None = None
    adopt_external_id: str | None = None

    @property
    def name(self) -> str:
        return self.verdict.verdict


def misrouting(effect: LockedEffect, result_topic: str | None, topic: str) -> Decision | None:
    """A result changes an effect only when it arrives on its type's result topic: one topic's
    producers must not confirm (or reject) another type's effects. None when it is in place."""
    if topic == result_topic:
        return None
    expected = f"its result topic {result_topic!r}" if result_topic else "no result topic"
    why = f"arrived on {topic!r}, but effect type {effect.effect_type!r} has {expected}"
    return Decision(Verdict("misrouted", why, effect.id, effect.attempts))


def decide(
    effect: LockedEffect | None, message: ResultMessage, *, waits_behind: bool = False
) -> Decision:
    """What ``message`` does to ``effect`` in its state; pure.

    ``waits_behind``: an earlier result of the effect is still deferred, so this one is deferred
    too (the downstream's results of one effect are applied in the order they arrived).
    """
    if effect is None:
        return Decision(Verdict("orphaned", ORPHANED))
    state, outcome = effect.state, message.outcome
    ext = clean_text(message.external_id, 512)

    def verdict(name: str, reason: str) -> Decision:
        return Decision(Verdict(name, reason, effect.id, effect.attempts))

    def moved(
        to_state: EffectState, name: str, reason: str, external_id: str | None = None
    ) -> Decision:
        step = Move(effect.id, state, to_state, reason, external_id)
        return Decision(Verdict(name, reason, effect.id, effect.attempts), step)

    if waits_behind:
        return verdict("deferred", WAITS_BEHIND)
    if state is EffectState.DISPATCHING:
        return verdict("deferred", "the relay has not recorded the publication yet")
    if state is EffectState.PENDING and effect.attempts == 0:
        return verdict("orphaned", "the effect was never attempted")
    if state is EffectState.CONFIRMED:
        if outcome is not ResultOutcome.COMMITTED:
            return verdict("late", f"'{outcome.value}' for an effect already CONFIRMED")
        if ext is not None and effect.external_id is None:
            why = f"confirms the CONFIRMED effect; external id {ext}"
            return verdict("repeated", why)._replace(adopt_external_id=ext)
        if ext is None or ext == effect.external_id:
            return verdict("repeated", "the same commit reported again")
        return verdict(
            "conflicting",
            f"a second commit (external id {ext}) of an effect CONFIRMED as "
            f"{effect.external_id}: the extra execution is compensated",
        )
    if state is EffectState.REJECTED and outcome is ResultOutcome.COMMITTED:
        # REJECTED told the application "this did not happen"; the downstream now says it did.
        why = (
            "downstream committed" + (f" as {ext}" if ext else "") + " an effect recorded "
            "REJECTED: it may have happened after all; a person decides"
        )
        return moved(EffectState.STUCK, "conflicting", why, ext)
    if state in (EffectState.REJECTED, EffectState.CANCELLED):
        return verdict("late", f"'{outcome.value}' for an effect already {state.value}")
    if state is EffectState.STUCK and effect.external_id is not None:
        # Only an extra execution that could not be compensated leaves a confirmed effect STUCK:
        # a person is undoing it, so nothing more happens automatically (nor is it CONFIRMED).
        if outcome is not ResultOutcome.COMMITTED:
            return verdict(
                "late", f"'{outcome.value}' for an effect confirmed as {effect.external_id}"
            )
        if ext is None or ext == effect.external_id:
            return verdict("repeated", "the same commit reported again")
        return verdict(
            "conflicting",
            f"another commit (external id {ext}) of an effect STUCK after an extra execution: "
            "a person decides",
        )

    detail = f": {message.detail}" if message.detail else ""
    if outcome is ResultOutcome.COMMITTED:
        why = "downstream committed" + (f" as {ext}" if ext else "") + detail
        return moved(EffectState.CONFIRMED, "applied", why, ext)
    if outcome is ResultOutcome.REJECTED:
        return moved(EffectState.REJECTED, "applied", f"downstream rejected{detail}")
    if state is EffectState.PUBLISHED:
        why = f"downstream does not know the outcome{detail}"
        return moved(EffectState.UNKNOWN, "applied", why)
    return verdict("ignored", f"'unknown' adds nothing to an effect already {state.value}")


class StoredResult(NamedTuple):
    """A result whose evidence row is written; its verdict is still to come."""

    evidence_id: int
    message: ResultMessage
    topic: str | None = None  # where it arrived; None: not from Kafka (not checked)


def apply_results(
    conn: psycopg.Connection[Any], settings: Settings, actor: str, stored: Sequence[StoredResult]
) -> list[Verdict]:
    """Decide ``stored`` in arrival order and write the moves and verdicts, in the caller's
    transaction; returns the verdicts (also written on the evidence rows).

    A result waits behind (is deferred after) an earlier result of its effect that still waits:
    one stored before and not among ``stored``, or one deferred in this call. A conflicting
    result writes what came before it and is compensated at once.
    """
    if not stored:
        return []
    writer = _Writer.lock(conn, settings, stored)
    verdicts: list[Verdict] = []
    applied: Counter[str] = Counter()
    quarantined: Counter[str] = Counter()
    for item in stored:
        decision = writer.decide(item)
        writer.add(item.evidence_id, decision)
        found = decision.verdict
        if found.verdict == "conflicting":
            # The compensation counts the evidence: write everything so far first.
            key = item.message.operation_key
            writer.write(conn, actor)
            reason = compensate_conflict(conn, settings, key, actor, found.reason)
            found = found._replace(reason=reason)
            writer.add(item.evidence_id, Decision(found))
            writer.reload(conn, key)
        if found.verdict == "applied":
            applied[item.message.outcome.value] += 1
        elif found.verdict in QUARANTINED:
            quarantined[found.verdict] += 1
        verdicts.append(found)
    writer.write(conn, actor)
    for outcome, count in applied.items():
        observability.record_result(outcome, count)
    for reason, count in quarantined.items():
        observability.record_quarantined(reason, count)
    return verdicts


def move_waves(moves: Sequence[Move]) -> list[list[Move]]:
    """The moves in waves that each name an effect at most once, in order: a move goes to the
    first wave without its effect, so an effect's second move is written after its first."""
    waves: list[tuple[list[Move], set[int]]] = []
    for m in moves:
        for wave, ids in waves:
            if m.effect_id not in ids:
                wave.append(m)
                ids.add(m.effect_id)
                break
        else:
            waves.append(([m], {m.effect_id}))
    return [wave for wave, _ in waves]


@dataclass
class _Writer:
    """What :func:`apply_results` knows without asking again: its effects, locked up front and
    kept up to date as its decisions change them; which effects have a result waiting; and what
    to write together."""

    settings: Settings
    effects: dict[str, LockedEffect]
    waiting: dict[int, int]  # effect id -> its first deferred evidence id outside this call
    deferred: set[int] = field(default_factory=set)  # effects deferred during this call
    keys: dict[int, str] = field(default_factory=dict)  # effect id -> its key in ``effects``
    traced: bool = False  # spans are recorded (asked once a call: a span costs a few us)
    moves: list[Move] = field(default_factory=list)
    adopted: list[tuple[int, str]] = field(default_factory=list)
    finished: list[tuple[int, Verdict]] = field(default_factory=list)

    @classmethod
    def lock(
        cls, conn: psycopg.Connection[Any], settings: Settings, stored: Sequence[StoredResult]
    ) -> _Writer:
        # A key with NUL cannot be sent to PostgreSQL, nor be any effect's: orphaned.
        keys = sorted(
            {s.message.operation_key for s in stored if "\x00" not in s.message.operation_key}
        )
        effects: dict[str, LockedEffect] = {}
        # Intents claimed in a batch whose outcome is not recorded have no effect row yet:
        # DISPATCHING, so their results wait; those of a published batch have none at all.
        # Asked first, so that a row written meanwhile is found by the lock after it, and wins.
        # Each statement returns LockedEffect's fields in order (one constructor call a row).
        for name in ("batch_effects", "published_effects", "lock_effects"):
            for row in conn.execute(query(name), {"keys": keys}).fetchall():
                effects[row[1]] = LockedEffect(
                    row[0], row[1], row[2], _STATES[row[3]], row[4], *row[5:9]
                )
        rows = conn.execute(
            query("effects_with_deferred"),
            {
                "ids": [e.id for e in effects.values()],
                "applying": [s.evidence_id for s in stored],
            },
        ).fetchall()
        return cls(
            settings,
            effects,
            {int(r[0]): int(r[1]) for r in rows},
            keys={e.id: key for key, e in effects.items()},
            traced=tracing.enabled(),
        )

    def decide(self, item: StoredResult) -> Decision:
        effect = self.effects.get(item.message.operation_key)
        if effect is None:
            return decide(None, item.message)
        spec = self.settings.effect_type(effect.effect_type)
        if item.topic is not None and spec is not None:
            misrouted = misrouting(effect, spec.result_topic, item.topic)
            if misrouted is not None:
                return misrouted
        waits = (
            effect.id in self.deferred
            or self.waiting.get(effect.id, item.evidence_id) < item.evidence_id
        )
        if not self.traced:
            return decide(effect, item.message, waits_behind=waits)
        ref = tracing.EffectRef(effect.operation_key, effect.id, effect.traceparent)
        outcome = {"relay.result.outcome": item.message.outcome.value}
        with tracing.span("relay.apply_result", [ref], outcome, kind="CONSUMER") as span:
            decision = decide(effect, item.message, waits_behind=waits)
            span.set_attribute("relay.verdict", decision.name)
        return decision

    def add(self, evidence_id: int, decision: Decision) -> None:
        """Collect what ``decision`` writes, and apply it to this call's copy of its effect."""
        found = decision.verdict
        self.finished.append((evidence_id, found))
        if found.effect_id is None:
            return
        if found.verdict == "deferred":
            self.deferred.add(found.effect_id)
        if decision.move is not None:
            m = decision.move
            self.moves.append(m)
            self._change(m.effect_id, state=m.to_state, external_id=m.external_id)
        if decision.adopt_external_id is not None:
            self.adopted.append((found.effect_id, decision.adopt_external_id))
            self._change(found.effect_id, external_id=decision.adopt_external_id)

    def _change(
        self, effect_id: int, *, state: EffectState | None = None, external_id: str | None
    ) -> None:
        key = self.keys.get(effect_id)
        effect = self.effects.get(key) if key is not None else None
        if key is None or effect is None or effect.id != effect_id:
            return  # not an effect of this call (or its key now holds another, reloaded)
        self.effects[key] = LockedEffect(  # positional: _replace costs twice as much
            effect.id,
            effect.operation_key,
            effect.effect_type,
            effect.state if state is None else state,
            effect.attempts,
            external_id or effect.external_id,
            effect.business_key,
            effect.published_offset,
            effect.traceparent,
        )

    def reload(self, conn: psycopg.Connection[Any], operation_key: str) -> None:
        effect = lock_effect(conn, operation_key)
        if effect is not None:
            self.effects[operation_key] = effect
            self.keys[effect.id] = operation_key

    def write(self, conn: psycopg.Connection[Any], actor: str) -> None:
        """Write what was collected: the moves one statement per wave (an effect moved twice
        has its second move in the second wave), the adopted ids, the verdicts in one."""
        waves = move_waves(self.moves)
        for wave in waves:
            rows = conn.execute(
                query("move_effects"),
                {
                    "ids": [m.effect_id for m in wave],
                    "from_states": [m.from_state.value for m in wave],
                    "to_states": [m.to_state.value for m in wave],
                    "reasons": [m.reason for m in wave],
                    "external_ids": [m.external_id for m in wave],
                    "actor": actor,
                },
            ).fetchall()
            moved = Counter((str(from_state), str(to_state)) for _, from_state, to_state in rows)
            for (from_state, to_state), count in moved.items():
                observability.record_transition(from_state, to_state, count)
        for effect_id, external_id in self.adopted:
            conn.execute(query("adopt_external_id"), {"id": effect_id, "external_id": external_id})
        if self.finished:
            ids, verdicts = zip(*self.finished, strict=True)
            conn.execute(
                query("finish_evidences"),
                {
                    "ids": list(ids),
                    "effect_ids": [v.effect_id for v in verdicts],
                    "verdicts": [v.verdict for v in verdicts],
                    "reasons": [v.reason for v in verdicts],
                    "attempts": [v.attempt for v in verdicts],
                },
            )
        self.moves, self.adopted, self.finished = [], [], []


def compensate_conflict(
    conn: psycopg.Connection[Any],
    settings: Settings,
    operation_key: str,
    actor: str,
    why: str,
) -> str:
    """After a conflicting commit was recorded: create its compensation, or, when none can be
    made, move the effect to STUCK for a person; returns the reason for the evidence.

    The compensations are made in a savepoint: a refused enqueue (a business-key field missing,
    the key taken by another intent, too many) is a database error that would otherwise abort
    the whole batch, and the same record would fail again at every redelivery.
    """
    effect = lock_effect(conn, operation_key)
    assert effect is not None
    if effect.state is not EffectState.CONFIRMED:
        return why
    try:
        with observability.deferred(), conn.transaction():
            made = ensure_compensations(conn, settings, effect, actor=actor, why=why)
    except RelayError as exc:
        reason = clean_text(f"{why}; but it cannot be compensated: {exc}: a person must undo it")
        assert reason is not None
        log.error("an extra execution cannot be compensated: %s", exc, extra={"key": operation_key})
        move(conn, effect.id, effect.state, EffectState.STUCK, reason=reason, actor=actor)
        return reason
    observability.record_transition(None, EffectState.PENDING.value, len(made))
    return f"{why}: {', '.join(made)}" if made else f"{why} (compensation exists already)"

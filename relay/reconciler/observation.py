"""Observation of UNKNOWN effects, with the design's table.

| answer       | effect becomes                                   |
| present      | CONFIRMED                                        |
| absent       | PENDING, re-dispatched with backoff; STUCK when max_attempts are spent |
| duplicate    | CONFIRMED plus compensation(s); STUCK if the type declares none |
| inconclusive | UNKNOWN, asked again with backoff; STUCK after observe_max_tries |

Effects are claimed in one short transaction that moves ``observe_at`` forward (a lease against
other replicas), observers are asked with no lock held, and each answer is applied in its own
transaction only if nothing moved the effect meanwhile (a result may have confirmed it).

Each observer call is bounded by its type's ``timeout_s`` counted from when it was handed to the
pool, so a round lasts about the longest timeout however many calls are slow. A round claims no
more effects than the pool has free workers (a hung observer keeps its worker): a call that never
started is not the observer's failure and must not spend one of the effect's tries.

Without Kafka transactions the relay cannot check its own ambiguous publishes, so those
(UNKNOWN, publication unknown) are observed here too, once the type's ``outcome_timeout_s`` has
passed since they became UNKNOWN (the downstream may still be reading the record).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from typing import Any

import psycopg

from relay import observability, tracing
from relay.config import Settings
from relay.errors import RelayError
from relay.reconciler.compensation import ensure_compensations
from relay.reconciler.effects import LockedEffect, clean_text, move
from relay.reconciler.observers import Observation, ObservedEffect, Observer, make_observer
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)

UNKNOWN = EffectState.UNKNOWN
# How long past an observer's timeout its answer is still waited for (scheduling, a late byte).
GRACE_S = 1.0
# The evidence's observed_count is an integer column: a larger count is kept in the detail.
INT4_MAX = 2**31 - 1


class Observations:
    """The observers of the declared effect types and a small pool to ask them in parallel."""

    def __init__(self, settings: Settings, actor: str, workers: int = 8) -> None:
        self.settings = settings
        self.actor = actor
        self.observers: dict[str, Observer] = {
            name: make_observer(spec.observer)
            for name, spec in settings.effect_types.items()
            if spec.observer is not None
        }
        timeouts = [s.observer.timeout_s for s in settings.effect_types.values() if s.observer]
        self.longest_s = max(timeouts, default=1.0)
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="observer")
        self._calls: set[Future[Observation]] = set()  # handed to the pool, not finished
        self._warned_busy_at = float("-inf")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def free_workers(self) -> int:
        """Workers not held by a call (a hung observer holds one past its timeout)."""
        self._calls = {f for f in self._calls if not f.done()}
        return self.workers - len(self._calls)

    def run_due(self, conn: psycopg.Connection[Any], limit: int = 32) -> Counter[str]:
        """Observe up to ``limit`` due UNKNOWN effects once, in rounds of at most as many as
        there are free workers; returns how many got each answer."""
        answers: Counter[str] = Counter()
        asked: list[int] = []  # each effect once per call, however soon it is due again
        while len(asked) < limit:
            free = self.free_workers()
            if free <= 0:
                self._warn_busy()
                break
            size = min(limit - len(asked), free)
            claimed = self._round(conn, size, answers, asked)
            if claimed < size:
                break
        return answers

    def _warn_busy(self) -> None:
        if time.monotonic() - self._warned_busy_at >= 60.0:
            self._warned_busy_at = time.monotonic()
            log.warning(
                "every observer worker is held by a call past its timeout (a hung "
                "observer?): observations wait until one is free"
            )

    def _round(
        self, conn: psycopg.Connection[Any], limit: int, answers: Counter[str], asked: list[int]
    ) -> int:
        """Claim (but not those in ``asked``, to which it adds), ask and apply one round; returns
        how many effects it claimed."""
        lease_s = self.longest_s + GRACE_S + 30.0
        with conn.transaction():
            rows = conn.execute(
                query("claim_observations"),
                {
                    "limit": limit,
                    "lease_s": lease_s,
                    "unpublished": not self.settings.kafka_transactions,
                    "asked": asked,
                },
            ).fetchall()
        asked.extend(int(row[0]) for row in rows)
        calls: list[tuple[tuple[Any, ...], Future[Observation] | Observation, float]] = []
        for row in rows:
            observer = self.observers.get(row[2])
            if observer is None:
                why = "no observer declared"
                calls.append((row, Observation("inconclusive", detail=why), 0.0))
                continue
            payload = decoded_payload(row[3])
            if isinstance(payload, str):
                calls.append((row, Observation("inconclusive", detail=payload), 0.0))
                continue
            effect = ObservedEffect(
                operation_key=row[1],
                effect_type=row[2],
                payload=payload,
                business_key=row[4],
                attempts=int(row[5]),
            )
            # The deadline counts from now, not from when this call's answer is looked at.
            deadline = time.monotonic() + self._timeout_s(row[2]) + GRACE_S
            call = self._pool.submit(observer.observe, effect)
            self._calls.add(call)
            calls.append((row, call, deadline))
        for row, pending, deadline in calls:
            answer = self._await(row, pending, deadline)
            if answer is None:
                # Never started: not the observer's failure. No try is spent and nothing is
                # recorded; the effect is asked again once its claim lapses.
                answers["not asked"] += 1
                continue
            observation, failed = answer
            answers[observation.answer] += 1
            self.apply(conn, row, observation, has_observer=row[2] in self.observers, failed=failed)
        return len(rows)

    def _timeout_s(self, effect_type: str) -> float:
        spec = self.settings.effect_type(effect_type)
        return spec.observer.timeout_s if spec and spec.observer else 5.0

    def _await(
        self, row: tuple[Any, ...], pending: Future[Observation] | Observation, deadline: float
    ) -> tuple[Observation, bool] | None:
        """The observer's answer, and whether it failed (timed out, raised) instead of answering:
        inconclusive either way, but counted apart so that a broken observer shows. None: the
        call never started by its deadline (cancelled)."""
        if isinstance(pending, Observation):
            return pending, False
        try:
            return pending.result(timeout=max(0.0, deadline - time.monotonic())), False
        except FutureTimeout:
            if pending.cancel():
                return None
            why = f"the observer did not answer in {self._timeout_s(row[2]) + GRACE_S}s"
            return Observation("inconclusive", detail=why), True
        except Exception as exc:  # noqa: BLE001 - any failure of an observer is inconclusive
            return Observation("inconclusive", detail=f"{type(exc).__name__}: {exc}"), True

    def apply(
        self,
        conn: psycopg.Connection[Any],
        row: tuple[Any, ...],
        observation: Observation,
        *,
        has_observer: bool = True,
        failed: bool = False,
    ) -> None:
        """Apply one answer in its own transaction; counted (moves included) once it commits."""
        effect_id, key, effect_type, _, business_key, attempts, tries, lease = row[:8]
        unpublished = len(row) > 8 and bool(row[8])
        spec = self.settings.effect_type(effect_type)
        with ExitStack() as traced, observability.deferred(), conn.transaction():
            locked = conn.execute(
                query("lock_observed"), {"id": effect_id, "attempt": attempts, "lease": lease}
            ).fetchone()
            ref = tracing.EffectRef(key, effect_id, locked[4] if locked else None)
            answer = {"relay.observation.answer": observation.answer}
            span = traced.enter_context(tracing.span("relay.observation", [ref], answer))
            span.set_attribute("relay.observation.failed", failed)
            detail = clean_text(observation.detail) or ""
            count = observation.count
            evidence = {
                "kind": "observation",
                "effect_id": effect_id,
                "operation_key": key,
                "outcome": observation.answer,
                "external_id": None,
                "observed_count": None if count is None else max(-INT4_MAX, min(count, INT4_MAX)),
                "detail": detail,
                "attempt": attempts,
                "actor": self.actor,
                "os_user": None,
            }
            if locked is None:
                conn.execute(
                    query("insert_evidence"),
                    {**evidence, "verdict": "ignored", "reason": "the effect moved on meanwhile"},
                )
                span.set_attribute("relay.verdict", "ignored")
                return
            if has_observer:
                observability.record_observation("error" if failed else observation.answer)
            target, reason, delay = self._decide(
                observation, int(attempts), int(tries), spec, has_observer, detail, unpublished
            )
            span.set_attribute("relay.verdict", "applied")
            span.set_attribute("relay.state", target.value)
            if target is UNKNOWN:
                conn.execute(
                    query("reschedule_observation"),
                    {"id": effect_id, "delay_s": delay, "reason": reason},
                )
            elif observation.answer == "duplicate" and target is EffectState.CONFIRMED:
                effect = LockedEffect(
                    effect_id, key, effect_type, target, attempts, None, business_key, None
                )
                reason = self._compensate(conn, effect, reason, count or 2)
            else:
                move(
                    conn, effect_id, UNKNOWN, target, reason=reason, actor=self.actor, delay_s=delay
                )
            conn.execute(
                query("insert_evidence"), {**evidence, "verdict": "applied", "reason": reason}
            )

    def _compensate(
        self, conn: psycopg.Connection[Any], effect: LockedEffect, reason: str, count: int
    ) -> str:
        """CONFIRMED plus a compensation per extra execution; STUCK (for a person) when they
        cannot be made: in a savepoint, so that a refused enqueue leaves the transaction usable.
        Returns the reason recorded."""
        try:
            with observability.deferred(), conn.transaction():
                move(conn, effect.id, UNKNOWN, effect.state, reason=reason, actor=self.actor)
                made = ensure_compensations(
                    conn, self.settings, effect, actor=self.actor, why=reason,
                    at_least=max(1, count - 1),
                )  # fmt: skip
        except RelayError as exc:
            stuck = clean_text(
                f"{reason.removesuffix(': compensated')}, but not compensated: {exc}: "
                "a person must undo it"
            )
            assert stuck is not None
            log.error(
                "an extra execution cannot be compensated: %s",
                exc,
                extra={"key": effect.operation_key},
            )
            move(conn, effect.id, UNKNOWN, EffectState.STUCK, reason=stuck, actor=self.actor)
            return stuck
        observability.record_transition(None, EffectState.PENDING.value, len(made))
        log.warning(
            "duplicate execution compensated", extra={"key": effect.operation_key, "made": made}
        )
        return reason

    def _decide(
        self,
        observation: Observation,
        attempts: int,
        tries: int,
        spec: Any,
        has_observer: bool,
        detail: str,
        unpublished: bool = False,
    ) -> tuple[EffectState, str, float]:
        s = self.settings
        if not has_observer or spec is None:
            if unpublished:
                why = (
                    "UNKNOWN publish that cannot be checked in Kafka (kafka_transactions = false) "
                    "and no observer is declared: a person decides"
                )
                return EffectState.STUCK, why, 0.0
            return EffectState.STUCK, "UNKNOWN and no observer is declared: a person decides", 0.0
        if observation.answer == "present":
            return EffectState.CONFIRMED, f"observed present ({detail})", 0.0
        if observation.answer == "absent":
            if attempts >= spec.max_attempts:
                return (
                    EffectState.STUCK,
                    f"observed absent ({detail}) after {attempts} attempts, the most allowed",
                    0.0,
                )
            delay = min(s.redispatch_backoff_max_s, s.redispatch_backoff_s * 2 ** (attempts - 1))
            return EffectState.PENDING, f"observed absent ({detail}): re-dispatched", delay
        if observation.answer == "duplicate":
            if spec.compensation is None:
                return (
                    EffectState.STUCK,
                    f"observed duplicate ({detail}) and the type declares no compensation",
                    0.0,
                )
            return EffectState.CONFIRMED, f"observed duplicate ({detail}): compensated", 0.0
        tries += 1
        if tries >= s.observe_max_tries:
            return (
                EffectState.STUCK,
                f"observation inconclusive {tries} times (last: {detail}): a person decides",
                0.0,
            )
        delay = min(s.observe_backoff_max_s, s.observe_backoff_s * 2 ** (tries - 1))
        return UNKNOWN, f"observation {tries} inconclusive ({detail}); asking again", delay


def decoded_payload(text: str) -> dict[str, Any] | str:
    """The payload for an observer, or why it cannot be had: a row written before the enqueue
    limits (or by hand) may nest deeper than the parser goes, and must not stop the round."""
    try:
        value = json.loads(text)
    except (RecursionError, ValueError) as exc:
        return (
            f"the payload cannot be decoded ({type(exc).__name__}, {len(text)} characters): "
            "the observer was not asked; a person decides"
        )
    return value if isinstance(value, dict) else "the payload is not a JSON object"

"""Observation of UNKNOWN effects, with the design's table.

| answer       | effect becomes                                   |
| present      | CONFIRMED                                        |
| absent       | PENDING, re-dispatched with backoff; STUCK when max_attempts are spent |
| duplicate    | CONFIRMED plus compensation(s); STUCK if the type declares none |
| inconclusive | UNKNOWN, asked again with backoff; STUCK after observe_max_tries |

Effects are claimed in one short transaction that moves ``observe_at`` forward (a lease against
other replicas), observers are asked with no lock held, and each answer is applied in its own
transaction only if nothing moved the effect meanwhile (a result may have confirmed it).
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import psycopg

from relay import observability
from relay.config import Settings
from relay.reconciler.compensation import ensure_compensations
from relay.reconciler.effects import LockedEffect, clean_text, move
from relay.reconciler.observers import Observation, ObservedEffect, Observer, make_observer
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)

UNKNOWN = EffectState.UNKNOWN


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
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="observer")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_due(self, conn: psycopg.Connection[Any], limit: int = 32) -> Counter[str]:
        """Observe the due UNKNOWN effects once; returns how many got each answer."""
        answers: Counter[str] = Counter()
        lease_s = self.longest_s + 30.0
        with conn.transaction():
            rows = conn.execute(
                query("claim_observations"), {"limit": limit, "lease_s": lease_s}
            ).fetchall()
        asked: list[tuple[tuple[Any, ...], Future[Observation] | Observation]] = []
        for row in rows:
            observer = self.observers.get(row[2])
            if observer is None:
                asked.append((row, Observation("inconclusive", detail="no observer declared")))
                continue
            effect = ObservedEffect(
                operation_key=row[1],
                effect_type=row[2],
                payload=dict(row[3]),
                business_key=row[4],
                attempts=int(row[5]),
            )
            asked.append((row, self._pool.submit(observer.observe, effect)))
        for row, pending in asked:
            observation, failed = self._await(row, pending)
            answers[observation.answer] += 1
            self.apply(conn, row, observation, has_observer=row[2] in self.observers, failed=failed)
        return answers

    def _await(
        self, row: tuple[Any, ...], pending: Future[Observation] | Observation
    ) -> tuple[Observation, bool]:
        """The observer's answer, and whether it failed (timed out, raised) instead of answering:
        inconclusive either way, but counted apart so that a broken observer shows."""
        if isinstance(pending, Observation):
            return pending, False
        spec = self.settings.effect_type(row[2])
        timeout = (spec.observer.timeout_s if spec and spec.observer else 5.0) + 1.0
        try:
            return pending.result(timeout=timeout), False
        except FutureTimeout:
            why = f"the observer did not answer in {timeout}s"
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
        effect_id, key, effect_type, payload, business_key, attempts, tries, lease = row[:8]
        spec = self.settings.effect_type(effect_type)
        with observability.deferred(), conn.transaction():
            locked = conn.execute(
                query("lock_observed"), {"id": effect_id, "attempt": attempts, "lease": lease}
            ).fetchone()
            detail = clean_text(observation.detail) or ""
            evidence = {
                "kind": "observation",
                "effect_id": effect_id,
                "operation_key": key,
                "outcome": observation.answer,
                "external_id": None,
                "observed_count": observation.count,
                "detail": detail,
                "attempt": attempts,
                "actor": self.actor,
            }
            if locked is None:
                conn.execute(
                    query("insert_evidence"),
                    {**evidence, "verdict": "ignored", "reason": "the effect moved on meanwhile"},
                )
                return
            if has_observer:
                observability.record_observation("error" if failed else observation.answer)
            target, reason, delay = self._decide(
                observation, int(attempts), int(tries), spec, has_observer, detail
            )
            conn.execute(
                query("insert_evidence"), {**evidence, "verdict": "applied", "reason": reason}
            )
            if target is UNKNOWN:
                conn.execute(
                    query("reschedule_observation"),
                    {"id": effect_id, "delay_s": delay, "reason": reason},
                )
                return
            if observation.answer == "duplicate" and target is EffectState.CONFIRMED:
                move(conn, effect_id, UNKNOWN, target, reason=reason, actor=self.actor)
                effect = LockedEffect(
                    effect_id,
                    key,
                    effect_type,
                    target,
                    attempts,
                    None,
                    dict(payload),
                    business_key,
                    None,
                )
                count = observation.count or 2
                made = ensure_compensations(
                    conn,
                    self.settings,
                    effect,
                    actor=self.actor,
                    why=reason,
                    at_least=max(1, count - 1),
                )
                observability.record_transition(None, EffectState.PENDING.value, len(made))
                log.warning("duplicate execution compensated", extra={"key": key, "made": made})
            else:
                move(
                    conn, effect_id, UNKNOWN, target, reason=reason, actor=self.actor, delay_s=delay
                )

    def _decide(
        self,
        observation: Observation,
        attempts: int,
        tries: int,
        spec: Any,
        has_observer: bool,
        detail: str,
    ) -> tuple[EffectState, str, float]:
        s = self.settings
        if not has_observer or spec is None:
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

"""The check of ambiguous publishes: every UNKNOWN attempt is looked up in Kafka before anything
is sent again.

A maintenance service of the relay: the daemon calls :meth:`Verifier.run_once` between batches
(and while Kafka cannot be reached, so that failed checks are counted and end STUCK instead of
waiting unseen). One round claims up to ``VERIFY_ROUND`` due UNKNOWN attempts, fences the
producers that made them, reads their windows once (``lookup.py``) and records each verdict:
PUBLISHED (found), PENDING (absent: a new attempt may be made), or UNKNOWN again, STUCK once its
checks are spent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from kafka import errors as kerr

from relay import observability, tracing
from relay.config import Settings
from relay.dispatch.lookup import (
    Absent,
    Found,
    Unprovable,
    Wanted,
    find_attempts,
    open_consumer,
)
from relay.dispatch.stage import Identity
from relay.dispatch.transactions import fence
from relay.errors import describe
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)

VERIFY_EVERY_S = 1.0
VERIFY_ROUND = 1000  # UNKNOWN publishes checked per round, with one read of their window


def round_budget_s(settings: Settings) -> float:
    """How long a round may go on reading windows: a quarter of the lease, so that the
    publishing thread it runs in keeps its heartbeat and its batches' leases."""
    return settings.lease_s / 4


class _Check(NamedTuple):
    """An UNKNOWN attempt claimed for a check (columns of claim_verifications)."""

    effect_id: int
    key: str
    message_key: str
    topic: str
    attempt: int
    tries: int
    replica: str
    replica_epoch: int
    started_at: datetime
    ordering_group: str | None  # its record went to the group's partition


@dataclass(frozen=True)
class Checked:
    """What one round did: attempts checked, found in Kafka, found absent, checks that could not
    be made (the attempt stays UNKNOWN, or goes STUCK when its checks are spent)."""

    checked: int = 0
    found: int = 0
    absent: int = 0
    failed: int = 0


class Verifier:
    """Resolves this relay's share of UNKNOWN publishes by looking in Kafka, a round at a time.

    ``producer_ready`` says whether this replica's transactional producer is initialised (which
    fenced its earlier ones: only then can its own attempts be checked)."""

    def __init__(
        self,
        settings: Settings,
        who: Identity,
        *,
        producer_ready: Callable[[], bool],
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.who = who
        self._producer_ready = producer_ready
        self._stop = stop
        self._last_run = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last_run >= VERIFY_EVERY_S

    def run_once(self, conn: psycopg.Connection[Any]) -> Checked:
        """One round: claim due UNKNOWN attempts, look for them, record each verdict."""
        self._last_run = time.monotonic()
        rows = conn.execute(
            query("claim_verifications"),
            {
                "owner": self.who.replica_id,
                "epoch": self.who.epoch,
                "lease_s": self.settings.lease_s,
                "limit": VERIFY_ROUND,
            },
        ).fetchall()
        if not rows:
            return Checked()
        checks = [_Check(*row) for row in rows]
        refs = [tracing.EffectRef(c.key, c.effect_id) for c in checks] if tracing.enabled() else []
        with tracing.span("relay.verification_round", refs) as span:
            answers = self._check_round(checks)
            span.set_attribute("relay.found", sum(isinstance(a, Found) for a in answers.values()))
        reached = [c for c in checks if c.effect_id in answers]
        record_verdicts(
            conn,
            self.who,
            [self._verdict(c, answers[c.effect_id]) for c in reached],
            max_tries=self.settings.verify_max_tries,
            backoff_max_s=self.settings.verify_backoff_max_s,
        )
        if len(reached) < len(checks):
            # Past the round's deadline: given back unchecked, due again at once, no try spent.
            conn.execute(
                query("release_verifications"),
                {
                    "owner": self.who.replica_id,
                    "epoch": self.who.epoch,
                    "ids": [c.effect_id for c in checks if c.effect_id not in answers],
                },
            )
        if len(rows) == VERIFY_ROUND or len(reached) < len(checks):
            self._last_run = 0.0  # more are due: the next cycle goes on at once
        verdicts = list(answers.values())
        return Checked(
            checked=len(reached),
            found=sum(isinstance(a, Found) for a in verdicts),
            absent=sum(isinstance(a, Absent) for a in verdicts),
            failed=sum(isinstance(a, str) for a in verdicts),
        )

    def _check_round(self, checks: Sequence[_Check]) -> dict[int, Found | Absent | str]:
        """A verdict per effect, or why Kafka could not be asked (after one such failure the
        rest of the round is rescheduled at once instead of each waiting out its timeout).
        Effects whose time window is not read by the round's deadline have no answer: the round
        runs in the publishing thread, which must send its heartbeat and batches meanwhile."""
        deadline = time.monotonic() + round_budget_s(self.settings)
        if self._stop.is_set():
            return {c.effect_id: "the relay is stopping" for c in checks}
        try:
            consumer = open_consumer(self.settings)
        except kerr.KafkaError as exc:
            return {c.effect_id: describe(exc) for c in checks}
        answers: dict[int, Found | Absent | str] = {}
        down: str | None = None
        try:
            ready: list[_Check] = []
            for replica in sorted({c.replica for c in checks}):
                theirs = [c for c in checks if c.replica == replica]
                why = down or self._fence_for_check(replica)
                if why is None:
                    ready.extend(theirs)
                    continue
                answers.update((c.effect_id, why) for c in theirs)
                if replica != self.who.replica_id:
                    down = why
            by_topic: dict[str, list[_Check]] = {}
            for c in ready:
                by_topic.setdefault(c.topic, []).append(c)
            for topic, group in by_topic.items():
                if answers and time.monotonic() > deadline:
                    break
                wanted = {
                    Wanted(
                        c.message_key,
                        c.effect_id,
                        c.attempt,
                        c.started_at,
                        partition_key=c.ordering_group,
                    ): c
                    for c in group
                }
                if down is None:
                    try:
                        found = find_attempts(
                            consumer,
                            self.settings,
                            topic,
                            list(wanted),
                            self.settings.publish_timeout_s,
                            deadline,
                        )
                    except (kerr.KafkaError, OSError) as exc:
                        down = describe(exc)
                    else:
                        answers.update(
                            (c.effect_id, _answer(v))
                            for w, c in wanted.items()
                            if (v := found.get(w)) is not None
                        )
                        continue
                answers.update((c.effect_id, down) for c in group)
        finally:
            consumer.close()
        return answers

    def _fence_for_check(self, replica: str) -> str | None:
        """Make sure the producer that made these attempts can no longer commit; or say why not.

        Our own initialised producer fenced our earlier ones. Another replica's is fenced here,
        or its open transaction could commit after we looked."""
        if replica == self.who.replica_id:
            return (
                None
                if self._producer_ready()
                else ("this replica's producer is not initialised yet")
            )
        try:
            fence(self.settings, replica)
        except (kerr.KafkaError, OSError) as exc:
            return describe(exc)
        return None

    def _verdict(self, check: _Check, answer: Found | Absent | str) -> Verdict:
        """What the check means: PUBLISHED, PENDING (absent), or UNKNOWN again and later STUCK."""
        key, effect_id, attempt, tries = check.key, check.effect_id, check.attempt, check.tries
        if isinstance(answer, str):
            give_up = tries + 1 >= self.settings.verify_max_tries
            why = f"check {tries + 1} of attempt {attempt} could not be made: {answer}"
            log.warning(why, extra={"operation_key": key, "effect_id": effect_id})
            return Verdict(
                effect_id,
                attempt,
                EffectState.STUCK if give_up else EffectState.UNKNOWN,
                f"{why}; {tries + 1} checks failed, a person decides" if give_up else why,
                why,
                retry_in_s=_retry_in_s(tries, self.settings.verify_backoff_max_s),
                tries=tries,
            )
        if isinstance(answer, Found):
            found = f"found at partition {answer.partition} offset {answer.offset}"
            verdict = Verdict(
                effect_id,
                attempt,
                EffectState.PUBLISHED,
                f"verified in Kafka: attempt {attempt} {found}",
                found,
                partition=answer.partition,
                offset=answer.offset,
                tries=tries,
            )
        else:
            verdict = Verdict(
                effect_id,
                attempt,
                EffectState.PENDING,
                f"verified absent from Kafka; attempt {attempt} published nothing, a new attempt "
                "may be made",
                f"absent: not among {answer.scanned} committed records of the attempt's window "
                f"in {answer.partitions} partitions, after fencing its producer",
                tries=tries,
            )
        log.info(
            "verified an ambiguous publish: %s",
            verdict.verification,
            extra={"operation_key": key, "effect_id": effect_id, "attempt": attempt},
        )
        return verdict


class Verdict(NamedTuple):
    """A check's outcome as ``finish_verifications`` records it."""

    effect_id: int
    attempt: int
    state: EffectState
    reason: str
    verification: str
    partition: int | None = None
    offset: int | None = None
    retry_in_s: float = 0.0
    tries: int = 0  # the checks of this attempt that failed before this one


def _answer(found: Found | Absent | Unprovable) -> Found | Absent | str:
    """An absence that proves nothing is a check that could not be made: checked again later,
    STUCK once the checks are spent, never PENDING (that would publish it again)."""
    return found.reason if isinstance(found, Unprovable) else found


def _retry_in_s(tries: int, backoff_max_s: float) -> float:
    """When a failed check is due again: doubling from 2 s, capped."""
    return min(backoff_max_s, 2.0 * 2.0 ** min(tries, 16))


def unrecordable(verdict: Verdict, exc: Exception, max_tries: int, backoff_max_s: float) -> Verdict:
    """A verdict the database refused to record, as a failed check: so that one it refuses every
    time ends STUCK for a person once the checks are spent, as a check that cannot be made does
    (it was otherwise checked again at every lease, for ever). What was found stays in the
    reason; nothing of the refused values is written."""
    n = verdict.tries + 1
    give_up = n >= max_tries
    why = (
        f"check {n} of attempt {verdict.attempt} found it {verdict.state.value} "
        f"({verdict.verification}), but the database refused to record that: {describe(exc)}"
    )
    why = why.replace("\x00", "\\0")[:2000]
    return Verdict(
        verdict.effect_id,
        verdict.attempt,
        EffectState.STUCK if give_up else EffectState.UNKNOWN,
        f"{why}; {n} checks failed, a person decides" if give_up else why,
        why,
        retry_in_s=_retry_in_s(verdict.tries, backoff_max_s),
        tries=verdict.tries,
    )


def finish_params(who: Identity, verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """``finish_verifications``'s arrays, one element per verdict."""
    return {
        "owner": who.replica_id,
        "epoch": who.epoch,
        "ids": [v.effect_id for v in verdicts],
        "attempts": [v.attempt for v in verdicts],
        "states": [v.state.value for v in verdicts],
        "reasons": [v.reason for v in verdicts],
        "verifications": [v.verification for v in verdicts],
        "partitions": [v.partition for v in verdicts],
        "offsets": [v.offset for v in verdicts],
        "retry_in_s": [v.retry_in_s for v in verdicts],
    }


def record_verdicts(
    conn: psycopg.Connection[Any],
    who: Identity,
    verdicts: Sequence[Verdict],
    *,
    max_tries: int | None = None,
    backoff_max_s: float = 300.0,
) -> None:
    """Record a round's verdicts in one statement. A row the database refuses (a value it
    cannot store, a constraint an operator added) must not keep the others unrecorded: the
    round is split until the refused row stands alone. With ``max_tries``, that row is then
    recorded as a failed check (``unrecordable``: UNKNOWN, checked again later, STUCK once the
    checks are spent); without, or if that is refused too, it stays UNKNOWN, claimed until its
    lease ends, then checked again."""
    if not verdicts:
        return
    try:
        # A savepoint when the caller is in a transaction: a refused round leaves it usable.
        with conn.transaction():
            moved = conn.execute(
                query("finish_verifications"), finish_params(who, verdicts)
            ).fetchall()
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        if len(verdicts) == 1:
            log.error(
                "the verdict of this check could not be recorded; it counts as a failed check"
                if max_tries is not None
                else "the verdict of this check could not be recorded; it is checked again once "
                "its lease ends",
                extra={
                    "effect_id": verdicts[0].effect_id,
                    "attempt": verdicts[0].attempt,
                    "reason": describe(exc),
                },
            )
            if max_tries is not None:
                record_verdicts(
                    conn, who, [unrecordable(verdicts[0], exc, max_tries, backoff_max_s)]
                )
            return
        half = len(verdicts) // 2
        for part in (verdicts[:half], verdicts[half:]):
            record_verdicts(conn, who, part, max_tries=max_tries, backoff_max_s=backoff_max_s)
        return
    for state, n in Counter(str(state) for _, state in moved).items():
        observability.record_verification(state, n)

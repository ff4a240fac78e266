"""Downstream results: stored as evidence, then applied to their effect, in one transaction.

Each Kafka record becomes one evidence row, unique by (topic, partition, offset), so a record
delivered again after a crash, a rebalance or a failed offset commit is recognised and not applied
twice. Offsets are committed to Kafka only after the database transaction that used them, so no
record is lost either. What cannot be applied (malformed, orphaned, conflicting, late) is kept
with the reason, counted, and the consumer moves on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka import errors as kerr
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from relay import observability, tracing
from relay.config import Settings
from relay.errors import RelayError
from relay.messages import ResultMessage, ResultOutcome
from relay.publisher import kafka_security
from relay.reconciler.compensation import ensure_compensations
from relay.reconciler.effects import LockedEffect, clean_text, lock_effect, move
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)

RAW_LIMIT = 65_536
QUARANTINED = frozenset({"malformed", "orphaned", "conflicting", "late"})


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    effect_id: int | None = None
    attempt: int | None = None


def parse(value: bytes | None) -> ResultMessage | str:
    """The result message, or why it is malformed."""
    if value is None:
        return "empty record (a tombstone)"
    try:
        return ResultMessage.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        return f"not a result message: {where}: {first['msg']} ({exc.error_count()} problems)"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not JSON: {exc}"


def apply_result(
    conn: psycopg.Connection[Any],
    settings: Settings,
    message: ResultMessage,
    actor: str,
    evidence_id: int,
) -> Verdict:
    """Move the result's effect as the design says; in the caller's transaction.

    A result that an earlier deferred result of the same effect still waits before is deferred
    too: the downstream's results of one effect are applied in the order they arrived."""
    effect = lock_effect(conn, message.operation_key)
    if effect is None:
        return Verdict("orphaned", "no effect has this operation key")
    ref = tracing.EffectRef(effect.operation_key, effect.id, effect.traceparent)
    outcome = {"relay.result.outcome": message.outcome.value}
    with tracing.span("relay.apply_result", [ref], outcome, kind="CONSUMER") as span:
        row = conn.execute(
            query("earlier_deferred"), {"effect_id": effect.id, "evidence_id": evidence_id}
        ).fetchone()
        if row is not None and row[0]:
            found = Verdict(
                "deferred",
                "an earlier result of this effect waits to be applied first",
                effect.id,
                effect.attempts,
            )
        else:
            found = _apply(conn, settings, effect, message, actor)
        span.set_attribute("relay.verdict", found.verdict)
        return found


def _apply(
    conn: psycopg.Connection[Any],
    settings: Settings,
    effect: LockedEffect,
    message: ResultMessage,
    actor: str,
) -> Verdict:
    state, outcome = effect.state, message.outcome
    ext = clean_text(message.external_id, 512)

    def verdict(name: str, reason: str) -> Verdict:
        return Verdict(name, reason, effect.id, effect.attempts)

    if state is EffectState.DISPATCHING:
        return verdict("deferred", "the relay has not recorded the publication yet")
    if state is EffectState.PENDING and effect.attempts == 0:
        return verdict("orphaned", "the effect was never attempted")
    if state is EffectState.CONFIRMED:
        if outcome is not ResultOutcome.COMMITTED:
            return verdict("late", f"'{outcome.value}' for an effect already CONFIRMED")
        if ext is not None and effect.external_id is None:
            conn.execute(query("adopt_external_id"), {"id": effect.id, "external_id": ext})
            return verdict("repeated", f"confirms the CONFIRMED effect; external id {ext}")
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
        move(conn, effect.id, state, EffectState.STUCK, reason=why, actor=actor, external_id=ext)
        return verdict("conflicting", why)
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
        move(
            conn, effect.id, state, EffectState.CONFIRMED, reason=why, actor=actor, external_id=ext
        )
        return verdict("applied", why)
    if outcome is ResultOutcome.REJECTED:
        why = f"downstream rejected{detail}"
        move(conn, effect.id, state, EffectState.REJECTED, reason=why, actor=actor)
        return verdict("applied", why)
    if state is EffectState.PUBLISHED:
        why = f"downstream does not know the outcome{detail}"
        move(conn, effect.id, state, EffectState.UNKNOWN, reason=why, actor=actor)
        return verdict("applied", why)
    return verdict("ignored", f"'unknown' adds nothing to an effect already {state.value}")


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


class ResultConsumer:
    """A Kafka consumer group member on the result topics that applies what it reads."""

    def __init__(self, settings: Settings, actor: str) -> None:
        self.settings = settings
        self.actor = actor
        self.topics = sorted(
            {s.result_topic for s in settings.effect_types.values() if s.result_topic}
        )
        self.counts: Counter[str] = Counter()
        self.applied_records = 0
        self._consumer: KafkaConsumer | None = None

    def open(self) -> None:
        if self._consumer is not None or not self.topics:
            return
        consumer = KafkaConsumer(
            **kafka_security(self.settings),
            client_id=f"relay-reconciler-{self.settings.replica_id}",
            group_id=self.settings.reconcile_group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_records=self.settings.reconcile_batch_size,
            metadata_max_age_ms=30_000,
            request_timeout_ms=30_000,
            # Static membership: a replica restarted after a crash takes its partitions back at
            # once instead of waiting out its dead incarnation's session.
            group_instance_id=f"relay-reconciler-{self.settings.replica_id}",
            session_timeout_ms=15_000,
            heartbeat_interval_ms=3_000,
        )
        consumer.subscribe(self.topics)
        self._consumer = consumer
        log.info("consuming results", extra={"topics": ",".join(self.topics)})

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception as exc:  # noqa: BLE001 - closing must not hide the real error
                log.warning("closing the result consumer: %s", exc)
            self._consumer = None

    def poll_once(self, conn: psycopg.Connection[Any], timeout_s: float) -> int:
        """Read one batch, apply it in one transaction, then commit its offsets. Returns records."""
        self.open()
        if self._consumer is None:
            time.sleep(timeout_s)
            return 0
        batch = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        records = [r for part in batch.values() for r in part]
        if not records:
            return 0
        try:
            verdicts = self._apply_batch(conn, records)
        except BaseException:
            # Nothing of the batch is recorded: read it again from its first offsets.
            self._rewind(records)
            raise
        self._commit(records)
        self.counts.update(verdicts)
        self.applied_records += len(records)
        return len(records)

    def _apply_batch(self, conn: psycopg.Connection[Any], records: Sequence[Any]) -> list[str]:
        # Metrics are counted only when the transaction commits: a batch rolled back is read again.
        try:
            with observability.deferred(), conn.transaction():
                return [self._record(conn, r) for r in records]
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            raise
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            # One record broke the batch (a bug, or data no one foresaw): keep the others,
            # record that one as failed evidence, and carry on.
            log.warning("a result batch failed (%s); applying it record by record", exc)
            verdicts = []
            with observability.deferred(), conn.transaction():
                for r in records:
                    try:
                        with observability.deferred(), conn.transaction():
                            verdicts.append(self._record(conn, r))
                    except (psycopg.OperationalError, psycopg.errors.DeadlockDetected):
                        raise
                    except psycopg.Error as one:
                        verdicts.append(self._failed(conn, r, one))
            return verdicts

    def _record(self, conn: psycopg.Connection[Any], record: Any) -> str:
        parsed = parse(record.value)
        key = clean_text(record.key.decode("utf-8", "replace") if record.key else None, 512)
        raw = bytes(record.value[:RAW_LIMIT]) if record.value is not None else None
        base = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "raw": raw,
            "raw_size": len(record.value) if record.value is not None else None,
            "actor": self.actor,
        }
        if isinstance(parsed, str):
            row = conn.execute(
                query("insert_result_evidence"),
                {
                    **base,
                    "operation_key": key,
                    "outcome": None,
                    "external_id": None,
                    "detail": None,
                    "verdict": "malformed",
                    "reason": clean_text(parsed),
                },
            ).fetchone()
            if row is None:
                return "redelivered"
            observability.record_quarantined("malformed")
            return "malformed"
        row = conn.execute(
            query("insert_result_evidence"),
            {
                **base,
                "operation_key": clean_text(parsed.operation_key, 512),
                "outcome": parsed.outcome.value,
                "external_id": clean_text(parsed.external_id, 512),
                "detail": clean_text(parsed.detail),
                "verdict": "failed",
                "reason": "being applied",
            },
        ).fetchone()
        if row is None:
            return "redelivered"
        return self.settle(conn, int(row[0]), parsed)

    def settle(
        self, conn: psycopg.Connection[Any], evidence_id: int, message: ResultMessage
    ) -> str:
        """Apply one stored result and record the verdict on its evidence row."""
        if "\x00" in message.operation_key:
            found = Verdict("orphaned", "no effect has this operation key")
        else:
            found = apply_result(conn, self.settings, message, self.actor, evidence_id)
        reason = found.reason
        conn.execute(
            query("finish_evidence"),
            {
                "id": evidence_id,
                "effect_id": found.effect_id,
                "verdict": found.verdict,
                "reason": reason,
                "attempt": found.attempt,
            },
        )
        if found.verdict == "conflicting":
            reason = compensate_conflict(
                conn, self.settings, message.operation_key, self.actor, found.reason
            )
            conn.execute(
                query("finish_evidence"),
                {
                    **{"id": evidence_id, "effect_id": found.effect_id},
                    "verdict": "conflicting",
                    "reason": reason,
                    "attempt": found.attempt,
                },
            )
        if found.verdict == "applied":
            observability.record_result(message.outcome.value)
        elif found.verdict in QUARANTINED:
            observability.record_quarantined(found.verdict)
        return found.verdict

    def _failed(self, conn: psycopg.Connection[Any], record: Any, exc: psycopg.Error) -> str:
        why = clean_text(f"could not be applied: {type(exc).__name__}: {exc}")
        log.error("result record could not be applied: %s", why)
        with conn.transaction():
            conn.execute(
                query("insert_result_evidence"),
                {
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "raw": bytes(record.value[:RAW_LIMIT]) if record.value is not None else None,
                    "raw_size": len(record.value) if record.value is not None else None,
                    "actor": self.actor,
                    "operation_key": None,
                    "outcome": None,
                    "external_id": None,
                    "detail": None,
                    "verdict": "failed",
                    "reason": why,
                },
            )
        observability.record_quarantined("failed")
        return "failed"

    def _rewind(self, records: Sequence[Any]) -> None:
        if self._consumer is None:
            return
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        for tp, offset in first.items():
            try:
                self._consumer.seek(tp, offset)
            except (AssertionError, kerr.KafkaError, ValueError) as exc:
                # The partition moved to another replica in between: it reads from the committed
                # offset, which is before this batch.
                log.info("could not rewind %s: %s", tp, exc)

    def _commit(self, records: Sequence[Any]) -> None:
        assert self._consumer is not None
        last: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            last[tp] = max(last.get(tp, r.offset), r.offset)
        offsets = {tp: OffsetAndMetadata(o + 1, "", -1) for tp, o in last.items()}
        try:
            self._consumer.commit(offsets)
        except kerr.KafkaError as exc:
            # The results are recorded; a new owner of the partitions reads them again and finds
            # them already stored (deduplicated by offset).
            log.warning("offset commit failed after the results were recorded: %s", exc)

    def lag(self) -> Mapping[str, int]:
        """Records not yet consumed, per result topic, over this member's partitions: every
        configured topic, 0 where it has none (so ``sum`` over replicas is the group's lag)."""
        lag: Counter[str] = Counter({topic: 0 for topic in self.topics})
        if self._consumer is None:
            return dict(lag)
        assigned = list(self._consumer.assignment())
        if not assigned:
            return dict(lag)
        ends = self._consumer.end_offsets(assigned)
        for tp in assigned:
            position = self._consumer.position(tp)
            lag[tp.topic] += max(0, ends.get(tp, position) - position)
        return dict(lag)


def describe_counts(counts: Mapping[str, int]) -> str:
    return json.dumps(dict(sorted(counts.items())))

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka import errors as kerr
from kafka.structs import OffsetAndMetadata
from psycopg.rows import dict_row
from pydantic import ValidationError

from relay import observability, tracing
from relay.config import Settings
from relay.errors import RelayError
from relay.kafka_client import kafka_security
from relay.messages import ResultMessage, ResultOutcome
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


@dataclass(frozen=True)
class Move:
    """A state change a result calls for; written at once, or with the rest of its batch."""

    effect_id: int
    from_state: EffectState
    to_state: EffectState
    reason: str
    external_id: str | None = None


@dataclass
class ResultBatch:
    """What a batch of results knows without asking again: its effects, locked up front (and
    kept up to date as its results move them), which have a result waiting (deferred), and the
    moves to write together."""

    effects: dict[str, LockedEffect]
    deferred: set[int]
    moves: list[Move] = field(default_factory=list)

    @classmethod
    def lock(cls, conn: psycopg.Connection[Any], keys: Sequence[str]) -> ResultBatch:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query("lock_effects"), {"keys": list(keys)})
            effects = {
                row["operation_key"]: LockedEffect(**{**row, "state": EffectState(row["state"])})
                for row in cur.fetchall()
            }
        ids = [e.id for e in effects.values()]
        rows = conn.execute(query("effects_with_deferred"), {"ids": ids}).fetchall()
        return cls(effects, {int(r[0]) for r in rows})

    def add_move(self, m: Move) -> None:
        self.moves.append(m)
        for key, effect in self.effects.items():
            if effect.id == m.effect_id:
                self.effects[key] = replace(
                    effect, state=m.to_state, external_id=m.external_id or effect.external_id
                )
                return

    def reload(self, conn: psycopg.Connection[Any], operation_key: str) -> None:
        effect = lock_effect(conn, operation_key)
        if effect is not None:
            self.effects[operation_key] = effect

    def flush(self, conn: psycopg.Connection[Any], actor: str) -> None:
        """Write the collected moves, one statement per wave (an effect moved twice in one batch
        has its second move in the second wave)."""
        waves: list[list[Move]] = []
        for m in self.moves:
            for wave in waves:
                if all(w.effect_id != m.effect_id for w in wave):
                    wave.append(m)
                    break
            else:
                waves.append([m])
        self.moves = []
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
            for _, from_state, to_state in rows:
                observability.record_transition(str(from_state), str(to_state))


def apply_result(
    conn: psycopg.Connection[Any],
    settings: Settings,
    message: ResultMessage,
    actor: str,
    evidence_id: int,
    batch: ResultBatch | None = None,
) -> Verdict:
    """Move the result's effect as the design says; in the caller's transaction.

    A result that an earlier deferred result of the same effect still waits before is deferred
    too: the downstream's results of one effect are applied in the order they arrived. With a
    ``batch``, the effect comes from it and the move is collected for it."""
    if batch is not None:
        effect = batch.effects.get(message.operation_key)
    else:
        effect = lock_effect(conn, message.operation_key)
    if effect is None:
        return Verdict("orphaned", "no effect has this operation key")
    ref = tracing.EffectRef(effect.operation_key, effect.id, effect.traceparent)
    outcome = {"relay.result.outcome": message.outcome.value}
    with tracing.span("relay.apply_result", [ref], outcome, kind="CONSUMER") as span:
        found = _decide(conn, settings, effect, message, actor, evidence_id, batch)
        span.set_attribute("relay.verdict", found.verdict)
        return found


def _decide(
    conn: psycopg.Connection[Any],
    settings: Settings,
    effect: LockedEffect,
    message: ResultMessage,
    actor: str,
    evidence_id: int,
    batch: ResultBatch | None,
) -> Verdict:
    if batch is not None:
        if effect.id in batch.deferred:
            return _waits_behind(effect)
        found = _apply(conn, settings, effect, message, actor, batch.add_move)
        if found.verdict == "deferred":
            batch.deferred.add(effect.id)
        return found
    row = conn.execute(
        query("earlier_deferred"), {"effect_id": effect.id, "evidence_id": evidence_id}
    ).fetchone()
    if row is not None and row[0]:
        return _waits_behind(effect)

    def now(m: Move) -> None:
        move(
            conn,
            m.effect_id,
            m.from_state,
            m.to_state,
            reason=m.reason,
            actor=actor,
            external_id=m.external_id,
        )

    return _apply(conn, settings, effect, message, actor, now)


def _waits_behind(effect: LockedEffect) -> Verdict:
    return Verdict(
        "deferred",
        "an earlier result of this effect waits to be applied first",
        effect.id,
        effect.attempts,
    )


def _apply(
    conn: psycopg.Connection[Any],
    settings: Settings,
    effect: LockedEffect,
    message: ResultMessage,
    actor: str,
    mover: Callable[[Move], None],
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
        mover(Move(effect.id, state, EffectState.STUCK, why, ext))
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
        mover(Move(effect.id, state, EffectState.CONFIRMED, why, ext))
        return verdict("applied", why)
    if outcome is ResultOutcome.REJECTED:
        why = f"downstream rejected{detail}"
        mover(Move(effect.id, state, EffectState.REJECTED, why))
        return verdict("applied", why)
    if state is EffectState.PUBLISHED:
        why = f"downstream does not know the outcome{detail}"
        mover(Move(effect.id, state, EffectState.UNKNOWN, why))
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
                return self._apply_set(conn, records)
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

    def _apply_set(self, conn: psycopg.Connection[Any], records: Sequence[Any]) -> list[str]:
        """The batch in a few statements: its evidence rows inserted together, its effects locked
        together, each result decided in arrival order, the moves and verdicts written together.
        (A conflicting result, rare, writes what came before it and is compensated at once.)"""
        parsed = [parse(r.value) for r in records]
        columns: dict[str, list[Any]] = {
            name: []
            for name in (
                "operation_keys", "topics", "partitions", "offsets", "outcomes",
                "external_ids", "details", "raws", "raw_sizes", "verdicts", "reasons",
            )
        }  # fmt: skip
        for record, message in zip(records, parsed, strict=True):
            value = record.value
            columns["topics"].append(record.topic)
            columns["partitions"].append(record.partition)
            columns["offsets"].append(record.offset)
            columns["raws"].append(bytes(value[:RAW_LIMIT]) if value is not None else None)
            columns["raw_sizes"].append(len(value) if value is not None else None)
            row: tuple[str | None, ...]
            if isinstance(message, str):
                key = record.key.decode("utf-8", "replace") if record.key else None
                row = (clean_text(key, 512), None, None, None, "malformed", clean_text(message))
            else:
                row = (
                    clean_text(message.operation_key, 512),
                    message.outcome.value,
                    clean_text(message.external_id, 512),
                    clean_text(message.detail),
                    "failed",
                    "being applied",
                )
            for name, item in zip(
                ("operation_keys", "outcomes", "external_ids", "details", "verdicts", "reasons"),
                row,
                strict=True,
            ):
                columns[name].append(item)
        inserted = conn.execute(
            query("insert_results_evidence"), {**columns, "actor": self.actor}
        ).fetchall()
        new = {(str(t), int(p), int(o)): int(i) for i, t, p, o in inserted}
        keys = {
            m.operation_key
            for m in parsed
            if isinstance(m, ResultMessage) and "\x00" not in m.operation_key
        }
        batch = ResultBatch.lock(conn, sorted(keys))
        verdicts: list[str] = []
        finished: list[tuple[int, int | None, str, str, int | None]] = []
        for record, message in zip(records, parsed, strict=True):
            evidence_id = new.get((record.topic, record.partition, record.offset))
            if evidence_id is None:
                verdicts.append("redelivered")
                continue
            if isinstance(message, str):
                observability.record_quarantined("malformed")
                verdicts.append("malformed")
                continue
            if "\x00" in message.operation_key:
                found = Verdict("orphaned", "no effect has this operation key")
            else:
                found = apply_result(conn, self.settings, message, self.actor, evidence_id, batch)
            finished.append(
                (evidence_id, found.effect_id, found.verdict, found.reason, found.attempt)
            )
            if found.verdict == "conflicting":
                # The compensation counts the evidence: write everything so far first.
                batch.flush(conn, self.actor)
                _finish(conn, finished)
                finished = []
                reason = compensate_conflict(
                    conn, self.settings, message.operation_key, self.actor, found.reason
                )
                _finish(
                    conn, [(evidence_id, found.effect_id, "conflicting", reason, found.attempt)]
                )
                batch.reload(conn, message.operation_key)
            if found.verdict == "applied":
                observability.record_result(message.outcome.value)
            elif found.verdict in QUARANTINED:
                observability.record_quarantined(found.verdict)
            verdicts.append(found.verdict)
        batch.flush(conn, self.actor)
        _finish(conn, finished)
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


def _finish(
    conn: psycopg.Connection[Any], rows: Sequence[tuple[int, int | None, str, str, int | None]]
) -> None:
    """Record the verdicts of stored results, in one statement."""
    if not rows:
        return
    ids, effect_ids, names, reasons, attempts = zip(*rows, strict=True)
    conn.execute(
        query("finish_evidences"),
        {
            "ids": list(ids),
            "effect_ids": list(effect_ids),
            "verdicts": list(names),
            "reasons": list(reasons),
            "attempts": list(attempts),
        },
    )


def describe_counts(counts: Mapping[str, int]) -> str:
    return json.dumps(dict(sorted(counts.items())))

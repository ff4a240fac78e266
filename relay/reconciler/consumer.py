"""The Kafka side of the downstream results: read, stored as evidence, offsets committed after.

Each Kafka record becomes one evidence row, unique by (topic, partition, offset), so a record
delivered again after a crash, a rebalance or a failed offset commit is recognised and not applied
twice. Offsets are committed to Kafka only after the database transaction that used them, so no
record is lost either; a batch that fails is read again from its first offsets, or, when one
record breaks it, applied record by record with that one kept as failed. What a result does to
its effect is decided in :mod:`relay.reconciler.results`, in the same transaction. What cannot
be applied (malformed, orphaned, conflicting, late) is kept with the reason, counted, and the
consumer moves on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka import errors as kerr
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from relay import observability
from relay.config import Settings
from relay.kafka_client import kafka_security, rejoin_if_stranded
from relay.messages import ResultMessage
from relay.reconciler.effects import clean_text
from relay.reconciler.results import StoredResult, apply_results
from relay.sql import query

log = logging.getLogger(__name__)

RAW_LIMIT = 65_536


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
        # Partitions known before the first join: a group leader that assigns before its
        # metadata has the topics hands out nothing, and kafka-python rejoins only when it sees
        # the metadata change afterwards (a test's consumer once waited 60 s with nothing).
        for topic in self.topics:
            consumer.partitions_for_topic(topic)
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
        rejoin_if_stranded(self._consumer)
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
                            verdicts.extend(self._apply_set(conn, [r]))
                    except (psycopg.OperationalError, psycopg.errors.DeadlockDetected):
                        raise
                    except psycopg.Error as one:
                        verdicts.append(self._failed(conn, r, one))
            return verdicts

    def _apply_set(self, conn: psycopg.Connection[Any], records: Sequence[Any]) -> list[str]:
        """Records as evidence rows, inserted together (a malformed record is kept with why, a
        redelivered one is recognised by its offset); then the new results applied together by
        :func:`~relay.reconciler.results.apply_results`. Returns the verdicts in record order."""
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
        verdicts: list[str | None] = []
        stored: list[StoredResult] = []
        for record, message in zip(records, parsed, strict=True):
            evidence_id = new.get((record.topic, record.partition, record.offset))
            if evidence_id is None:
                verdicts.append("redelivered")
            elif isinstance(message, str):
                observability.record_quarantined("malformed")
                verdicts.append("malformed")
            else:
                stored.append(StoredResult(evidence_id, message, record.topic))
                verdicts.append(None)  # decided below, with the others
        applied = iter(apply_results(conn, self.settings, self.actor, stored))
        return [v if v is not None else next(applied).verdict for v in verdicts]

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

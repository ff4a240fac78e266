"""The Kafka side of the relay: one producer, and one batch published with every future checked.

What a claimed effect becomes in Kafka (topic, key, value, headers, partition) is decided by
:func:`build_record`, a pure function; sending it and classifying each answer is the rest.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kafka import KafkaProducer
from kafka import errors as kerr

from relay.dispatch import transactions
from relay.dispatch.appender import Appender
from relay.dispatch.murmur2 import murmur2
from relay.dispatch.outcomes import (
    AttemptOutcome,
    Classified,
    classify_delivery_error,
    classify_send_error,
)
from relay.dispatch.receipts import Line, ReceiptSpec, receipt_values
from relay.dispatch.status_records import CLAIMED, ENQUEUED, PUBLISHED_IN_TXN, status_value
from relay.errors import describe
from relay.headers import dispatch_headers, status_headers

log = logging.getLogger(__name__)


class ClaimedEffect(NamedTuple):
    """One effect claimed for publication, with the number of the attempt recorded for it.

    This, ``Record`` and ``PublishResult`` are named tuples, made for every effect of a batch:
    immutable, and built in 0.8 us where a frozen dataclass took 4.4 (its ``__init__`` sets each
    field through ``object.__setattr__``)."""

    id: int
    operation_key: str
    message_key: str  # the Kafka key: the operation key, or the reported one's for a status event
    effect_type: str
    topic: str
    payload: str
    business_key: str | None
    traceparent: str | None
    attempt: int
    created_at: datetime
    ordering_group: str | None = None  # its effects go one at a time, to one partition
    # The batch (relay.dispatch_batch) that claimed it: no effect row until its outcome.
    batch: int | None = None
    # Its status events ride in its batch's Kafka transaction (relay.dispatch_batch.status_ids).
    status_in_txn: bool = False
    claimed_at: datetime | None = None


def group_partition(group: str, partitions: set[int] | None) -> int | None:
    """The partition of an ordering group: Kafka's default partitioner (murmur2) applied to the
    group, so a Java producer keyed by the group would pick the same one. None: no metadata."""
    if not partitions:
        return None
    return key_partition(group.encode(), sorted(partitions))


def key_partition(key: bytes, ordered: Sequence[int]) -> int:
    """Kafka's default partitioner for a keyed record, over the topic's partitions in order.

    Computed by the relay rather than by kafka-python's partitioner, which builds the cluster's
    topic set and the topic's partition lists again for every record (5 us of the 55 us the
    publishing thread spends per record in a drain)."""
    return int(ordered[(int(murmur2(key)) & 0x7FFFFFFF) % len(ordered)])


class PublishResult(NamedTuple):
    effect: ClaimedEffect
    outcome: AttemptOutcome
    reason: str | None = None
    partition: int | None = None
    offset: int | None = None
    failed_in_flight: bool = False  # the error came through the future: the producer is suspect
    suspect: bool = True  # False: aborted only because another record of its transaction failed
    # UNKNOWN only because its transaction's commit went unanswered, and that transaction carried
    # a receipt: once the producer is replaced (fenced), the receipts say how it ended.
    receipted: bool = False


def estimated_record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of the record's size in a one-record batch: the v2 batch header (61 bytes)
    and every varint of the record at its longest (36 bytes, and 10 a header). Header names are
    the relay's own, ASCII: a name's length is its size in bytes (the lengths summed in one pass
    took a third of the time of encoding each name, and summed by pairs in a list half the time
    of a chain over them)."""
    return 97 + len(key) + len(value) + sum([len(n) + len(v) + 10 for n, v in headers])


class Record(NamedTuple):
    """A dispatch message as it goes to Kafka."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int | None = None  # None: the producer's partitioner picks one from the key

    def estimated_size(self) -> int:
        return estimated_record_size(self.key, self.value, self.headers)


def build_record(
    effect: ClaimedEffect, *, source: str, partitions: set[int] | None = None
) -> Record:
    """The record of one attempt: key = the message key, value = the payload, CloudEvents and
    relay headers. ``partitions`` (the topic's) matter only for an effect of an ordering group:
    its record goes to the group's partition (without them, the partitioner picks one)."""
    headers = dispatch_headers(
        effect_id=effect.id,
        effect_type=effect.effect_type,
        attempt=effect.attempt,
        created_at=effect.created_at,
        source=source,
        business_key=effect.business_key,
        traceparent=effect.traceparent,
        ordering_group=effect.ordering_group,
    )
    partition = None
    if effect.ordering_group is not None:
        partition = group_partition(effect.ordering_group, partitions)
    return Record(
        effect.topic, effect.message_key.encode(), effect.payload.encode(), headers, partition
    )


def batch_status_records(
    effect: ClaimedEffect,
    *,
    topic: str,
    source: str,
    now: datetime,
    partitions: Sequence[int] | None = None,
) -> list[Record]:
    """The status events of an intent whose record rides in its batch's Kafka transaction: its
    enqueue, its claim and its publication, visible if and only if the record is (issue 19:
    no transition rows, no second transaction). Keyed by the operation key, as the log's, and
    on the partition the producer's partitioner picks for that key (computed once for the three,
    from the topic's ``partitions`` in order)."""
    claimed_at = effect.claimed_at or now
    key = effect.operation_key.encode()
    partition = key_partition(key, partitions) if partitions else None
    story = (
        (0, None, "PENDING", ENQUEUED, 0, effect.created_at),
        (1, "PENDING", "DISPATCHING", CLAIMED, effect.attempt, claimed_at),
        (2, "DISPATCHING", "PUBLISHED", PUBLISHED_IN_TXN, effect.attempt, now),
    )
    return [
        Record(
            topic,
            key,
            status_value(
                operation_key=effect.operation_key,
                effect_type=effect.effect_type,
                state=state,
                previous_state=previous,
                reason=reason,
                attempt=attempt,
                at=at,
                traceparent=effect.traceparent,
            ),
            status_headers(
                effect_id=effect.id,
                transition_id=None,
                batch_id=effect.batch,
                part=part,
                at=at,
                source=source,
                traceparent=effect.traceparent,
            ),
            partition,
        )
        for part, previous, state, reason, attempt, at in story
    ]


def ack_latencies_s(results: Sequence[PublishResult], now: datetime | None = None) -> list[float]:
    """Seconds from enqueue (the effect's created_at, database clock) to now, per acked attempt;
    negative when the database's clock runs ahead of ours."""
    now = now or datetime.now(UTC)
    latencies = []
    for result in results:
        if result.outcome is AttemptOutcome.ACKED:
            created = result.effect.created_at
            if created.tzinfo is None:  # the column is timestamptz; be safe with naive values
                created = created.replace(tzinfo=UTC)
            latencies.append((now - created).total_seconds())
    return latencies


def _send_all(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    results: list[PublishResult | None],
    *,
    source: str,
    limit_bytes: int,
    status: list[tuple[int, Any]] | None = None,
    status_topic: str | None = None,
    status_partitions: Sequence[int] | None = None,
) -> list[tuple[int, Any]]:
    """Hand every record to the producer; fill ``results`` for those refused before any send.

    A topic whose metadata could not be had is not tried again within the batch, so one bad
    topic costs one wait. With a ``status_topic``, an intent whose status events ride in the
    transaction has them sent after its record, only if its record was taken (their futures, or
    the exception a send raised, appended to ``status``).
    """
    appender = Appender(producer)
    sent: list[tuple[int, int]] = []  # (index in batch, slot in the appender)
    unavailable: dict[str, Classified] = {}
    layout: dict[str, list[int]] = {}  # each topic's partitions, asked once a batch
    for index, effect in enumerate(batch):
        if effect.topic in unavailable:
            verdict = unavailable[effect.topic]
            results[index] = PublishResult(effect, verdict.outcome, verdict.reason)
            continue
        record = build_record(effect, source=source)
        size = record.estimated_size()
        if size > limit_bytes:
            reason = (
                f"refused by the relay: a record of about {size} bytes exceeds the limit of "
                f"{limit_bytes} bytes (max_message_bytes / max_request_size)"
            )
            results[index] = PublishResult(effect, AttemptOutcome.REJECTED, reason)
            continue
        try:
            # Asked only for a record that will be sent: the topic's metadata can take a while.
            ordered = layout.get(effect.topic)
            if ordered is None:
                ordered = layout[effect.topic] = sorted(producer.partitions_for(effect.topic))
        except Exception as exc:  # noqa: BLE001 - every send error is classified, none escapes
            verdict = classify_send_error(exc)
            if isinstance(exc, kerr.KafkaTimeoutError):
                unavailable[effect.topic] = verdict
            results[index] = PublishResult(effect, verdict.outcome, verdict.reason)
            continue
        partition = record.partition
        if ordered:
            # An ordering group's effects go to the group's partition, whatever their keys.
            by = record.key if effect.ordering_group is None else effect.ordering_group.encode()
            partition = key_partition(by, ordered)
        sent.append(
            (index, appender.add(record.topic, partition, record.key, record.value, record.headers))
        )
    slots = appender.flush()
    pending: list[tuple[int, Any]] = []
    for index, slot in sent:
        future = slots[slot]
        if isinstance(future, Exception):
            verdict = classify_send_error(future)
            results[index] = PublishResult(batch[index], verdict.outcome, verdict.reason)
        else:
            pending.append((index, future))
    if status is not None and status_topic is not None:
        _send_status(
            appender, batch, pending, status, status_topic, source, status_partitions, limit_bytes
        )
    return pending


def _send_status(
    appender: Appender,
    batch: Sequence[ClaimedEffect],
    pending: list[tuple[int, Any]],
    status: list[tuple[int, Any]],
    topic: str,
    source: str,
    partitions: Sequence[int] | None,
    limit_bytes: int,
) -> None:
    """The status events of the intents whose records were taken and whose events ride in the
    transaction (``status_in_txn``): by intent, each event's future or what refused it (one over
    the size limit is refused here, as ``send`` refused it)."""
    now = datetime.now(UTC)
    queued: list[tuple[int, int]] = []
    for index, _ in pending:
        effect = batch[index]
        if not effect.status_in_txn:
            continue
        try:
            for event in batch_status_records(
                effect, topic=topic, source=source, now=now, partitions=partitions
            ):
                size = estimated_record_size(event.key, event.value, event.headers)
                if size > limit_bytes:
                    raise kerr.MessageSizeTooLargeError(
                        f"a status event of about {size} bytes exceeds the limit of "
                        f"{limit_bytes} bytes"
                    )
                queued.append(
                    (
                        index,
                        appender.add(
                            event.topic, event.partition, event.key, event.value, event.headers
                        ),
                    )
                )
        except Exception as exc:  # noqa: BLE001 - the transaction is aborted for it
            status.append((index, exc))
    slots = appender.flush()
    status.extend((index, slots[slot]) for index, slot in queued)


def _status_failures(
    batch: Sequence[ClaimedEffect],
    results: list[PublishResult | None],
    status: list[tuple[int, Any]],
    deadline: float,
    timeout_s: float,
) -> None:
    """An intent whose status event failed fails with it: its transaction is aborted (the events
    must be visible if and only if the record is), and the intent goes again, its story then
    told by the log. Unanswered: UNKNOWN, as an unanswered record."""
    for index, sent in status:
        r = results[index]
        if r is None or r.outcome is not AttemptOutcome.ACKED:
            continue  # the record failed on its own: that is its outcome
        if isinstance(sent, Exception):
            error: BaseException = sent
        else:
            try:
                sent.get(timeout=max(0.0, deadline - time.monotonic()))
                continue
            except Exception as exc:  # noqa: BLE001 - classified below
                error = exc
            if not sent.is_done:
                reason = f"ambiguous end of its status event: no answer within {timeout_s:.1f}s"
                results[index] = PublishResult(
                    batch[index], AttemptOutcome.UNKNOWN, reason, failed_in_flight=True
                )
                continue
        results[index] = PublishResult(
            batch[index],
            AttemptOutcome.NOT_SENT,
            f"its status event was not published: {describe(error)}",
            failed_in_flight=True,
        )


def _await_all(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    results: list[PublishResult | None],
    pending: list[tuple[int, Any]],
    timeout_s: float,
) -> None:
    """Wait for each record's own answer: ``flush()`` alone would hide failed records."""
    deadline = time.monotonic() + timeout_s
    try:
        producer.flush(timeout=timeout_s)
    except kerr.KafkaTimeoutError:
        log.warning("flush did not finish within %.1fs; unanswered records end UNKNOWN", timeout_s)
    for index, future in pending:
        effect = batch[index]
        remaining = max(0.0, deadline - time.monotonic())
        try:
            metadata = future.get(timeout=remaining)
        except Exception as exc:  # noqa: BLE001 - classified; an unexpected error is ambiguous
            if not future.is_done:
                reason = f"ambiguous end of publish: no answer within {timeout_s:.1f}s"
                verdict = Classified(AttemptOutcome.UNKNOWN, reason)
            else:
                verdict = classify_delivery_error(exc)
            results[index] = PublishResult(
                effect, verdict.outcome, verdict.reason, failed_in_flight=True
            )
            continue
        reason = f"acknowledged by Kafka: partition {metadata.partition} offset {metadata.offset}"
        results[index] = PublishResult(
            effect, AttemptOutcome.ACKED, reason, metadata.partition, metadata.offset
        )


def _done(results: list[PublishResult | None]) -> list[PublishResult]:
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # pragma: no cover - defensive: every index is filled above
        raise AssertionError(f"records without an outcome: {missing}")
    return [r for r in results if r is not None]


def publish_batch(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    *,
    source: str,
    timeout_s: float,
    limit_bytes: int,
) -> list[PublishResult]:
    """Publish with the idempotent producer alone: each record stands on its own."""
    results: list[PublishResult | None] = [None] * len(batch)
    pending = _send_all(producer, batch, results, source=source, limit_bytes=limit_bytes)
    _await_all(producer, batch, results, pending, timeout_s)
    # kafka-python's idempotent producer treats a broker refusal as fatal and aborts its other
    # batches with the same error: with several refusals, which record was at fault is unknown.
    refused = [i for i, _ in pending if _refused_by_broker(results[i])]
    if len(refused) > 1:
        for i in refused:
            r = results[i]
            assert r is not None
            results[i] = PublishResult(
                r.effect,
                AttemptOutcome.UNKNOWN,
                f"ambiguous: {len(refused)} records failed together ({r.reason}); the "
                "producer aborts its other batches after a refusal, so the culprit is unknown",
                failed_in_flight=True,
            )
    return _done(results)


def _refused_by_broker(result: PublishResult | None) -> bool:
    return (
        result is not None and result.outcome is AttemptOutcome.REJECTED and result.failed_in_flight
    )


def publish_batch_transactional(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    *,
    source: str,
    timeout_s: float,
    limit_bytes: int,
    before_commit: Callable[[], None] | None = None,
    status_topic: str | None = None,
    on_status_unavailable: Callable[[], None] | None = None,
    receipt: ReceiptSpec | None = None,
    stop_receipts: Callable[[str], None] | None = None,
    receipt_deadline: float | None = None,
    receipt_late: Callable[[], None] | None = None,
) -> list[PublishResult]:
    """Publish the batch in one Kafka transaction: all of it becomes visible, or none of it.
    With a ``status_topic``, the status events of the intents claimed so (``status_in_txn``)
    ride in it too; if that topic is unavailable, those intents are not sent (NOT_SENT, to go
    again at once, their events then from the log), ``on_status_unavailable`` is called, and the
    rest of the batch is published.

    With a ``receipt``, the transaction's receipt (``receipts.py``) is written once every record
    is acknowledged, and the transaction commits only with it. If the receipts topic is
    unavailable, or the receipt cannot be written, ``stop_receipts(why)`` is called, which must
    record that this incarnation writes receipts no more before it returns (the absence of a
    receipt proves nothing from then on): the batch is then published without one, or, when its
    receipt failed, aborted and every record is ABORTED, innocent, to go again at once. Past
    ``receipt_deadline`` (monotonic: the claim plus ``receipts.receipt_bound_s``) no receipt is
    sent and the transaction is aborted the same way (receipts go on; ``receipt_late()`` is then
    called, so that a publisher that is always that slow can stop them): a settler reads receipts
    only up to there.

    Commit succeeded: every sent record is published. A send failed: the transaction is
    aborted; its answered records are provably invisible to read_committed readers (ABORTED, to
    be tried again), a lone definite refusal is REJECTED, and an unanswered record stays UNKNOWN.
    Commit or abort ended without an answer: every sent record is UNKNOWN, to be verified after
    fencing.
    """
    receipt_partitions: list[int] = []
    if receipt is not None:
        try:
            receipt_partitions = sorted(producer.partitions_for(receipt.topic))
            if not receipt_partitions:
                raise kerr.UnknownTopicOrPartitionError(receipt.topic)
        except Exception as exc:  # noqa: BLE001 - checked before anything is sent
            if stop_receipts is not None:
                stop_receipts(
                    f"the receipts topic {receipt.topic!r} is unavailable: {describe(exc)}"
                )
            receipt = None
    status_partitions: list[int] | None = None
    if status_topic is not None and any(e.status_in_txn for e in batch):
        try:
            status_partitions = sorted(producer.partitions_for(status_topic))
            if not status_partitions:
                raise kerr.UnknownTopicOrPartitionError(status_topic)
        except Exception as exc:  # noqa: BLE001 - checked before anything is sent
            if on_status_unavailable is not None:
                on_status_unavailable()
            return _without_status(
                producer,
                batch,
                f"not sent: the status topic {status_topic!r} is unavailable "
                f"({describe(exc)}); it goes again, its status events then from the log",
                source=source,
                timeout_s=timeout_s,
                limit_bytes=limit_bytes,
                before_commit=before_commit,
                receipt=receipt,
                stop_receipts=stop_receipts,
                receipt_deadline=receipt_deadline,
                receipt_late=receipt_late,
            )
    results: list[PublishResult | None] = [None] * len(batch)
    try:
        producer.begin_transaction()
    except Exception as exc:  # noqa: BLE001 - nothing was sent: every record is untouched
        reason = f"not sent: the transaction could not begin: {describe(exc)}"
        return [
            PublishResult(e, AttemptOutcome.NOT_SENT, reason, failed_in_flight=True) for e in batch
        ]
    status: list[tuple[int, Any]] = []
    pending = _send_all(
        producer,
        batch,
        results,
        source=source,
        limit_bytes=limit_bytes,
        status=status,
        status_topic=status_topic,
        status_partitions=status_partitions,
    )
    deadline = time.monotonic() + timeout_s
    _await_all(producer, batch, results, pending, timeout_s)
    if status:
        _status_failures(batch, results, status, deadline, timeout_s)
    sent = [i for i, _ in pending]
    failed = [i for i in sent if _outcome(results[i]) is not AttemptOutcome.ACKED]
    if not failed and sent and receipt is not None:
        problem = _send_receipt(
            producer,
            receipt,
            receipt_partitions,
            results,
            sent,
            limit_bytes,
            timeout_s,
            receipt_deadline,
        )
        if problem is not None:
            # Too late: nothing is wrong with the topic, receipts go on.
            stop = None if problem == TOO_LATE else stop_receipts
            aborted = _abort_for_receipt(producer, results, sent, problem, timeout_s, stop)
            if problem == TOO_LATE and receipt_late is not None:
                try:
                    receipt_late()
                except Exception:
                    log.exception("could not count a batch too late for its receipt")
            return aborted
    if failed:
        try:
            transactions.abort(producer, timeout_s)
        except Exception as exc:  # noqa: BLE001 - an unfinished abort leaves everything unknown
            why = f"ambiguous: a send failed and the abort did not complete: {describe(exc)}"
            _mark_all(results, sent, AttemptOutcome.UNKNOWN, why)
            return _done(results)
        lone_refusal = len(failed) == 1 and _refused_by_broker(results[failed[0]])
        for i in sent:
            r = results[i]
            assert r is not None
            if lone_refusal and i == failed[0]:
                continue
            own = i in failed
            if own and r.outcome is AttemptOutcome.UNKNOWN:
                # Unanswered: the write may still be on its way and land after the abort marker
                # (kafka-python lacks Kafka's transaction defence, KIP-890). Verify, don't assume.
                results[i] = PublishResult(
                    r.effect,
                    AttemptOutcome.UNKNOWN,
                    f"{r.reason}; its transaction was aborted, but a late write is not ruled out",
                    failed_in_flight=True,
                )
                continue
            cause = r.reason if own else "another record of its transaction failed"
            results[i] = PublishResult(
                r.effect,
                AttemptOutcome.ABORTED,
                f"transaction aborted, nothing visible: {cause}",
                failed_in_flight=True,
                suspect=own,
            )
        return _done(results)
    if sent:
        if before_commit is not None:
            before_commit()
        try:
            transactions.commit(producer, timeout_s)
        except Exception as exc:  # noqa: BLE001 - a commit without an answer is ambiguous
            _mark_all(
                results,
                sent,
                AttemptOutcome.UNKNOWN,
                f"ambiguous end of the transaction commit: {describe(exc)}",
                receipted=receipt is not None,
            )
    else:
        with contextlib.suppress(Exception):
            transactions.abort(producer, timeout_s)
    return _done(results)


TOO_LATE = "too late for its receipt (the batch was claimed too long ago)"


def _send_receipt(
    producer: KafkaProducer,
    receipt: ReceiptSpec,
    partitions: Sequence[int],
    results: list[PublishResult | None],
    sent: list[int],
    limit_bytes: int,
    timeout_s: float,
    deadline: float | None,
) -> str | None:
    """Write the receipt of the transaction's records (all acknowledged, with their offsets) in
    it, and wait for it; None when written, else why not."""
    lines: list[Line] = []
    batches: set[int] = set()
    for i in sent:
        r = results[i]
        assert r is not None and r.partition is not None and r.offset is not None
        e = r.effect
        lines.append((e.id, e.attempt, e.topic, r.partition, r.offset))
        if e.batch is not None:
            batches.add(e.batch)
    values = receipt_values(receipt, uuid.uuid4().hex, sorted(batches), lines, limit_bytes)
    partition = key_partition(receipt.key, partitions)
    if deadline is not None and time.monotonic() > deadline:
        return TOO_LATE  # a settler reads receipts only up to there
    try:
        futures = [
            producer.send(receipt.topic, key=receipt.key, value=value, partition=partition)
            for value in values
        ]
        deadline = time.monotonic() + timeout_s  # the records' waits are over: its own bound
        producer.flush(timeout=timeout_s)  # now, not after linger_ms
        for future in futures:
            future.get(timeout=max(0.0, deadline - time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - the transaction is aborted for it
        return f"its receipt could not be written: {describe(exc)}"
    return None


def _abort_for_receipt(
    producer: KafkaProducer,
    results: list[PublishResult | None],
    sent: list[int],
    problem: str,
    timeout_s: float,
    stop_receipts: Callable[[str], None] | None,
) -> list[PublishResult]:
    """A transaction whose receipt failed must not commit: aborted, every record innocent, and
    receipts stopped, so that a topic that keeps refusing them does not stop every batch."""
    if stop_receipts is not None:
        try:
            stop_receipts(problem)
        except Exception:
            log.exception("could not record that receipts stop; they stay on")
    try:
        transactions.abort(producer, timeout_s)
    except Exception as exc:  # noqa: BLE001 - an unfinished abort leaves everything unknown
        why = f"ambiguous: {problem}, and the abort did not complete: {describe(exc)}"
        _mark_all(results, sent, AttemptOutcome.UNKNOWN, why)
        return _done(results)
    for i in sent:
        r = results[i]
        assert r is not None
        results[i] = PublishResult(
            r.effect,
            AttemptOutcome.ABORTED,
            f"transaction aborted, nothing visible: {problem}",
            # Too late: nothing failed, the producer is sound (replacing it would make the next
            # batch later still). A receipt that failed leaves it suspect.
            failed_in_flight=problem != TOO_LATE,
            suspect=False,
        )
    return _done(results)


def _without_status(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    reason: str,
    **publish: Any,
) -> list[PublishResult]:
    """The batch without the intents whose status events were to ride with them: those are
    NOT_SENT and innocent (no backoff, no attempt counted against them); the rest published."""
    rest = [e for e in batch if not e.status_in_txn]
    sent = iter(publish_batch_transactional(producer, rest, **publish) if rest else [])
    return [
        PublishResult(e, AttemptOutcome.NOT_SENT, reason, suspect=False)
        if e.status_in_txn
        else next(sent)
        for e in batch
    ]


def _outcome(result: PublishResult | None) -> AttemptOutcome | None:
    return None if result is None else result.outcome


def _mark_all(
    results: list[PublishResult | None],
    indexes: list[int],
    outcome: AttemptOutcome,
    reason: str,
    *,
    receipted: bool = False,
) -> None:
    for i in indexes:
        r = results[i]
        assert r is not None
        results[i] = PublishResult(
            r.effect, outcome, reason, failed_in_flight=True, receipted=receipted
        )

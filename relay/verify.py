"""Is an ambiguous attempt's record in Kafka? Read it back, read_committed, after fencing.

An attempt's records carry a producer timestamp taken while the attempt ran, so the search is
bounded to the attempt's window (started_at - skew .. started_at + the longest the attempt could
have lasted + skew), over every partition of the topic: a record is found even if the topic's
partition count changed since. The producer that made the attempt must be fenced before the
search, or an open transaction could still commit after the search said "absent".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from kafka import KafkaConsumer, TopicPartition

from relay.config import Settings
from relay.headers import H_ATTEMPT, H_EFFECT_ID
from relay.publisher import kafka_security
from relay.transactions import TransactionTimeoutError


@dataclass(frozen=True)
class Found:
    partition: int
    offset: int


@dataclass(frozen=True)
class Absent:
    partitions: int
    scanned: int


def open_consumer(settings: Settings) -> KafkaConsumer:
    """One read_committed consumer, without a group, reused for the checks of one round."""
    return KafkaConsumer(
        **kafka_security(settings),
        client_id=f"relay-verify-{settings.replica_id}",
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        request_timeout_ms=int(min(settings.publish_timeout_s, 30.0) * 1000),
        bootstrap_timeout_ms=int(min(settings.publish_timeout_s, 10.0) * 1000),
        max_partition_fetch_bytes=max(1_048_576, settings.max_message_bytes * 2),
    )


def find_attempt(
    consumer: KafkaConsumer,
    settings: Settings,
    *,
    topic: str,
    operation_key: str,
    effect_id: int,
    attempt: int,
    started_at: datetime,
    timeout_s: float,
) -> Found | Absent:
    """Search the topic for this attempt's record. Raises KafkaError when Kafka can't answer."""
    try:
        return _search(
            consumer, settings, topic, (operation_key, effect_id, attempt), started_at, timeout_s
        )
    finally:
        consumer.unsubscribe()


def _search(
    consumer: KafkaConsumer,
    settings: Settings,
    topic: str,
    wanted: tuple[str, int, int],
    started_at: datetime,
    timeout_s: float,
) -> Found | Absent:
    operation_key, effect_id, attempt = wanted
    deadline = time.monotonic() + timeout_s
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        return Absent(partitions=0, scanned=0)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    skew_ms = int(settings.clock_skew_s * 1000)
    start_ms = int(started_at.timestamp() * 1000) - skew_ms
    longest_s = settings.publish_timeout_s * 2 + settings.transaction_timeout_s
    end_ms = int(started_at.timestamp() * 1000 + longest_s * 1000) + skew_ms
    starts = consumer.offsets_for_times({tp: start_ms for tp in tps})
    ends = consumer.offsets_for_times({tp: end_ms for tp in tps})
    stable_ends = consumer.end_offsets(tps)  # read_committed: the last stable offsets
    ranges: dict[TopicPartition, tuple[int, int]] = {}
    for tp in tps:
        begin = starts.get(tp)
        if begin is None:
            continue  # no record at or after the window's start
        end = ends.get(tp)
        stop = end.offset if end is not None else stable_ends[tp]
        if stop > begin.offset:
            ranges[tp] = (begin.offset, stop)
    if not ranges:
        return Absent(partitions=len(tps), scanned=0)
    consumer.assign(list(ranges))
    for tp, (begin, _) in ranges.items():
        consumer.seek(tp, begin)
    key = operation_key.encode()
    want_id, want_attempt = str(effect_id).encode(), str(attempt).encode()
    scanned = 0
    remaining = dict(ranges)
    while remaining:
        if time.monotonic() > deadline:
            raise TransactionTimeoutError(
                f"the search did not finish within {timeout_s:.1f}s ({scanned} records read)"
            )
        batch = consumer.poll(timeout_ms=200, max_records=5000)
        for tp, records in batch.items():
            for record in records:
                scanned += 1
                if record.key == key:
                    headers = dict(record.headers)
                    if (
                        headers.get(H_EFFECT_ID) == want_id
                        and headers.get(H_ATTEMPT) == want_attempt
                    ):
                        return Found(partition=tp.partition, offset=record.offset)
        for tp in list(remaining):
            if consumer.position(tp) >= remaining[tp][1]:
                del remaining[tp]
    return Absent(partitions=len(tps), scanned=scanned)

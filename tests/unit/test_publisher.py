"""What a claimed effect becomes in Kafka (relay/dispatch/publisher.py): pure, no broker."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from relay.dispatch.outcomes import AttemptOutcome
from relay.dispatch.publisher import ClaimedEffect, PublishResult, ack_latencies_s, build_record

CREATED = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


def effect(
    *,
    effect_id: int = 7,
    message_key: str = "wire-7",
    ordering_group: str | None = None,
    created_at: datetime = CREATED,
) -> ClaimedEffect:
    return ClaimedEffect(
        id=effect_id,
        operation_key="wire-7",
        message_key=message_key,
        effect_type="wire",
        topic="payments.wires",
        payload='{"amount": "12.50", "to": "Zoë"}',
        business_key="ACC:100",
        traceparent=None,
        attempt=3,
        created_at=created_at,
        ordering_group=ordering_group,
    )


def test_the_record_carries_topic_key_value_and_headers() -> None:
    record = build_record(effect(), source="/relay")
    assert record.topic == "payments.wires"
    assert record.key == b"wire-7"
    assert record.value == '{"amount": "12.50", "to": "Zoë"}'.encode()
    headers = dict(record.headers)
    assert headers["ce_id"] == b"7"  # the effect id: stable across attempts
    assert headers["relay_attempt"] == b"3"
    assert headers["ce_source"] == b"/relay"
    assert headers["ce_time"] == b"2026-11-22T12:00:00Z"
    assert headers["relay_business_key"] == b"ACC:100"
    assert "relay_ordering_group" not in headers
    assert record.partition is None  # the producer's partitioner picks it from the key


def test_the_key_is_the_message_key_not_the_operation_key() -> None:
    record = build_record(effect(message_key="reported-key"), source="/relay")
    assert record.key == b"reported-key"


def test_an_ordering_group_picks_the_partition_kafka_would_for_the_group_as_key() -> None:
    # Java's Utils.murmur2("foobar") is -790332482; toPositive(...) % 10 == 6.
    record = build_record(
        effect(ordering_group="foobar"), source="/relay", partitions=set(range(10))
    )
    assert record.partition == 6
    assert dict(record.headers)["relay_ordering_group"] == b"foobar"
    # Every effect of the group, whatever its key, goes to the same partition.
    other = build_record(
        effect(effect_id=8, message_key="another", ordering_group="foobar"),
        source="/relay",
        partitions=set(range(10)),
    )
    assert other.partition == 6
    # Java's Utils.murmur2("a-little-bit-long-string") is -985981536: partition 2 of 10.
    longer = effect(ordering_group="a-little-bit-long-string")
    assert build_record(longer, source="/relay", partitions=set(range(10))).partition == 2


def test_a_group_partition_indexes_the_sorted_partitions() -> None:
    # Index 6 of the ten partitions 10..19, whatever order they were given in.
    partitions = {19, 11, 15, 10, 12, 18, 13, 17, 16, 14}
    record = build_record(effect(ordering_group="foobar"), source="/relay", partitions=partitions)
    assert record.partition == 16


def test_without_metadata_or_without_a_group_there_is_no_partition() -> None:
    assert build_record(effect(ordering_group="foobar"), source="/relay").partition is None
    assert build_record(effect(), source="/relay", partitions={0, 1, 2}).partition is None


def test_the_estimated_size_grows_with_the_payload() -> None:
    small = build_record(effect(), source="/relay")
    assert small.estimated_size() > len(small.key) + len(small.value)
    bigger = replace(effect(), payload="x" * 10_000)
    assert build_record(bigger, source="/relay").estimated_size() >= small.estimated_size() + 9_000


def test_ack_latencies_are_only_for_acked_attempts() -> None:
    now = CREATED + timedelta(seconds=3)
    ahead = effect(created_at=now + timedelta(seconds=2))  # the database's clock ahead of ours
    naive = effect(created_at=CREATED.replace(tzinfo=None))
    results = [
        PublishResult(effect(), AttemptOutcome.ACKED),
        PublishResult(effect(), AttemptOutcome.UNKNOWN),
        PublishResult(ahead, AttemptOutcome.ACKED),
        PublishResult(naive, AttemptOutcome.ACKED),
    ]
    assert ack_latencies_s(results, now) == pytest.approx([3.0, -2.0, 3.0])

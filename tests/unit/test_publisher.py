"""What a claimed effect becomes in Kafka (relay/dispatch/publisher.py): pure, no broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatchBuilder

from relay import headers as relay_headers
from relay.dispatch.outcomes import AttemptOutcome
from relay.dispatch.publisher import (
    ClaimedEffect,
    PublishResult,
    ack_latencies_s,
    build_record,
    estimated_record_size,
    key_partition,
)

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
    bigger = effect()._replace(payload="x" * 10_000)
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


def test_an_intents_status_events_in_its_transaction_tell_its_story_on_its_keys_partition() -> None:
    from kafka.partitioner.default import murmur2

    from relay.dispatch.publisher import batch_status_records
    from relay.messages import StatusMessage

    created = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    effect = ClaimedEffect(
        41,
        "order-7",
        "order-7",
        "email",
        "emails",
        "{}",
        None,
        "00-ab-cd-01",
        1,
        created,
        batch=9,
        status_in_txn=True,
        claimed_at=created + timedelta(seconds=1),
    )
    now = created + timedelta(seconds=2)
    records = batch_status_records(
        effect, topic="relay.status", source="/relay", now=now, partitions=[0, 1, 2]
    )
    events = [StatusMessage.model_validate_json(r.value) for r in records]
    assert [(e.previous_state, e.state) for e in events] == [
        (None, "PENDING"),
        ("PENDING", "DISPATCHING"),
        ("DISPATCHING", "PUBLISHED"),
    ]
    assert [e.at for e in events] == [created, created + timedelta(seconds=1), now]
    assert [e.attempt for e in events] == [0, 1, 1]
    assert [dict(r.headers)["ce_id"] for r in records] == [b"41.b9.0", b"41.b9.1", b"41.b9.2"]
    assert all(dict(r.headers)["relay_batch_id"] == b"9" for r in records)
    assert all("relay_transition_id" not in dict(r.headers) for r in records)
    # The partition Kafka's default partitioner picks for the key, as for the log's events.
    expected = (murmur2(b"order-7") & 0x7FFFFFFF) % 3
    assert {(r.topic, r.key, r.partition) for r in records} == {
        ("relay.status", b"order-7", expected)
    }
    unknown = batch_status_records(effect, topic="relay.status", source="/relay", now=now)
    assert {r.partition for r in unknown} == {None}  # no metadata: the partitioner decides


def test_a_keyed_record_goes_where_kafka_pythons_own_partitioner_would_send_it() -> None:
    """The relay picks the partition itself (once per batch it asks for the topic's partitions);
    it must be the partition the producer's default partitioner, and Java's, would pick."""
    from kafka.cluster import ClusterMetadata
    from kafka.partitioner.default import DefaultPartitioner

    class Cluster(ClusterMetadata):  # type: ignore[misc]
        def __init__(self, partitions: set[int]) -> None:
            super().__init__()
            self._parts = partitions

        def topics(self, exclude_internal_topics: bool = True) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return self._parts

        def available_partitions_for_topic(self, topic: str) -> set[int]:
            return self._parts

    # Java's Utils.murmur2("foobar") is -790332482; toPositive(...) % 10 == 6.
    assert key_partition(b"foobar", list(range(10))) == 6
    partitioner = DefaultPartitioner()
    for partitions in ({0, 1, 2}, set(range(12)), {0, 3, 5, 7}):
        cluster = Cluster(partitions)
        for i in range(500):
            key = f"order-{i}-\u00e9".encode()
            expected = partitioner.partition("t", key, key, None, None, cluster)
            assert key_partition(key, sorted(partitions)) == expected


_NAMES = sorted(
    {
        value
        for name, value in vars(relay_headers).items()
        if name.startswith("H_") and isinstance(value, str)
    }
    | {"ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"}
)


@example(key=b"", value=b"", headers=[])
@example(key=b"k" * 127, value=b"v" * 16_383, headers=[("ce_id", b"x" * 127)] * 3)
@example(key=b"k" * 128, value=b"v" * 16_384, headers=[("ce_id", b"x" * 128)] * 3)
@example(key=b"k" * 16_384, value=b"v" * (1 << 21), headers=[("traceparent", b"")] * 130)
@given(
    key=st.binary(max_size=600),
    value=st.binary(max_size=70_000),
    headers=st.lists(st.tuples(st.sampled_from(_NAMES), st.binary(max_size=3_000)), max_size=12),
)
def test_the_estimate_bounds_kafka_pythons_from_above(
    key: bytes, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    # The appender skips send()'s own size check: the relay's estimate must never be the smaller.
    kafkas = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    assert estimated_record_size(key, value, headers) >= kafkas


_ZONES = [
    UTC,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(-timedelta(hours=8)),
    timezone(timedelta(seconds=-37, microseconds=250)),  # a fraction of a second: not cached
    ZoneInfo("Europe/Paris"),
    ZoneInfo("America/New_York"),
    ZoneInfo("UTC"),
]
_FIRST, _LAST = datetime(1000, 1, 2), datetime(9999, 12, 30)


@example(moment=datetime(2026, 11, 22, 12, 0, tzinfo=UTC))
@example(moment=datetime(2026, 11, 22, 12, 0, 0, 999_999, tzinfo=UTC))
@example(moment=datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC))
@example(moment=datetime(1000, 1, 1, tzinfo=UTC))
@example(moment=datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))
@example(moment=datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris")))  # in the gap
@example(moment=datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Paris")))  # twice: fold 0
@example(moment=datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")))
@settings(deadline=None)
@given(
    moment=st.datetimes(_FIRST, _LAST, timezones=st.sampled_from(_ZONES))
    | st.datetimes(_FIRST, _LAST)
)
def test_ce_time_is_isoformat_in_utc_with_z(moment: datetime) -> None:
    # The seconds come from a cache: each time must read as isoformat writes it, in UTC, any zone
    # it came in (a naive one is local time, as astimezone reads it).
    expected = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert relay_headers.rfc3339_uncached(moment) == expected
    # Twice: the second from the cache.
    assert relay_headers.rfc3339_uncached(moment) == expected


def test_ce_time_cache_stays_bounded() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for second in range(3 * 1024):
        relay_headers.rfc3339_uncached(start + timedelta(seconds=second, microseconds=7))
    assert len(relay_headers._SECONDS) <= relay_headers._SECONDS_KEPT
    assert relay_headers.rfc3339_uncached(start) == "2026-01-01T00:00:00Z"


@pytest.fixture
def no_cached_seconds() -> Iterator[None]:
    relay_headers._SECONDS.clear()
    yield
    relay_headers._SECONDS.clear()


@pytest.mark.usefixtures("no_cached_seconds")
def test_ce_time_tells_apart_the_folds_and_zones_of_one_wall_clock_second() -> None:
    # The cache is keyed by the wall-clock second: the same second twice in a night (the clocks
    # go back), and in two zones, are different times, one after the other in one process.
    paris = ZoneInfo("Europe/Paris")
    first = datetime(2026, 10, 25, 2, 30, 5, 120, tzinfo=paris)
    second = first.replace(fold=1)
    elsewhere = first.replace(tzinfo=ZoneInfo("America/New_York"))
    fixed = first.replace(tzinfo=timezone(timedelta(hours=2)))
    assert relay_headers.rfc3339_uncached(first) == "2026-10-25T00:30:05.000120Z"
    assert relay_headers.rfc3339_uncached(second) == "2026-10-25T01:30:05.000120Z"
    assert relay_headers.rfc3339_uncached(elsewhere) == "2026-10-25T06:30:05.000120Z"
    assert relay_headers.rfc3339_uncached(fixed) == "2026-10-25T00:30:05.000120Z"
    assert relay_headers.rfc3339_uncached(first.replace(microsecond=0)) == "2026-10-25T00:30:05Z"


class _Unhashable(tzinfo):
    """A zone that cannot be a key (as dateutil's): formatted whole, never cached."""

    __hash__ = None  # type: ignore[assignment]

    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=-3)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)

    def tzname(self, dt: datetime | None) -> str:
        return "UTC-3"


class _Moment(datetime):
    """A subclass may format itself otherwise: formatted through its own methods."""

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "subclass"


@pytest.mark.usefixtures("no_cached_seconds")
def test_ce_time_of_an_unhashable_zone_or_a_subclass_is_formatted_whole() -> None:
    moment = datetime(2026, 1, 1, 21, 0, tzinfo=_Unhashable())
    assert relay_headers.rfc3339_uncached(moment) == "2026-01-02T00:00:00Z"
    odd = _Moment(2026, 1, 1, tzinfo=UTC)
    assert relay_headers.rfc3339_uncached(odd) == odd.astimezone(UTC).isoformat().replace(
        "+00:00", "Z"
    )
    assert not relay_headers._SECONDS

"""The publisher's records go straight into kafka-python's accumulator (relay.dispatch.appender):
they must arrive as ``KafkaProducer.send`` would have sent them, and be refused where ``send``
refuses them. Real Kafka."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import kafka
import pytest
from kafka import KafkaProducer
from kafka import errors as kerr
from kafka.admin import KafkaAdminClient, NewTopic

from relay.devtools.services import Services
from relay.dispatch.appender import Appender
from tests import support


@pytest.fixture
def topic(services: Services, prefix: str) -> Iterator[str]:
    name = f"{prefix}-appended"
    admin = KafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    try:
        admin.create_topics([NewTopic(name, 3, 1)])
        yield name
    finally:
        admin.close()


def _producer(services: Services, prefix: str) -> KafkaProducer:
    producer = KafkaProducer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        transactional_id=f"{prefix}-appender",
        enable_idempotence=True,
    )
    producer.init_transactions()
    return producer


def _headers(i: int) -> list[tuple[str, bytes]]:
    return [("ce_id", f"id-{i}".encode()), ("ce_type", b"t"), ("empty", b"")]


def _seen(record: Any) -> tuple[bytes, bytes, int, list[tuple[str, bytes]]]:
    return record.key, record.value, record.partition, list(record.headers)


def test_appended_records_arrive_as_sent_ones_in_one_transaction(
    services: Services, prefix: str, topic: str
) -> None:
    producer = _producer(services, prefix)
    try:
        producer.partitions_for(topic)
        producer.begin_transaction()
        appender = Appender(producer)
        assert appender.direct
        slots, sent = [], []
        for i in range(60):
            # the same record twice: once appended, once through send()
            key, value, partition = f"k-{i}".encode(), f'{{"n": {i}}}'.encode(), i % 3
            slots.append(appender.add(topic, partition, key, value, _headers(i)))
            sent.append(
                producer.send(topic, key=key, value=value, headers=_headers(i), partition=partition)
            )
        # a record without a partition is the partitioner's, through send()
        unplaced = appender.add(topic, None, b"k-x", b"{}", _headers(99))
        futures = appender.flush()
        producer.commit_transaction()
        appended = [futures[slot].get(timeout=30) for slot in slots]
        assert futures[unplaced].get(timeout=30).offset >= 0
        assert [f.get(timeout=30).partition for f in sent] == [i % 3 for i in range(60)]
    finally:
        producer.close()
    assert [m.partition for m in appended] == [i % 3 for i in range(60)]
    records = support.read_topic(services.kafka_bootstrap_servers, topic, 121)
    assert len(records) == 121
    seen = sorted(_seen(r) for r in records if r.key != b"k-x")
    # every record arrived twice, identical: appended and sent
    assert seen[0::2] == seen[1::2]
    assert {(k, v, p) for k, v, p, _ in seen} == {
        (f"k-{i}".encode(), f'{{"n": {i}}}'.encode(), i % 3) for i in range(60)
    }
    assert all(h == _headers(int(k.decode()[2:])) for k, _, _, h in seen)
    # each partition's records in the order they were added
    for p in range(3):
        offsets = [m.offset for i, m in enumerate(appended) if i % 3 == p]
        assert offsets == sorted(offsets)


def test_runs_of_appends_fill_producer_batches_in_order(
    services: Services, prefix: str, topic: str
) -> None:
    # Producer batches of 16 KiB hold about 15 of these records: a run stops where one fills and
    # the accumulator makes the next.
    producer = KafkaProducer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        transactional_id=f"{prefix}-runs",
        enable_idempotence=True,
        batch_size=16 * 1024,
    )
    try:
        producer.init_transactions()
        producer.partitions_for(topic)
        producer.begin_transaction()
        appender = Appender(producer)
        value = b"v" * 1000
        slots = [appender.add(topic, 1, f"r-{i}".encode(), value, _headers(i)) for i in range(2000)]
        futures = appender.flush()
        producer.commit_transaction()
        offsets = [futures[slot].get(timeout=30).offset for slot in slots]
    finally:
        producer.close()
    assert offsets == list(range(offsets[0], offsets[0] + 2000))
    records = support.read_topic(services.kafka_bootstrap_servers, topic, 2000)
    assert [r.key for r in records] == [f"r-{i}".encode() for i in range(2000)]
    assert {r.partition for r in records} == {1}


def test_an_append_outside_a_transaction_is_refused_as_send_refuses_it(
    services: Services, prefix: str, topic: str
) -> None:
    producer = _producer(services, prefix)
    try:
        producer.partitions_for(topic)
        appender = Appender(producer)
        slots = [appender.add(topic, 0, b"k", b"{}", []), appender.add(topic, 0, b"j", b"{}", [])]
        refused = appender.flush()
        with pytest.raises(kerr.IllegalStateError) as sent:
            producer.send(topic, key=b"k", value=b"{}", partition=0)
        assert all(isinstance(refused[slot], kerr.IllegalStateError) for slot in slots)
        assert {str(refused[slot]) for slot in slots} == {str(sent.value)}
    finally:
        producer.close()


def test_a_producer_without_the_accumulator_is_sent_to_through_send(
    services: Services, prefix: str, topic: str
) -> None:
    producer = _producer(services, prefix)
    try:
        producer.begin_transaction()
        # only send(): what a kafka-python without the internals offers
        facade: Any = types.SimpleNamespace(send=producer.send)
        appender = Appender(facade)
        assert not appender.direct
        slot = appender.add(topic, 2, b"k-1", b'{"a": 1}', _headers(1))
        future = appender.flush()[slot]
        producer.commit_transaction()
        assert future.get(timeout=30).partition == 2
    finally:
        producer.close()
    records = support.read_topic(services.kafka_bootstrap_servers, topic, 1)
    assert [_seen(r) for r in records] == [(b"k-1", b'{"a": 1}', 2, _headers(1))]


def test_another_kafka_python_version_is_sent_to_through_send(
    services: Services, prefix: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The accumulator's shape is kafka-python 3.0's: any other version goes through send().
    monkeypatch.setattr(kafka, "__version__", "3.1.0")
    producer = _producer(services, prefix)
    try:
        producer.begin_transaction()
        appender = Appender(producer)
        assert not appender.direct
        slot = appender.add(topic, 0, b"k-2", b"{}", _headers(2))
        future = appender.flush()[slot]
        producer.commit_transaction()
        assert future.get(timeout=30).partition == 0
    finally:
        producer.close()


def test_a_closed_producer_refuses_every_queued_record(
    services: Services, prefix: str, topic: str
) -> None:
    producer = _producer(services, prefix)
    producer.partitions_for(topic)
    producer.begin_transaction()
    appender = Appender(producer)
    slots = [appender.add(topic, p, b"k", b"{}", []) for p in (0, 1, 2)]
    producer.close()
    refused = appender.flush()
    assert all(isinstance(refused[slot], kerr.IllegalStateError) for slot in slots)

"""One run of :mod:`bench.kafka_ceiling`, in its own interpreter (argv: a JSON list).

Nothing imports kafka-python before ``main`` decides whether ``crc32c`` is hidden: kafka-python
binds its checksum function when ``kafka.record.util`` is first imported.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def main() -> None:
    bootstrap, topic, position_topic, n, per_txn, use_crc32c = json.loads(sys.argv[1])
    if not use_crc32c:
        sys.modules["crc32c"] = None  # type: ignore[assignment]  # its import now fails
    from kafka import KafkaProducer
    from kafka.record import util

    from relay.dispatch.transactions import commit
    from relay.headers import dispatch_headers

    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        transactional_id=f"bench-ceiling-{uuid.uuid4().hex[:8]}",
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        linger_ms=5,
        batch_size=256 * 1024,
    )
    producer.init_transactions()
    producer.partitions_for(topic)
    if position_topic is not None:
        producer.partitions_for(position_topic)
    created = datetime.now(UTC)
    # key ~30 bytes, value ~100 bytes of JSON
    keys = [f"order-{i:09d}-{uuid.uuid4().hex[:15]}".encode() for i in range(n)]
    values = [
        (f'{{"n": {i}, "account": "ACC-{i % 977:04d}", "amount": {i % 10_000}, "body": "')
        .ljust(96, "x")
        .encode()
        + b'"}'
        for i in range(n)
    ]
    before = os.times()
    started = time.monotonic()
    for first in range(0, n, per_txn):
        producer.begin_transaction()
        futures = []
        last = min(n, first + per_txn)
        for i in range(first, last):
            headers = dispatch_headers(
                effect_id=i + 1,
                effect_type="bench",
                attempt=1,
                created_at=created,
                source="relay://bench",
                business_key=None,
                traceparent=TRACEPARENT,
            )
            futures.append(producer.send(topic, key=keys[i], value=values[i], headers=headers))
        if position_topic is not None:
            position = json.dumps({"lane": 0, "through": last}).encode()
            futures.append(producer.send(position_topic, key=b"lane-0", value=position))
        commit(producer, 60.0)  # the relay's bounded commit (pitfalls.md)
        for future in futures:  # flush() does not raise for failed records
            future.get(timeout=0)
    seconds = time.monotonic() - started
    after = os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    producer.close(timeout=10)
    print(json.dumps([seconds, cpu, util.crc32c_c is not None]))


if __name__ == "__main__":
    main()

"""How fast the relay checks ambiguous publishes in Kafka, against checking them one at a time.

A topic holds N committed records written over a few seconds, as a relay writes them. Then K
attempts are looked for, half of them present and half absent (an attempt number never written),
first one search per attempt (the baseline: what the relay did before rounds), then in rounds of
``VERIFY_ROUND`` attempts with one read of their merged windows (what the relay does now).

    .venv/bin/python -m bench.bench_verify [--records 20000] [--checks 300]
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

from kafka.admin import KafkaAdminClient, NewTopic

from relay.config import Settings, load_settings
from relay.devtools.services import local_services
from relay.dispatch.lookup import (
    Absent,
    Found,
    Unprovable,
    Wanted,
    find_attempt,
    find_attempts,
    open_consumer,
)
from relay.dispatch.transactions import commit
from relay.dispatch.verifier import VERIFY_ROUND
from relay.headers import dispatch_headers
from relay.kafka_client import make_producer


def _fill(settings: Settings, topic: str, records: int, seconds: float) -> list[Wanted]:
    """Write the records in transactions of 200, spread over ``seconds``; return what was sent."""
    producer = make_producer(settings, f"bench-verify-{uuid.uuid4().hex[:6]}")
    producer.init_transactions()
    sent: list[Wanted] = []
    pause = seconds / max(1, records // 200)
    for start in range(0, records, 200):
        producer.begin_transaction()
        now = datetime.now(UTC)
        for i in range(start, min(records, start + 200)):
            key = f"v-{i:06d}"
            headers = dispatch_headers(
                effect_id=i,
                effect_type="bench",
                attempt=1,
                created_at=now,
                source="/bench",
                business_key=None,
                traceparent=None,
            )
            producer.send(topic, key=key.encode(), value=b"{}", headers=headers)
            sent.append(Wanted(key, i, 1, now - timedelta(milliseconds=5)))
        commit(producer, 30)
        time.sleep(pause)
    producer.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--checks", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0, help="time the writes span")
    args = parser.parse_args()
    with local_services() as services:
        prefix = uuid.uuid4().hex[:8]
        settings = load_settings(
            None,
            database_url=services.database_url,
            kafka_bootstrap_servers=services.kafka_bootstrap_servers,
            replica_id=f"bench-{prefix}",
            metrics_port=0,
        )
        topic = f"{prefix}.verify"
        admin = KafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
        admin.create_topics([NewTopic(topic, 3, 1)])
        admin.close()
        sent = _fill(settings, topic, args.records, args.seconds)
        rng = random.Random(7)
        picked = rng.sample(sent, args.checks)
        # Half of them absent: the same effect, an attempt that was never written.
        wanted = [
            w if n % 2 == 0 else Wanted(w.key, w.effect_id, 2, w.started_at)
            for n, w in enumerate(picked)
        ]
        consumer = open_consumer(settings)
        try:
            started = time.monotonic()
            one_by_one = {
                w: find_attempt(
                    consumer,
                    settings,
                    topic=topic,
                    key=w.key,
                    effect_id=w.effect_id,
                    attempt=w.attempt,
                    started_at=w.started_at,
                    timeout_s=30,
                )
                for w in wanted
            }
            single_s = time.monotonic() - started
            started = time.monotonic()
            rounds: dict[Wanted, Found | Absent | Unprovable] = {}
            for at in range(0, len(wanted), VERIFY_ROUND):
                rounds.update(
                    find_attempts(consumer, settings, topic, wanted[at : at + VERIFY_ROUND], 30)
                )
            rounds_s = time.monotonic() - started
        finally:
            consumer.close()
        found = sum(isinstance(v, Found) for v in rounds.values())
        disagree = [
            w
            for w in wanted
            if (isinstance(one_by_one[w], Found) or isinstance(rounds[w], Found))
            and one_by_one[w] != rounds[w]
        ]
        if disagree or found != (len(wanted) + 1) // 2:
            raise SystemExit(f"wrong answers: {found} found, disagreeing on {disagree[:3]}")
        print(
            f"verification ({args.records:,} records over {args.seconds:.0f}s, {args.checks} "
            f"attempts, {found} present): one search each {single_s:.2f}s "
            f"({args.checks / single_s:,.0f} checks/s); rounds of {VERIFY_ROUND} "
            f"{rounds_s:.2f}s ({args.checks / rounds_s:,.0f} checks/s), "
            f"{single_s / rounds_s:.1f}x faster"
        )


if __name__ == "__main__":
    main()

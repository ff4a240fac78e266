"""How fast the reconciler applies downstream results, against a bare consumer of the same topic.

N wires are published by the relay; then N "committed" results are written to the result topic,
and one reconciler applies them (each stored as evidence and moving its effect to CONFIRMED in the
same transaction, offsets committed after it): once with status events off, once on (each
confirmation then also writes a status effect to the outbox). The baseline is a bare
read_committed kafka-python consumer reading the same records without doing anything.

    .venv/bin/python -m bench.bench_reconciler [--results 5000]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import psycopg
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

import relay
from bench.common import bare_consumer_rate, start_thread
from relay.config import Settings, load_settings
from relay.devtools.services import local_services
from relay.dispatch.daemon import Relay
from relay.migrations import migrate, sync_effect_types
from relay.reconciler.daemon import Reconciler


def _settings(server_url: str, bootstrap: str, prefix: str, status_events: bool) -> Settings:
    name = f"bench_{prefix}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return load_settings(
        None,
        database_url=server_url.rsplit("/", 1)[0] + f"/{name}",
        kafka_bootstrap_servers=bootstrap,
        replica_id=f"bench-{prefix}",
        metrics_port=0,
        reconcile_group_id=f"bench-{prefix}",
        status_events=status_events,
        status_topic=f"{prefix}.status",
        effect_types={
            "wire": {
                "topic": f"{prefix}.wires",
                "idempotent": True,
                "result_topic": f"{prefix}.results",
                "outcome_timeout_s": 3600,
            }
        },
    )


def _count(url: str, state: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM relay.effect WHERE state = %s AND effect_type = 'wire'", (state,)
        ).fetchone()
    return int(row[0]) if row else 0


def _wait(url: str, state: str, n: int) -> None:
    while _count(url, state) < n:
        time.sleep(0.05)


def _publish_and_report(settings: Settings, n: int) -> None:
    """The wires, published by the relay; then one committed result for each."""
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        sync_effect_types(conn, settings)
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("wire", f"w-{i}", {"n": i}) for i in range(n)])
        conn.commit()
    daemon = Relay(settings)
    thread = start_thread(daemon)
    _wait(url, "PUBLISHED", n)
    daemon.stop()
    thread.join()
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5)
    topic = settings.effect_types["wire"].result_topic
    for i in range(n):
        value = {"operation_key": f"w-{i}", "outcome": "committed", "external_id": f"x-{i}"}
        producer.send(topic, key=f"w-{i}".encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()


def reconcile_rate(server_url: str, bootstrap: str, n: int, status_events: bool) -> float:
    settings = _settings(server_url, bootstrap, uuid.uuid4().hex[:8], status_events)
    _publish_and_report(settings, n)
    started = time.monotonic()
    daemon = Reconciler(settings)
    thread = start_thread(daemon)
    _wait(settings.require_database_url(), "CONFIRMED", n)
    elapsed = time.monotonic() - started
    daemon.stop()
    thread.join()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results", type=int, default=5000)
    args = parser.parse_args()
    n = args.results
    with local_services() as services:
        url, bootstrap = services.database_url, services.kafka_bootstrap_servers
        quiet = reconcile_rate(url, bootstrap, n, status_events=False)
        loud = reconcile_rate(url, bootstrap, n, status_events=True)
        topic = f"bare-{uuid.uuid4().hex[:6]}"
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(topic, 3, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        for _ in range(n):
            producer.send(topic, key=b"k", value=b'{"operation_key": "k", "outcome": "committed"}')
        producer.flush()
        producer.close()
        bare = bare_consumer_rate(bootstrap, topic, n, from_first_record=False)
    print(
        f"reconciler ({n:,} committed results, one replica, start-up and group join included): "
        f"{quiet:,.0f} results/s with status events off, {loud:,.0f}/s on "
        f"(status events cost {(1 - loud / quiet) * 100:.0f}%); bare read_committed consumer "
        f"{bare:,.0f} records/s (ratio {quiet / bare:.3f})"
    )


if __name__ == "__main__":
    main()

"""Relay benchmarks on real servers, each figure beside a baseline measured in the same run.

1. throughput: N effects published by one relay, against a bare kafka-python producer sending the
   same records with the same settings (acks=all, idempotent);
2. latency: enqueue-to-ack (created_at -> published_at) at a steady offered rate;
3. writers: the application's commit rate (8 processes, one intent per transaction) with and
   without a relay running, against plain inserts and against a NOTIFY per transaction.

    .venv/bin/python -m bench.bench_relay [--effects 20000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid

import psycopg
from kafka import KafkaProducer

import relay
from bench.common import PLAIN_TABLE, fresh_db, start_thread, writers
from relay.config import Settings, load_settings
from relay.devtools.services import local_services
from relay.dispatch.daemon import Relay
from relay.kafka_client import make_producer
from relay.migrations import migrate, sync_effect_types
from relay.reconciler.daemon import register_status_type

_WRITER_BYTES = 32  # the writers' payload: a small JSON object


def _settings(url: str, bootstrap: str, prefix: str, transactions: bool = True) -> Settings:
    return load_settings(
        None,
        database_url=url,
        kafka_bootstrap_servers=bootstrap,
        replica_id=f"bench-{prefix}",
        kafka_transactions=transactions,
        metrics_port=0,
        effect_types={"bench": {"topic": f"{prefix}.bench", "idempotent": True}},
    )


def _prepare(settings: Settings) -> None:
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        migrate(conn)
        sync_effect_types(conn, settings)


def _count(url: str, state: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM relay.effect WHERE state = %s", (state,)
        ).fetchone()
    return int(row[0]) if row else 0


def _start(settings: Settings) -> tuple[Relay, threading.Thread]:
    daemon = Relay(settings)
    return daemon, start_thread(daemon)


def bench_throughput(server_url: str, bootstrap: str, effects: int) -> None:
    transactional = _relay_throughput(server_url, bootstrap, effects, transactions=True)[0]
    idempotent = _relay_throughput(server_url, bootstrap, effects, transactions=False)[0]
    bare = _bare_throughput(server_url, bootstrap, effects)
    print(
        f"throughput ({effects} effects, one relay): transactional {transactional:,.0f}/s; "
        f"idempotent-only {idempotent:,.0f}/s (transactions cost "
        f"{(1 - transactional / idempotent) * 100:.0f}%); bare kafka-python producer "
        f"{bare:,.0f} records/s (relay/bare: {transactional / bare:.2f} transactional, "
        f"{idempotent / bare:.2f} idempotent)"
    )


def _relay_throughput(
    server_url: str, bootstrap: str, effects: int, *, transactions: bool
) -> tuple[float, float]:
    prefix = uuid.uuid4().hex[:8]
    settings = _settings(fresh_db(server_url), bootstrap, prefix, transactions)
    _prepare(settings)
    url = settings.require_database_url()
    payload = {"to": "someone@example.com", "subject": "hello", "body": "x" * 200}
    with psycopg.connect(url) as conn:
        for start in range(0, effects, 5000):
            relay.enqueue_many(
                conn,
                [
                    relay.Intent("bench", f"e-{i}", payload)
                    for i in range(start, min(effects, start + 5000))
                ],
            )
        conn.commit()
    # Warm the topic's metadata so neither side pays for topic creation.
    warm = make_producer(settings)
    warm.send(f"{prefix}.bench", b"warm").get(timeout=30)
    warm.close()

    started = time.monotonic()
    daemon, thread = _start(settings)
    while _count(url, "PUBLISHED") < effects:
        time.sleep(0.05)
    relay_s = time.monotonic() - started
    daemon.stop()
    thread.join()
    return effects / relay_s, relay_s


def _bare_throughput(server_url: str, bootstrap: str, effects: int) -> float:
    prefix = uuid.uuid4().hex[:8]
    settings = _settings("postgresql://unused", bootstrap, prefix, False)
    payload = {"to": "someone@example.com", "subject": "hello", "body": "x" * 200}
    warm = make_producer(settings)
    warm.send(f"{prefix}.bench", b"warm").get(timeout=30)
    warm.close()
    producer: KafkaProducer = make_producer(settings)
    value = json.dumps(payload).encode()
    started = time.monotonic()
    futures = [
        producer.send(f"{prefix}.bench", key=f"b-{i}".encode(), value=value) for i in range(effects)
    ]
    producer.flush()
    for future in futures:
        future.get(timeout=30)
    bare_s = time.monotonic() - started
    producer.close()
    return effects / bare_s


def bench_latency(server_url: str, bootstrap: str, seconds: float, rate: float) -> None:
    prefix = uuid.uuid4().hex[:8]
    settings = _settings(fresh_db(server_url), bootstrap, prefix)
    _prepare(settings)
    url = settings.require_database_url()
    daemon, thread = _start(settings)
    time.sleep(2.0)  # let it go idle and arm the doorbell
    sent = 0
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() - started < seconds:
            relay.enqueue(conn, "bench", f"l-{sent}", {"n": sent})
            sent += 1
            next_at = started + sent / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
    while _count(url, "PUBLISHED") < sent:
        time.sleep(0.05)
    daemon.stop()
    thread.join()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM published_at - created_at) * 1000 FROM relay.effect"
        ).fetchall()
    ms = sorted(float(r[0]) for r in rows)
    q = statistics.quantiles(ms, n=100)
    print(
        f"latency enqueue->ack at {rate:.0f}/s offered ({len(ms)} effects): "
        f"p50 {q[49]:.1f} ms, p95 {q[94]:.1f} ms, p99 {q[98]:.1f} ms, max {ms[-1]:.1f} ms"
    )


def bench_wakeup(server_url: str, bootstrap: str, samples: int) -> None:
    """Idle relay (doorbell armed), one intent: how long until the relay claims it."""
    prefix = uuid.uuid4().hex[:8]
    settings = _settings(fresh_db(server_url), bootstrap, prefix)
    _prepare(settings)
    url = settings.require_database_url()
    daemon, thread = _start(settings)
    time.sleep(2.0)
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(samples):
            relay.enqueue(conn, "bench", f"w-{i}", {"n": i})
            time.sleep(0.4)  # past the quiet polls: the doorbell is armed again
        rows = conn.execute(
            "SELECT extract(epoch FROM d.at - p.at) * 1000 FROM relay.transition_log p "
            "JOIN relay.transition_log d ON d.effect_id = p.effect_id "
            "WHERE p.to_state = 'PENDING' AND d.to_state = 'DISPATCHING'"
        ).fetchall()
    daemon.stop()
    thread.join()
    ms = sorted(float(r[0]) for r in rows)
    q = statistics.quantiles(ms, n=20)
    print(
        f"wake-up of an idle relay (enqueue commit -> claim, {len(ms)} samples): "
        f"p50 {q[9]:.1f} ms, p95 {q[18]:.1f} ms, max {ms[-1]:.1f} ms "
        f"(the polling fallback alone would average {settings.poll_interval_s * 500:.0f} ms)"
    )


def _writers(url: str, mode: str, seconds: float, processes: int) -> float:
    return writers(url, mode, processes=processes, per_txn=1, size=_WRITER_BYTES, seconds=seconds)


def bench_writers(server_url: str, bootstrap: str, seconds: float, processes: int) -> None:
    prefix = uuid.uuid4().hex[:8]
    settings = _settings(fresh_db(server_url), bootstrap, prefix)
    _prepare(settings)
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PLAIN_TABLE)
    plain = _writers(url, "plain", seconds, processes)
    idle = _writers(url, "enqueue", seconds, processes)
    notify = _writers(url, "notify", seconds, processes)
    with psycopg.connect(url, autocommit=True) as conn:
        register_status_type(conn, settings.model_copy(update={"status_events": True}))
    status = _writers(url, "enqueue", seconds, processes)  # each enqueue also writes its event
    with psycopg.connect(url, autocommit=True) as conn:
        register_status_type(conn, settings.model_copy(update={"status_events": False}))
    daemon, thread = _start(settings)
    with_relay = _writers(url, "enqueue", seconds, processes)
    daemon.stop()
    thread.join()
    print(
        f"application commits/s, {processes} writers, one intent per transaction: "
        f"plain insert {plain:,.0f}; relay.enqueue without relay {idle:,.0f} "
        f"({idle / plain:.2f}x plain); with the relay running {with_relay:,.0f} "
        f"({with_relay / plain:.2f}x plain); enqueue + NOTIFY per transaction {notify:,.0f} "
        f"({notify / plain:.2f}x plain); relay.enqueue with status events on (relay idle) "
        f"{status:,.0f} ({status / idle:.2f}x without)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--effects", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--fsync", action="store_true", help="fsync on (realistic commit cost)")
    args = parser.parse_args()
    with local_services(fsync=args.fsync) as services:
        print(f"services: fsync={'on' if args.fsync else 'off'}")
        bench_throughput(services.database_url, services.kafka_bootstrap_servers, args.effects)
        bench_wakeup(services.database_url, services.kafka_bootstrap_servers, 40)
        bench_latency(
            services.database_url, services.kafka_bootstrap_servers, args.seconds, args.rate
        )
        bench_writers(
            services.database_url, services.kafka_bootstrap_servers, args.seconds, args.writers
        )


if __name__ == "__main__":
    main()

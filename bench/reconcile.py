"""(d) The reconciler draining a backlog of results, against a bare read_committed consumer.

The backlog: N intents of an effect type with a result topic, written by ``relay.enqueue``
(:func:`bench.common.fill_backlog`) and published by ``relay run`` before the reconciler starts,
and one "committed" result per effect on the result topic: every result confirms its effect.
Progress is read from the consumer group's committed offsets, which the reconciler commits only
after the database transaction that applied the records.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from bench.common import (
    DaemonProcess,
    backend_cpu_s,
    bare_consumer_rate,
    cpu_by_role,
    create_topic,
    delete_topics,
    drop_db,
    fill_backlog,
    fresh_db,
    prepare,
    process_cpu_s,
    settings_for,
)
from bench.report import Figure, Target
from relay.config import Settings

# What the relay leaves behind for an effect whose type awaits a result: its effect row,
# PUBLISHED (the intake has no state: an intent not read yet has no effect row).
_PUBLISHED = "SELECT count(*) FROM relay.effect WHERE effect_type = 'wire' AND state = 'PUBLISHED'"
# What every committed result should have made of its effect.
_CONFIRMED = "SELECT count(*) FROM relay.effect WHERE effect_type = 'wire' AND state = 'CONFIRMED'"


def confirmed(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(_CONFIRMED).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class ReconcileSizes:
    results: int = 100_000
    status_events: tuple[bool, ...] = (True, False)
    timeout_s: float = 300.0


def wire_settings(server_url: str, bootstrap: str, status_events: bool) -> tuple[Settings, str]:
    prefix = uuid.uuid4().hex[:8]
    url = fresh_db(server_url)
    settings = settings_for(
        url,
        bootstrap,
        prefix,
        status_events=status_events,
        effect_types={
            "wire": {
                "topic": f"{prefix}.wires",
                "idempotent": True,
                "result_topic": f"{prefix}.results",
                "outcome_timeout_s": 3600,
            }
        },
    )
    prepare(settings)
    return settings, prefix


def result_topic(settings: Settings) -> str:
    topic = settings.effect_types["wire"].result_topic
    assert topic is not None
    return topic


def _produce_results(bootstrap: str, topic: str, n: int) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","), linger_ms=20, batch_size=256 * 1024
    )
    for i in range(n):
        value = {"operation_key": f"w-{i}", "outcome": "committed", "external_id": f"x-{i}"}
        producer.send(topic, key=f"w-{i}".encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()


def publish_by_relay(settings: Settings, n: int, timeout_s: float, log_dir: Path) -> float:
    """``relay run`` publishes the backlog, so that the reconciler finds every effect as the relay
    leaves it: PUBLISHED, awaiting its result. Returns the seconds it took.

    Until this existed the backlog was moved to PUBLISHED by an UPDATE of ``relay.effect``; since
    enqueue writes the intake (issue 19) that statement found no row, and every result was
    quarantined as naming no effect: the reconciler's figure measured that path instead."""
    url = settings.require_database_url()
    started = time.monotonic()
    daemon = DaemonProcess("run", settings, log_dir / f"reconcile-relay-{settings.replica_id}.log")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                daemon.check_alive()
                row = conn.execute(_PUBLISHED).fetchone()
                if row is not None and int(row[0]) >= n:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout_s:
                    raise RuntimeError(
                        f"the relay published {row[0] if row else 0} of {n} wires "
                        f"within {timeout_s:.0f} s"
                    )
                time.sleep(0.2)
    finally:
        daemon.stop()


def results_backlog(
    settings: Settings,
    bootstrap: str,
    n: int,
    *,
    fill: bool = True,
    publish: tuple[float, Path] | None = None,
) -> None:
    """One committed result for each of N wire effects (keys w-<i>) in the result topic, produced
    by another process while the database works; with ``fill``, the N intents are enqueued first;
    with ``publish`` (a timeout and a log directory), the relay publishes them before this returns
    (:func:`publish_by_relay`)."""
    url = settings.require_database_url()
    topic = result_topic(settings)
    create_topic(bootstrap, topic)
    ctx = mp.get_context("spawn")
    producer = ctx.Process(target=_produce_results, args=(bootstrap, topic, n))
    producer.start()
    if fill:
        fill_backlog(url, "wire", n, 64, "w-")
    if publish is not None:
        create_topic(bootstrap, settings.effect_types["wire"].topic)
        if settings.status_events:
            create_topic(bootstrap, settings.status_topic)
        took = publish_by_relay(settings, n, *publish)
        print(f"  (d) the relay published the {n:,} wires in {took:.0f} s", flush=True)
    producer.join()
    if producer.exitcode != 0:
        raise RuntimeError(f"producing {n} results failed (exit {producer.exitcode})")


def committed_total(admin: KafkaAdminClient, group: str) -> int:
    offsets: dict[Any, Any] = admin.list_group_offsets({group: None}).get(group, {})
    return sum(max(0, int(meta.offset)) for meta in offsets.values())


@dataclass(frozen=True)
class Reconciled:
    """Results a second from the first committed offset to the last, and over that window the
    reconciler process's CPU and its PostgreSQL backends' a result (us; None if not read)."""

    rate: float | None
    note: str = ""
    cpu_us: float | None = None
    pg_us: float | None = None


def reconciler_rate(
    settings: Settings, bootstrap: str, n: int, timeout_s: float, log_dir: Path
) -> Reconciled:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    daemon = DaemonProcess("reconcile", settings, log_dir / f"reconcile-{settings.replica_id}.log")
    url = settings.require_database_url()
    spawned = time.monotonic()
    first: tuple[float, int, float | None] | None = None
    backends_first = backends_end = None
    done, now, cpu_end = 0, spawned, None
    try:
        deadline = spawned + timeout_s
        while time.monotonic() < deadline:
            daemon.check_alive()
            done = committed_total(admin, settings.reconcile_group_id)
            now = time.monotonic()
            cpu_now = process_cpu_s(daemon.proc.pid)
            if done and first is None:
                first = (now, done, cpu_now)
                backends_first = backend_cpu_s(url)
            if done >= n:
                cpu_end = cpu_now
                backends_end = backend_cpu_s(url)
                break
            time.sleep(0.1)
    finally:
        daemon.stop()
        admin.close()
    if done < n:
        return Reconciled(None, f"timed out after {timeout_s:.0f} s at {done} results")
    assert first is not None
    if first[1] >= n or now - first[0] < 0.5:
        return Reconciled(n / (now - spawned), "start-up and group join included")
    applied = n - first[1]
    cpu_us = (
        (cpu_end - first[2]) * 1e6 / applied
        if cpu_end is not None and first[2] is not None
        else None
    )
    roles = cpu_by_role(backends_first, backends_end)
    pg_us = roles["reconciler"] * 1e6 / applied if roles and "reconciler" in roles else None
    return Reconciled(applied / (now - first[0]), "", cpu_us, pg_us)


def run(server_url: str, bootstrap: str, sizes: ReconcileSizes, log_dir: Path) -> list[Figure]:
    n = sizes.results
    figures: list[Figure] = []
    bare: float | None = None
    for status in sizes.status_events:
        settings, prefix = wire_settings(server_url, bootstrap, status)
        try:
            results_backlog(settings, bootstrap, n, publish=(sizes.timeout_s, log_dir))
            if bare is None:
                bare = bare_consumer_rate(bootstrap, result_topic(settings), n)
                print(f"  (d) bare read_committed consumer: {bare:,.0f} records/s", flush=True)
            got = reconciler_rate(settings, bootstrap, n, sizes.timeout_s, log_dir)
            applied = confirmed(settings.require_database_url())
        finally:
            delete_topics(bootstrap, prefix)
            drop_db(server_url, settings.require_database_url())
        name = f"reconciler, backlog of {n:,} results, status events {'on' if status else 'off'}"
        cpu = ", ".join(
            f"CPU {where} {us:.0f} us a result"
            for where, us in (("in the reconciler", got.cpu_us), ("in its backends", got.pg_us))
            if us is not None
        )
        short = f"only {applied:,} of {n:,} effects CONFIRMED" if applied != n else ""
        rate, note = got.rate, "; ".join(part for part in (short, got.note, cpu) if part)
        told = "; ".join(part for part in (short, cpu) if part)
        print(f"  (d) {name}: {rate or 0:,.0f} results/s {told}".rstrip(), flush=True)
        figures.append(
            Figure(
                "d",
                name,
                rate,
                "results/s",
                ceiling=bare,
                ceiling_name="bare read_committed consumer",
                targets=(Target("value", ">=", 5000), Target("ratio", ">=", 0.2)),
                note=note,
            )
        )
    return figures

"""``relay demo``: the whole path on real servers, for a first look.

Starts a throwaway PostgreSQL and Kafka broker unless RELAY_DATABASE_URL /
RELAY_KAFKA_BOOTSTRAP_SERVERS name existing ones, runs the relay in this process, writes intents
the way an application would (one transaction rolled back, to show it leaves nothing), and prints
the effects' states as they move until every one has ended.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import click
import psycopg

from relay import outbox
from relay.config import EffectTypeSpec, Settings
from relay.daemon import Relay
from relay.devservices import LocalKafka, local_services
from relay.migrations import migrate, sync_effect_types
from relay.sql import query

DEMO_TYPES: dict[str, dict[str, Any]] = {
    "demo.email": {"topic": "demo.emails", "idempotent": True},
    "demo.wire": {
        "topic": "demo.wires",
        "business_key": "{account}:{amount}:{date}",
    },
}


def _demo_settings(settings: Settings, database_url: str, bootstrap: str) -> Settings:
    types = dict(settings.effect_types)
    for name, spec in DEMO_TYPES.items():
        types.setdefault(name, EffectTypeSpec(name=name, **spec))
    return settings.model_copy(
        update={
            "database_url": database_url,
            "kafka_bootstrap_servers": bootstrap,
            "effect_types": types,
            "publish_timeout_s": min(settings.publish_timeout_s, 3.0),
            "metrics_port": 0,
        }
    )


def run_demo(settings: Settings, *, effects: int, keep_running: bool) -> None:
    # kafka-python narrates every lost connection at ERROR; the relay's own lines say what matters.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    with ExitStack() as stack:
        click.echo("starting services (a throwaway PostgreSQL and Kafka unless configured) ...")
        started = time.monotonic()
        services = stack.enter_context(local_services(fsync=True))
        click.echo(
            f"  PostgreSQL {services.database_url}\n  Kafka      {services.kafka_bootstrap_servers}"
            f"\n  ready in {time.monotonic() - started:.1f}s"
        )
        cfg = _demo_settings(settings, services.database_url, services.kafka_bootstrap_servers)
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            applied = migrate(conn)
            sync_effect_types(conn, cfg)
        click.echo(f"schema migrated ({len(applied)} new migrations); effect types synced")

        daemon = Relay(cfg)
        thread = threading.Thread(target=daemon.run, name="relay", daemon=True)
        thread.start()
        stack.callback(thread.join, 30)
        stack.callback(daemon.stop)
        click.echo(f"relay running (replica {cfg.replica_id})\n")

        run_id = uuid.uuid4().hex[:6]
        click.echo("act 1: an application commits intents; the relay publishes them")
        keys = _write_intents(services.database_url, run_id, effects, cfg.max_request_size)
        _watch(services.database_url, keys)
        click.echo("")
        _show_one(services.database_url, keys[0])
        if services.local_kafka is not None and cfg.kafka_transactions:
            click.echo(
                "\nact 2: the broker freezes while a batch is in flight (SIGSTOP): the publish "
                "ends UNKNOWN,\nnot failed and not retried; when Kafka answers again the relay "
                "fences the old producer,\nreads the partitions back (read_committed) and decides"
            )
            frozen = _freeze_mid_publish(services.database_url, services.local_kafka, run_id)
            click.echo("")
            _show_one(services.database_url, frozen, attempts=True)
        if keep_running:
            click.echo("\nrelay still running; enqueue more with 'relay enqueue'. Ctrl-C stops.")
            try:
                while thread.is_alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        click.echo("\nstopping the relay and the services ...")


def _write_intents(url: str, run_id: str, effects: int, max_request_size: int) -> list[str]:
    keys: list[str] = []
    with psycopg.connect(url) as conn:
        # An application's transaction that rolls back: its intent never exists.
        outbox.enqueue(conn, "demo.email", f"demo-{run_id}-rolled-back", {"to": "nobody"})
        conn.rollback()
        click.echo("a transaction that rolled back left no effect behind")
        for i in range(effects):
            key = f"demo-{run_id}-{i:04d}"
            if i % 2:
                payload = {"account": f"ACC{i:03d}", "amount": 100 + i, "date": "2026-11-22"}
                outbox.enqueue(conn, "demo.wire", key, payload)
            else:
                outbox.enqueue(conn, "demo.email", key, {"to": f"user{i}@example.com"})
            keys.append(key)
        # One record too large for Kafka: refused definitively, and it holds up nothing else.
        big = f"demo-{run_id}-too-large"
        outbox.enqueue(conn, "demo.email", big, {"blob": "x" * (max_request_size + 1)})
        keys.append(big)
        conn.commit()
    click.echo(f"committed {len(keys)} intents in one application transaction\n")
    return keys


def _freeze_mid_publish(url: str, broker: LocalKafka, run_id: str) -> str:
    keys = [f"demo-{run_id}-frozen-{i}" for i in range(5)]
    broker.pause()
    try:
        with psycopg.connect(url) as conn:
            for key in keys:
                outbox.enqueue(conn, "demo.email", key, {"to": f"{key}@example.com"})
            conn.commit()
        _watch(url, keys, until=lambda states: states.get("UNKNOWN") == len(keys))
        click.echo("  ... the broker answers again")
    finally:
        broker.resume()
    _watch(url, keys, timeout_s=120.0)
    return keys[0]


def _states(url: str, keys: list[str]) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM relay.effect WHERE operation_key = ANY(%s) GROUP BY 1",
            (keys,),
        ).fetchall()
    return {str(s): int(n) for s, n in rows}


def _settled(states: dict[str, int]) -> bool:
    return not (states.get("PENDING") or states.get("DISPATCHING") or states.get("UNKNOWN"))


def _watch(
    url: str,
    keys: list[str],
    timeout_s: float = 60.0,
    until: Callable[[dict[str, int]], bool] = _settled,
) -> None:
    """Print the keys' state counts each time they change, until ``until`` holds."""
    started = time.monotonic()
    last: dict[str, int] = {}
    while time.monotonic() - started < timeout_s:
        states = _states(url, keys)
        if states != last:
            line = "  ".join(f"{s}={n}" for s, n in sorted(states.items()))
            click.echo(f"  t+{time.monotonic() - started:5.2f}s  {line}")
            last = states
        if until(states):
            return
        time.sleep(0.05)
    click.echo("  (some effects are still in flight after the demo's wait)")


def _show_one(url: str, key: str, *, attempts: bool = False) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        effect = conn.execute(query("get_effect"), {"operation_key": key}).fetchone()
        if effect is None:
            return
        rows = conn.execute(query("get_transitions"), {"effect_id": effect[0]}).fetchall()
        tried = conn.execute(query("get_attempts"), {"effect_id": effect[0]}).fetchall()
    click.echo(f"the story of {key} (as 'relay show {key}' tells it):")
    if attempts:
        for number, replica, _epoch, _start, _end, outcome, reason, *_rest, check, _at in tried:
            click.echo(f"  attempt {number} by {replica}: {outcome}: {reason}")
            if check:
                click.echo(f"    checked in Kafka: {check}")
    for from_state, to_state, reason, actor, _attempt, at in rows:
        click.echo(
            f"  {at:%H:%M:%S.%f}  {from_state or '-':>11} -> {to_state:<11} {actor}: {reason}"
        )

"""Helpers of the reconciler tests: settings with short timers, a reconciler in a thread, the
downstream service as a subprocess, producing raw result records, reading the books."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from relay.config import Settings
from relay.reconciler.daemon import Reconciler
from tests import support

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-11-22"}


def wire_types(
    prefix: str,
    *,
    observer_url: str | None = None,
    python_observer: str | None = None,
    outcome_timeout_s: float = 30.0,
    max_attempts: int = 3,
    observer_timeout_s: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """A wire type awaiting results, undone by a wire-reversal; an email type without results."""
    wire: dict[str, Any] = {
        "topic": f"{prefix}.wires",
        "business_key": "{account}:{amount}:{date}",
        "result_topic": f"{prefix}.wire-results",
        "outcome_timeout_s": outcome_timeout_s,
        "compensation": "wire-reversal",
        "max_attempts": max_attempts,
    }
    if observer_url is not None:
        wire["observer"] = {"http_url": observer_url, "timeout_s": observer_timeout_s}
    if python_observer is not None:
        wire["observer"] = {"python": python_observer, "timeout_s": observer_timeout_s}
    return {
        "wire": wire,
        "wire-reversal": {
            "topic": f"{prefix}.wire-reversals",
            "idempotent": True,
            "result_topic": f"{prefix}.wire-results",
            "outcome_timeout_s": outcome_timeout_s,
        },
        "email": {"topic": f"{prefix}.emails", "idempotent": True},
    }


def isolate_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """RELAY_* variables point the session at running servers; they must not also override
    the per-test database in the settings (the environment wins over explicit values)."""
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)


def reconciler_settings(
    database_url: str, bootstrap: str, prefix: str, **overrides: Any
) -> Settings:
    """Settings with short timers, migrated database, topics created up front."""
    values: dict[str, Any] = {
        "effect_types": wire_types(prefix),
        "reconcile_group_id": f"{prefix}-reconciler",
        "reconcile_interval_s": 0.2,
        "observe_backoff_s": 0.2,
        "observe_backoff_max_s": 1.0,
        "observe_max_tries": 3,
        "redispatch_backoff_s": 0.1,
        "status_topic": f"{prefix}.status",
        "poll_interval_s": 0.2,
        **overrides,
    }
    settings = support.make_settings(database_url, bootstrap, prefix, **values)
    support.prepare_database(settings)
    topics = {s.topic for s in settings.effect_types.values()}
    topics |= {s.result_topic for s in settings.effect_types.values() if s.result_topic}
    create_topics(bootstrap, sorted(topics | {settings.status_topic}))
    return settings


def create_topics(bootstrap: str, topics: Sequence[str], partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        for topic in new:
            # Another client (the downstream's consumer) may auto-create it meanwhile.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic])
    finally:
        admin.close()


@contextmanager
def running_reconciler(settings: Settings) -> Iterator[Reconciler]:
    daemon = Reconciler(settings)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        assert daemon.ready.wait(60), "the reconciler did not start"
        yield daemon
    finally:
        daemon.stop()
        thread.join(60)
        assert not thread.is_alive(), "the reconciler did not stop"


def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=5)


def result(
    key: str, outcome: str = "committed", external_id: str | None = None
) -> tuple[bytes, bytes]:
    doc: dict[str, Any] = {"operation_key": key, "outcome": outcome}
    if external_id is not None:
        doc["external_id"] = external_id
    return key.encode(), json.dumps(doc).encode()


def state(url: str, key: str) -> str | None:
    """The effect's state; an intent claimed in a batch has no effect row yet (DISPATCHING),
    nor has one in a published batch (PUBLISHED)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT state FROM relay.effect WHERE operation_key = %s "
            "UNION ALL SELECT 'DISPATCHING' FROM relay.batch_effect WHERE operation_key = %s "
            "UNION ALL SELECT 'PUBLISHED' FROM relay.published_effect WHERE operation_key = %s",
            (key, key, key),
        ).fetchone()
    return str(row[0]) if row else None


def states(url: str, keys: Sequence[str]) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT operation_key, state FROM relay.effect WHERE operation_key = ANY(%s) "
            "UNION ALL SELECT operation_key, 'PUBLISHED' FROM relay.published_effect "
            "WHERE operation_key = ANY(%s)",
            (list(keys), list(keys)),
        ).fetchall()
    return {str(k): str(s) for k, s in rows}


def transitions(url: str, key: str) -> list[tuple[str | None, str, str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT t.from_state, t.to_state, t.actor, t.reason FROM relay.transition_log t"
            " JOIN relay.effect e ON e.id = t.effect_id WHERE e.operation_key = %s"
            " ORDER BY t.transition_id, t.part",
            (key,),
        ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def verdicts(url: str, kind: str = "result") -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT verdict, count(*) FROM relay.evidence WHERE kind = %s GROUP BY verdict", (kind,)
        ).fetchall()
    return {str(v): int(n) for v, n in rows}


def observations(url: str) -> list[tuple[str, str]]:
    """(operation key, answer) of every applied observation, by key then time."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT operation_key, outcome FROM relay.evidence"
            " WHERE kind = 'observation' AND verdict = 'applied' ORDER BY operation_key, id"
        ).fetchall()
    return [(str(k), str(o)) for k, o in rows]


def children(url: str, key: str) -> list[tuple[str, str, str]]:
    """Compensations of an effect: (operation key, type, state)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.operation_key, c.effect_type, c.state FROM relay.effect c"
            " JOIN relay.effect p ON p.id = c.parent_effect_id WHERE p.operation_key = %s"
            " ORDER BY c.id",
            (key,),
        ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


class Downstream:
    """The downstream service (tests/downstream/service.py) as a real subprocess."""

    def __init__(self, settings_bootstrap: str, prefix: str, workdir: Path) -> None:
        self.bootstrap = settings_bootstrap
        self.prefix = prefix
        self.books_path = workdir / f"{prefix}-books.sqlite"
        self.faults_path = workdir / f"{prefix}-faults.json"
        self.log_path = workdir / f"{prefix}-downstream.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.set_faults()

    def set_faults(self, keys: dict[str, list[str]] | None = None, http: str = "normal") -> None:
        tmp = self.faults_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": keys or {}, "http": http, "slow_s": 3.0}))
        tmp.replace(self.faults_path)

    @property
    def observer_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/wires/{{business_key}}"

    def start(self) -> Downstream:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.downstream.service",
                "--bootstrap", self.bootstrap,
                "--dispatch-topic", f"{self.prefix}.wires",
                "--reversal-topic", f"{self.prefix}.wire-reversals",
                "--result-topic", f"{self.prefix}.wire-results",
                "--group", f"{self.prefix}-bank",
                "--books", str(self.books_path),
                "--faults", str(self.faults_path),
                "--port", str(self.port),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready port="), f"downstream did not start: {line!r}\n{self.log()}"
        self.port = int(line.split("=", 1)[1])
        return self

    def log(self, lines: int = 40) -> str:
        """The end of the service's stderr, for a failure message."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            support.stop_process(self.proc)
            self.proc = None

    def received_count(self) -> int:
        """Records the bank has read so far (booked or not)."""
        with sqlite3.connect(self.books_path) as db:
            row = db.execute("SELECT count(*) FROM received").fetchone()
        return int(row[0]) if row else 0

    def books(self) -> list[tuple[str, str, str | None, int | None]]:
        """(kind, operation key, business key, attempt) of every booking, in order."""
        with sqlite3.connect(self.books_path) as db:
            rows = db.execute(
                "SELECT kind, operation_key, business_key, attempt FROM books ORDER BY id"
            ).fetchall()
        return [(str(a), str(b), c, d) for a, b, c, d in rows]

    def history(self, key: str) -> list[tuple[float, str]]:
        """(time, what) of every request, booking and result send of ``key``."""
        with sqlite3.connect(self.books_path) as db:
            rows = db.execute(
                "SELECT at, 'received attempt ' || coalesce(attempt, '?') || ' from ' || topic"
                " || ': ' || what FROM received WHERE operation_key = :k"
                " UNION ALL SELECT at, 'booked ' || external_id FROM books WHERE operation_key = :k"
                " UNION ALL SELECT at, 'result ' || coalesce(external_id, '?') || coalesce("
                " ' failed: ' || error, ' acknowledged at ' || partition || '@' || \"offset\")"
                " FROM sent WHERE operation_key = :k ORDER BY 1",
                {"k": key},
            ).fetchall()
        return [(float(at), str(what)) for at, what in rows]

    def received(self, key: str) -> list[tuple[int | None, str]]:
        with sqlite3.connect(self.books_path) as db:
            rows = db.execute(
                "SELECT attempt, what FROM received WHERE operation_key = ? ORDER BY rowid", (key,)
            ).fetchall()
        return [(a, str(w)) for a, w in rows]

    def net_wires(self, business_key: str) -> int:
        kinds = [b[0] for b in self.books() if b[2] == business_key]
        return kinds.count("wire") - kinds.count("reversal")

"""A steady load for the fault scenarios: an application thread that enqueues intents the way an
application does (one transaction per small group, retried with the same operation keys until
its commit is known), and the settings, topics and drain shared by the scenarios.

``RELAY_SOAK=1`` turns on the soak profile: more intents, more fault rounds."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

import relay
from relay.config import Settings
from tests import support
from tests.downstream import harness as h


@dataclass(frozen=True)
class Profile:
    intents: int  # per scenario
    seconds: float  # over which the feeder spreads them
    rounds: int  # fault rounds per scenario

    @property
    def soak(self) -> bool:
        return self.rounds > 1


def profile() -> Profile:
    if os.environ.get("RELAY_SOAK", "") not in ("", "0"):
        return Profile(
            intents=int(os.environ.get("RELAY_SOAK_INTENTS", "6000")),
            seconds=float(os.environ.get("RELAY_SOAK_SECONDS", "120")),
            rounds=int(os.environ.get("RELAY_SOAK_ROUNDS", "5")),
        )
    return Profile(intents=300, seconds=12.0, rounds=1)


def wire(i: int) -> dict[str, Any]:
    """A wire whose business key is its own (the amount is unique)."""
    return {**h.WIRE, "amount": 10_000 + i}


def intents(prefix: str, count: int, *, wires: bool) -> list[relay.Intent]:
    """Half wires (through the downstream bank) and half e-mails, or e-mails only."""
    made: list[relay.Intent] = []
    for i in range(count):
        if wires and i % 2 == 0:
            made.append(relay.Intent("wire", f"{prefix}-w{i:05d}", wire(i)))
        else:
            made.append(relay.Intent("email", f"{prefix}-e{i:05d}", {"to": f"u{i}@example.org"}))
    return made


class Feeder(threading.Thread):
    """Enqueues ``items`` over ``seconds``, a few per transaction. A transaction whose commit
    failed (the database restarted, the connection was cut) is retried with the same operation
    keys, as an application retries: the outbox answers an existing key with the existing effect.
    Every key ends up committed; ``committed`` says which ones are known to be."""

    def __init__(self, url: str, items: list[relay.Intent], seconds: float) -> None:
        super().__init__(daemon=True, name="feeder")
        self.url = url
        self.items = items
        self.seconds = seconds
        self.committed: set[str] = set()
        self.retries = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            self._feed()
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def _feed(self) -> None:
        rounds = max(1, int(self.seconds * 10))
        per_round = max(1, -(-len(self.items) // rounds))
        conn: psycopg.Connection[Any] | None = None
        for start in range(0, len(self.items), per_round):
            chunk = self.items[start : start + per_round]
            while not self.halt.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.url, connect_timeout=5)
                    relay.enqueue_many(conn, chunk)
                    conn.commit()
                    break
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    self.retries += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.2)
            else:
                return
            self.committed.update(i.operation_key for i in chunk)
            time.sleep(0.1)
        if conn is not None:
            conn.close()

    def finish(self) -> set[str]:
        self.join(self.seconds + 120.0)
        assert not self.is_alive(), "the application could not enqueue its intents"
        if self.error is not None:
            raise AssertionError(f"the application failed: {self.error!r}") from self.error
        return self.committed


def fault_settings(
    database_url: str,
    bootstrap: str,
    prefix: str,
    *,
    observer_url: str | None = None,
    **overrides: Any,
) -> Settings:
    """Settings of a fault scenario: short timers, so that every ambiguous outcome is checked and
    settled within the scenario. Results are due after 30 s: longer than the bank's consumer group
    takes to recover from a broker fault, so that a late bank does not make the reconciler
    re-dispatch wires it merely has not read yet (see the checker's "redispatched"). The budgets
    of checks and observations (100 x 2 s, 30 x 2 s)
    outlast the scenario's drain (120 s): an effect the relay could not settle in time is then
    reported UNKNOWN, as it is, rather than STUCK because the test spent its budget too fast."""
    types = h.wire_types(
        prefix, observer_url=observer_url, outcome_timeout_s=30.0, observer_timeout_s=2.0
    )
    values: dict[str, Any] = {
        "effect_types": types,
        "reconcile_group_id": f"{prefix}-reconciler",
        "reconcile_interval_s": 0.5,
        "observe_backoff_s": 0.5,
        "observe_backoff_max_s": 2.0,
        "observe_max_tries": 30,
        "redispatch_backoff_s": 0.5,
        "redispatch_backoff_max_s": 2.0,
        "status_topic": f"{prefix}.status",
        "status_events": False,
        "poll_interval_s": 0.2,
        "batch_size": 50,
        "lease_s": 15.0,
        "publish_timeout_s": 5.0,
        "transaction_timeout_s": 15.0,
        "verify_max_tries": 100,
        "verify_backoff_max_s": 2.0,
        "not_sent_backoff_s": 0.2,
        "not_sent_backoff_max_s": 2.0,
        "outage_backoff_max_s": 2.0,
        "max_publish_attempts": 50,
        **overrides,
    }
    return support.make_settings(database_url, bootstrap, prefix, **values)


def topics_of(settings: Settings) -> list[str]:
    names = {s.topic for s in settings.effect_types.values()}
    names |= {s.result_topic for s in settings.effect_types.values() if s.result_topic}
    return sorted(names | {settings.status_topic})


def create_topics(bootstrap: str, topics: list[str], replication: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        for topic in topics:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(topic, 3, replication)])
    finally:
        admin.close()


def done(url: str, settings: Settings) -> bool:
    """Every effect settled: e-mails PUBLISHED, wires and their reversals CONFIRMED; no intent
    left without an effect row, unless it lies in a published batch (e-mails, status events
    off)."""
    awaiting = {name for name, spec in settings.effect_types.items() if spec.result_topic}
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM relay.effect WHERE NOT ("
            " (effect_type = ANY(%s) AND state = 'CONFIRMED')"
            " OR (NOT effect_type = ANY(%s) AND state = 'PUBLISHED')))"
            " + (SELECT count(*) FROM relay.intake i"
            "    WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)"
            "      AND NOT EXISTS (SELECT 1 FROM relay.published_intent(i.id)))",
            (sorted(awaiting), sorted(awaiting)),
        ).fetchone()
    return row is not None and int(row[0]) == 0


def drain(url: str, settings: Settings, timeout_s: float) -> bool:
    """Wait for every effect to settle; False (not an error: the checker says what is left)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done(url, settings):
            return True
        time.sleep(0.5)
    return False

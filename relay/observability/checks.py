"""Readiness checks a daemon can hand to the observability server.

Each opens its own short-lived connection with a short timeout: a probe must answer within a
probe's timeout and must never borrow (or disturb) the daemon's working connections.
"""

from __future__ import annotations

import psycopg
from kafka import KafkaConsumer

from relay.config import Settings
from relay.kafka_client import kafka_security
from relay.migrations import check_current
from relay.observability.server import Check
from relay.sql import query

TIMEOUT_S = 3


def database_check(settings: Settings) -> Check:
    """PostgreSQL answers a query."""

    def check() -> None:
        with psycopg.connect(
            settings.require_database_url(),
            autocommit=True,
            connect_timeout=TIMEOUT_S,
            application_name="relay-readyz",
        ) as conn:
            conn.execute(query("observability_ping"))

    return check


def migrations_check(settings: Settings) -> Check:
    """The database has every migration this code needs (else the daemon would refuse to run)."""

    def check() -> None:
        with psycopg.connect(
            settings.require_database_url(),
            autocommit=True,
            connect_timeout=TIMEOUT_S,
            application_name="relay-readyz",
        ) as conn:
            check_current(conn)

    return check


def kafka_check(settings: Settings) -> Check:
    """A broker answers a metadata request, with the daemon's own security settings."""

    def check() -> None:
        consumer = KafkaConsumer(
            **kafka_security(settings),
            client_id=f"relay-readyz-{settings.replica_id}",
            bootstrap_timeout_ms=TIMEOUT_S * 1000,
            request_timeout_ms=TIMEOUT_S * 1000,
            enable_auto_commit=False,
        )
        try:
            consumer.topics()
        finally:
            consumer.close()

    return check


def standard_checks(settings: Settings) -> dict[str, Check]:
    """What both daemons need before they can do any work."""
    return {
        "database": database_check(settings),
        "migrations": migrations_check(settings),
        "kafka": kafka_check(settings),
    }

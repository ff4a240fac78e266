"""relay/migrations.py on the real PostgreSQL: a migration never queues the outbox behind a
long reader for longer than its lock timeout (issue 18 item 8f)."""

from __future__ import annotations

import threading
import time

import psycopg

from relay.devtools.services import Services
from relay.errors import MigrationError
from relay.migrations import available, migrate, sync_effect_types
from tests import support


def test_a_long_reader_delays_enqueues_by_one_lock_timeout_at_most(
    database_url: str, services: Services, prefix: str
) -> None:
    # 0007 alters relay.effect: the reader's lock stands in its way.
    before = next(m.version for m in available() if m.name == "application_isolation") - 1
    settings = support.make_settings(database_url, services.kafka_bootstrap_servers, prefix)
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, target=before)
        sync_effect_types(conn, settings)
    reader = psycopg.connect(database_url)
    reader.execute("SELECT count(*) FROM relay.effect")  # holds its lock until it ends
    failures: list[BaseException] = []

    def try_to_migrate() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            try:
                migrate(conn, lock_timeout_s=0.5, tries=3)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                failures.append(exc)

    migrating = threading.Thread(target=try_to_migrate)
    migrating.start()
    time.sleep(0.2)
    # While the migration waits for the reader, an enqueue waits for the migration; each try
    # gives up after its lock timeout, so the enqueue goes through well before the reader ends.
    # The application enqueueing meanwhile runs the previous release (new code never runs on an
    # older schema: docs/deployment.md), whose enqueue is the SQL function on this schema.
    with psycopg.connect(database_url) as app:
        app.execute("SET statement_timeout = '20s'")
        row = app.execute(
            "SELECT created FROM relay.enqueue('while-migrating', 'email', '{\"a\": 1}'::jsonb)"
        ).fetchone()
        assert row is not None and row[0] is True
        app.commit()
    migrating.join(60)
    assert len(failures) == 1 and isinstance(failures[0], MigrationError)
    assert "could not take the locks" in str(failures[0])
    reader.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        applied = migrate(conn, lock_timeout_s=0.5, tries=3)
        assert [m.version for m in applied] == [m.version for m in available()][before:]

"""An upgrade with effects in flight (issue 19): a database at migration 0013 (batches claimed
per read, an effect row each at the outcome) holds intents not read yet and a batch claimed by a
replica of the old version; `relay migrate` takes it to the newest schema, and a relay of this
version publishes every intent exactly once. And intents purged before migration 0025 keep
their keys through it. Real PostgreSQL and Kafka."""

from __future__ import annotations

import psycopg
import pytest

import relay
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.dispatch.ticker import Ticker
from relay.errors import InvalidTransitionError, OperationKeyConflictError
from relay.migrations import available, migrate, sync_effect_types
from relay.reconciler.purge import purge
from tests import support

BEFORE = 13  # the schema of the version before published batches


def test_an_upgrade_with_a_batch_in_flight_publishes_everything_once(
    database_url: str, services: Services, prefix: str
) -> None:
    settings = support.make_settings(
        database_url, services.kafka_bootstrap_servers, prefix, status_events=False
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, target=BEFORE)
        sync_effect_types(conn, settings)
        for i in range(6):
            conn.execute(
                "SELECT * FROM relay.enqueue(%s, 'email', %s::jsonb)",
                (f"old-{i}", f'{{"i": {i}}}'),
            )
        # A replica of the old version claims them (its read, its function) and dies before
        # recording anything: the batch stays behind with a short lease, and its last heartbeat
        # is long past (so its attempts may be checked in Kafka at once).
        conn.execute(
            "INSERT INTO relay.replica (replica_id, epoch, heartbeat_at)"
            " VALUES ('old', 1, now() - interval '1 hour')"
        )
        Ticker().run_once(conn)
        claimed = conn.execute(
            "SELECT count(*) FROM relay.promote_intake(100, 1000, 'old', 1, 0.5, 100, 1000000)"
            " WHERE id IS NOT NULL"
        ).fetchone()
        assert claimed == (6,)
        # Intents enqueued by the old version and not read before the upgrade.
        for i in range(6, 10):
            conn.execute(
                "SELECT * FROM relay.enqueue(%s, 'email', %s::jsonb)",
                (f"old-{i}", f'{{"i": {i}}}'),
            )
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (1,)
        applied = [m.version for m in migrate(conn)]
        assert applied == [m.version for m in available() if m.version > BEFORE], applied
    keys = [f"old-{i}" for i in range(10)]
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: support.count_states(database_url) == {"PUBLISHED": 10},
            90,
            "the old batch expired and verified, the unread intents published",
        )
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 10)
    assert sorted(r.key.decode() for r in records) == keys  # each exactly once
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The old replica's claim: attempt 1 unknown (its lease ran out), verified absent, then
        # published by this relay, all in effect rows; the unread ones in a published batch.
        rows = conn.execute(
            "SELECT e.operation_key, a.attempt, a.replica_id, a.outcome FROM relay.effect e"
            " JOIN relay.attempt a ON a.effect_id = e.id ORDER BY e.id, a.attempt"
        ).fetchall()
        assert rows == [
            (f"old-{i}", n, who, outcome)
            for i in range(6)
            for n, who, outcome in ((1, "old", "unknown"), (2, settings.replica_id, "acked"))
        ]
        published = conn.execute(
            "SELECT operation_key FROM relay.published_effect ORDER BY id"
        ).fetchall()
        assert published == [(f"old-{i}",) for i in range(6, 10)]
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (0,)


def test_intents_purged_before_0025_stay_refused_then_are_forgotten(
    database_url: str, services: Services, prefix: str
) -> None:
    """Intents published in a batch and purged by a version before migration 0025 (their keys in
    relay.purged_key, their intake rows emptied, unmarked) keep working after it: the key is
    refused at enqueue, the intent cannot be cancelled or seen, and the purge that forgets keys
    deletes both rows when the dedupe window ends."""
    settings = support.make_settings(
        database_url, services.kafka_bootstrap_servers, prefix, status_events=False
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, target=24)
        sync_effect_types(conn, settings)
        for i in range(3):
            conn.execute(
                "SELECT * FROM relay.enqueue(%s, 'email', %s::jsonb)",
                (f"kept-{i}", f'{{"i": {i}}}'),
            )
        # What a relay of that version records for a batch it published.
        conn.execute(
            "INSERT INTO relay.published_batch (batch_id, effect_type, owner, owner_epoch,"
            " claimed_at, first_id, last_id, n, ids, partitions, offsets)"
            " SELECT 1, 'email', 'old', 1, now(), min(id), max(id), count(*),"
            " array_agg(id ORDER BY id), array_agg(0), array_agg(id ORDER BY id)"
            " FROM relay.intake"
        )
        removed = conn.execute("SELECT count(*) FROM relay.purge_batch(0, 500)").fetchone()
        assert removed == (3,)
        assert conn.execute("SELECT count(*) FROM relay.purged_key").fetchone() == (3,)
        migrate(conn)
        assert conn.execute(
            "SELECT count(*) FROM relay.intake WHERE purged_at IS NULL"
        ).fetchone() == (3,)  # not marked: relay.purged_key speaks for them
        with pytest.raises(OperationKeyConflictError, match="purged"):
            relay.enqueue(conn, "email", "kept-0", {"i": 0})
        with pytest.raises(InvalidTransitionError, match="is purged"):
            relay.cancel(conn, "kept-1")
        assert relay.get_effect(conn, "kept-2") is None
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)
        purge(conn, settings.model_copy(update={"dedupe_window_s": 0.000001}), 0.0)
        assert conn.execute("SELECT count(*) FROM relay.intake").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM relay.purged_key").fetchone() == (0,)
        assert relay.enqueue(conn, "email", "kept-0", {"i": 0}).created

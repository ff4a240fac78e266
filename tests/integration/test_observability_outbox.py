"""The outbox gauges, read from a real PostgreSQL, as every replica reports them."""

from __future__ import annotations

import time

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.observability.metrics import OutboxCollector
from tests import support


def snapshot(collector: OutboxCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def effects(
    snap: dict[tuple[str, tuple[tuple[str, str], ...]], float], t: str, state: str
) -> float:
    return snap[("relay_effects", (("effect_type", t), ("state", state)))]


def force_state(
    conn: psycopg.Connection[tuple[object, ...]], key: str, state: str, ago_s: float
) -> None:
    """Move an effect to ``state`` as if ``ago_s`` seconds ago, with its transition row."""
    conn.execute(
        "WITH e AS (UPDATE relay.effect SET state = %(s)s, updated_at = now() "
        "WHERE operation_key = %(k)s RETURNING id, attempts) "
        "INSERT INTO relay.transition"
        " (effect_id, from_state, to_state, reason, actor, attempt, at) "
        "SELECT id, 'DISPATCHING', %(s)s, 'test', 'test', attempts, "
        "now() - make_interval(secs => %(ago)s) FROM e",
        {"s": state, "k": key, "ago": ago_s},
    )


def test_counts_by_type_and_state_and_oldest_ages(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(3):
            relay.enqueue(conn, "email", f"mail-{i}", {"to": f"u{i}@example.com"})
        relay.enqueue(conn, "wire", "wire-1", {"account": "A", "amount": 1, "date": "d"})
        relay.enqueue(conn, "wire", "wire-2", {"account": "A", "amount": 2, "date": "d"})
        support.read_intake(url)
        # A scheduled effect is not lag: it is not due yet.
        conn.execute(
            "UPDATE relay.effect SET available_at = now() + interval '1 hour' "
            "WHERE operation_key = 'mail-2'"
        )
        conn.execute(
            "UPDATE relay.effect SET available_at = now() - interval '42 seconds' "
            "WHERE operation_key = 'mail-0'"
        )
        force_state(conn, "wire-1", "UNKNOWN", ago_s=600)
        # updated_at is recent (a failed verification moves it on); the age must come from the
        # transition into UNKNOWN.
        force_state(conn, "wire-2", "STUCK", ago_s=120)

    collector = OutboxCollector(url, cache_s=0.01)
    try:
        snap = snapshot(collector)
        assert snap[("relay_effects_query_success", ())] == 1
        assert effects(snap, "email", "PENDING") == 3
        assert effects(snap, "wire", "UNKNOWN") == 1
        assert effects(snap, "wire", "STUCK") == 1
        assert effects(snap, "wire", "PENDING") == 0  # zeros are reported, not left out
        assert effects(snap, "email", "CONFIRMED") == 0
        assert 42 <= snap[("relay_oldest_pending_age_seconds", ())] < 60
        assert 600 <= snap[("relay_oldest_unknown_age_seconds", ())] < 620
        assert 120 <= snap[("relay_oldest_stuck_age_seconds", ())] < 140

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE relay.effect SET state = 'CONFIRMED' WHERE state = 'UNKNOWN'")
        time.sleep(0.02)
        snap = snapshot(collector)
        assert effects(snap, "wire", "UNKNOWN") == 0
        assert effects(snap, "wire", "CONFIRMED") == 1
        assert snap[("relay_oldest_unknown_age_seconds", ())] == 0
    finally:
        collector.close()


def test_one_query_per_cache_period(settings: Settings) -> None:
    url = settings.require_database_url()
    collector = OutboxCollector(url, cache_s=60)
    try:
        first = snapshot(collector)
        with psycopg.connect(url, autocommit=True) as conn:
            relay.enqueue(conn, "email", "late", {"to": "x@example.com"})
        assert snapshot(collector) == first  # served from the cache
    finally:
        collector.close()


def test_database_down_reports_failure_and_no_stale_numbers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "postgresql://relay:t0psecret@127.0.0.1:1/nothing"
    collector = OutboxCollector(bad, cache_s=0.01, timeout_s=1)
    snap = snapshot(collector)
    assert snap[("relay_effects_query_success", ())] == 0
    assert not any(name == "relay_effects" for name, _ in snap)
    assert not any(name.startswith("relay_oldest_") for name, _ in snap)
    assert "t0psecret" not in caplog.text

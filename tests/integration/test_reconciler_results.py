"""The reconciler's result consumer on the real broker and database."""

from __future__ import annotations

import json

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.status_feed import StatusFeed
from tests import support
from tests.downstream import harness as h


@pytest.fixture
def rsettings(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    return h.reconciler_settings(database_url, services.kafka_bootstrap_servers, prefix)


def _enqueue(url: str, keys: list[str]) -> None:
    with psycopg.connect(url) as conn:
        for i, key in enumerate(keys):
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": 100 + i})
        conn.commit()


def test_results_move_effects_and_everything_is_kept_as_evidence(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    url = rsettings.require_database_url()
    bootstrap = services.kafka_bootstrap_servers
    keys = ["w-commit", "w-reject", "w-unknown", "w-twice"]
    _enqueue(url, keys)
    topic = f"{prefix}.wire-results"
    with support.running(Relay(rsettings)), h.running_reconciler(rsettings) as rec:
        support.wait_for(
            lambda: set(h.states(url, keys).values()) == {"PUBLISHED"}, 30, "publication"
        )
        h.produce(
            bootstrap,
            topic,
            [
                h.result("w-commit", external_id="x-1"),
                h.result("w-reject", "rejected"),
                h.result("w-unknown", "unknown"),
                h.result("w-twice", external_id="t-1"),
                (b"junk", b"\xff\xfe not json"),
                (b"w-commit", b'{"operation_key": "w-commit", "outcome": "maybe"}'),
                (b"tombstone", None),
                h.result("nobody-has-this-key"),
                h.result("w-commit", external_id="x-1"),  # the same commit reported again
            ],
        )
        support.wait_for(
            lambda: (
                h.states(url, keys[:2]) == {"w-commit": "CONFIRMED", "w-reject": "REJECTED"}
                and h.state(url, "w-twice") == "CONFIRMED"
            ),
            30,
            "results applied",
        )
        # A second commit with another external id: stays CONFIRMED, one compensation.
        h.produce(bootstrap, topic, [h.result("w-twice", external_id="t-2")] * 2)
        support.wait_for(lambda: len(h.children(url, "w-twice")) == 1, 30, "a compensation")
        support.wait_for(
            lambda: sum(h.verdicts(url).values()) == 11, 30, "every record stored as evidence"
        )
        # No observer declared: an UNKNOWN effect goes STUCK for a person.
        support.wait_for(lambda: h.state(url, "w-unknown") == "STUCK", 30, "STUCK")
        support.wait_for(
            lambda: h.state(url, "w-twice#compensation") == "PUBLISHED", 30, "compensation sent"
        )
        consumed = rec.results.applied_records
    assert consumed == 11
    assert h.verdicts(url) == {
        "applied": 4,
        "malformed": 3,
        "orphaned": 1,
        "repeated": 1,
        "conflicting": 2,
    }
    assert h.state(url, "w-twice") == "CONFIRMED"
    assert h.children(url, "w-twice") == [("w-twice#compensation", "wire-reversal", "PUBLISHED")]
    assert [t[:2] for t in h.transitions(url, "w-unknown")][-2:] == [
        ("PUBLISHED", "UNKNOWN"),
        ("UNKNOWN", "STUCK"),
    ]
    with psycopg.connect(url) as conn:
        effect = relay.get_effect(conn, "w-commit")
        ext = conn.execute(
            "SELECT external_id FROM relay.effect WHERE operation_key = 'w-commit'"
        ).fetchone()
    assert effect is not None and ext == ("x-1",)

    # Redelivery: a new consumer group reads every record again; nothing is applied twice.
    before = h.verdicts(url), h.transitions(url, "w-twice"), h.children(url, "w-twice")
    again = rsettings.model_copy(update={"reconcile_group_id": f"{prefix}-again"})
    with h.running_reconciler(again) as rec2:
        support.wait_for(lambda: rec2.results.counts["redelivered"] == 11, 30, "redelivery")
    assert (h.verdicts(url), h.transitions(url, "w-twice"), h.children(url, "w-twice")) == before


def test_status_events_for_every_transition_through_the_outbox(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    url = rsettings.require_database_url()
    bootstrap = services.kafka_bootstrap_servers
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        _enqueue(url, ["s-1"])
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "email", "e-1", {"to": "a@example.org"})
            conn.commit()
        support.wait_for(lambda: h.state(url, "s-1") == "PUBLISHED", 30, "publication")
        h.produce(bootstrap, f"{prefix}.wire-results", [h.result("s-1", external_id="b-1")])
        support.wait_for(lambda: h.state(url, "s-1") == "CONFIRMED", 30, "confirmation")
        support.wait_for(lambda: support.status_backlog(url) == 0, 30, "status events sent")
    events = []
    with StatusFeed.from_settings(rsettings, effect_types={"wire"}) as feed:
        for _ in range(20):
            events.extend(feed.poll(0.5))
            if len(events) >= 4:
                break
    story = sorted(events, key=lambda e: e.at)
    assert [(e.previous_state, e.state) for e in story] == [
        (None, "PENDING"),
        ("PENDING", "DISPATCHING"),
        ("DISPATCHING", "PUBLISHED"),
        ("PUBLISHED", "CONFIRMED"),
    ]
    assert {e.operation_key for e in story} == {"s-1"} and story[-1].attempt == 1
    assert "b-1" in story[-1].reason
    with psycopg.connect(url) as conn:
        # Status events are read from the transitions log: they are no effects of their own.
        n = conn.execute(
            "SELECT count(*) FROM relay.effect WHERE effect_type = 'relay.status'"
        ).fetchone()
    assert n == (0,)
    # One event per transition, each published once: 4 transitions of the wire, 3 of the email.
    records = support.read_topic(bootstrap, rsettings.status_topic, 4 + 3, timeout_s=10)
    assert len(records) == 4 + 3
    assert len({dict(r.headers)["ce_id"] for r in records}) == 4 + 3


def test_status_events_are_keyed_by_the_effect_they_report_on_also_from_an_app_trigger(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    """One effect's events share its operation key (one partition), and an intent enqueued by
    the application's own trigger (trigger depth 2) gets its status events too."""
    from kafka import KafkaConsumer, TopicPartition

    url = rsettings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE app_orders (id text PRIMARY KEY)")
        conn.execute(
            "CREATE FUNCTION app_order_email() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM relay.enqueue('mail-' || NEW.id, 'email', '{\"to\": \"a@example.org\"}'); "
            "RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER app_orders_email AFTER INSERT ON app_orders "
            "FOR EACH ROW EXECUTE FUNCTION app_order_email()"
        )
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO app_orders VALUES ('o-1'), ('o-2')")
            conn.commit()
        support.wait_for(
            lambda: (
                h.states(url, ["mail-o-1", "mail-o-2"])
                == {
                    "mail-o-1": "PUBLISHED",
                    "mail-o-2": "PUBLISHED",
                }
            ),
            30,
            "publication",
        )
        support.wait_for(lambda: support.status_backlog(url) == 0, 30, "status events sent")
    consumer = KafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    try:
        tps = [TopicPartition(rsettings.status_topic, p) for p in range(3)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        records = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    by_key: dict[bytes, set[int]] = {}
    states: dict[bytes, list[str]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
        states.setdefault(r.key, []).append(json.loads(r.value)["state"])
    assert set(by_key) == {b"mail-o-1", b"mail-o-2"}
    assert all(len(partitions) == 1 for partitions in by_key.values())
    # one relay: published in the order of the transitions
    assert states[b"mail-o-1"] == ["PENDING", "DISPATCHING", "PUBLISHED"]

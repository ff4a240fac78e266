"""Intents published in a batch that needs nothing more (migration 0015): no effect, attempt or
transition row; one relay.published_batch row per batch and type, read by everything that reads
effects. Real PostgreSQL and Kafka."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.dispatch.intake import Claim, promote
from relay.dispatch.ticker import Ticker
from relay.errors import InvalidTransitionError, OperationKeyConflictError
from relay.inspection import list_effects, stats
from relay.reconciler.purge import purge
from relay.reconciler.resolve import Decision, resolve
from relay.sql import query
from relay.story import load_story
from tests import support

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-12-04"}


def _inserted(url: str) -> dict[str, int]:
    """Rows inserted per table since the database was made (ended backends' counters)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, n_tup_ins FROM pg_stat_user_tables WHERE schemaname = 'relay' "
            "AND relname IN ('effect', 'attempt', 'transition', 'published_batch')"
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def _recorded_positions(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    """Where the database says each published intent's record went: key -> (partition, offset)."""
    return {
        str(k): (int(p), int(o))
        for k, p, o in conn.execute(
            'SELECT operation_key, partition, "offset" FROM relay.published_effect'
        ).fetchall()
    }


def _quiet(settings: Settings) -> Settings:
    return settings.model_copy(update={"status_events": False})


def test_a_published_batch_writes_no_row_per_effect(
    settings: Settings, services: Services, prefix: str
) -> None:
    url = settings.require_database_url()
    keys = [f"q-{i}" for i in range(301)]
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", k, {"to": k}) for k in keys])
        conn.commit()
    with support.running(Relay(_quiet(settings))):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 301}, 60, "publication")
    support.wait_for(lambda: _inserted(url)["published_batch"] >= 1, 15, "the table's counters")
    written = _inserted(url)
    # Before 0015: 301 effect, 301 attempt and 301 transition rows.
    assert (written["effect"], written["attempt"], written["transition"]) == (0, 0, 0), written
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 301)
    where = {r.key.decode(): (r.partition, r.offset) for r in records}
    assert len(records) == 301 and sorted(where) == sorted(keys)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (0,)
        assert _recorded_positions(conn) == where
        # What an application, `relay show`, `stats` and `list` see.
        shown = relay.get_effect(conn, "q-7")
        assert shown is not None and shown.state is relay.EffectState.PUBLISHED
        assert (shown.published_partition, shown.published_offset) == where["q-7"]
        story = load_story(conn, "q-7")
        assert story is not None
        assert [(t["from_state"], t["to_state"]) for t in story["transitions"]] == [
            (None, "PENDING"),
            ("PENDING", "DISPATCHING"),
            ("DISPATCHING", "PUBLISHED"),
        ]
        assert [(a["attempt"], a["outcome"], a["replica_id"]) for a in story["attempts"]] == [
            (1, "acked", settings.replica_id)
        ]
        assert [(r["effect_type"], r["state"], r["effects"]) for r in stats(conn)] == [
            ("email", "PUBLISHED", 301)
        ]
        listed = list_effects(conn, state="PUBLISHED", limit=1000)
        assert sorted(r["operation_key"] for r in listed) == sorted(keys)
        assert len(list_effects(conn, state="PUBLISHED", limit=5)) == 5
        assert list_effects(conn, state="PENDING", limit=5) == []
        # The same intent again is the same effect; a cancel or a resolution is refused.
        again = relay.enqueue(conn, "email", "q-7", {"to": "q-7"})
        assert not again.created and again.effect_id == shown.id
        assert again.state is relay.EffectState.PUBLISHED
        with pytest.raises(InvalidTransitionError, match="PUBLISHED"):
            relay.cancel(conn, "q-7")
        with pytest.raises(InvalidTransitionError, match="is PUBLISHED"):
            resolve(conn, settings, "q-7", Decision.CONFIRM, reason="r", actor="t")
        with pytest.raises(OperationKeyConflictError):
            relay.enqueue(conn, "email", "q-7", {"to": "someone else"})


def test_a_batch_of_two_quiet_types_is_one_published_batch_row_per_type(
    settings: Settings, services: Services, prefix: str
) -> None:
    """A batch of one type is written as its arrays came (mark_quiet_batch_of_one_type); one that
    mixes types is split by type (mark_quiet_batch). Both record where each record went."""
    url = settings.require_database_url()
    types = {**settings.effect_types, "sms": {"topic": f"{prefix}.sms", "idempotent": True}}
    mixed = support.make_settings(
        url, services.kafka_bootstrap_servers, prefix, effect_types=types, status_events=False
    )
    support.prepare_database(mixed)
    with psycopg.connect(url) as conn:
        relay.enqueue_many(
            conn,
            [relay.Intent("email" if i % 3 else "sms", f"m-{i}", {"i": i}) for i in range(30)],
        )
        conn.commit()
    with support.running(Relay(mixed)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 30}, 60, "publication")
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"o-{i}", {"i": i}) for i in range(10)])
        conn.commit()
    with support.running(Relay(mixed)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 40}, 60, "publication")
    where: dict[str, tuple[int, int]] = {}
    for topic, n in ((f"{prefix}.emails", 30), (f"{prefix}.sms", 10)):
        records = support.read_topic(services.kafka_bootstrap_servers, topic, n)
        assert len(records) == n
        where.update({r.key.decode(): (r.partition, r.offset) for r in records})
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)
        rows = conn.execute(
            "SELECT effect_type, n, first_id, last_id, ids FROM relay.published_batch ORDER BY id"
        ).fetchall()
        # The first batch held both types (one row each), the second emails only.
        assert sorted((str(t), int(n)) for t, n, *_ in rows) == [
            ("email", 10),
            ("email", 20),
            ("sms", 10),
        ]
        for _, n, first, last, ids in rows:
            assert ids == sorted(ids) and (first, last, n) == (ids[0], ids[-1], len(ids))
        assert _recorded_positions(conn) == where


def test_what_awaits_a_result_keeps_its_rows_and_status_events_ride_in_the_transaction(
    settings: Settings, services: Services, prefix: str
) -> None:
    """In one batch: the wire (it awaits a result) gets its effect row, the e-mails none. With
    status events on, an e-mail's three events ride in its record's Kafka transaction and it
    still gets no row; a relay without Kafka transactions publishes them from the rows."""
    url = settings.require_database_url()
    bootstrap = services.kafka_bootstrap_servers
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "wire", "m-wire", WIRE)
        relay.enqueue_many(conn, [relay.Intent("email", f"m-{i}", {"i": i}) for i in range(20)])
        conn.commit()
    with support.running(Relay(_quiet(settings))):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 21}, 60, "publish")
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT operation_key FROM relay.effect").fetchall()
        assert rows == [("m-wire",)]
        assert conn.execute(
            "SELECT sum(n), count(*) FILTER (WHERE effect_type <> 'email') "
            "FROM relay.published_batch"
        ).fetchone() == (20, 0)
        relay.enqueue_many(conn, [relay.Intent("email", f"s-{i}", {"i": i}) for i in range(5)])
    own = settings.model_copy(update={"status_topic": f"{prefix}.status"})
    assert own.status_events and own.kafka_transactions
    with support.running(Relay(own)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 26}, 60, "publish")
    with psycopg.connect(url, autocommit=True) as conn:
        loud = conn.execute(
            "SELECT count(*) FROM relay.effect WHERE operation_key LIKE 's-%%'"
        ).fetchone()
        assert loud == (0,)
        ids: dict[str, int] = dict(
            conn.execute(
                "SELECT operation_key, id FROM relay.intake WHERE operation_key LIKE 's-%%'"
            ).fetchall()
        )
    events = support.read_topic(bootstrap, own.status_topic, 15)
    assert len(events) == 15
    story: dict[str, list[tuple[str | None, str]]] = {}
    for r in events:
        value = json.loads(r.value)
        assert r.key == value["operation_key"].encode()
        ce_id = dict(r.headers)["ce_id"].decode()
        assert re.fullmatch(rf"{ids[value['operation_key']]}\.b\d+\.[012]", ce_id), ce_id
        story.setdefault(value["operation_key"], []).append(
            (value["previous_state"], value["state"])
        )
    assert story == {
        f"s-{i}": [(None, "PENDING"), ("PENDING", "DISPATCHING"), ("DISPATCHING", "PUBLISHED")]
        for i in range(5)
    }
    assert len({dict(r.headers)["ce_id"] for r in events}) == 15
    # Without Kafka transactions the events cannot ride with the records: rows, and the log's.
    with psycopg.connect(url, autocommit=True) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"t-{i}", {"i": i}) for i in range(5)])
    plain = own.model_copy(update={"kafka_transactions": False})
    with support.running(Relay(plain)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 31}, 60, "publish")
        support.wait_for(lambda: support.status_backlog(url) == 0, 30, "status events sent")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM relay.effect WHERE operation_key LIKE 't-%%'"
        ).fetchone() == (5,)
    assert len(support.read_topic(bootstrap, own.status_topic, 30)) == 30
    records = support.read_topic(bootstrap, f"{prefix}.emails", 30)
    assert len(records) == 30


def _claim(url: str, n: int) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1) "
            "ON CONFLICT DO NOTHING"
        )
        Ticker().run_once(conn)
        done = promote(
            conn, limit=100, claim=Claim("solo", 1, lease_s=0.5, limit=100, max_bytes=10**6)
        )
    assert len(done.claimed) == n and all(e.batch is not None for e in done.claimed)
    return list(done.claimed)


def _mark(url: str, claimed: list[Any], offset: int) -> list[int]:
    params = {
        "owner": "solo",
        "epoch": 1,
        "actor": "solo",
        "ids": [e.id for e in claimed],
        "batches": [e.batch for e in claimed],
        "states": ["PUBLISHED"] * len(claimed),
        "outcomes": ["acked"] * len(claimed),
        "reasons": ["acknowledged"] * len(claimed),
        "partitions": [0] * len(claimed),
        "offsets": list(range(offset, offset + len(claimed))),
        "delays_s": [0.0] * len(claimed),
    }
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(query("mark_batch_outcomes"), params).fetchall()
    return sorted(int(r[0]) for r in rows)


def test_a_batch_marked_in_parts_is_closed_and_never_expired_unknown(settings: Settings) -> None:
    """The marker splits a batch when the database refuses a row: each part is recorded, the
    batch goes when every intent is, and no part is taken for an unrecorded one."""
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"p-{i}", {"i": i}) for i in range(6)])
        conn.commit()
    claimed = _claim(url, 6)
    assert _mark(url, claimed[:3], 100) == sorted(e.id for e in claimed[:3])
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (1,)
        # The rest's lease runs out: only they may be written UNKNOWN.
        conn.execute("UPDATE relay.dispatch_batch SET lease_until = now() - interval '1 s'")
        expired = conn.execute(
            query("expire_batches"),
            {
                "owner": "other",
                "epoch": 1,
                "all_own": False,
                "held": [],
                "limit": 10,
                "leave_receipted": False,
                "lease_s": 0.0,
            },
        ).fetchone()
        assert expired == (3,)
        states = conn.execute(
            "SELECT operation_key, state FROM relay.effect ORDER BY id"
        ).fetchall()
        assert states == [(f"p-{i}", "UNKNOWN") for i in range(3, 6)]
        assert conn.execute("SELECT sum(n) FROM relay.published_batch").fetchone() == (3,)
    # A late outcome for the expired part writes nothing.
    assert _mark(url, claimed[3:], 200) == []
    assert support.count_states(url) == {"PUBLISHED": 3, "UNKNOWN": 3}


def test_two_parts_marked_in_turn_close_the_batch(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"t-{i}", {"i": i}) for i in range(4)])
        conn.commit()
    claimed = _claim(url, 4)
    _mark(url, claimed[:2], 10)
    _mark(url, claimed[2:], 20)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)
    assert support.count_states(url) == {"PUBLISHED": 4}


def test_purge_removes_published_batches_and_remembers_their_keys(settings: Settings) -> None:
    """At retention a published batch's intents lose their content and keep their keys in
    their own intake rows (nothing written per intent but that row); when the dedupe window
    ends the rows go with the batch, and the keys may be used again."""
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"g-{i}", {"i": i}) for i in range(5)])
        conn.commit()
    with support.running(Relay(_quiet(settings))):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 5}, 60, "publish")
    with psycopg.connect(url, autocommit=True) as conn:
        removed, *_ = purge(conn, settings, retention_s=0.0)
        assert removed == 5
        assert conn.execute("SELECT count(*) FROM relay.published_batch").fetchone() == (0,)
        remembered = conn.execute(
            "SELECT operation_key, effect_type::text, purged_at IS NOT NULL FROM relay.intake "
            "ORDER BY 1"
        ).fetchall()
        assert remembered == [(f"g-{i}", "email", True) for i in range(5)]
        assert conn.execute("SELECT count(*) FROM relay.purged_key").fetchone() == (0,)
        assert conn.execute("SELECT sum(cardinality(ids)) FROM relay.emptied_batch").fetchone() == (
            5,
        )
        assert conn.execute(
            "SELECT count(*) FROM relay.intake WHERE payload <> '{}'::jsonb"
        ).fetchone() == (0,)
        assert relay.get_effect(conn, "g-1") is None
        assert support.count_states(url) == {}
        # Nor cancelled (an effect row with the emptied payload was written, then cancelled).
        with pytest.raises(InvalidTransitionError, match="'g-3' is purged"):
            relay.cancel(conn, "g-3")
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)
        # Within the dedupe window the key is never published again: the same intent, or another.
        with pytest.raises(
            OperationKeyConflictError, match=r"purged at .*PUBLISHED|PUBLISHED.*purged"
        ):
            relay.enqueue(conn, "email", "g-1", {"i": 1})
        with pytest.raises(OperationKeyConflictError, match="purged"):
            relay.enqueue(conn, "email", "g-2", {})
        # Kept for the dedupe window: a purge with a longer one forgets nothing.
        purge(conn, settings, retention_s=0.0)
        assert conn.execute("SELECT count(*) FROM relay.intake").fetchone() == (5,)
        # Past it, the rows go by their batches, and the keys are free.
        purge(conn, settings.model_copy(update={"dedupe_window_s": 0.000001}), 0.0)
        assert conn.execute("SELECT count(*) FROM relay.intake").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM relay.emptied_batch").fetchone() == (0,)
        again = relay.enqueue(conn, "email", "g-1", {"i": 1})
    assert again.created


def test_a_cancel_that_waited_for_the_purge_of_its_intent_is_refused(settings: Settings) -> None:
    """A cancel of a published intent waits on its intake row while a purge empties it; once
    the purge commits, the cancel is refused as purged (it used to read the row from before
    its wait, find no batch any more, write an effect row with the intent's whole payload and
    cancel that)."""
    import threading

    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "email", "race-1", {"secret": "s3cret"})
        conn.commit()
    with support.running(Relay(_quiet(settings))):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 1}, 60, "publish")
    outcome: list[BaseException | str] = []
    with psycopg.connect(url) as purging:
        assert len(purging.execute("SELECT relay.purge_batch(0, 500)").fetchall()) == 1

        def cancel() -> None:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    relay.cancel(conn, "race-1")
                    outcome.append("cancelled")
            except Exception as error:  # noqa: BLE001 - the test reads it below
                outcome.append(error)

        canceller = threading.Thread(target=cancel)
        canceller.start()

        def cancel_waits() -> bool:
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%relay.cancel%%'"
                ).fetchone()
            return row is not None and row[0] == 1

        support.wait_for(cancel_waits, 30, "the cancel to wait for the purge")
        purging.commit()
    canceller.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidTransitionError), outcome
    assert "is purged" in str(outcome[0])
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)
        assert conn.execute(
            "SELECT payload::text FROM relay.intake WHERE operation_key = 'race-1'"
        ).fetchone() == ("{}",)

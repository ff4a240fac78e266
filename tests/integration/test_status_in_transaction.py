"""Status events in the batch's Kafka transaction (migration 0017): visible if and only if the
record is, each told once, also when the transaction's commit goes unanswered. Real PostgreSQL
and Kafka; the relay runs in this process so that its commit can be made to lose its answer."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

import relay
from relay import db as relay_db
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch import transactions
from relay.dispatch.daemon import Relay
from relay.dispatch.intake import Claim, promote
from relay.dispatch.stage import Held, Identity, expire_leases
from relay.dispatch.ticker import Ticker
from relay.dispatch.verifier import Verdict, Verifier, record_verdicts
from relay.reconciler.resolve import Decision, resolve
from relay.sql import query
from relay.states import EffectState
from tests import support


@pytest.fixture
def own_topic(settings: Settings, prefix: str) -> Settings:
    """Status events on a topic of this test's own (the default one is shared by the suite).
    Without receipts: these tests hold the path of an unsettled batch (UNKNOWN, then looked
    for); test_receipts.py has the same faults with receipts."""
    return settings.model_copy(
        update={"status_topic": f"{prefix}.status", "lease_s": 5.0, "receipts_topic": None}
    )


def _held(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM relay.status_held").fetchone()
    return int(row[0]) if row else 0


def test_a_commit_that_lost_its_answer_tells_each_story_once_from_the_transaction(
    own_topic: Settings, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first commit lands but its answer is lost: the intents go UNKNOWN, their log's events
    are held, the lookup finds the records, and the events that rode with them are the only ones
    published (no second enqueue or claim, no UNKNOWN after PUBLISHED)."""
    settings, url = own_topic, own_topic.require_database_url()
    real = transactions.commit
    calls = {"n": 0}

    def commit_loses_its_answer(producer: Any, timeout_s: float) -> None:
        real(producer, timeout_s)
        calls["n"] += 1
        if calls["n"] == 1:
            raise transactions.TransactionTimeoutError("commit_transaction did not complete")

    keys = [f"lost-{i}" for i in range(6)]
    support.publish_with_commit(settings, keys, monkeypatch, commit_loses_its_answer)
    with psycopg.connect(url, autocommit=True) as conn:
        # The lost commit's intents went through UNKNOWN (their rows say so) and were found.
        unknown = conn.execute(
            "SELECT count(DISTINCT effect_id) FROM relay.transition WHERE to_state = 'UNKNOWN'"
        ).fetchone()
        assert unknown is not None and unknown[0] > 0
    assert _held(url) == 0
    told = support.status_stories(
        support.read_topic(services.kafka_bootstrap_servers, settings.status_topic, 18)
    )
    happy = [
        (None, "PENDING", "txn"),
        ("PENDING", "DISPATCHING", "txn"),
        ("DISPATCHING", "PUBLISHED", "txn"),
    ]
    assert told == {k: happy for k in keys}


def test_an_aborted_transaction_shows_none_of_its_events_and_the_log_tells_the_story(
    own_topic: Settings, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first commit is aborted and its answer lost: nothing of it is visible; the lookup
    finds nothing, the intents go again, and their whole story comes from the log, once."""
    settings, url = own_topic, own_topic.require_database_url()
    real = transactions.commit
    calls = {"n": 0}

    def commit_aborted_unanswered(producer: Any, timeout_s: float) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            transactions.abort(producer, timeout_s)
            raise transactions.TransactionTimeoutError("commit_transaction did not complete")
        real(producer, timeout_s)

    keys = [f"gone-{i}" for i in range(6)]
    support.publish_with_commit(settings, keys, monkeypatch, commit_aborted_unanswered)
    assert _held(url) == 0
    with psycopg.connect(url, autocommit=True) as conn:
        again: dict[str, int] = dict(
            conn.execute("SELECT e.operation_key, e.attempts FROM relay.effect e").fetchall()
        )
    retried = sorted(k for k, attempts in again.items() if attempts == 2)
    assert retried, again  # the first batch's intents went again
    told = support.status_stories(
        support.read_topic(services.kafka_bootstrap_servers, settings.status_topic, 18)
    )
    assert set(told) == set(keys)
    for key in retried:
        assert told[key] == [
            (None, "PENDING", "log"),
            ("PENDING", "DISPATCHING", "log"),
            ("DISPATCHING", "UNKNOWN", "log"),
            ("UNKNOWN", "PENDING", "log"),
            ("PENDING", "DISPATCHING", "log"),
            ("DISPATCHING", "PUBLISHED", "log"),
        ], told[key]


def _finish(conn: psycopg.Connection[Any], check: dict[str, Any]) -> int:
    """One verdict through ``finish_verifications`` (as a round of one): effects moved."""
    arrays = {
        "ids": "id",
        "attempts": "attempt",
        "states": "state",
        "reasons": "reason",
        "verifications": "verification",
        "partitions": "partition",
        "offsets": "offset",
        "retry_in_s": "retry_in_s",
    }
    params = {name: [check[one]] for name, one in arrays.items()}
    params.update(owner=check["owner"], epoch=check["epoch"])
    return len(conn.execute(query("finish_verifications"), params).fetchall())


def _a_dead_replicas_batch(url: str) -> dict[str, int]:
    """Three e-mails whose status events rode in the transaction of a replica that died, and a
    wire whose did not: the lease expiry writes all four UNKNOWN and holds the e-mails' log
    events. Their ids, by operation key."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE relay.reconciler_config SET status_events = true")
        relay.enqueue_many(conn, [relay.Intent("email", f"h-{i}", {"i": i}) for i in range(3)])
        relay.enqueue(conn, "wire", "h-wire", {"account": "A", "amount": 1, "date": "2026-12-04"})
        conn.execute(
            "INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1) "
            "ON CONFLICT DO NOTHING"
        )
        Ticker().run_once(conn)
        claim = Claim("solo", 1, lease_s=0.5, limit=100, max_bytes=10**6, status_in_txn=True)
        claimed = promote(conn, limit=100, claim=claim).claimed
        assert {e.operation_key: e.status_in_txn for e in claimed} == {
            "h-0": True,
            "h-1": True,
            "h-2": True,
            "h-wire": False,
        }
        ids = {e.operation_key: e.id for e in claimed}
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
        assert expired == (4,)
        assert _held(url) == 3
    return ids


def test_a_dead_replicas_batch_holds_its_log_events_until_each_record_is_looked_for(
    settings: Settings,
) -> None:
    """A replica dies with a batch whose e-mails' events rode in its transaction: the lease
    expiry writes them UNKNOWN and holds their log's events (the wire's go: its events were never
    in the transaction). Found, an e-mail's log events are never published; absent, they are."""
    url = settings.require_database_url()
    ids = _a_dead_replicas_batch(url)
    with psycopg.connect(url, autocommit=True) as conn:

        def due() -> set[int]:
            rows = conn.execute(query("status_batch"), {"limit": 100}).fetchall()
            return {int(r[2]) for r in rows}

        assert due() == {ids["h-wire"]}
        conn.execute("UPDATE relay.effect SET owner = 'solo', owner_epoch = 1")
        base = {"owner": "solo", "epoch": 1, "attempt": 1, "retry_in_s": 0.0}
        found = {
            **base,
            "id": ids["h-0"],
            "state": "PUBLISHED",
            "reason": "found",
            "verification": "found",
            "partition": 0,
            "offset": 7,
        }
        absent = {
            **base,
            "id": ids["h-1"],
            "state": "PENDING",
            "reason": "absent",
            "verification": "absent",
            "partition": None,
            "offset": None,
        }
        assert _finish(conn, found) == 1
        assert _finish(conn, absent) == 1
        assert _held(url) == 1
        assert due() == {ids["h-wire"], ids["h-1"]}
        told = conn.execute(
            "SELECT count(*) FILTER (WHERE status_pending), count(*) FROM relay.transition "
            "WHERE effect_id = %s",
            (ids["h-0"],),
        ).fetchone()
        assert told == (0, 2)  # UNKNOWN and PUBLISHED written, neither to be published


def test_a_person_who_confirms_a_held_effect_has_the_log_tell_only_the_decision(
    settings: Settings,
) -> None:
    """Confirmed by a person while its log events are held: it happened, so its record and the
    events that rode with it are in Kafka, and the log adds only the decision (it told the whole
    story again before). A rejected one says nothing about Kafka: its log tells its story."""
    url = settings.require_database_url()
    ids = _a_dead_replicas_batch(url)
    with psycopg.connect(url) as conn:
        resolve(conn, settings, "h-0", Decision.CONFIRM, reason="in the mailer's log", actor="t")
        resolve(conn, settings, "h-1", Decision.REJECT, reason="never sent", actor="t")
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(query("status_batch"), {"limit": 100}).fetchall()
    due: dict[int, list[tuple[str | None, str]]] = {}
    for row in rows:
        due.setdefault(int(row[2]), []).append((row[5], row[6]))
    assert due[ids["h-0"]] == [("UNKNOWN", "CONFIRMED")]
    assert due[ids["h-1"]] == [
        (None, "PENDING"),
        ("PENDING", "DISPATCHING"),
        ("DISPATCHING", "UNKNOWN"),
        ("UNKNOWN", "REJECTED"),
    ]
    assert ids["h-2"] not in due  # still held, still UNKNOWN


def _sent_again_then_unknown(url: str, settings: Settings, key: str, effect: int) -> None:
    """An effect of a dead replica's batch (held), sent again by a person and claimed for a
    second attempt that also ends UNKNOWN: its hold is left over from the first attempt."""
    with psycopg.connect(url) as conn:
        resolve(conn, settings, key, Decision.REDISPATCH, reason="send it again", actor="t")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE relay.effect SET available_at = now() - interval '1 s' WHERE id = %s",
            (effect,),
        )
        claim = {"owner": "solo", "epoch": 1, "limit": 10, "max_bytes": 10**6, "lease_s": 60}
        assert [r[0] for r in conn.execute(query("claim_batch"), claim).fetchall()] == [effect]
        conn.execute(
            "UPDATE relay.effect SET lease_until = now() - interval '1 s' WHERE id = %s",
            (effect,),
        )
        assert expire_leases(conn, Identity("solo", 2), Held()) == 1
        row = conn.execute(
            "SELECT state, attempts FROM relay.effect WHERE id = %s", (effect,)
        ).fetchone()
    assert row == ("UNKNOWN", 2)


def _due_of(url: str, effect: int) -> list[tuple[str | None, str, int]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(query("status_batch"), {"limit": 1000}).fetchall()
    return [(r[5], r[6], int(r[8])) for r in rows if int(r[2]) == effect]


# What the log must still tell of a second attempt: the person's decision, the second claim and
# its UNKNOWN (none of them rode in any Kafka transaction).
_SECOND_ATTEMPT = [
    ("UNKNOWN", "PENDING", 1),
    ("PENDING", "DISPATCHING", 2),
    ("DISPATCHING", "UNKNOWN", 2),
]


def test_a_hold_left_from_the_first_attempt_silences_nothing_of_the_second(
    settings: Settings,
) -> None:
    """Only the first attempt's events rode in a batch's transaction: after a second attempt, a
    person's confirmation (h-0) or the verifier's find (h-1) must leave the log to tell
    everything since, and add the ending."""
    url = settings.require_database_url()
    ids = _a_dead_replicas_batch(url)
    for key in ("h-0", "h-1"):
        _sent_again_then_unknown(url, settings, key, ids[key])
    confirmed, found = ids["h-0"], ids["h-1"]
    before = {e: _due_of(url, e) for e in (confirmed, found)}
    assert before[confirmed][-3:] == before[found][-3:] == _SECOND_ATTEMPT, before
    with psycopg.connect(url) as conn:
        resolve(conn, settings, "h-0", Decision.CONFIRM, reason="seen downstream", actor="t")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE relay.effect SET owner = 'solo', owner_epoch = 1 WHERE id = %s", (found,)
        )
        verified = {
            "owner": "solo",
            "epoch": 1,
            "attempt": 2,
            "retry_in_s": 0.0,
            "id": found,
            "state": "PUBLISHED",
            "reason": "found",
            "verification": "found",
            "partition": 0,
            "offset": 7,
        }
        assert _finish(conn, verified) == 1
    assert _due_of(url, confirmed) == [*before[confirmed], ("UNKNOWN", "CONFIRMED", 2)]
    assert _due_of(url, found) == [*before[found], ("UNKNOWN", "PUBLISHED", 2)]


def test_a_missing_status_topic_holds_nothing_back_and_loses_no_event(
    settings: Settings, prefix: str
) -> None:
    """Without auto-creation and without the status topic, the intents whose events were to
    ride with them are not sent (nothing waits on the topic at every batch after that); they go
    again at once and are published, and their whole story comes from the log once the topic
    exists."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from relay.devtools.services.kafka import LocalKafka

    broker = LocalKafka(partitions=1, auto_create_topics=False)
    broker.start()
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics([NewTopic(f"{prefix}.emails", 1, 1)])
        own = settings.model_copy(
            update={
                "kafka_bootstrap_servers": broker.bootstrap_servers,
                "status_topic": f"{prefix}.status",
                "publish_timeout_s": 3.0,
            }
        )
        url = own.require_database_url()
        keys = [f"nt-{i}" for i in range(4)]
        with psycopg.connect(url, autocommit=True) as conn:
            relay.enqueue_many(conn, [relay.Intent("email", k, {"to": k}) for k in keys])
        with support.running(Relay(own)):
            support.wait_for(
                lambda: support.count_states(url) == {"PUBLISHED": 4}, 60, "publication"
            )
            admin.create_topics([NewTopic(own.status_topic, 1, 1)])
            support.wait_for(lambda: support.status_backlog(url) == 0, 60, "status events sent")
        admin.close()
        with psycopg.connect(url, autocommit=True) as conn:
            first = conn.execute(
                "SELECT a.outcome, a.reason FROM relay.attempt a "
                "JOIN relay.effect e ON e.id = a.effect_id WHERE a.attempt = 1"
            ).fetchall()
        assert len(first) == 4 and {outcome for outcome, _ in first} == {"not_sent"}, first
        assert all(own.status_topic in reason for _, reason in first), first
        told = support.status_stories(
            support.read_topic(broker.bootstrap_servers, own.status_topic, 20)
        )
        assert set(told) == set(keys)
        for key, story in told.items():
            assert {kind for _, _, kind in story} == {"log"}, (key, story)
            assert story[0][:2] == (None, "PENDING") and story[-1][1] == "PUBLISHED", story
    finally:
        broker.stop()


def test_a_verdict_the_database_refuses_leaves_the_rest_of_its_round_recorded(
    settings: Settings,
) -> None:
    """A round's verdicts are one statement; one the database refuses (here a reason with a NUL,
    which the relay's connection sends in a binary array and the server refuses) is split off,
    stays UNKNOWN for a later check, counted as a failed check, and the others are recorded."""
    url = settings.require_database_url()
    ids = _a_dead_replicas_batch(url)
    with relay_db.connect(settings, purpose="test") as conn:
        conn.execute("UPDATE relay.effect SET owner = 'solo', owner_epoch = 1")
        found = [
            Verdict(ids[key], 1, EffectState.PUBLISHED, "found", "found", 0, offset)
            for offset, key in enumerate(("h-0", "h-1", "h-2"))
        ]
        refused = Verdict(ids["h-wire"], 1, EffectState.PENDING, "absent\x00", "absent")
        record_verdicts(conn, Identity("solo", 1), [found[0], refused, *found[1:]], max_tries=20)
        states: dict[str, str] = dict(
            conn.execute("SELECT operation_key, state FROM relay.effect").fetchall()
        )
        offsets = conn.execute(
            "SELECT published_offset FROM relay.effect WHERE state = 'PUBLISHED' ORDER BY id"
        ).fetchall()
        wire = conn.execute(
            "SELECT verify_tries, reason, owner FROM relay.effect WHERE id = %s", (ids["h-wire"],)
        ).fetchone()
    assert states == {
        "h-0": "PUBLISHED",
        "h-1": "PUBLISHED",
        "h-2": "PUBLISHED",
        "h-wire": "UNKNOWN",
    }
    assert offsets == [(0,), (1,), (2,)]
    assert wire is not None
    tries, reason, owner = wire
    assert tries == 1 and owner is None  # a failed check: counted, and free for the next one
    assert "found it PENDING (absent), but the database refused to record that" in reason


def test_a_verdict_the_database_refuses_every_time_ends_stuck(settings: Settings) -> None:
    """A verdict refused at the last check of its budget ends STUCK for a person, with what the
    check found in its reason (it was checked again at every lease, for ever)."""
    url = settings.require_database_url()
    ids = _a_dead_replicas_batch(url)
    with relay_db.connect(settings, purpose="test") as conn:
        conn.execute("UPDATE relay.effect SET owner = 'solo', owner_epoch = 1, verify_tries = 4")
        refused = Verdict(
            ids["h-wire"], 1, EffectState.PUBLISHED, "found\x00", "found", 0, 7, tries=4
        )
        record_verdicts(conn, Identity("solo", 1), [refused], max_tries=5)
        state, reason, offset = conn.execute(
            "SELECT state, reason, published_offset FROM relay.effect WHERE id = %s",
            (ids["h-wire"],),
        ).fetchone() or (None, None, None)
        went = conn.execute(
            "SELECT from_state, to_state FROM relay.transition WHERE effect_id = %s "
            "ORDER BY id DESC LIMIT 1",
            (ids["h-wire"],),
        ).fetchone()
    assert (state, went) == ("STUCK", ("UNKNOWN", "STUCK"))
    assert offset is None  # nothing of the refused verdict is written
    assert isinstance(reason, str)
    assert "check 5 of attempt 1 found it PUBLISHED (found), but the database refused" in reason
    assert reason.endswith("5 checks failed, a person decides")


def test_a_round_past_its_deadline_gives_back_what_it_did_not_read(
    settings: Settings, services: Services, prefix: str
) -> None:
    """A round reads one time window at least, then none past its deadline (it runs in the
    publishing thread): the effects of the windows not read are given back unchecked, due again
    at once with no try spent, and the next round checks them."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    admin.create_topics([NewTopic(f"{prefix}.emails", 1, 1), NewTopic(f"{prefix}.wires", 1, 1)])
    admin.close()
    url = settings.require_database_url()
    ids = _a_dead_replicas_batch(url)
    with psycopg.connect(url, autocommit=True) as conn:
        # One e-mail's attempt an hour earlier: a window of its own, read first.
        conn.execute(
            "UPDATE relay.attempt SET started_at = started_at - interval '1 hour' "
            "WHERE effect_id = %s",
            (ids["h-0"],),
        )
    # A budget already spent when the round begins (a quarter of the lease).
    hasty = settings.model_copy(update={"lease_s": 1e-6})
    verifier = Verifier(
        hasty, Identity("solo", 2), producer_ready=lambda: True, stop=threading.Event()
    )
    with psycopg.connect(url, autocommit=True) as conn:
        first = verifier.run_once(conn)
        after_first: dict[str, str] = dict(
            conn.execute(
                "SELECT operation_key, state || ':' || verify_tries || ':' || (owner IS NULL) "
                "FROM relay.effect"
            ).fetchall()
        )
        assert verifier.due(), "a round that gave checks back is followed at once"
        settings_ok = Verifier(
            settings, Identity("solo", 2), producer_ready=lambda: True, stop=threading.Event()
        )
        second = settings_ok.run_once(conn)
        states: dict[str, str] = dict(
            conn.execute("SELECT operation_key, state FROM relay.effect").fetchall()
        )
    assert first.checked == 1 and first.absent == 1, first
    assert after_first == {
        "h-0": "PENDING:0:true",
        "h-1": "UNKNOWN:0:true",
        "h-2": "UNKNOWN:0:true",
        "h-wire": "UNKNOWN:0:true",
    }
    assert second.checked == 3 and second.absent == 3, second
    assert set(states.values()) == {"PENDING"}


def test_an_absence_retention_may_have_made_is_a_failed_check_not_pending(
    settings: Settings, services: Services, prefix: str
) -> None:
    """The verifier end to end: where the topic's retention can reach the attempts' window and
    the partition they went to no longer holds the records of that time, not finding them is a
    failed check (UNKNOWN, counted; STUCK at the end), never PENDING: sent again, a record that
    was committed and then deleted would be published twice. The wire's topic lost nothing:
    its absence stands."""
    from kafka import KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    emails = f"{prefix}.emails"
    admin = KafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    admin.create_topics(
        [
            NewTopic(emails, 1, 1, topic_configs={"retention.ms": "1000"}),
            NewTopic(f"{prefix}.wires", 1, 1),
        ]
    )
    url = settings.require_database_url()
    _a_dead_replicas_batch(url)
    producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers)
    for _ in range(2):
        producer.send(emails, key=b"other", value=b"{}").get(timeout=30)
    producer.close()
    try:
        admin.delete_records({TopicPartition(emails, 0): 2})  # the log starts past them, empty
    finally:
        admin.close()
    verifier = Verifier(
        settings, Identity("solo", 2), producer_ready=lambda: True, stop=threading.Event()
    )
    with psycopg.connect(url, autocommit=True) as conn:
        done = verifier.run_once(conn)
        rows = conn.execute(
            "SELECT operation_key, state, verify_tries, reason FROM relay.effect"
        ).fetchall()
    assert (done.checked, done.absent, done.failed) == (4, 1, 3), done
    states = {k: (s, t) for k, s, t, _ in rows}
    assert states == {
        "h-0": ("UNKNOWN", 1),
        "h-1": ("UNKNOWN", 1),
        "h-2": ("UNKNOWN", 1),
        "h-wire": ("PENDING", 0),
    }
    assert all("may have been deleted (retention)" in r for k, _, _, r in rows if k != "h-wire")

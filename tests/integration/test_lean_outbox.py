"""The lean outbox on the real servers: what an enqueue writes, names no application may write,
business keys that cannot collide, a doorbell that lapses, status events published once."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch import transactions
from relay.dispatch.claimer import doorbell_rang
from relay.dispatch.daemon import Relay
from relay.dispatch.stage import Held, Identity
from relay.dispatch.status_events import StatusPublisher
from relay.errors import InvalidIntentError, UnknownEffectTypeError
from relay.intents import translate_errors
from relay.reconciler.daemon import register_status_type
from relay.sql import query
from relay.story import load_story
from tests import support

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-11-22"}


def _counts(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """Intents (effect rows, and intake rows the relay has not read yet), transitions, attempts."""
    row = conn.execute(
        f"SELECT (SELECT count(*) FROM relay.effect) + ({support.UNREAD_INTAKE}),"
        " (SELECT count(*) FROM relay.transition), (SELECT count(*) FROM relay.attempt)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_an_enqueue_writes_one_row_and_the_story_still_starts_with_it(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        register_status_type(conn, settings)  # status events on: still nothing more is written
        relay.enqueue(conn, "wire", "lean-1", WIRE)
        assert _counts(conn) == (1, 0, 0)
        support.read_intake(url)
        story = load_story(conn, "lean-1")
    assert story is not None
    assert [(t["from_state"], t["to_state"]) for t in story["transitions"]] == [(None, "PENDING")]


def test_names_of_the_relay_are_refused_to_applications(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(UnknownEffectTypeError, match="reserved"):
            relay.enqueue(conn, "relay.status", "forged", {"state": "CONFIRMED"})
        for key in ("victim#compensation", "victim#compensation-3"):
            with pytest.raises(InvalidIntentError, match="reserved"):
                relay.enqueue(conn, "wire", key, WIRE)
        late_newline = "00-" + "a" * 32 + "-" + "b" * 16 + "-01\n"
        with pytest.raises(InvalidIntentError, match="traceparent"), translate_errors():
            conn.execute(
                "SELECT * FROM relay.enqueue('tp', 'email', '{}'::jsonb, NULL, %s)",
                (late_newline,),
            )
        assert _counts(conn)[0] == 0


def test_compensation_keys_are_derived_in_the_reserved_namespace_within_the_limit(
    settings: Settings,
) -> None:
    url = settings.require_database_url()
    long_key = "k" * 512
    with psycopg.connect(url, autocommit=True) as conn:
        parent = relay.enqueue(conn, "wire", long_key, WIRE)
        support.read_intake(url)
        made = [
            conn.execute(
                "SELECT operation_key, created FROM relay.enqueue_compensation(%s, %s, 'email',"
                " '{}'::jsonb, 'test', 'test')",
                (parent.effect_id, index),
            ).fetchone()
            for index in (0, 1, 1)
        ]
    # Cut to fit 512 characters, with a digest of the whole parent key (issue 18 item 8a: two
    # long keys sharing their start must not share a compensation key).
    digest = "~" + hashlib.md5(long_key.encode()).hexdigest()[:16]
    assert made[0] == ("k" * (512 - 13 - 17) + digest + "#compensation", True)
    assert made[1] == ("k" * (512 - 15 - 17) + digest + "#compensation-2", True)
    assert all(len(m[0]) == 512 for m in made if m is not None)
    assert made[2] == (made[1][0], False)  # asked again: the same one, not a second


def test_business_keys_of_distinct_values_are_distinct_and_never_expanded(
    settings: Settings,
) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        relay.enqueue(conn, "wire", "bk-1", {"account": "A:1", "amount": 2, "date": "d"})
        relay.enqueue(conn, "wire", "bk-2", {"account": "A", "amount": "1:2", "date": "d"})
        relay.enqueue(conn, "wire", "bk-3", {"account": "{amount}", "amount": 7, "date": "100%"})
        keys = {k: relay.get_effect(conn, k) for k in ("bk-1", "bk-2", "bk-3")}
    business = {k: e.business_key for k, e in keys.items() if e is not None}
    assert business == {"bk-1": "A%3A1:2:d", "bk-2": "A:1%3A2:d", "bk-3": "{amount}:7:100%25"}


def test_a_key_that_mimics_derived_names_stops_nobody(own_topic: Settings) -> None:
    """The attack of an outside review: a key shaped like another effect's derived key."""
    settings = own_topic
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        register_status_type(conn, settings)
        relay.enqueue(conn, "email", "victim", {"to": "a@example.org"})
        relay.enqueue(conn, "email", "victim#status#1", {"to": "b@example.org"})
        relay.enqueue(conn, "email", "victim#status#2", {"to": "c@example.org"})
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: support.count_states(url).get("PUBLISHED") == 3, 60, "all three published"
        )
        support.wait_for(lambda: support.status_backlog(url) == 0, 60, "status events sent")


def test_the_doorbell_lapses_when_no_relay_rearms_it(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as listener, psycopg.connect(url) as writer:
        listener.execute("LISTEN relay_doorbell")
        listener.execute(query("arm_doorbell"), {"armed_for_s": 0.5})
        # An ungrouped intent is a plain INSERT into the intake that rings nothing (the relay polls
        # the intake's sequence); a grouped one goes through relay.enqueue, which rings.
        relay.enqueue(writer, "email", "ring-1", {"to": "a"}, ordering_group="ring")
        writer.commit()
        rang = [n for n in listener.notifies(timeout=2.0, stop_after=1)]
        assert len(rang) == 1
        threading.Event().wait(0.8)  # nobody re-arms it: it lapses
        relay.enqueue(writer, "email", "ring-2", {"to": "b"}, ordering_group="ring")
        writer.commit()
        assert [n for n in listener.notifies(timeout=1.0, stop_after=1)] == []


def test_the_relays_wait_for_a_ring_sees_one_sent_before_or_while_it_waits(
    settings: Settings,
) -> None:
    """The claimer's idle wait (a poll of the socket, then a look without waiting) sees a ring
    that arrives while it waits, and one that arrived while the connection ran a command, which
    psycopg keeps aside and the socket no longer shows."""
    url = settings.require_database_url()
    with (
        psycopg.connect(url, autocommit=True) as listener,
        psycopg.connect(url, autocommit=True) as ringer,
    ):
        listener.execute(query("listen_doorbell"))
        assert not doorbell_rang(listener, 0.05)
        later = threading.Timer(0.2, lambda: ringer.execute("NOTIFY relay_doorbell"))
        later.start()
        try:
            assert _within(9.0, lambda: doorbell_rang(listener, 10.0))  # at the ring, not at 10 s
        finally:
            later.join()
        assert not doorbell_rang(listener, 0.05)
        ringer.execute("NOTIFY relay_doorbell")
        support.wait_for(
            lambda: listener.execute("SELECT 1").fetchone() == (1,) and _kept_aside(listener),
            10,
            "the ring received while the listener ran a command",
        )
        assert _within(9.0, lambda: doorbell_rang(listener, 10.0))  # at once, not at 10 s
        assert not doorbell_rang(listener, 0.05)


def _within(seconds: float, wait: Callable[[], bool]) -> bool:
    """What ``wait`` returned, if it returned within ``seconds`` (a wait that missed the ring
    runs to its own timeout)."""
    started = time.monotonic()
    answer = wait()
    return answer and time.monotonic() - started < seconds


def _kept_aside(conn: psycopg.Connection[Any]) -> bool:
    """Whether psycopg holds a notification received during a command (its backlog)."""
    return bool(getattr(conn, "_notifies_backlog", None))


class _LosesRecord(StatusPublisher):
    """Publishes and commits in Kafka, then dies before recording it in the database."""

    def _record(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        if ids:
            raise psycopg.OperationalError("the database went away after the Kafka commit")
        super()._record(conn, ids)


def _stage(settings: Settings, kind: type[StatusPublisher] = StatusPublisher) -> StatusPublisher:
    return kind(settings, Identity(settings.replica_id, 1), Held(), threading.Event())


@pytest.fixture
def own_topic(settings: Settings, prefix: str) -> Settings:
    """Status events on a topic of this test's own (the default one is shared by the suite)."""
    return settings.model_copy(update={"status_topic": f"{prefix}.status"})


def _published_status(settings: Settings, services: Services, url: str, expected: int) -> list[Any]:
    records = support.read_topic(
        services.kafka_bootstrap_servers, settings.status_topic, expected, timeout_s=10
    )
    ids = [dict(r.headers)["ce_id"] for r in records]
    assert len(ids) == len(set(ids)), "a status event was published twice"
    return records


def _transitions(url: str, n: int) -> None:
    """n effects through PENDING -> DISPATCHING -> PUBLISHED in the log, status events due."""
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            relay.enqueue(conn, "email", f"st-{i}", {"to": f"{i}@example.org"})
        support.read_intake(url)
        conn.execute(
            "UPDATE relay.effect SET state = 'PUBLISHED', attempts = 1, claimed_at = now(),"
            " updated_at = now()"
        )
        conn.execute(
            "INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor,"
            " attempt, status_pending)"
            " SELECT id, s.f, s.t, 'test', 'test', 1, true FROM relay.effect,"
            " (VALUES (1, NULL, 'PENDING'), (2, 'PENDING', 'DISPATCHING'),"
            "         (3, 'DISPATCHING', 'PUBLISHED')) AS s(n, f, t) ORDER BY id, s.n"
        )


def test_status_events_committed_but_not_recorded_are_found_not_resent(
    own_topic: Settings, services: Services
) -> None:
    settings = own_topic
    url = settings.require_database_url()
    _transitions(url, 20)
    dying = _stage(settings, _LosesRecord)
    with pytest.raises(psycopg.OperationalError):
        dying.step()
    dying.drop_producer()
    assert support.status_backlog(url) == 60
    successor = _stage(settings)  # a restart: its producer fences the old one
    try:
        successor.step()  # finds the in-flight events in Kafka
        assert support.status_backlog(url) == 0
        successor.step()  # and sends nothing again
    finally:
        successor.drop_producer()
    records = _published_status(settings, services, url, 60)
    assert len(records) == 60
    by_key: dict[bytes, list[str]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(json.loads(r.value)["state"])
    assert len(by_key) == 20
    assert all(states == ["PENDING", "DISPATCHING", "PUBLISHED"] for states in by_key.values())


def test_status_events_whose_commit_failed_are_sent_again_once(
    own_topic: Settings, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = own_topic
    url = settings.require_database_url()
    _transitions(url, 10)
    real_commit = transactions.commit
    calls = {"n": 0}

    def commit_fails_once(producer: Any, timeout_s: float) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            transactions.abort(producer, timeout_s)
            raise transactions.TransactionTimeoutError("commit_transaction did not complete")
        real_commit(producer, timeout_s)

    monkeypatch.setattr(transactions, "commit", commit_fails_once)
    stage = _stage(settings)
    try:
        stage.step()  # sends, the commit fails: in flight, nothing recorded
        assert support.status_backlog(url) == 30
        stage.step()  # looks for them: absent (aborted), gives them back
        assert support.status_backlog(url) == 30
        stage.step()  # sends them again
        assert support.status_backlog(url) == 0
    finally:
        stage.drop_producer()
    assert calls["n"] == 2
    assert len(_published_status(settings, services, url, 30)) == 30


def test_a_purged_key_is_refused_not_published_again(settings: Settings) -> None:
    from relay.errors import OperationKeyConflictError
    from relay.reconciler.purge import purge

    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        relay.enqueue(conn, "email", "old-intent", {"to": "a@example.org"})
        relay.cancel(conn, "old-intent")
        removed, *_ = purge(conn, settings, retention_s=0.000001)
        assert removed == 1 and relay.get_effect(conn, "old-intent") is None
        with pytest.raises(OperationKeyConflictError, match="purged"):
            relay.enqueue(conn, "email", "old-intent", {"to": "a@example.org"})
        # Past the dedupe window the key may be used again.
        purge(conn, settings.model_copy(update={"dedupe_window_s": 0.000001}), 0.000001)
        again = relay.enqueue(conn, "email", "old-intent", {"to": "a@example.org"})
    assert again.created


class _LosesRecordOnce(StatusPublisher):
    """Loses the record of its first published batch, then carries on (the same process)."""

    lost = False

    def _record(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        if ids and not self.lost:
            self.lost = True
            raise psycopg.OperationalError("the database went away after the Kafka commit")
        super()._record(conn, ids)


def test_the_same_publisher_settles_what_it_lost_before_sending_more(
    own_topic: Settings, services: Services
) -> None:
    settings = own_topic
    url = settings.require_database_url()
    _transitions(url, 5)
    stage = _stage(settings, _LosesRecordOnce)
    try:
        with pytest.raises(psycopg.OperationalError):
            stage.step()
        stage.drop()  # as the stage's loop does after a database error
        stage.step()  # settles: found in Kafka, recorded, nothing sent again
        stage.step()
        assert support.status_backlog(url) == 0
    finally:
        stage.drop_producer()
    assert len(_published_status(settings, services, url, 15)) == 15


def test_payload_limit_in_sql_and_claims_capped_by_bytes(settings: Settings) -> None:
    from relay.errors import PayloadTooLargeError
    from relay.migrations import sync_effect_types

    url = settings.require_database_url()
    small = settings.model_copy(update={"max_payload_bytes": 1000})
    with psycopg.connect(url, autocommit=True) as conn:
        sync_effect_types(conn, small)
        big = json.dumps({"to": "x" * 2000})
        with pytest.raises(PayloadTooLargeError, match="max_payload_bytes"), translate_errors():
            conn.execute("SELECT * FROM relay.enqueue('too-big', 'email', %s::jsonb)", (big,))
        sync_effect_types(conn, settings)
        for i in range(5):
            relay.enqueue(conn, "email", f"sized-{i}", {"to": f"{i}", "body": "y" * 5000})
        support.read_intake(url)

        def claim(max_bytes: int) -> int:
            rows = conn.execute(
                query("claim_batch"),
                {"owner": "r", "epoch": 1, "limit": 100, "max_bytes": max_bytes, "lease_s": 60},
            ).fetchall()
            conn.execute("UPDATE relay.effect SET state = 'PENDING', attempts = 0, owner = NULL")
            return len(rows)

        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('r', 1)")
        assert claim(1) == 1  # always at least one
        assert claim(10**9) == 5
        one = conn.execute(
            "SELECT pg_column_size(payload) FROM relay.effect WHERE operation_key = 'sized-0'"
        ).fetchone()
        assert one is not None
        assert claim(int(one[0]) * 2 + 1) == 3  # stops once the bytes claimed reach the cap


def test_two_installations_on_one_kafka_never_fence_each_others_status_publisher(
    own_topic: Settings, services: Services
) -> None:
    """Two relays of two databases (two applications' outboxes) on one Kafka cluster each keep
    their status publisher's producer: the transactional id is one per database. With one fixed
    id, each publisher's start fenced the other's, whose next publish failed and fenced back."""
    from relay.dispatch.status_events import status_transactional_id

    first = own_topic
    url = first.require_database_url()
    other_url = support.create_database(services.database_url, template=None)
    try:
        second = first.model_copy(
            update={"database_url": other_url, "status_topic": f"{first.status_topic}-2"}
        )
        support.prepare_database(second)
        with psycopg.connect(url) as a, psycopg.connect(other_url) as b, psycopg.connect(url) as c:
            assert status_transactional_id(a) != status_transactional_id(b)
            assert status_transactional_id(a) == status_transactional_id(c)  # its replicas fence
        _transitions(url, 2)
        _transitions(other_url, 2)
        stage_a, stage_b = _stage(first), _stage(second)
        try:
            stage_a.step()  # a's producer, then b's: with one id, b's start fenced a's
            stage_b.step()
            assert support.status_backlog(url) == 0 and support.status_backlog(other_url) == 0
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor,"
                    " attempt, status_pending) SELECT id, 'PUBLISHED', 'CONFIRMED', 'test',"
                    " 'test', 1, true FROM relay.effect ORDER BY id LIMIT 1"
                )
            assert support.status_backlog(url) == 1
            stage_a.step()  # a publishes again with the producer it has
            assert support.status_backlog(url) == 0
            assert stage_a.producer is not None  # never dropped for a fencing
        finally:
            stage_a.drop_producer()
            stage_b.drop_producer()
    finally:
        support.drop_database(other_url)

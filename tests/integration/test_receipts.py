"""Receipts (migration 0028): a batch left without an outcome is settled by one read of its
producer's receipts after fencing it, never made UNKNOWN. Real PostgreSQL and Kafka; the relays
run in this process so that an outcome can be lost on purpose."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from kafka import KafkaProducer
from kafka import errors as kerr

import relay
from relay import db as relay_db
from relay.config import Settings
from relay.dispatch import transactions
from relay.dispatch.daemon import LATE_RECEIPTS_LIMIT, Relay
from relay.dispatch.intake import Claim, promote
from relay.dispatch.publisher import ClaimedEffect, PublishResult
from relay.dispatch.receipts import ReceiptLine, ReceiptSpec, parse_receipt, receipt_values
from relay.dispatch.settler import Settler
from relay.dispatch.stage import Claimed, Held, Identity, expire_leases
from relay.dispatch.status_events import installation_digest
from relay.dispatch.ticker import Ticker
from relay.dispatch.transactions import commit, transactional_id
from relay.sql import query
from tests import support


@pytest.fixture
def own(settings: Settings, prefix: str) -> Settings:
    """A receipts topic of this test's own (created, as a deployment creates it), and a short
    lease."""
    topic = f"{prefix}.receipts"
    support.create_topic(settings.kafka_bootstrap_servers, topic)
    return settings.model_copy(
        update={"receipts_topic": topic, "lease_s": 5.0, "publish_timeout_s": 2.0}
    )


class LosesOutcomes(Relay):
    """Publishes as a relay does, then loses every outcome (as a crash right after the commit
    would): its batches stay claimed, without an outcome."""

    def _submit_outcomes(self, results: Sequence[PublishResult], claimed_at: float) -> None:
        self.lost = getattr(self, "lost", 0) + len(results)


class NeverSends(Relay):
    """Claims, then drops each batch without sending it (as a crash before the send would)."""

    def _publish_and_mark(self, claimed: Claimed) -> None:
        self.dropped = getattr(self, "dropped", 0) + len(claimed.effects)


def _enqueue(url: str, keys: list[str]) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        ids = relay.enqueue_many(conn, [relay.Intent("email", k, {"to": k}) for k in keys])
    return {k: i.effect_id for k, i in zip(keys, ids, strict=True)}


def _open_batches(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone()
    return int(row[0]) if row else 0


def _placed(url: str, ids: list[int]) -> dict[int, tuple[int, int]]:
    """Where the outbox says each intent was published (a published batch's row, or its own)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT x.id, coalesce(p.partition, e.published_partition), "
            "coalesce(p.offset, e.published_offset) FROM unnest(%s::bigint[]) AS x(id) "
            "LEFT JOIN relay.effect e ON e.id = x.id "
            "LEFT JOIN LATERAL relay.published_intent(x.id) p ON true",
            (ids,),
        ).fetchall()
    return {int(i): (p, o) for i, p, o in rows}


def _went(url: str, ids: list[int], state: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM relay.transition WHERE to_state = %s AND effect_id = ANY(%s)",
            (state, ids),
        ).fetchone()
    return int(row[0]) if row else 0


def _in_topic(bootstrap: str, topic: str, n: int) -> dict[int, tuple[int, int, int]]:
    """Each record's effect id -> (partition, offset, attempt), asserting each is there once."""
    seen: dict[int, tuple[int, int, int]] = {}
    for r in support.read_topic(bootstrap, topic, n):
        headers = dict(r.headers)
        effect_id = int(headers["relay_effect_id"])
        assert effect_id not in seen, f"effect {effect_id} published twice"
        seen[effect_id] = (r.partition, r.offset, int(headers["relay_attempt"]))
    return seen


def test_a_batch_committed_but_never_recorded_is_published_where_its_receipt_says(
    own: Settings, prefix: str
) -> None:
    """A relay commits its batches and loses every outcome; the next incarnation reads its
    receipts once and records each intent PUBLISHED at the partition and offset Kafka gave it:
    no UNKNOWN, no search of the dispatch topic, no second copy."""
    url = own.require_database_url()
    committed = _settled_metric("committed")
    ids = _enqueue(url, [f"rc-{i}" for i in range(30)])
    crashed = LosesOutcomes(own)
    with support.running(crashed):
        support.wait_for(lambda: getattr(crashed, "lost", 0) == 30, 60, "30 outcomes lost")
    assert _open_batches(url) > 0
    with support.running(Relay(own)):
        support.wait_for(
            lambda: support.count_states(url) == {"PUBLISHED": 30}, 60, "settled by receipts"
        )
    assert _open_batches(url) == 0
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", 30)
    assert set(records) == set(ids.values())
    assert _placed(url, list(ids.values())) == {i: (p, o) for i, (p, o, _) in records.items()}
    assert {a for _, _, a in records.values()} == {1}
    assert _went(url, list(ids.values()), "UNKNOWN") == 0
    assert _settled_metric("committed") > committed


def _settled_metric(result: str) -> float:
    from relay.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value("relay_batches_settled_total", {"result": result}) or 0.0


def test_a_batch_never_sent_goes_again_at_once_without_a_search(own: Settings, prefix: str) -> None:
    """A relay claims batches and dies before sending them: the next incarnation finds no
    receipt for them after fencing, records attempt 1 aborted (not UNKNOWN, no check of Kafka,
    no try counted against them) and publishes each intent once, as attempt 2."""
    url = own.require_database_url()
    ids = _enqueue(url, [f"rn-{i}" for i in range(30)])
    crashed = NeverSends(own)
    with support.running(crashed):
        support.wait_for(lambda: getattr(crashed, "dropped", 0) == 30, 60, "30 claimed, dropped")
    with support.running(Relay(own)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 30}, 60, "published")
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", 30)
    assert set(records) == set(ids.values())
    assert {a for _, _, a in records.values()} == {2}
    with psycopg.connect(url, autocommit=True) as conn:
        first = conn.execute(
            "SELECT outcome, reason, verification FROM relay.attempt WHERE attempt = 1"
        ).fetchall()
    assert len(first) == 30
    assert {(o, v) for o, _, v in first} == {("aborted", None)}
    assert all("no receipt names batch" in r for _, r, _ in first), first[0]
    assert _went(url, list(ids.values()), "UNKNOWN") == 0


def _claimed_by_a_dead_replica(own: Settings, keys: list[str]) -> tuple[list[ClaimedEffect], str]:
    """A batch claimed by replica 'gone' (epoch 1, which writes receipts), whose heartbeat
    stopped and whose lease has run out; the installation's digest."""
    url = own.require_database_url()
    _enqueue(url, keys)
    with relay_db.connect(own, purpose="test") as conn:
        conn.execute(
            "INSERT INTO relay.replica (replica_id, epoch, heartbeat_at) "
            "VALUES ('gone', 1, now() - interval '1 hour')"
        )
        install = installation_digest(conn)
        conn.execute(
            query("register_receipts"),
            {
                "replica_id": "gone",
                "epoch": 1,
                "topic": own.receipts_topic,
                "install": install,
                "window_s": 10.0,
            },
        )
        Ticker().run_once(conn)
        claim = Claim("gone", 1, lease_s=0.5, limit=100, max_bytes=10**6, status_in_txn=False)
        claimed = promote(conn, limit=100, claim=claim).claimed
        conn.execute("UPDATE relay.dispatch_batch SET lease_until = now() - interval '1 s'")
    assert len(claimed) == len(keys)
    return list(claimed), install


def _zombie(own: Settings) -> KafkaProducer:
    producer = KafkaProducer(
        bootstrap_servers=own.kafka_bootstrap_servers,
        transactional_id=transactional_id("gone"),
        enable_idempotence=True,
        acks="all",
    )
    producer.init_transactions()
    return producer


def _receipt(
    own: Settings, install: str, claimed: list[ClaimedEffect], offsets: list[int], epoch: int = 1
) -> list[bytes]:
    assert own.receipts_topic is not None
    key = transactional_id("gone").encode()
    spec = ReceiptSpec(own.receipts_topic, key, install, "gone", epoch)
    batches = sorted({e.batch for e in claimed if e.batch is not None})
    lines = [
        ReceiptLine(e.id, 1, e.topic, 0, offset) for e, offset in zip(claimed, offsets, strict=True)
    ]
    return receipt_values(spec, "t-1", batches, lines, 10**6)


LIVE = Identity("live", 1)


def _settle(own: Settings, who: Identity = LIVE) -> Any:
    with relay_db.connect(own, purpose="test") as conn:
        return Settler(own, who, producer_ready=lambda: True).run_once(conn)


def test_a_zombie_transaction_left_open_is_fenced_before_the_receipts_are_read(
    own: Settings,
) -> None:
    """The dead replica's producer still has a transaction open that holds the batch's receipt.
    The settler fences that producer first (its transaction is aborted, and it can never commit
    it), then reads: no committed receipt, so the batch goes again. Read before fencing, a commit
    that came after the read would have published the batch twice."""
    claimed, install = _claimed_by_a_dead_replica(own, ["zo-0", "zo-1"])
    zombie = _zombie(own)
    zombie.begin_transaction()
    assert own.receipts_topic is not None
    for value in _receipt(own, install, claimed, [7, 8]):
        zombie.send(own.receipts_topic, key=transactional_id("gone").encode(), value=value)
    zombie.flush()
    try:
        done = _settle(own)
        assert (done.committed, done.aborted, done.again, done.left) == (0, 1, 2, 0)
        with pytest.raises(kerr.KafkaError):
            commit(zombie, 10.0)  # fenced: this commit can never happen
    finally:
        zombie.close(timeout=1)
    assert support.count_states(own.require_database_url()) == {"PENDING": 2}


def test_a_receipt_of_another_installation_or_not_a_receipt_proves_nothing(
    own: Settings,
) -> None:
    """Committed records on the receipts topic under the dead replica's key that are not its
    receipts (another installation's digest, another incarnation's epoch, a value that is no
    receipt) are skipped: the batch did not commit. Its own committed receipt then settles
    another batch as published."""
    url = own.require_database_url()
    claimed, install = _claimed_by_a_dead_replica(own, ["ri-0", "ri-1"])
    zombie = _zombie(own)
    assert own.receipts_topic is not None
    key = transactional_id("gone").encode()
    zombie.begin_transaction()
    for value in _receipt(own, "another-install", claimed, [1, 2]):
        zombie.send(own.receipts_topic, key=key, value=value)
    for value in _receipt(own, install, claimed, [3, 4], epoch=2):
        zombie.send(own.receipts_topic, key=key, value=value)
    zombie.send(own.receipts_topic, key=key, value=b'{"v": 1, "batches": "all of them"}')
    commit(zombie, 10.0)
    zombie.close(timeout=1)
    done = _settle(own)
    assert (done.committed, done.aborted, done.again) == (0, 1, 2)
    assert support.count_states(url) == {"PENDING": 2}
    # Now a batch whose receipt is its own, committed.
    more = _claimed_by_a_dead_replica_again(own, ["ri-2", "ri-3"])
    zombie = _zombie(own)
    zombie.begin_transaction()
    for value in _receipt(own, install, more, [40, 41]):
        zombie.send(own.receipts_topic, key=key, value=value)
    commit(zombie, 10.0)
    zombie.close(timeout=1)
    done = _settle(own)
    assert (done.committed, done.aborted, done.published) == (1, 0, 2)
    assert _placed(url, [e.id for e in more]) == {more[0].id: (0, 40), more[1].id: (0, 41)}
    assert _went(url, [e.id for e in claimed + more], "UNKNOWN") == 0


def _claimed_by_a_dead_replica_again(own: Settings, keys: list[str]) -> list[ClaimedEffect]:
    """Another batch of the same dead replica (its rows exist already)."""
    url = own.require_database_url()
    _enqueue(url, keys)
    with relay_db.connect(own, purpose="test") as conn:
        Ticker().run_once(conn)
        claim = Claim("gone", 1, lease_s=0.5, limit=100, max_bytes=10**6, status_in_txn=False)
        claimed = [
            e for e in promote(conn, limit=100, claim=claim).claimed if e.operation_key in keys
        ]
        conn.execute("UPDATE relay.dispatch_batch SET lease_until = now() - interval '1 s'")
    assert len(claimed) == len(keys)
    return claimed


def test_a_live_replicas_batch_is_left_to_it(own: Settings) -> None:
    """A batch past its lease whose replica still sends heartbeats is not settled by another
    replica (that would fence a live producer), nor expired by it for one more lease: the
    replica settles its own."""
    _claimed_by_a_dead_replica(own, ["lv-0"])
    url = own.require_database_url()
    with relay_db.connect(own, purpose="test") as conn:
        conn.execute("UPDATE relay.replica SET heartbeat_at = now() WHERE replica_id = 'gone'")
        assert (
            expire_leases(conn, Identity("live", 1), Held(), leave_receipted=True, lease_s=60.0)
            == 0
        )
    done = _settle(own)
    assert (done.committed, done.aborted, done.left) == (0, 0, 0)
    assert _open_batches(url) == 1
    done = _settle(own, Identity("gone", 1))
    assert (done.committed, done.aborted, done.again) == (0, 1, 1)
    assert _open_batches(url) == 0


def test_without_its_receipts_topic_a_batch_is_left_to_the_search(settings: Settings) -> None:
    """The receipts topic of the dead replica's incarnation does not exist (deleted, or never
    made): the absence of a receipt proves nothing, so the batch is not settled; lease expiry
    then makes it UNKNOWN for the search, as without receipts."""
    own = settings.model_copy(update={"receipts_topic": f"{settings.replica_id}.never-made"})
    _claimed_by_a_dead_replica(own, ["nt-0", "nt-1"])
    left = _settled_metric("left")
    done = _settle(own)
    assert (done.committed, done.aborted, done.left) == (0, 0, 1)
    assert _settled_metric("left") == left + 1
    assert "does not exist" in done.why[0]
    with relay_db.connect(own, purpose="test") as conn:
        assert expire_leases(conn, Identity("live", 1), Held()) == 2
    assert support.count_states(own.require_database_url()) == {"UNKNOWN": 2}


def test_receipts_deleted_by_retention_prove_nothing(own: Settings) -> None:
    """The receipts topic's log no longer starts at 0 and keeps nothing older than the batch's
    window (retention, here DeleteRecords, deleted the records of its time): the absence of a
    receipt proves nothing, so the batch is left to lease expiry and the search, not sent again
    as never committed."""
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient

    _claimed_by_a_dead_replica(own, ["rd-0", "rd-1"])
    assert own.receipts_topic is not None
    producer = KafkaProducer(bootstrap_servers=own.kafka_bootstrap_servers)
    for _ in range(3):
        producer.send(own.receipts_topic, key=b"other", value=b"not a receipt").get(timeout=30)
    producer.close()
    admin = KafkaAdminClient(bootstrap_servers=own.kafka_bootstrap_servers)
    try:
        admin.delete_records({TopicPartition(own.receipts_topic, 0): 3})
    finally:
        admin.close()
    done = _settle(own)
    assert (done.committed, done.aborted, done.left) == (0, 0, 1), done
    assert "may have been deleted (retention)" in done.why[0]


def test_without_its_topic_the_relay_stops_receipts_and_publishes(
    settings: Settings, prefix: str
) -> None:
    """Without auto-creation and without the receipts topic, the relay records that its
    incarnation writes no receipts (before it commits a transaction without one) and publishes
    every intent at its first attempt."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from relay.devtools.services.kafka import LocalKafka

    broker = LocalKafka(partitions=1, auto_create_topics=False)
    broker.start()
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics([NewTopic(f"{prefix}.emails", 1, 1), NewTopic("relay.status", 1, 1)])
        admin.close()
        own = settings.model_copy(
            update={
                "kafka_bootstrap_servers": broker.bootstrap_servers,
                "receipts_topic": f"{prefix}.receipts",
                "publish_timeout_s": 3.0,
                "lease_s": 7.0,
            }
        )
        url = own.require_database_url()
        _enqueue(url, [f"nr-{i}" for i in range(4)])
        with support.running(Relay(own)):
            support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 4}, 60, "published")
            with psycopg.connect(url, autocommit=True) as conn:
                writers = conn.execute("SELECT count(*) FROM relay.receipt_writer").fetchone()
            assert writers == (0,)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM relay.attempt WHERE attempt > 1").fetchone()
        assert row == (0,)  # nothing was held back for the missing topic
    finally:
        broker.stop()


def test_receipts_off_writes_no_receipt(own: Settings, prefix: str) -> None:
    """With receipts_topic empty, no incarnation is recorded as writing receipts and no receipt
    is written: a batch left without an outcome goes through UNKNOWN, as before receipts."""
    off = own.model_copy(update={"receipts_topic": None})
    url = off.require_database_url()
    _enqueue(url, [f"ro-{i}" for i in range(3)])
    with support.running(Relay(off)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 3}, 60, "published")
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM relay.receipt_writer").fetchone() == (0,)
    assert own.receipts_topic is not None
    assert support.read_topic(off.kafka_bootstrap_servers, own.receipts_topic, 0, 3.0) == []


def test_each_transaction_carries_a_receipt_of_its_records(own: Settings, prefix: str) -> None:
    """What a receipt holds: the transaction's batches, and each record's effect, attempt,
    topic, partition and offset, as the dispatch topic has them."""
    url = own.require_database_url()
    ids = _enqueue(url, [f"rr-{i}" for i in range(12)])
    with support.running(Relay(own)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 12}, 60, "published")
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", 12)
    assert own.receipts_topic is not None
    listed: dict[int, tuple[str, int, int, int]] = {}
    for r in support.read_topic(own.kafka_bootstrap_servers, own.receipts_topic, 1, 5.0):
        assert r.key == transactional_id(own.replica_id).encode()
        receipt = parse_receipt(r.value)
        assert receipt is not None and receipt.replica == own.replica_id and receipt.batches
        for line in receipt.lines:
            listed[line.effect_id] = (line.topic, line.partition, line.offset, line.attempt)
    assert listed == {i: (f"{prefix}.emails", p, o, a) for i, (p, o, a) in records.items()}
    assert set(listed) == set(ids.values())


def test_a_commit_that_lost_its_answer_is_settled_by_its_receipt(
    own: Settings, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first commit lands and its answer is lost: once the producer is replaced (which
    fences the old one), the receipt says the batch committed. Nothing goes UNKNOWN, nothing is
    sent twice, and each intent's story is the one its transaction told."""
    own = own.model_copy(update={"status_topic": f"{prefix}.status"})
    real = transactions.commit
    calls = {"n": 0}

    def commit_loses_its_answer(producer: Any, timeout_s: float) -> None:
        real(producer, timeout_s)
        calls["n"] += 1
        if calls["n"] == 1:
            raise transactions.TransactionTimeoutError("commit_transaction did not complete")

    keys = [f"la-{i}" for i in range(6)]
    support.publish_with_commit(own, keys, monkeypatch, commit_loses_its_answer)
    url = own.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        all_ids = [int(r[0]) for r in conn.execute("SELECT id FROM relay.intake").fetchall()]
    assert _went(url, all_ids, "UNKNOWN") == 0
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", len(keys))
    assert len(records) == len(keys) and {a for _, _, a in records.values()} == {1}
    assert _placed(url, all_ids) == {i: (p, o) for i, (p, o, _) in records.items()}
    told = support.status_stories(
        support.read_topic(own.kafka_bootstrap_servers, own.status_topic, 3 * len(keys))
    )
    happy = [
        (None, "PENDING", "txn"),
        ("PENDING", "DISPATCHING", "txn"),
        ("DISPATCHING", "PUBLISHED", "txn"),
    ]
    assert told == {k: happy for k in keys}


def test_a_commit_that_never_happened_goes_again_without_unknown(
    own: Settings, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first transaction is aborted and its commit's answer lost: no receipt, so its
    intents go again at once (attempt 1 aborted, never UNKNOWN), each published once, and
    their story comes from the log."""
    own = own.model_copy(update={"status_topic": f"{prefix}.status"})
    real = transactions.commit
    calls = {"n": 0}

    def commit_aborted_unanswered(producer: Any, timeout_s: float) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            transactions.abort(producer, timeout_s)
            raise transactions.TransactionTimeoutError("commit_transaction did not complete")
        real(producer, timeout_s)

    keys = [f"na-{i}" for i in range(6)]
    support.publish_with_commit(own, keys, monkeypatch, commit_aborted_unanswered)
    url = own.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        first: dict[str, tuple[str, str]] = {
            k: (o, r)
            for k, o, r in conn.execute(
                "SELECT e.operation_key, a.outcome, a.reason FROM relay.attempt a "
                "JOIN relay.effect e ON e.id = a.effect_id WHERE a.attempt = 1"
            ).fetchall()
        }
        all_ids = [int(r[0]) for r in conn.execute("SELECT id FROM relay.intake").fetchall()]
    assert first and {o for o, _ in first.values()} == {"aborted"}, first
    assert all("no receipt names batch" in r for _, r in first.values())
    assert _went(url, all_ids, "UNKNOWN") == 0
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", len(keys))
    assert len(records) == len(keys)
    told = support.status_stories(
        support.read_topic(own.kafka_bootstrap_servers, own.status_topic, 5 * len(keys))
    )
    for key in first:
        assert told[key] == [
            (None, "PENDING", "log"),
            ("PENDING", "DISPATCHING", "log"),
            ("DISPATCHING", "PENDING", "log"),
            ("PENDING", "DISPATCHING", "log"),
            ("DISPATCHING", "PUBLISHED", "log"),
        ], told[key]


class SlowerThanItsReceipts(Relay):
    """Reaches the receipt of each batch past its deadline (as a publisher slower than the bound
    would; the deadline is made short, which is always safe, so that the test is quick); once
    receipts stop, its batches no longer wait (the test needs no more)."""

    def _receipt_deadline(self, claimed_at: float) -> float:
        return claimed_at + 0.2

    def _publish(self, batch: Sequence[ClaimedEffect], claimed_at: float) -> list[PublishResult]:
        if self._receipts is not None:
            time.sleep(max(0.0, claimed_at + 0.4 - time.monotonic()))
        return super()._publish(batch, claimed_at)


def test_a_publisher_always_too_late_for_its_receipts_stops_them_and_publishes(
    own: Settings, prefix: str
) -> None:
    """A batch that reaches its receipt too late is aborted (innocent) and goes again; a
    publisher that is too late every time would abort every batch for ever. After a few in a
    row, the relay records that it writes receipts no more and publishes without them."""
    url = own.require_database_url()
    ids = _enqueue(url, [f"rl-{i}" for i in range(5)])
    with support.running(SlowerThanItsReceipts(own)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 5}, 60, "published")
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM relay.receipt_writer").fetchone() == (0,)
            aborted = conn.execute(
                "SELECT attempt, outcome, reason FROM relay.attempt ORDER BY effect_id, attempt"
            ).fetchall()
    late = [(a, o) for a, o, r in aborted if "too late for its receipt" in r]
    assert sorted(late) == sorted((a, "aborted") for a in (1, 2, 3) for _ in range(5))
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", 5)
    assert set(records) == set(ids.values())
    assert {a for _, _, a in records.values()} == {LATE_RECEIPTS_LIMIT + 1}
    assert _went(url, list(ids.values()), "UNKNOWN") == 0
    assert own.receipts_topic is not None
    assert support.read_topic(own.kafka_bootstrap_servers, own.receipts_topic, 0, 3.0) == []


class LateNowAndThen(Relay):
    """Too late for the receipts of its 1st, 2nd, 4th and 5th batches (a short deadline, which
    is always safe), in time for the others."""

    calls = 0

    def _receipt_deadline(self, claimed_at: float) -> float:
        self.calls += 1
        late = self.calls in (1, 2, 4, 5)
        return claimed_at - 1.0 if late else super()._receipt_deadline(claimed_at)


def test_late_receipts_count_only_in_a_row(own: Settings, prefix: str) -> None:
    """Two late batches, one in time, two late again: never three in a row, so receipts go on
    (the count starts again at each batch that Kafka acknowledged)."""
    url = own.require_database_url()
    first = _enqueue(url, [f"rw-{i}" for i in range(3)])
    daemon = LateNowAndThen(own)
    with support.running(daemon):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 3}, 60, "first wave")
        second = _enqueue(url, [f"rx-{i}" for i in range(3)])
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 6}, 60, "second wave")
        with psycopg.connect(url, autocommit=True) as conn:
            writers = conn.execute("SELECT count(*) FROM relay.receipt_writer").fetchone()
    assert writers == (1,)  # receipts still on
    assert daemon.calls >= 6  # the fifth batch was late too, and went again
    records = _in_topic(own.kafka_bootstrap_servers, f"{prefix}.emails", 6)
    assert set(records) == set(first.values()) | set(second.values())
    assert own.receipts_topic is not None
    assert support.read_topic(own.kafka_bootstrap_servers, own.receipts_topic, 2, 5.0)

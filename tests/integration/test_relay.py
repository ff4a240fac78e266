"""The relay daemon on the real PostgreSQL and the real Kafka broker."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.states import EffectState
from tests import support

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-11-22"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _state(url: str, key: str) -> EffectState | None:
    with psycopg.connect(url, autocommit=True) as conn:
        effect = relay.get_effect(conn, key)
    return effect.state if effect else None


def test_committed_effect_arrives_once_with_key_and_headers(
    settings: Settings, services: Services, prefix: str
) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        made = relay.enqueue(conn, "wire", "op-wire-1", WIRE, traceparent=TRACEPARENT)
        relay.enqueue(conn, "wire", "op-rolled-back", {**WIRE, "amount": 7})
        conn.rollback()
        made = relay.enqueue(conn, "wire", "op-wire-1", WIRE, traceparent=TRACEPARENT)
        conn.commit()
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: _state(url, "op-wire-1") is EffectState.PUBLISHED, 30, "publication"
        )
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.wires", 1)
    assert len(records) == 1, [r.key for r in records]
    record = records[0]
    assert record.key == b"op-wire-1"
    assert json.loads(record.value) == WIRE
    headers = dict(record.headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == str(made.effect_id).encode()
    assert headers["ce_type"] == b"wire"
    assert headers["ce_source"] == settings.cloudevents_source.encode()
    assert headers["content-type"] == b"application/json"
    assert b"T" in headers["ce_time"]
    assert headers["relay_effect_id"] == str(made.effect_id).encode()
    assert headers["relay_attempt"] == b"1"
    assert headers["relay_business_key"] == b"ACC1:100:2026-11-22"
    assert headers["traceparent"] == TRACEPARENT.encode()
    with psycopg.connect(url) as conn:
        effect = relay.get_effect(conn, "op-wire-1")
        attempts = conn.execute('SELECT outcome, partition, "offset" FROM relay.attempt').fetchall()
    assert effect is not None
    assert (effect.published_partition, effect.published_offset) == (
        record.partition,
        record.offset,
    )
    assert effect.outcome_deadline is not None  # the wire type awaits a downstream result
    assert attempts == [("acked", record.partition, record.offset)]


def _enqueue_small_and_huge(url: str) -> None:
    """A deployment whose payload limit (max_payload_bytes) is above what the brokers take."""
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE relay.limits SET max_payload_bytes = 2000000")
        intents = [relay.Intent("email", f"small-{i}", {"i": i}) for i in range(20)]
        relay.enqueue_many(conn, intents[:10])
        huge = {"blob": "x" * 1_500_000}
        relay.enqueue(conn, "email", "huge", huge, max_payload_bytes=2_000_000)
        relay.enqueue_many(conn, intents[10:])
        conn.commit()


def test_record_too_large_for_the_broker_is_rejected_and_holds_up_nothing(
    settings: Settings, services: Services, prefix: str
) -> None:
    # The broker's default message.max.bytes is about 1 MiB, and so is max_message_bytes.
    url = settings.require_database_url()
    _enqueue_small_and_huge(url)
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: support.count_states(url) == {"PUBLISHED": 20, "REJECTED": 1}, 60, "outcomes"
        )
    with psycopg.connect(url) as conn:
        effect = relay.get_effect(conn, "huge")
    assert effect is not None and effect.reason is not None
    assert "exceeds the limit of 1048576 bytes" in effect.reason
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 20)
    assert sorted(r.key for r in records) == sorted(f"small-{i}".encode() for i in range(20))


def test_broker_refusal_never_rejects_the_innocent_records(
    settings: Settings, services: Services, prefix: str
) -> None:
    """If the limit is set above the broker's, the broker refuses the huge record and
    kafka-python aborts its other batches with the same error: those must not end REJECTED."""
    settings = settings.model_copy(
        update={"max_request_size": 4 * 1024 * 1024, "max_message_bytes": 4 * 1024 * 1024}
    )
    url = settings.require_database_url()
    _enqueue_small_and_huge(url)
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: (
                sum(
                    n
                    for s, n in support.count_states(url).items()
                    if s not in {"PENDING", "DISPATCHING"}
                )
                == 21
            ),
            60,
            "every attempt to end",
        )
    with psycopg.connect(url) as conn:
        rejected = [
            key
            for (key,) in conn.execute(
                "SELECT operation_key FROM relay.effect WHERE state = 'REJECTED'"
            ).fetchall()
        ]
        published = {
            key
            for (key,) in conn.execute(
                "SELECT operation_key FROM relay.effect WHERE state = 'PUBLISHED'"
            ).fetchall()
        }
    assert set(rejected) <= {"huge"}, rejected
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 1)
    # Everything marked PUBLISHED really is in Kafka; the rest is UNKNOWN, never REJECTED.
    assert published <= {r.key.decode() for r in records}
    print(f"\nbroker refusal: {support.count_states(url)}")


def test_wakes_on_a_new_intent_long_before_the_poll_interval(settings: Settings) -> None:
    """With a 30 s poll interval, only the doorbell can explain a publication within seconds."""
    settings = settings.model_copy(update={"poll_interval_s": 30.0})
    url = settings.require_database_url()
    with support.running(Relay(settings)):
        with psycopg.connect(url, autocommit=True) as conn:
            support.wait_for(
                lambda: conn.execute("SELECT armed FROM relay.doorbell").fetchone() == (True,),
                30,
                "the idle relay to arm the doorbell",
            )
            started = time.monotonic()
            relay.enqueue(conn, "email", "wake-me", {"to": "x"})
        support.wait_for(lambda: _state(url, "wake-me") is EffectState.PUBLISHED, 20, "publication")
        waited = time.monotonic() - started
    assert waited < 15, f"took {waited:.2f}s: the doorbell did not ring"


def test_two_relay_processes_publish_10000_effects_exactly_once(
    settings: Settings, services: Services, prefix: str, tmp_path: Path
) -> None:
    url = settings.require_database_url()
    total = 10_000
    with psycopg.connect(url) as conn:
        for start in range(0, total, 1000):
            relay.enqueue_many(
                conn,
                [
                    relay.Intent("email", f"bulk-{i:05d}", {"i": i})
                    for i in range(start, start + 1000)
                ],
            )
        conn.commit()
    procs = []
    for name in ("a", "b"):
        config = support.write_config(
            tmp_path / f"relay-{name}.toml",
            settings.model_copy(update={"replica_id": f"{prefix}-{name}", "batch_size": 250}),
        )
        procs.append(support.start_relay(config, tmp_path / f"relay-{name}.log"))
    started = time.monotonic()
    try:
        support.wait_for(
            lambda: support.count_states(url).get("PUBLISHED") == total, 240, "10,000 publications"
        )
        elapsed = time.monotonic() - started
    finally:
        codes = [support.stop_process(p) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"relay-{n}.log").read_text()[-2000:] for n in "ab"]
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", total, 90)
    keys = Counter(r.key for r in records)
    duplicates = {k: n for k, n in keys.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} keys published more than once"
    assert len(keys) == total
    with psycopg.connect(url) as conn:
        # Attempts recorded per effect, or per published batch (no row per effect).
        per_replica: dict[str, int] = dict(
            conn.execute(
                "SELECT r, sum(n)::int FROM (SELECT replica_id, count(*) FROM relay.attempt "
                "GROUP BY 1 UNION ALL SELECT owner, sum(n) FROM relay.published_batch GROUP BY 1)"
                " x(r, n) GROUP BY 1"
            ).fetchall()
        )
        multi = conn.execute(
            "SELECT count(*) FROM (SELECT effect_id FROM relay.attempt GROUP BY 1 "
            "HAVING count(*) > 1) x"
        ).fetchone()
    assert multi == (0,)
    assert sum(per_replica.values()) == total
    assert all(n > 0 for n in per_replica.values()) and len(per_replica) == 2, per_replica
    print(
        f"\n10,000 effects by two relays in {elapsed:.1f}s ({total / elapsed:,.0f}/s), "
        f"split {per_replica}; {len(records)} records read, {len(keys)} distinct keys"
    )


def test_sigterm_finishes_the_batch_in_hand_and_exits_zero(
    settings: Settings, tmp_path: Path
) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"t-{i}", {"i": i}) for i in range(3000)])
        conn.commit()
    config = support.write_config(
        tmp_path / "relay.toml", settings.model_copy(update={"batch_size": 100})
    )
    proc = support.start_relay(config, tmp_path / "relay.log")
    support.wait_for(lambda: support.count_states(url).get("PUBLISHED", 0) > 0, 60, "a first batch")
    code = support.stop_process(proc)
    assert code == 0, (tmp_path / "relay.log").read_text()[-2000:]
    states = support.count_states(url)
    assert "DISPATCHING" not in states and "UNKNOWN" not in states, states
    assert states.get("PUBLISHED", 0) + states.get("PENDING", 0) == 3000


def _relay_run(config: Path, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "--config", str(config), "run", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=support.relay_env(),
    )


def _epoch(url: str, replica_id: str) -> int | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT epoch FROM relay.replica WHERE replica_id = %s", (replica_id,)
        ).fetchone()
    return int(row[0]) if row else None


def test_a_live_replica_id_is_never_taken_without_take_over(
    settings: Settings, tmp_path: Path
) -> None:
    """Issue 21.3: a second `relay run` with the id of a live one refuses to start and says what
    to set; with --take-over it replaces the first, which is fenced and exits 2."""
    config = support.write_config(tmp_path / "relay.toml", settings)
    url = settings.require_database_url()
    first = _relay_run(config, tmp_path / "first.log")
    try:
        support.wait_for(lambda: _epoch(url, settings.replica_id) == 1, 30, "the first relay")
        second = _relay_run(config, tmp_path / "second.log")
        try:
            assert second.wait(timeout=30) == 2
        finally:
            support.stop_process(second)
        said = (tmp_path / "second.log").read_text()
        for what in ("in use by a running relay", "RELAY_REPLICA_ID", "RELAY_METRICS_PORT"):
            assert what in said, said
        assert "--take-over" in said and "Traceback" not in said, said
        time.sleep(6)  # past a heartbeat: the first one was not fenced
        assert first.poll() is None and _epoch(url, settings.replica_id) == 1

        third = _relay_run(config, tmp_path / "third.log", "--take-over")
        try:
            assert first.wait(timeout=30) == 2
            assert _epoch(url, settings.replica_id) == 2 and third.poll() is None
        finally:
            assert support.stop_process(third) == 0, (tmp_path / "third.log").read_text()
    finally:
        support.stop_process(first)
    assert "registered again by another process" in (tmp_path / "first.log").read_text()


def test_a_replica_that_died_or_stopped_is_replaced_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    """Its lock went with the process: the same id starts again without --take-over."""
    config = support.write_config(tmp_path / "relay.toml", settings)
    url = settings.require_database_url()
    first = _relay_run(config, tmp_path / "relay.log")
    support.wait_for(lambda: _epoch(url, settings.replica_id) == 1, 30, "the first relay")
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = _relay_run(config, tmp_path / "relay.log")
    try:
        support.wait_for(lambda: _epoch(url, settings.replica_id) == 2, 30, "the restart")
    finally:
        assert support.stop_process(again) == 0, (tmp_path / "relay.log").read_text()
    with support.running(Relay(settings)):  # after a clean stop, too
        support.wait_for(lambda: _epoch(url, settings.replica_id) == 3, 30, "a second restart")


def test_unreachable_broker_ends_attempts_unknown_and_nothing_is_resent(
    settings: Settings, prefix: str
) -> None:
    """Without Kafka transactions there is no safe check: UNKNOWN stays UNKNOWN, never PENDING.
    (With transactions, tests/integration/test_effectively_once.py shows the check.)"""
    from relay.devtools.services import LocalKafka

    broker = LocalKafka()
    broker.start()
    try:
        settings = settings.model_copy(
            update={
                "kafka_bootstrap_servers": broker.bootstrap_servers,
                "publish_timeout_s": 4.0,
                "kafka_transactions": False,
            }
        )
        url = settings.require_database_url()
        with support.running(Relay(settings)):
            with psycopg.connect(url, autocommit=True) as conn:
                relay.enqueue(conn, "email", "before", {"n": 0})
                support.wait_for(
                    lambda: _state(url, "before") is EffectState.PUBLISHED, 60, "a first publish"
                )
                broker.pause()
                relay.enqueue_many(
                    conn, [relay.Intent("email", f"during-{i}", {"n": i}) for i in range(5)]
                )
                support.wait_for(
                    lambda: support.count_states(url).get("UNKNOWN") == 5, 60, "UNKNOWN outcomes"
                )
            broker.resume()
            time.sleep(3)  # the relay runs on with Kafka back: nothing may be re-sent blindly
        states = support.count_states(url)
        assert states == {"PUBLISHED": 1, "UNKNOWN": 5}, states
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT a.outcome, a.reason, e.attempts FROM relay.attempt a "
                "JOIN relay.effect e ON e.id = a.effect_id WHERE e.operation_key LIKE 'during-%%'"
            ).fetchall()
        assert len(rows) == 5
        assert all(outcome == "unknown" and attempts == 1 for outcome, _, attempts in rows)
        assert all("ambiguous" in reason or "no answer" in reason for _, reason, _ in rows)
    finally:
        broker.stop()


def test_lost_database_connections_are_waited_out(settings: Settings, services: Services) -> None:
    """Every relay connection is killed over and over while it publishes a backlog: the relay
    reconnects, loses nothing and publishes nothing twice."""
    url = settings.require_database_url()
    total = 3000
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"pg-{i}", {"i": i}) for i in range(total)])
        conn.commit()
    settings = settings.model_copy(
        update={"batch_size": 50, "lease_s": 8.0, "publish_timeout_s": 3.0}
    )
    dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    killed = 0
    with (
        support.running(Relay(settings)) as daemon,
        psycopg.connect(services.database_url, autocommit=True) as admin,
    ):
        deadline = time.monotonic() + 120
        while support.count_states(url).get("PUBLISHED", 0) < total:
            assert time.monotonic() < deadline, support.count_states(url)
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name LIKE 'relay-%%'",
                (dbname,),
            ).fetchall()
            killed += len(rows)
            time.sleep(0.3)
        assert daemon.published_total >= 1
    assert killed >= 5
    assert support.count_states(url) == {"PUBLISHED": total}
    records = support.read_topic(
        services.kafka_bootstrap_servers, f"{settings.effect_types['email'].topic}", total
    )
    keys = Counter(r.key for r in records)
    assert len(keys) == total and max(keys.values()) == 1


def test_a_row_the_database_refuses_to_mark_holds_up_nothing_else(
    settings: Settings, caplog: Any
) -> None:
    """One outcome that cannot be written (here: a constraint an operator added) is split off;
    the rest of its batch is recorded, later batches flow, and the refused one ends UNKNOWN at
    its lease, then verified in Kafka."""
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"m-{i}", {"i": i}) for i in range(20)])
        conn.commit()
        support.read_intake(url)
        row = conn.execute("SELECT id FROM relay.effect WHERE operation_key = 'm-7'").fetchone()
        assert row is not None
        conn.execute(
            f"ALTER TABLE relay.attempt ADD CONSTRAINT refuse_one CHECK (effect_id <> {row[0]})"
        )
        conn.commit()
    fast = settings.model_copy(update={"lease_s": 4.0, "publish_timeout_s": 1.5})
    with caplog.at_level("ERROR", logger="relay.dispatch.marker"), support.running(Relay(fast)):
        support.wait_for(
            lambda: support.count_states(url) == {"PUBLISHED": 19, "DISPATCHING": 1},
            30,
            "the others recorded",
        )
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "email", "m-later", {"i": 99})
            conn.commit()
        support.wait_for(lambda: _state(url, "m-later") is EffectState.PUBLISHED, 30, "later")
        assert _state(url, "m-7") is EffectState.DISPATCHING
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE relay.attempt DROP CONSTRAINT refuse_one")
        support.wait_for(lambda: _state(url, "m-7") is EffectState.PUBLISHED, 60, "verified")
    refused = [r for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert [getattr(r, "operation_key", None) for r in refused] == ["m-7"]
    with psycopg.connect(url, autocommit=True) as conn:
        story = conn.execute(
            "SELECT a.outcome FROM relay.attempt a JOIN relay.effect e ON e.id = a.effect_id"
            " WHERE e.operation_key = 'm-7' ORDER BY a.attempt"
        ).fetchall()
    assert story == [("unknown",)]  # ended UNKNOWN at its lease, then found in Kafka


def _status_events_flag(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT status_events FROM relay.reconciler_config").fetchone()
    return bool(row and row[0])


def test_status_events_are_on_from_relay_migrate_without_a_reconciler(
    database_url: str, services: Services, prefix: str, tmp_path: Path
) -> None:
    """Issue 21.4: the setting (on by default) takes effect at `relay migrate`: effects published
    by a relay started right after it produce status events, with no reconciler ever started."""
    settings = support.make_settings(
        database_url,
        services.kafka_bootstrap_servers,
        prefix,
        status_topic=f"{prefix}.status",
    )
    config = support.write_config(tmp_path / "relay.toml", settings)
    migrated = support.run_cli(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert _status_events_flag(database_url)
    with support.running(Relay(settings)):
        with psycopg.connect(database_url, autocommit=True) as conn:
            relay.enqueue(conn, "email", "status-1", {"to": "a@example.com"})
        records = support.read_topic(
            services.kafka_bootstrap_servers, settings.status_topic, 3, timeout_s=30
        )
    states = [json.loads(r.value)["state"] for r in records]
    assert states == ["PENDING", "DISPATCHING", "PUBLISHED"], states


def test_relay_run_switches_status_events_as_its_settings_say(settings: Settings) -> None:
    url = settings.require_database_url()
    assert not _status_events_flag(url)  # migrated by the library alone: the schema's default
    with support.running(Relay(settings)):
        support.wait_for(lambda: _status_events_flag(url), 30, "status events on")
    with support.running(Relay(settings.model_copy(update={"status_events": False}))):
        support.wait_for(lambda: not _status_events_flag(url), 30, "status events off")


def _all_published(url: str, keys: list[str]) -> bool:
    return all(_state(url, k) is EffectState.PUBLISHED for k in keys)


def _xid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_xact_id()").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_writing_transactions_held_open_elsewhere_delay_nothing_else(
    settings: Settings, services: Services, prefix: str
) -> None:
    """Issue 19's trap 3 against a live relay: while three writing transactions stay open (an
    uncommitted intent, another intent holding its ordering group, a write in another database
    of the cluster), every intent committed after them is published, grouped or not; the held
    ones are published once they commit. No timing is asserted: only that publication happened
    while they were still open, with the snapshot horizon provably behind them."""
    url = settings.require_database_url()
    elsewhere = support.create_database(services.database_url)
    held: list[psycopg.Connection[Any]] = []
    try:
        for target in (url, url, elsewhere):
            held.append(psycopg.connect(target))
        relay.enqueue(held[0], "email", "held-open", {"to": "held"})
        relay.enqueue(held[1], "email", "held-group-0", {"to": "g"}, ordering_group="g-held")
        held[2].execute("CREATE TABLE scratch (n int)")
        held[2].execute("INSERT INTO scratch VALUES (1)")
        oldest = min(_xid(c) for c in held)
        later: list[str] = []
        with support.running(Relay(settings)), psycopg.connect(url, autocommit=True) as conn:
            for n in range(5):
                keys = [f"later-{n}", f"free-group-{n}"]
                relay.enqueue(conn, "email", keys[0], {"to": "x"})
                relay.enqueue(conn, "email", keys[1], {"to": "y"}, ordering_group="g-free")
                later += keys
                support.wait_for(
                    functools.partial(_all_published, url, keys),
                    30,
                    f"round {n} published while the other transactions are open",
                    explain=lambda: support.diagnose(url),
                )
                horizon = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()
                assert horizon is not None and int(str(horizon[0])) <= oldest, (
                    "the snapshot horizon moved past a held transaction: the test held nothing"
                )
                assert all(
                    c.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS for c in held
                )
                assert _state(url, "held-open") is None  # not committed: not there at all
            for c in held:
                c.commit()
            support.wait_for(
                functools.partial(_all_published, url, ["held-open", "held-group-0"]),
                30,
                "the held intents published once committed",
                explain=lambda: support.diagnose(url),
            )
        expected = {*later, "held-open", "held-group-0"}
        records = support.read_topic(
            services.kafka_bootstrap_servers, f"{prefix}.emails", len(expected)
        )
        assert Counter(r.key.decode() for r in records) == Counter(expected)
    finally:
        for c in held:
            c.close()
        support.drop_database(elsewhere)

"""Ordering groups on the real servers: commit order, one partition, one in flight, poison
isolation and `relay unblock`.

The guarantee these tests check: effects that share an ordering group reach a read_committed
consumer once each, in one partition, in the order their enqueuing transactions committed; an
effect of a group that ends REJECTED, UNKNOWN or STUCK holds back only the later effects of its
own group, until it is settled or released."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.errors import EffectNotFoundError, InvalidTransitionError
from relay.headers import H_ORDERING_GROUP
from relay.reconciler.purge import purge
from relay.reconciler.unblock import unblock
from tests import support
from tests.downstream import harness as h


def _by_group(records: list[Any]) -> dict[str, list[tuple[int, str]]]:
    """(partition, operation key) of each record, per ordering group, in the order read."""
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        group = dict(record.headers).get(H_ORDERING_GROUP)
        if group is not None:
            out[group.decode()].append((record.partition, record.key.decode()))
    return out


def _parked(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT e.operation_key, b.operation_key FROM relay.effect e"
            " JOIN LATERAL (SELECT p.operation_key FROM relay.effect p"
            "   WHERE p.ordering_group = e.ordering_group AND p.id < e.id"
            "     AND p.group_released_at IS NULL AND p.state IN ('REJECTED','UNKNOWN','STUCK')"
            "   ORDER BY p.id DESC LIMIT 1) b ON true"
            " WHERE e.state = 'PENDING' AND e.ordering_group IS NOT NULL ORDER BY e.id"
        ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


def _gauges(url: str) -> dict[str, float]:
    from relay.sql import query

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(query("observability_snapshot")).fetchall()
    return {str(kind): float(value) for kind, _t, _s, value in rows if kind.startswith("parked")}


def test_overlapping_transactions_of_a_group_publish_in_commit_order(
    settings: Settings, services: Services, prefix: str
) -> None:
    """The second transaction enqueues while the first is open and would commit first if it
    could: it waits at relay.enqueue until the first commits, so commit order is id order."""
    url = settings.require_database_url()
    committed: list[str] = []
    gate = threading.Lock()  # a commit and its record in ``committed`` happen as one step

    def second() -> None:
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "email", "g-b", {"n": 2}, ordering_group="order-1")
            with gate:
                conn.commit()
                committed.append("g-b")

    with psycopg.connect(url) as first:
        relay.enqueue(first, "email", "g-a", {"n": 1}, ordering_group="order-1")
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)  # the second transaction is at its enqueue (or past it, if unlocked)
        with gate:
            first.commit()
            committed.append("g-a")
    thread.join(10)
    assert not thread.is_alive()
    # Another group and an ungrouped effect, committed after: they do not wait for order-1.
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "email", "g-c", {"n": 3}, ordering_group="order-2")
        relay.enqueue(conn, "email", "g-free", {"n": 4})
        conn.commit()
    with support.running(Relay(settings)):
        support.wait_for(lambda: support.count_states(url) == {"PUBLISHED": 4}, 30, "published")
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 4)
    groups = _by_group(records)
    assert committed == ["g-a", "g-b"]
    assert [key for _, key in groups["order-1"]] == committed
    assert len({partition for partition, _ in groups["order-1"]}) == 1
    assert [key for _, key in groups["order-2"]] == ["g-c"]
    assert sorted(r.key.decode() for r in records) == ["g-a", "g-b", "g-c", "g-free"]
    # The partition is Kafka's default partitioner applied to the group.
    from relay.dispatch.publisher import group_partition

    assert groups["order-1"][0][0] == group_partition("order-1", {0, 1, 2})


def test_a_group_key_is_refused_when_malformed_and_reused_keys_must_match_their_group(
    settings: Settings,
) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        with pytest.raises(relay.InvalidIntentError):
            relay.enqueue(conn, "email", "k", {}, ordering_group="")
        with pytest.raises(relay.InvalidIntentError):
            relay.enqueue(conn, "email", "k", {}, ordering_group="x" * 513)
        with pytest.raises(relay.InvalidIntentError):
            relay.enqueue(conn, "email", "k", {}, ordering_group="a\x00b")
        first = relay.enqueue(conn, "email", "k", {}, ordering_group="g")
        again = relay.enqueue(conn, "email", "k", {}, ordering_group="g")
        assert again.effect_id == first.effect_id and not again.created
        with pytest.raises(relay.OperationKeyConflictError):
            relay.enqueue(conn, "email", "k", {}, ordering_group="other")
        conn.rollback()
        # The SQL function checks as well (other languages call it directly).
        with pytest.raises(psycopg.DatabaseError) as raised:
            conn.execute("SELECT * FROM relay.enqueue('k2', 'email', '{}', NULL, NULL, NULL, '')")
        assert raised.value.sqlstate == "RL002"


def _writer(
    url: str,
    groups: list[str],
    per_group: int,
    counts: dict[str, int],
    expected: dict[str, list[str]],
    gate: threading.Lock,
    seed: int,
    errors: list[BaseException],
) -> None:
    rng = random.Random(seed)
    try:
        with psycopg.connect(url) as conn:
            while True:
                with gate:
                    open_groups = [g for g in groups if counts[g] < per_group]
                    if not open_groups:
                        return
                    group = rng.choice(open_groups)
                    # Reserve one or two effects of the group for this transaction.
                    n = min(per_group - counts[group], 2 if rng.random() < 0.2 else 1)
                    counts[group] += n
                keys = [f"{group}-w{seed}-{rng.getrandbits(48):012x}" for _ in range(n)]
                for key in keys:
                    relay.enqueue(conn, "email", key, {"group": group}, ordering_group=group)
                with gate:  # the commit and its place in the expected order, as one step
                    conn.commit()
                    expected[group].extend(keys)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _starts_are(log: Path, n: int) -> bool:
    return log.read_text().count("relay starting") == n


def test_two_hundred_groups_from_eight_writers_two_replicas_five_kills_in_commit_order_once(
    settings: Settings, services: Services, prefix: str, tmp_path: Path
) -> None:
    url = settings.require_database_url()
    n_groups, per_group = 200, 50
    total = n_groups * per_group
    groups = [f"agg-{i:03d}" for i in range(n_groups)]
    fast = {"lease_s": 8.0, "publish_timeout_s": 3.5, "transaction_timeout_s": 8.0}
    configs = {
        name: support.write_config(
            tmp_path / f"{name}.toml",
            settings.model_copy(update={**fast, "replica_id": f"{prefix}-{name}"}),
        )
        for name in ("steady", "victim")
    }
    counts = dict.fromkeys(groups, 0)
    expected: dict[str, list[str]] = defaultdict(list)
    gate = threading.Lock()
    errors: list[BaseException] = []
    writers = [
        threading.Thread(
            target=_writer,
            args=(url, groups, per_group, counts, expected, gate, seed, errors),
        )
        for seed in range(8)
    ]
    steady = support.start_relay(configs["steady"], tmp_path / "steady.log")
    victim = support.start_relay(configs["victim"], tmp_path / "victim.log")
    for w in writers:
        w.start()
    rng = random.Random(13)
    kills = 0
    try:
        # The first incarnation is up too before the first kill (CI once killed it unstarted).
        support.wait_for(partial(_starts_are, tmp_path / "victim.log", 1), 60, "the victim's start")
        while kills < 5:
            time.sleep(rng.uniform(1.5, 3.0))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            victim = support.start_relay(configs["victim"], tmp_path / "victim.log")
            # Each kill lands on a relay that is running: under load, Python's start alone can
            # take longer than the shortest sleep, and a kill then hit one that never started.
            support.wait_for(
                partial(_starts_are, tmp_path / "victim.log", kills + 1),
                60,
                "the victim's restart",
            )
        # The last incarnation is up (its SIGTERM handler installed) before anything stops it.
        support.wait_for(
            lambda: (tmp_path / "victim.log").read_text().count("relay starting") == kills + 1,
            60,
            "the victim's last start",
        )
        for w in writers:
            w.join(300)
        assert not errors, errors
        try:
            support.wait_for(
                lambda: support.count_states(url).get("PUBLISHED") == total, 300, "every effect"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {support.diagnose(url)}") from None
    finally:
        for w in writers:
            w.join(60)
        codes = [support.stop_process(p) for p in (steady, victim)]
    assert codes == [0, 0], (tmp_path / "steady.log").read_text()[-3000:]
    records = support.read_topic(
        services.kafka_bootstrap_servers, f"{prefix}.emails", total, timeout_s=120
    )
    seen = _by_group(records)
    assert sum(len(v) for v in expected.values()) == total
    out_of_order = [g for g in groups if [k for _, k in seen[g]] != expected[g]]
    partitions = {g: {p for p, _ in seen[g]} for g in groups}
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE outcome = 'unknown'), count(*) FROM relay.attempt"
        ).fetchone()
    assert row is not None
    print(
        f"\nordering: {kills} SIGKILLs, {n_groups} groups x {per_group}, {len(records)} records "
        f"read, {row[1]} attempts of which {row[0]} ended UNKNOWN (verified), "
        f"{len(out_of_order)} groups out of order"
    )
    assert len(records) == total  # once each: no duplicate, none missing
    assert out_of_order == []
    assert all(len(p) == 1 for p in partitions.values())


def test_a_poison_effect_parks_only_its_group_and_unblock_releases_it_in_order(
    services: Services, database_url: str, prefix: str
) -> None:
    """Too large for the brokers: REJECTED at publication. Its group waits, others finish."""
    settings = support.make_settings(
        database_url, services.kafka_bootstrap_servers, prefix, max_message_bytes=4096
    )
    support.prepare_database(settings)
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        for i in range(4):
            payload = {"n": i, "pad": "x" * (6000 if i == 1 else 1)}
            relay.enqueue(conn, "email", f"p-{i}", payload, ordering_group="poisoned")
            relay.enqueue(conn, "email", f"h-{i}", {"n": i}, ordering_group="healthy")
        conn.commit()
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: h.states(url, ["p-1", "h-3"]) == {"p-1": "REJECTED", "h-3": "PUBLISHED"},
            30,
            "the healthy group done, the poison rejected",
        )
        time.sleep(1.0)  # several more claims: the parked effects must stay
        assert h.states(url, ["p-0", "p-2", "p-3"]) == {
            "p-0": "PUBLISHED",
            "p-2": "PENDING",
            "p-3": "PENDING",
        }
        assert _parked(url) == [("p-2", "p-1"), ("p-3", "p-1")]
        assert _gauges(url) == {"parked": 1.0, "parked_effects": 2.0}
        # A purge, however short the retention, keeps the effect that parks its group (and waits
        # for the status events, on from the start, of the effects it removes).
        support.wait_for(lambda: support.status_backlog(url) == 0, 30, "status events sent")
        with psycopg.connect(url, autocommit=True) as conn:
            removed, *_ = purge(conn, settings, 0.0)
        assert removed == 5  # p-0 and h-0..h-3: finished; p-1 stays
        assert h.state(url, "p-1") == "REJECTED"
        with psycopg.connect(url) as conn:
            with pytest.raises(EffectNotFoundError):
                unblock(conn, "healthy", skip=None, reason="nothing parked", actor="t")
            with pytest.raises(InvalidTransitionError):
                unblock(conn, "poisoned", skip="p-0", reason="the wrong one", actor="t")
            released = unblock(conn, "poisoned", skip=None, reason="too large, dropped", actor="t")
        assert (released.operation_key, released.state.value, released.waiting) == (
            "p-1",
            "REJECTED",
            2,
        )
        support.wait_for(
            lambda: h.states(url, ["p-2", "p-3"]) == {"p-2": "PUBLISHED", "p-3": "PUBLISHED"},
            30,
            "the group released",
        )
    assert _gauges(url) == {"parked": 0.0, "parked_effects": 0.0}
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 7)
    seen = _by_group(records)
    assert [k for _, k in seen["poisoned"]] == ["p-0", "p-2", "p-3"]
    assert [k for _, k in seen["healthy"]] == ["h-0", "h-1", "h-2", "h-3"]
    with psycopg.connect(url, autocommit=True) as conn:
        evidence = conn.execute(
            "SELECT kind, outcome, actor, db_role, detail FROM relay.evidence"
            " WHERE operation_key = 'p-1'"
        ).fetchall()
    assert evidence == [("operator", "release", "t", "postgres", "too large, dropped")]


def test_rejected_and_unresolved_results_park_their_groups_until_released(
    database_url: str,
    services: Services,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A type awaiting results: the next effect of a group waits for the previous one's result.
    A rejected result parks the group; an unknown one (no observer: STUCK) too, and only
    --skip releases that one."""
    h.isolate_from_environment(monkeypatch)
    settings = h.reconciler_settings(database_url, services.kafka_bootstrap_servers, prefix)
    url = settings.require_database_url()
    bootstrap = services.kafka_bootstrap_servers
    with psycopg.connect(url) as conn:
        for group in ("r", "u", "ok"):
            for i in range(2):
                relay.enqueue(
                    conn,
                    "wire",
                    f"{group}-{i}",
                    {**h.WIRE, "amount": f"{group}{i}"},
                    ordering_group=f"wires-{group}",
                )
        conn.commit()
    topic = f"{prefix}.wire-results"
    with support.running(Relay(settings)), h.running_reconciler(settings):
        firsts = ["r-0", "u-0", "ok-0"]
        support.wait_for(
            lambda: set(h.states(url, firsts).values()) == {"PUBLISHED"}, 30, "first of each"
        )
        time.sleep(1.0)  # awaiting results: the second of each group must not go yet
        assert set(h.states(url, ["r-1", "u-1", "ok-1"]).values()) == {"PENDING"}
        h.produce(
            bootstrap,
            topic,
            [h.result("r-0", "rejected"), h.result("u-0", "unknown"), h.result("ok-0")],
        )
        support.wait_for(lambda: h.state(url, "ok-1") == "PUBLISHED", 30, "ok group goes on")
        support.wait_for(
            lambda: h.states(url, ["r-0", "u-0"]) == {"r-0": "REJECTED", "u-0": "STUCK"},
            30,
            "rejected and stuck",
        )
        assert sorted(_parked(url)) == [("r-1", "r-0"), ("u-1", "u-0")]
        assert _gauges(url) == {"parked": 2.0, "parked_effects": 2.0}
        config = support.write_config(tmp_path / "relay.toml", settings)
        refused = support.run_cli(config, "unblock", "wires-u", "--reason", "try")
        assert refused.returncode != 0 and "--skip" in refused.stderr, refused.stderr
        listed = support.run_cli(config, "list", "--state", "PARKED")
        assert listed.returncode == 0, listed.stderr
        assert "r-1" in listed.stdout and "u-1" in listed.stdout and "PARKED" in listed.stdout
        done = support.run_cli(
            config, "unblock", "wires-u", "--skip", "u-0", "--reason", "gave up", "--actor", "ops"
        )
        assert done.returncode == 0, done.stderr
        assert "released from u-0 (STUCK)" in done.stdout
        shown = support.run_cli(config, "show", "u-0")
        assert "its group went on without it" in shown.stdout
        support.wait_for(lambda: h.state(url, "u-1") == "PUBLISHED", 30, "u group released")
        assert h.state(url, "r-1") == "PENDING"  # still parked: nobody released it
        with psycopg.connect(url) as conn:
            unblock(conn, "wires-r", skip=None, reason="rejected downstream", actor="ops")
        support.wait_for(lambda: h.state(url, "r-1") == "PUBLISHED", 30, "r group released")
    records = support.read_topic(bootstrap, f"{prefix}.wires", 6)
    seen = _by_group(records)
    for group in ("r", "u", "ok"):
        assert [k for _, k in seen[f"wires-{group}"]] == [f"{group}-0", f"{group}-1"]


def test_async_enqueue_and_the_sql_function_take_the_group_too(settings: Settings) -> None:
    import asyncio

    url = settings.require_database_url()

    async def enqueue_async() -> None:
        async with await psycopg.AsyncConnection.connect(url) as aconn:
            await relay.enqueue_async(aconn, "email", "a-1", {"n": 1}, ordering_group="ga")
            await aconn.commit()

    asyncio.run(enqueue_async())
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT * FROM relay.enqueue('s-1', 'email', '{}', NULL, NULL, NULL, 'gs')"
        ).fetchone()
        conn.commit()
        support.read_intake(url)
        groups: dict[str, str] = dict(
            conn.execute(
                "SELECT operation_key, ordering_group FROM relay.effect ORDER BY id"
            ).fetchall()
        )
        effect = relay.get_effect(conn, "a-1")
    assert groups == {"a-1": "ga", "s-1": "gs"}
    assert effect is not None and effect.ordering_group == "ga"

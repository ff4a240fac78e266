"""Replay: the reconciler's consumer group is reset to the start of the result topics and a fresh
reconciler reads every result again; nothing may change (no state twice, no compensation twice)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.errors import NoError as KafkaNoError

from relay.config import Settings
from tests.downstream import harness as h


def snapshot(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        transitions = conn.execute(
            "SELECT effect_id, from_state, to_state, attempt, actor FROM relay.transition"
            " ORDER BY id"
        ).fetchall()
        effects = conn.execute(
            "SELECT operation_key, state, attempts, parent_effect_id IS NOT NULL"
            " FROM relay.effect ORDER BY id"
        ).fetchall()
        applied = conn.execute(
            "SELECT count(*) FROM relay.evidence WHERE verdict = 'applied'"
        ).fetchone()
    return {"transitions": transitions, "effects": effects, "applied": applied}


def result_partitions(settings: Settings, consumer: KafkaConsumer) -> list[TopicPartition]:
    topics = sorted({s.result_topic for s in settings.effect_types.values() if s.result_topic})
    return [
        TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
    ]


def reset_to_start(settings: Settings) -> int:
    """Reset the (stopped) reconciler group to the earliest offset of every result partition,
    as ``kafka-consumer-groups --reset-offsets --to-earliest`` does; returns how many result
    records the group will read again."""
    servers = settings.kafka_bootstrap_servers.split(",")
    consumer = KafkaConsumer(bootstrap_servers=servers)
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        tps = result_partitions(settings, consumer)
        ends = consumer.end_offsets(tps)
        # The stopped reconciler's member may linger until its session ends: retry till then.
        deadline = time.monotonic() + 60
        while True:
            done = admin.reset_group_offsets(
                settings.reconcile_group_id, {tp: OffsetSpec.EARLIEST for tp in tps}
            )
            errors = {tp: r["error"] for tp, r in done.items() if r["error"] is not KafkaNoError}
            if not errors:
                break
            assert time.monotonic() < deadline, f"the group could not be reset: {errors}"
            time.sleep(1.0)
        return sum(ends[tp] - int(done[tp]["offset"]) for tp in tps)
    finally:
        consumer.close()
        admin.close()


def caught_up(settings: Settings) -> bool:
    """The group's committed offsets are at the end of every result partition."""
    servers = settings.kafka_bootstrap_servers.split(",")
    consumer = KafkaConsumer(bootstrap_servers=servers)
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        tps = result_partitions(settings, consumer)
        ends = consumer.end_offsets(tps)
        group = settings.reconcile_group_id
        committed = admin.list_group_offsets({group: tps}).get(group, {})
        return all(tp in committed and committed[tp].offset >= ends[tp] for tp in tps)
    finally:
        consumer.close()
        admin.close()


def replay(settings: Settings, timeout_s: float = 90.0) -> tuple[int, dict[str, Any]]:
    """Reset, run a fresh reconciler until it has read everything again; returns how many records
    were replayed and the snapshot before."""
    url = settings.require_database_url()
    before = snapshot(url)
    replayed = reset_to_start(settings)
    assert not caught_up(settings), "the reset did not move the group back"
    with h.running_reconciler(settings):
        deadline = time.monotonic() + timeout_s
        while not caught_up(settings):
            assert time.monotonic() < deadline, "the fresh reconciler did not read every result"
            time.sleep(0.5)
        time.sleep(2 * settings.reconcile_interval_s)  # a sweep of the timers as well
    return replayed, before


def assert_replay_changes_nothing(settings: Settings) -> int:
    url = settings.require_database_url()
    replayed, before = replay(settings)
    after = snapshot(url)
    new = after["transitions"][len(before["transitions"]) :]
    assert not new, f"replaying {replayed} results made {len(new)} transitions: {new[:10]}"
    assert after["effects"] == before["effects"], "replay changed effects"
    assert after["applied"] == before["applied"], "replay applied results again"
    return replayed

"""A three-broker KRaft cluster (replication factor 3, min.insync.replicas 2) losing a broker
while the relay publishes a steady load of wires (through the downstream bank and the reconciler)
and e-mails: the partition leader SIGKILLed with a Kafka transaction in flight, a broker paused
(SIGSTOP) past its session timeout, a broker restarted. After each, the checker; after the first,
a replay of every result."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from relay.config import Settings
from relay.devtools.services import KafkaCluster
from relay.dispatch.daemon import Relay
from tests import support
from tests.downstream import harness as h
from tests.faults import load, replay, scenario
from tests.faults.load import Profile

pytestmark = pytest.mark.faults


class LeaderKillingRelay(Relay):
    """The in-process relay, SIGKILLing the leader of a dispatch partition between its sends and
    its commit (the records are in the leader's log, the transaction is open) when armed."""

    def __init__(self, settings: Settings, cluster: KafkaCluster, topic: str) -> None:
        super().__init__(settings)
        self.cluster = cluster
        self.topic = topic
        self.armed = threading.Event()
        self.killed = threading.Event()
        self.victims: list[int] = []

    def _before_commit(self) -> None:
        if self.armed.is_set():
            self.armed.clear()
            leader = scenario.leader_of(self.cluster, self.topic, len(self.victims) % 3)
            self.cluster.node(leader).kill()
            self.victims.append(leader)
            self.killed.set()


def test_leader_killed_mid_transaction_then_replayed(
    cluster: KafkaCluster,
    database_url: str,
    prefix: str,
    workdir: Path,
    load_profile: Profile,
) -> None:
    scenario.wait_healthy(cluster)
    bootstrap = cluster.bootstrap_servers
    with ExitStack() as stack:
        settings, bank = scenario.prepare(
            database_url, bootstrap, prefix, workdir, stack, replication=3
        )
        assert bank is not None
        # A few wires executed twice by the bank: the reconciler compensates them, and the replay
        # below must not compensate them again.
        twice = [f"{prefix}-w{i:05d}" for i in range(0, 40, 10)]
        bank.set_faults({key: ["execute_twice"] for key in twice})
        daemon = LeaderKillingRelay(settings, cluster, f"{prefix}.wires")
        feeder = load.Feeder(
            database_url,
            load.intents(prefix, load_profile.intents, wires=True),
            load_profile.seconds,
        )
        with scenario.reconciling(settings, database_url), support.running(daemon):
            feeder.start()
            # Armed while the load is young: armed after the flow was seen, no transaction came
            # to be cut in one CI run (a slow start let the feeder finish first).
            daemon.armed.set()
            scenario.wait_flowing(database_url, bank)
            for round_ in range(load_profile.rounds):
                if round_ > 0:
                    time.sleep(2.0)  # the load flows
                    daemon.killed.clear()
                    daemon.armed.set()
                support.wait_for(daemon.killed.is_set, 60, "a leader killed mid-transaction")
                time.sleep(3.0)  # two brokers carry on (min ISR 2)
                victim = cluster.node(daemon.victims[-1])
                victim.launch()
                victim.wait_ready()
                scenario.wait_healthy(cluster)
            committed = feeder.finish()
            report = scenario.finish(
                "leader killed mid-transaction", settings, database_url, bootstrap, committed, bank
            )
        report.assert_clean()
        assert len(daemon.victims) == load_profile.rounds
        with_compensations = support.count_states(database_url)
        replayed = replay.assert_replay_changes_nothing(
            settings.model_copy(update={"database_url": database_url})
        )
        assert replayed >= len(committed) // 2, (replayed, with_compensations)
        assert support.count_states(database_url) == with_compensations
        for key in twice:
            assert [c[1:] for c in h.children(database_url, key)] == [
                ("wire-reversal", "CONFIRMED")
            ], key
        print(f"replayed {replayed} results: no transition, no compensation made again")


def _broker_fault_scenario(
    name: str,
    fault: str,
    cluster: KafkaCluster,
    database_url: str,
    prefix: str,
    workdir: Path,
    load_profile: Profile,
) -> None:
    scenario.wait_healthy(cluster)
    bootstrap = cluster.bootstrap_servers
    with ExitStack() as stack:
        settings, bank = scenario.prepare(
            database_url, bootstrap, prefix, workdir, stack, replication=3
        )
        feeder = load.Feeder(
            database_url,
            load.intents(prefix, load_profile.intents, wires=True),
            load_profile.seconds,
        )
        with scenario.reconciling(settings, database_url):
            relays = scenario.start_relays(settings, workdir, 2)
            try:
                feeder.start()
                scenario.wait_flowing(database_url, bank)
                for round_ in range(load_profile.rounds):
                    time.sleep(2.0)
                    victim = cluster.node(
                        scenario.leader_of(cluster, f"{prefix}.wires", round_ % 3)
                    )
                    if fault == "pause":
                        victim.pause()
                        time.sleep(12.0)  # past the broker's session timeout (9 s)
                        victim.resume()
                    else:
                        victim.restart()
                    scenario.wait_healthy(cluster)
                committed = feeder.finish()
                report = scenario.finish(name, settings, database_url, bootstrap, committed, bank)
            finally:
                scenario.stop_relays(relays, workdir)
        report.assert_clean()


def test_broker_paused_then_resumed(
    cluster: KafkaCluster, database_url: str, prefix: str, workdir: Path, load_profile: Profile
) -> None:
    _broker_fault_scenario(
        "broker paused", "pause", cluster, database_url, prefix, workdir, load_profile
    )


def test_broker_restarted(
    cluster: KafkaCluster, database_url: str, prefix: str, workdir: Path, load_profile: Profile
) -> None:
    _broker_fault_scenario(
        "broker restarted", "restart", cluster, database_url, prefix, workdir, load_profile
    )

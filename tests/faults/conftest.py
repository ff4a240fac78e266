"""Fixtures of the fault suite: a three-node Kafka cluster (shared by the cluster scenarios), a
Toxiproxy server, a PostgreSQL server a test owns (to restart it), and the load profile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.devtools.services import KafkaCluster, LocalPostgres
from tests.faults.load import Profile, profile
from tests.faults.toxiproxy import Toxiproxy


@pytest.fixture(scope="session")
def load_profile() -> Profile:
    return profile()


@pytest.fixture
def cluster() -> Iterator[KafkaCluster]:
    """Three brokers (KRaft, each also a controller), replication factor 3, min ISR 2: a fresh
    cluster per scenario (about 12 s), so no scenario meets the aftermath of the one before (a
    bank that joined its group right after the leader-kill scenario consumed nothing in 3
    minutes), and none runs (or holds ports) through the rest of the suite."""
    made = KafkaCluster(3, extra_properties={"group.initial.rebalance.delay.ms": 0})
    made.start()
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture(scope="module")
def toxiproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Toxiproxy]:
    server = Toxiproxy(tmp_path_factory.mktemp("toxiproxy") / "toxiproxy.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this test's own, which it may restart or cut off."""
    server = LocalPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path

"""PostgreSQL faults while the relay (two ``relay run`` replicas) and the reconciler work through
a steady load of wires and e-mails: the server restarted, and the network between them and the
database degraded through a real TCP proxy (latency, connections cut after a request was sent,
reset, cut after some bytes). The application's own connection goes straight to the server; its
transactions that fail are retried with the same operation keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from relay.devtools.services import LocalPostgres, Services
from tests import support
from tests.faults import scenario
from tests.faults.load import Feeder, Profile, intents
from tests.faults.toxiproxy import Proxy, Toxiproxy

pytestmark = pytest.mark.faults


@pytest.fixture
def own_database(own_postgres: LocalPostgres) -> Iterator[str]:
    url = support.create_database(own_postgres.url)
    yield url
    support.drop_database(url)


def test_postgres_restarted_mid_run(
    own_postgres: LocalPostgres,
    own_database: str,
    services: Services,
    prefix: str,
    workdir: Path,
    load_profile: Profile,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    with ExitStack() as stack:
        settings, bank = scenario.prepare(own_database, bootstrap, prefix, workdir, stack)
        feeder = Feeder(
            own_database, intents(prefix, load_profile.intents, wires=True), load_profile.seconds
        )
        with scenario.reconciling(settings, own_database):
            relays = scenario.start_relays(settings, workdir, 2)
            try:
                feeder.start()
                scenario.wait_flowing(own_database, bank)
                for _ in range(load_profile.rounds * 2):
                    time.sleep(2.5)
                    own_postgres.restart()
                committed = feeder.finish()
                report = scenario.finish(
                    "PostgreSQL restarted", settings, own_database, bootstrap, committed, bank
                )
            finally:
                scenario.stop_relays(relays, workdir)
        report.assert_clean()
        assert feeder.retries > 0, "no application transaction met the restarts"


ROUND_S = 12.0  # how long one round of _degrade lasts


def _degrade(proxy: Proxy, rounds: int) -> None:
    """Each round: latency, then connections cut a while after a request went out (``timeout``:
    nothing gets through, the connection is closed after 1.5 s), reset (TCP RST after 300 ms), and
    closed after 4 kB from the server (``limit_data``)."""
    for _ in range(rounds):
        with proxy.toxic("latency", "downstream", latency=150, jitter=100):
            time.sleep(3.0)
        with proxy.toxic("timeout", "upstream", timeout=1500):
            time.sleep(3.0)
        time.sleep(1.0)
        with proxy.toxic("reset_peer", "upstream", timeout=300):
            time.sleep(2.0)
        time.sleep(1.0)
        with proxy.toxic("limit_data", "downstream", bytes=4096):
            time.sleep(2.0)
        proxy.clear()
        time.sleep(1.0)


def test_network_faults_between_the_relay_and_postgres(
    own_postgres: LocalPostgres,
    own_database: str,
    services: Services,
    toxiproxy: Toxiproxy,
    prefix: str,
    workdir: Path,
    load_profile: Profile,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    proxy = toxiproxy.proxy(f"{prefix}-pg", own_postgres.port)
    through_proxy = own_database.replace(f"port={own_postgres.port}", f"port={proxy.port}")
    assert through_proxy != own_database
    with ExitStack() as stack:
        stack.callback(proxy.clear)
        settings, bank = scenario.prepare(
            own_database, bootstrap, prefix, workdir, stack, relay_database_url=through_proxy
        )
        feeder = Feeder(
            own_database,
            intents(prefix, load_profile.intents, wires=True),
            max(load_profile.seconds, ROUND_S * load_profile.rounds),  # load through every fault
        )
        with scenario.reconciling(settings, through_proxy):
            relays = scenario.start_relays(settings, workdir, 2)
            try:
                feeder.start()
                scenario.wait_flowing(own_database, bank)
                time.sleep(1.0)
                _degrade(proxy, load_profile.rounds)
                committed = feeder.finish()
                report = scenario.finish(
                    "network to PostgreSQL", settings, own_database, bootstrap, committed, bank
                )
            finally:
                scenario.stop_relays(relays, workdir)
        report.assert_clean()

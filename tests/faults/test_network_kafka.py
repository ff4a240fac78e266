"""Network faults between the relay and Kafka, through a real TCP proxy on loopback: a broker
whose client listener is advertised at the proxy's address (so that every client, told by the
metadata where the broker is, goes through the proxy), while the broker's own traffic has a
listener of its own. Latency, requests sent and never answered, resets and connections cut after
some bytes, while two ``relay run`` replicas publish a steady load of e-mails and wires (the
reconciler goes through the proxy too; the bank does not)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from relay.devtools.services import LocalKafka, free_port
from tests.faults import scenario
from tests.faults.load import Feeder, Profile, intents
from tests.faults.toxiproxy import Proxy, Toxiproxy

pytestmark = pytest.mark.faults


@pytest.fixture
def proxied_broker(toxiproxy: Toxiproxy, prefix: str) -> Iterator[tuple[LocalKafka, Proxy]]:
    listen = free_port()
    broker = LocalKafka(internal_listener=True, advertised=f"127.0.0.1:{listen}")
    proxy = toxiproxy.proxy(f"{prefix}-kafka", broker.port, listen_port=listen)
    broker.start()
    try:
        yield broker, proxy
    finally:
        proxy.clear()
        broker.stop()


ROUND_S = 22.0  # how long one round of _degrade lasts


def _degrade(proxy: Proxy, rounds: int) -> None:
    """Each round: latency both ways; requests that go out and are never answered (``timeout``
    upstream: nothing passes, the connection is closed after 3 s, beyond nothing the relay waits
    for is unbounded); resets (RST 300 ms into every connection); connections cut after 20 kB
    of answers (``limit_data``)."""
    for _ in range(rounds):
        with (
            proxy.toxic("latency", "downstream", latency=300, jitter=100),
            proxy.toxic("latency", "upstream", latency=100),
        ):
            time.sleep(4.0)
        with proxy.toxic("timeout", "upstream", timeout=3000):
            time.sleep(6.0)
        time.sleep(1.0)
        with proxy.toxic("reset_peer", "upstream", timeout=300):
            time.sleep(3.0)
        time.sleep(1.0)
        with proxy.toxic("limit_data", "downstream", bytes=20_000):
            time.sleep(4.0)
        proxy.clear()
        time.sleep(1.0)


def test_network_faults_between_the_relay_and_kafka(
    proxied_broker: tuple[LocalKafka, Proxy],
    database_url: str,
    prefix: str,
    workdir: Path,
    load_profile: Profile,
) -> None:
    broker, proxy = proxied_broker
    through_proxy = broker.bootstrap_servers  # what the client listener advertises
    # The bank and the checker bootstrap on the broker's own listener, which advertises itself:
    # the faults are between the relay (and its reconciler) and Kafka, not under the bank.
    bootstrap = f"127.0.0.1:{broker.internal_port}"
    assert through_proxy == f"127.0.0.1:{proxy.port}"
    with ExitStack() as stack:
        settings, bank = scenario.prepare(
            database_url, bootstrap, prefix, workdir, stack, relay_bootstrap=through_proxy
        )
        feeder = Feeder(
            database_url,
            intents(prefix, load_profile.intents, wires=True),
            max(load_profile.seconds, ROUND_S * load_profile.rounds),  # load through every fault
        )
        with scenario.reconciling(settings, database_url):
            relays = scenario.start_relays(settings, workdir, 2)
            try:
                feeder.start()
                scenario.wait_flowing(database_url, bank)
                time.sleep(1.0)
                _degrade(proxy, load_profile.rounds)
                committed = feeder.finish()
                report = scenario.finish(
                    "network to Kafka", settings, database_url, bootstrap, committed, bank
                )
            finally:
                scenario.stop_relays(relays, workdir)
        report.assert_clean()

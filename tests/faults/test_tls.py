"""TLS at the edges (issue 11, item 10), on the real commands and a real broker:

- ``relay run`` and ``relay reconcile`` warn at start when the database is reached over the
  network without ``sslmode=verify-full`` (and stay silent on loopback or with verify-full);
- Kafka mTLS: a broker whose SSL listener requires a client certificate; the relay publishes with
  the certificate its settings name, and a client without one, or with one from another CA, is
  refused. The CA and the certificates are made by the test with openssl."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError

import relay
from relay.devtools.services import LocalKafka
from tests import support

pytestmark = pytest.mark.faults

WARNING = "is reached without sslmode=verify-full"


def _daemon_output(config: Path, command: str, wait_for: str, log_path: Path) -> str:
    """Start ``relay <command>``, wait until its log shows ``wait_for``, stop it (SIGTERM)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "--config", str(config), command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=support.relay_env(),
        )
    try:
        support.wait_for(
            lambda: wait_for in log_path.read_text(errors="replace"), 60, f"{command}: {wait_for}"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return log_path.read_text(errors="replace")


@pytest.mark.parametrize("command", ["run", "reconcile"])
def test_daemons_warn_about_a_remote_database_without_verify_full(
    command: str, tmp_path: Path, prefix: str
) -> None:
    # 192.0.2.1 (TEST-NET-1) is not loopback and answers nothing: the daemon warns, then waits
    # for the database like after any outage (an "unavailable" line), and stops on SIGTERM.
    remote = "postgresql://relay@192.0.2.1:5432/relay?connect_timeout=1"
    outputs = {}
    for name, url in {
        "remote": remote,
        "verified": remote + "&sslmode=verify-full",
        "loopback": "postgresql://relay@127.0.0.1:1/relay?connect_timeout=1",
    }.items():
        settings = support.make_settings(url, "127.0.0.1:1", prefix)
        config = support.write_config(tmp_path / f"{name}.toml", settings)
        outputs[name] = _daemon_output(config, command, "unavailable", tmp_path / f"{name}.log")
    warned = [line for line in outputs["remote"].splitlines() if WARNING in line]
    assert len(warned) == 1, outputs["remote"][-2000:]
    assert f"{command}: PostgreSQL at 192.0.2.1" in warned[0]
    assert "WARNING" in warned[0]
    assert WARNING not in outputs["verified"], outputs["verified"][-2000:]
    assert WARNING not in outputs["loopback"], outputs["loopback"][-2000:]


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def _certificate(directory: Path, name: str, ca: str, usage: str) -> None:
    """``name.pem`` and ``name.key`` (PKCS#8, unencrypted), signed by ``ca``, for 127.0.0.1."""
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n", encoding="ascii"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _certificate(directory, "broker", "ca", "serverAuth")
    _certificate(directory, "relay-client", "ca", "clientAuth")
    _certificate(directory, "stranger", "other-ca", "clientAuth")
    # The broker's PEM keystore: its key, then its certificate.
    (directory / "broker-keystore.pem").write_text(
        (directory / "broker.key").read_text() + (directory / "broker.pem").read_text()
    )
    return directory


@pytest.fixture(scope="module")
def mtls_broker(pki: Path) -> Iterator[LocalKafka]:
    broker = LocalKafka(
        partitions=1,
        ssl_properties={
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(pki / "broker-keystore.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(pki / "ca.pem"),
            "ssl.client.auth": "required",
        },
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_relay_publishes_over_mutual_tls(
    mtls_broker: LocalKafka, pki: Path, database_url: str, prefix: str, tmp_path: Path
) -> None:
    settings = support.make_settings(
        database_url,
        mtls_broker.ssl_bootstrap_servers,
        prefix,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(pki / "ca.pem"),
        kafka_ssl_certfile=str(pki / "relay-client.pem"),
        kafka_ssl_keyfile=str(pki / "relay-client.key"),
        status_events=False,
    )
    support.prepare_database(settings)
    with psycopg.connect(database_url) as conn:
        relay.enqueue(conn, "email", "mtls-1", {"to": "a@example.org"})
        conn.commit()
    config = support.write_config(tmp_path / "relay.toml", settings)
    proc = support.start_relay(config, tmp_path / "relay.log")
    try:
        support.wait_for(
            lambda: support.count_states(database_url).get("PUBLISHED") == 1,
            90,
            "the effect PUBLISHED over mTLS",
        )
    finally:
        assert support.stop_process(proc) == 0
    # Read back on the broker's plaintext listener: the record is there once.
    records = support.read_topic(mtls_broker.bootstrap_servers, f"{prefix}.emails", 1)
    assert [r.key for r in records] == [b"mtls-1"]


@pytest.mark.parametrize("client", [None, "stranger"])
def test_a_client_without_a_trusted_certificate_is_refused(
    mtls_broker: LocalKafka, pki: Path, client: str | None
) -> None:
    ssl = {"ssl_cafile": str(pki / "ca.pem")}
    if client is not None:
        ssl |= {
            "ssl_certfile": str(pki / f"{client}.pem"),
            "ssl_keyfile": str(pki / f"{client}.key"),
        }
    with pytest.raises(KafkaError):
        producer = KafkaProducer(
            bootstrap_servers=mtls_broker.ssl_bootstrap_servers,
            security_protocol="SSL",
            max_block_ms=5000,
            bootstrap_timeout_ms=5000,
            **ssl,
        )
        try:
            producer.send("mtls-refused", b"x").get(timeout=5)
        finally:
            producer.close(timeout=1)

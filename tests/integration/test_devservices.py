"""The local servers for real: both start, serve SQL and a transactional Kafka round trip, can be
paused, and leave no process and no directory behind once stopped.

These start their own servers even when RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS are
set: the point is to test the starting.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer

import relay.devtools.services as devservices
from relay.devtools.services import LocalKafka, LocalPostgres, local_services


def _ps() -> str:
    return subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout


def _state(pid: int) -> str | None:
    """The process state letter (R, S, T, Z...) or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _wait_state(pid: int, wanted: Callable[[str | None], bool], timeout_s: float = 5) -> bool:
    """Signals arrive asynchronously: poll for the state they lead to."""
    deadline = time.monotonic() + timeout_s
    while not wanted(_state(pid)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _assert_gone(pid: int | None, root: Path) -> None:
    assert pid is not None
    assert _state(pid) in (None, "Z"), f"process {pid} is still running"
    leftovers = [line for line in _ps().splitlines() if str(root) in line]
    assert not leftovers, f"processes left behind: {leftovers}"
    assert not root.exists(), f"{root} was not removed"


def _roundtrip(bootstrap: str) -> None:
    """Commit one record in a transaction and read it back through a consumer group."""
    topic = f"devservices-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"devservices-test-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        acks="all",
    )
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, key=b"k", value=b"hello").get(timeout=30)
        producer.commit_transaction()
    finally:
        producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"devservices-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        consumer_timeout_ms=30_000,
    )
    try:
        first = next(iter(consumer), None)  # None after consumer_timeout_ms without a record
        assert first is not None and first.value == b"hello"
    finally:
        consumer.close()


@pytest.fixture
def no_configured_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_DATABASE_URL", raising=False)
    monkeypatch.delenv("RELAY_KAFKA_BOOTSTRAP_SERVERS", raising=False)


@pytest.mark.usefixtures("no_configured_servers")
def test_local_services_start_serve_and_stop_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[LocalPostgres | LocalKafka] = []

    class RecordedPostgres(LocalPostgres):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            started.append(self)

    class RecordedKafka(LocalKafka):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            started.append(self)

    monkeypatch.setattr(devservices, "LocalPostgres", RecordedPostgres)
    monkeypatch.setattr(devservices, "LocalKafka", RecordedKafka)

    began = time.monotonic()
    with local_services() as services:
        print(f"\nlocal_services ready in {time.monotonic() - began:.1f}s")
        postgres, kafka = started
        assert isinstance(postgres, LocalPostgres) and isinstance(kafka, LocalKafka)
        pg_pid, pg_root = postgres.pid, postgres.root
        kafka_pid, kafka_root = kafka.pid, kafka.root
        assert pg_root is not None and kafka_root is not None

        with psycopg.connect(services.database_url, connect_timeout=10) as conn:
            settings: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN "
                    "('max_connections', 'fsync', 'listen_addresses', 'server_version_num')"
                ).fetchall()
            )
        assert settings["max_connections"] == "200"
        assert settings["fsync"] == "off"
        assert settings["listen_addresses"] == "127.0.0.1"
        assert settings["server_version_num"].startswith("15")

        _roundtrip(services.kafka_bootstrap_servers)
        assert kafka.log_path.is_file()

    _assert_gone(pg_pid, pg_root)
    _assert_gone(kafka_pid, kafka_root)


class _Proxy:
    """A TCP relay in front of the broker: the address it advertises need not be its own."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.server.close()
        self.thread.join(5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def proxied_broker() -> Iterator[tuple[LocalKafka, _Proxy]]:
    proxy_port = devservices.free_port()
    broker = LocalKafka(
        advertised=f"127.0.0.1:{proxy_port}",
        partitions=1,
        extra_properties={"message.max.bytes": 2_000_000},
    )
    proxy = _Proxy(proxy_port, broker.port)
    try:
        broker.start()
        yield broker, proxy
    finally:
        broker.stop()
        proxy.close()


def test_broker_behind_a_proxy_pauses_resumes_and_is_killed(
    proxied_broker: tuple[LocalKafka, _Proxy],
) -> None:
    broker, proxy = proxied_broker
    assert broker.bootstrap_servers == f"127.0.0.1:{proxy.server.getsockname()[1]}"
    _roundtrip(broker.bootstrap_servers)
    properties = broker.config_path.read_text()
    assert "message.max.bytes=2000000" in properties
    assert "num.partitions=1" in properties

    broker.pause()
    assert _wait_state(broker.pid, lambda state: state == "T")
    broker.resume()
    assert _wait_state(broker.pid, lambda state: state in ("S", "R"))

    pid, root = broker.pid, broker.root
    assert root is not None
    broker.kill()
    assert _state(pid) is None
    assert broker.log_path.is_file(), "the log outlives a kill, for post-mortems"
    broker.stop()
    _assert_gone(pid, root)


def test_postgres_stop_is_idempotent_and_complete() -> None:
    server = LocalPostgres(fsync=True, settings={"shared_buffers": "32MB"})
    server.start()
    try:
        pid, root = server.pid, server.root
        assert root is not None
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SELECT current_setting('fsync'), current_setting('shared_buffers')")
            assert row.fetchone() == ("on", "32MB")
        # The unix socket is in the private directory, not in a shared one.
        assert any(p.name.startswith(".s.PGSQL.") for p in root.iterdir())
        if os.geteuid() == 0:
            assert root.stat().st_uid != 0, "the cluster belongs to the postgres user"
    finally:
        server.stop()
    server.stop()
    _assert_gone(pid, root)

"""The local servers' pure parts: ports, config rendering, the jar cache, tool lookup, and the
guarantee that ``local_services`` stops what it started when the other server fails."""

from __future__ import annotations

import base64
import socket
import stat
import time
from pathlib import Path
from typing import ClassVar

import pytest

import relay.devtools.services as devservices
from relay.devtools.services import DevServicesError, Services, free_ports, local_services, tail
from relay.devtools.services import kafka as dkafka
from relay.devtools.services import postgres as dpostgres
from relay.devtools.services.__main__ import export_lines


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
    assert not set(ports) & set(free_ports(5)), "a port was handed out twice"


def test_tail_keeps_the_last_lines_and_survives_a_missing_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == "line 97\nline 98\nline 99"
    assert "no log" in tail(tmp_path / "missing.log")


def test_broker_properties_single_node_kraft(tmp_path: Path) -> None:
    props = dkafka.broker_properties(port=9092, controller_port=9093, log_dir=tmp_path)
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert props["auto.create.topics.enable"] == "true"
    assert props["num.partitions"] == "3"
    assert props["log.dirs"] == str(tmp_path)
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "min.insync.replicas",
    ):
        assert props[key] == "1"


def test_broker_properties_overrides(tmp_path: Path) -> None:
    props = dkafka.broker_properties(
        port=9092,
        controller_port=9093,
        log_dir=tmp_path,
        advertised="127.0.0.1:7000",
        partitions=1,
        auto_create_topics=False,
        extra={"message.max.bytes": 2_000_000, "num.partitions": 6, "delete.topic.enable": True},
    )
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:7000"
    assert props["listeners"].startswith("PLAINTEXT://127.0.0.1:9092,")
    assert props["auto.create.topics.enable"] == "false"
    assert props["message.max.bytes"] == "2000000"
    assert props["num.partitions"] == "6", "extra properties win"
    assert props["delete.topic.enable"] == "true"


def test_render_properties_escapes() -> None:
    text = dkafka.render_properties(
        {"log.dirs": "/tmp/a b", "odd key=x": "C:\\dir", "multi": "a\nb", "lead": " x"}
    )
    assert text.splitlines() == [
        "log.dirs=/tmp/a b",
        "odd\\ key\\=x=C:\\\\dir",
        "multi=a\\nb",
        "lead=\\ x",
    ]


def test_local_kafka_picks_two_ports_and_honours_advertised() -> None:
    broker = dkafka.LocalKafka(advertised="127.0.0.1:7000")
    assert broker.port != broker.controller_port
    assert broker.bootstrap_servers == "127.0.0.1:7000"
    assert dkafka.LocalKafka(port=12345).bootstrap_servers == "127.0.0.1:12345"
    with pytest.raises(DevServicesError):
        _ = broker.pid
    broker.stop()  # never started: a no-op


def test_cluster_ids_look_like_kafka_uuids() -> None:
    for _ in range(200):
        cluster_id = dkafka.new_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_pom_and_module_agree_on_the_kafka_version() -> None:
    pom = dkafka.POM.read_text()
    assert f"<version>{dkafka.KAFKA_VERSION}</version>" in pom
    assert "<artifactId>kafka_2.13</artifactId>" in pom
    assert dkafka.LOG4J2_CONFIG.is_file()


def test_cache_root_honours_relay_dev_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RELAY_DEV_CACHE", str(tmp_path))
    assert dkafka.cache_root() == tmp_path
    monkeypatch.delenv("RELAY_DEV_CACHE")
    assert dkafka.cache_root() == Path.home() / ".cache" / "relay-dev"


def _fake_mvn(bin_dir: Path, calls: Path, *, fail: bool = False) -> None:
    """A stand-in for Maven that copies one 'jar' into -DoutputDirectory and counts its calls."""
    bin_dir.mkdir()
    script = bin_dir / "mvn"
    body = (
        "echo 'resolution failed' ; exit 1"
        if fail
        else (
            'for a in "$@"; do case "$a" in -DoutputDirectory=*) out="${a#-DoutputDirectory=}";; '
            f'esac; done; : > "$out/kafka_2.13-{dkafka.KAFKA_VERSION}.jar"'
        )
    )
    script.write_text(f'#!/bin/sh\necho call >> "{calls}"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_jars_are_resolved_once_then_served_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    _fake_mvn(tmp_path / "bin", calls)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cache = tmp_path / "cache"
    lib = dkafka.broker_jars(cache)
    assert lib == cache / f"kafka-{dkafka.KAFKA_VERSION}" / "lib"
    assert (lib / f"kafka_2.13-{dkafka.KAFKA_VERSION}.jar").is_file()
    assert dkafka.broker_jars(cache) == lib
    assert calls.read_text().count("call") == 1, "the second start must not call Maven"
    assert not list(lib.parent.glob("lib.*")), "no scratch directory is left behind"


def test_a_changed_pom_invalidates_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    _fake_mvn(tmp_path / "bin", calls)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    pom = tmp_path / "pom.xml"
    pom.write_text("<project/>")
    dkafka.broker_jars(tmp_path / "cache", pom)
    pom.write_text("<project><!-- changed --></project>")
    dkafka.broker_jars(tmp_path / "cache", pom)
    assert calls.read_text().count("call") == 2


def test_a_failed_resolution_leaves_no_marker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_mvn(tmp_path / "bin", tmp_path / "calls", fail=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(DevServicesError, match="resolution failed"):
        dkafka.broker_jars(tmp_path / "cache")
    root = tmp_path / "cache" / f"kafka-{dkafka.KAFKA_VERSION}"
    assert not (root / dkafka.MARKER).exists()
    assert not list(root.glob("lib*"))


def test_missing_maven_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DevServicesError, match="'mvn' is not on PATH"):
        dkafka.broker_jars(tmp_path / "cache")


def test_java_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(DevServicesError, match="JAVA_HOME"):
        dkafka.find_java()
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert dkafka.find_java() == str(java)
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DevServicesError, match="'java' is not on PATH"):
        dkafka.find_java()


def test_missing_postgres_binaries_are_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RELAY_PG_BIN", str(tmp_path))
    with pytest.raises(DevServicesError, match="initdb, pg_ctl"):
        dpostgres.pg_bin_dir()


def test_postgres_conf_rendering() -> None:
    text = dpostgres.render_conf(
        {"fsync": False, "max_connections": 200, "unix_socket_directories": "/tmp/it's"}
    )
    assert text.splitlines() == [
        "fsync = off",
        "max_connections = 200",
        "unix_socket_directories = '/tmp/it''s'",
    ]


def test_local_postgres_url_and_defaults() -> None:
    server = dpostgres.LocalPostgres(port=5999)
    assert server.url == "postgresql://postgres@127.0.0.1:5999/postgres"
    assert server.fsync is False
    assert server.pid is None
    server.stop()  # never started: a no-op


def test_export_lines() -> None:
    lines = export_lines(Services("postgresql://x/postgres", "127.0.0.1:1"))
    assert lines == (
        "export RELAY_DATABASE_URL=postgresql://x/postgres\n"
        "export RELAY_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1\n"
    )


class _FakeServer:
    """Records start/stop; fails to start when told to."""

    events: ClassVar[list[str]] = []

    def __init__(self, name: str, fail: bool) -> None:
        self.name, self.fail = name, fail
        self.url = f"postgresql://{name}"
        self.bootstrap_servers = f"{name}:9092"

    def start(self) -> None:
        self.events.append(f"start {self.name}")
        if self.fail:
            raise DevServicesError(f"{self.name} broke")

    def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def _fake_servers(monkeypatch: pytest.MonkeyPatch, fail: str | None) -> list[str]:
    events: list[str] = []
    monkeypatch.setattr(_FakeServer, "events", events)
    monkeypatch.setattr(devservices, "LocalPostgres", lambda **_: _FakeServer("pg", fail == "pg"))
    monkeypatch.setattr(
        devservices, "LocalKafka", lambda **_: _FakeServer("kafka", fail == "kafka")
    )
    monkeypatch.delenv("RELAY_DATABASE_URL", raising=False)
    monkeypatch.delenv("RELAY_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    return events


@pytest.mark.parametrize("fail", ["pg", "kafka"])
def test_a_failed_start_stops_the_other_server(monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    events = _fake_servers(monkeypatch, fail)
    with pytest.raises(DevServicesError, match=f"{fail} broke"), local_services():
        pytest.fail("must not get here")
    assert sorted(events) == ["start kafka", "start pg", "stop kafka", "stop pg"]


def test_local_services_stops_both_on_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _fake_servers(monkeypatch, None)
    with local_services() as services:
        assert services == Services("postgresql://pg", "kafka:9092")
        assert sorted(events) == ["start kafka", "start pg"]
    assert sorted(events)[2:] == ["stop kafka", "stop pg"]


def test_local_services_uses_configured_servers_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = _fake_servers(monkeypatch, None)
    monkeypatch.setenv("RELAY_DATABASE_URL", "postgresql://elsewhere/db")
    with local_services() as services:
        assert services.database_url == "postgresql://elsewhere/db"
        assert services.kafka_bootstrap_servers == "kafka:9092"
    assert "start pg" not in events
    monkeypatch.setenv("RELAY_KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    events.clear()
    with local_services() as services:
        assert services == Services("postgresql://elsewhere/db", "broker:9092")
    assert events == []


def test_leftover_servers_are_stopped_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A registry of its own: the real one may hold this test session's servers.
    monkeypatch.setattr(devservices, "_live", {})
    stopped: list[str] = []
    owner = object()
    devservices.track(owner, lambda: stopped.append("a"))
    devservices.track(object(), lambda: stopped.append("b"))
    devservices.untrack(owner)
    devservices._stop_leftovers()
    assert stopped == ["b"], "an untracked server is not stopped again"
    devservices._stop_leftovers()
    assert stopped == ["b"], "stopped once only"


def test_down_never_signals_a_process_that_took_a_stale_pid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An ``up`` killed before removing its state file leaves a pid another process may have
    now: ``down`` ignores it unless that process is still ``relay.devtools.services``."""
    import json
    import subprocess
    import sys

    from relay.devtools.services import __main__ as cli

    monkeypatch.setenv("RELAY_DEV_CACHE", str(tmp_path))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ours = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "relay.devtools.services"]
    )
    try:
        for proc in (stranger, ours):
            # Popen returns once exec has begun; the kernel shows the new command line a moment
            # later (CI once read it empty): wait for it, as a stale pid would long have it.
            shown = Path(f"/proc/{proc.pid}/cmdline")
            deadline = time.monotonic() + 10
            while b"time.sleep(60)" not in shown.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.01)
        for proc in (stranger, ours):
            cli.state_file().write_text(json.dumps({"pid": proc.pid}))
            found = cli._running_state()
            assert (found is not None) == (proc is ours)
        cli.state_file().write_text(json.dumps({"pid": stranger.pid}))
        assert cli.main(["down"]) == 0
        assert stranger.poll() is None  # not signalled
    finally:
        for proc in (stranger, ours):
            proc.kill()
            proc.wait()

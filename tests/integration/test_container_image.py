"""The Dockerfile, built and run for real with buildah (no Docker engine needed) on a local Debian
base image, against the suite's PostgreSQL and Kafka: the image works where it will live.

Slow on a cold cache (debootstrap of the base image, then the build); the base image and the
build's layers are cached under ~/.cache/relay-dev/container. Skipped, with the reason, only where
buildah cannot run at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

import relay
from tests import support
from tests.deploy import ROOT, dockerfile_ports, dockerfile_user, run_script

if TYPE_CHECKING:
    from relay.devtools.services import Services

# Cold, the image fixture debootstraps a base image and builds (minutes on a loaded machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
TAG = "localhost/outbox-relay:test"


def buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "buildah.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def buildah_unusable() -> str | None:
    """Why buildah cannot run here, or None. Installing it is the project's script's job."""
    installed = run_script("install-container-tools.sh", timeout=600)
    if installed.returncode != 0:
        return f"buildah cannot be installed here: {installed.stderr.strip()[-500:]}"
    probe = buildah("from", "scratch")
    if probe.returncode != 0:
        return f"buildah cannot create a container here: {probe.stderr.strip()[-500:]}"
    buildah("rm", probe.stdout.strip())
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = buildah_unusable()
    if reason is not None:
        pytest.skip(reason)
    built = run_script("build-image.sh", TAG, timeout=1500)
    assert built.returncode == 0, f"scripts/build-image.sh failed:\n{built.stderr[-5000:]}"
    return TAG


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    """One working container of the image for the module (with vfs, each costs a full copy of
    the image); removed afterwards."""
    made = buildah("from", "--pull-never", image)
    assert made.returncode == 0, made.stderr
    name = made.stdout.strip()
    yield name
    buildah("rm", name)


def run_in(container: str, *command: str, volume: str | None = None) -> list[str]:
    """``buildah run`` arguments: chroot isolation, the host's network (so the host's loopback)."""
    args = ["bash", str(ROOT / "scripts" / "buildah.sh"), "run", "--isolation", "chroot"]
    if volume is not None:
        args += ["--volume", volume]
    return [*args, container, "--", *command]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (chroot isolation: they are host processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_image_metadata(image: str) -> None:
    inspected = buildah("inspect", "--type", "image", image)
    assert inspected.returncode == 0, inspected.stderr
    config: dict[str, Any] = json.loads(inspected.stdout)["OCIv1"]["config"]
    assert config["User"] == dockerfile_user() == "10001:10001"
    assert config["Entrypoint"] == ["relay"] and config["Cmd"] == ["run"]
    assert {int(port.split("/")[0]) for port in config["ExposedPorts"]} == dockerfile_ports()
    assert dockerfile_ports() == {9400, 9401}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "outbox-relay"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    for variable in config.get("Env", []):
        name = variable.split("=", 1)[0]
        assert not any(
            word in name for word in ("PASSWORD", "SECRET", "TOKEN", "DATABASE", "PIP_CERT")
        )


def test_help_as_the_non_root_user_and_no_build_tools(container: str) -> None:
    done = subprocess.run(
        run_in(container, "sh", "-c", "id -u; id -g; relay --help"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    uid, gid, *_ = done.stdout.splitlines()
    assert (uid, gid) == ("10001", "10001")
    assert "Usage: relay" in done.stdout and "migrate" in done.stdout
    tools = "gcc cc c++ make pip pip3 git"
    probe = subprocess.run(
        run_in(
            container,
            "sh",
            "-c",
            f"for t in {tools}; do command -v $t; done; ls /run/secrets 2>/dev/null; "
            "ls /src /wheels 2>/dev/null; true",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "", (
        f"build tools or build leftovers in the image: {probe.stdout}"
    )


def test_migrate_and_run_in_the_container_publish_an_intent(
    container: str, services: Services, database_url: str, prefix: str, tmp_path: Path
) -> None:
    settings = support.make_settings(database_url, services.kafka_bootstrap_servers, prefix)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    # Mounted read-only as the chart mounts its ConfigMap; the settings below come from RELAY_*.
    support.write_config(config_dir / "relay.toml", settings)
    config_dir.chmod(0o755)
    (config_dir / "relay.toml").chmod(0o644)
    port = support.free_port()
    env = [
        "env",
        "RELAY_CONFIG=/etc/relay/config/relay.toml",
        f"RELAY_REPLICA_ID={prefix}-container",
        "RELAY_METRICS_HOST=127.0.0.1",
        f"RELAY_METRICS_PORT={port}",
    ]
    volume = f"{config_dir}:/etc/relay/config:ro"

    migrated = subprocess.run(
        run_in(container, *env, "relay", "migrate", volume=volume),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        types = {row[0] for row in conn.execute("SELECT name FROM relay.effect_type")}
        assert types == {"wire", "email"}
        with conn.transaction():
            relay.enqueue(conn, "email", f"{prefix}-mail-1", {"to": "a@example.com"})

    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            run_in(container, *env, "relay", "run", volume=volume),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 1, 90)
        assert [r.key for r in records] == [f"{prefix}-mail-1".encode()], log.read_text()[-3000:]
        assert support.count_states(database_url) == {"PUBLISHED": 1}
        status, _ = support.http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        support.wait_for(
            lambda: support.http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 30, "/readyz"
        )
        with psycopg.connect(database_url, autocommit=True) as conn:
            replicas = {
                row[0]
                for row in conn.execute(
                    "SELECT replica_id FROM relay.attempt "
                    "UNION SELECT owner FROM relay.published_batch"
                )
            }
        assert replicas == {f"{prefix}-container"}
    finally:
        # As Kubernetes stops a pod: SIGTERM to the relay itself (buildah run would turn a
        # SIGTERM of its own into a SIGKILL of the container); it finishes and exits 0.
        signalled = 0
        for pid in descendants(daemon.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
            if argv[0].endswith(b"python3") and argv[1:3] == [b"/opt/relay/bin/relay", b"run"]:
                os.kill(pid, signal.SIGTERM)
                signalled += 1
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
            raise
    assert signalled == 1 and code == 0, log.read_text()[-3000:]
    assert "finishing the batch in hand" in log.read_text()

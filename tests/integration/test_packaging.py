"""The install the docs describe: the project's own wheel and sdist, in a fresh virtual environment.

``python -m build`` makes both from this tree; the wheel goes into a new virtual environment (the
wheel from its folder, its dependencies from the normal index pip is configured with), nothing of
the source tree on ``sys.path``; ``relay`` runs from that environment's ``bin``; the migrations and
the named SQL files are read from inside the installed package; and docs/getting-started.md is
followed as written with that environment first on ``PATH`` (its ``python`` and its ``relay``),
against the suite's servers, up to an intent read back from Kafka.

About 25 s warm (the build, then pip resolving the dependencies from its cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from relay.devtools.services import Services
from tests import support
from tests.integration import test_docs_snippets as docs

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
pytestmark = pytest.mark.timeout(300)


def _relay_up(relay: subprocess.Popen[bytes], log: Path, started_before: int) -> bool:
    """The relay logged one more start than ``started_before`` (its SIGTERM handler is set), or
    ended."""
    return relay.poll() is not None or log.read_bytes().count(b"relay starting") > started_before


def _run(
    command: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
        f"--- stderr\n{done.stderr[-4000:]}"
    )
    return done


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user who installed the wheel: the venv's bin first on PATH, no
    PYTHONPATH pointing into the source tree, no RELAY_* from the suite."""
    env = support.relay_env()
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=ROOT, timeout=240)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("fresh") / "venv"
    home = where.parent
    _run([sys.executable, "-m", "venv", str(where)], cwd=home)
    [wheel] = dist.glob("*.whl")
    _run(
        [str(where / "bin" / "pip"), "install", "--find-links", str(dist), str(wheel)],
        cwd=home,
        env=_clean_env(where),
        timeout=240,
    )
    yield where


def test_build_makes_a_wheel_and_an_sdist_of_this_version(dist: Path) -> None:
    names = sorted(p.name for p in dist.iterdir())
    assert names == [
        f"outbox_relay-{VERSION}-py3-none-any.whl",
        f"outbox_relay-{VERSION}.tar.gz",
    ]


def test_the_wheel_carries_the_migrations_and_the_sql_files(dist: Path) -> None:
    [wheel] = dist.glob("*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    migrations = {p.name for p in (ROOT / "schemas" / "migrations").glob("*.sql")}
    sql = {p.name for p in (ROOT / "relay" / "sql").glob("*.sql")}
    assert migrations and sql
    assert {f"relay/_schemas/migrations/{name}" for name in migrations} <= inside
    assert {f"relay/sql/{name}" for name in sql} <= inside
    assert {"relay/_schemas/json/result.schema.json", "relay/py.typed"} <= inside
    assert not [n for n in inside if n.endswith(".jar") or n.startswith("tests/")], inside
    # The sdist rebuilds the same wheel: the schemas and the SQL are in it too.
    [sdist] = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {f"schemas/migrations/{name}" for name in migrations} <= members
    assert {f"relay/sql/{name}" for name in sql} <= members


def test_the_installed_relay_runs_from_its_own_environment(venv: Path) -> None:
    env = _clean_env(venv)
    helped = _run(["relay", "--help"], cwd=venv.parent, env=env)
    assert "Usage: relay" in helped.stdout
    if "--version" in helped.stdout:  # the flag of issue 21, item 6
        shown = _run(["relay", "--version"], cwd=venv.parent, env=env)
        assert VERSION in shown.stdout + shown.stderr
    probe = (
        "import relay, relay.migrations as m, relay.db as d;"
        "print(relay.__file__);"
        "print(m.schemas_dir());"
        "print(len(m.available()))"
    )
    out = _run([str(venv / "bin" / "python"), "-c", probe], cwd=venv.parent, env=env)
    package, schemas, count = out.stdout.split()
    assert Path(package).is_relative_to(venv), package  # not the source tree
    assert Path(schemas) == Path(package).parent / "_schemas"
    assert int(count) == len(list((ROOT / "schemas" / "migrations").glob("*.sql")))


def test_getting_started_as_written_in_the_fresh_environment(
    venv: Path, services: Services, tmp_path: Path
) -> None:
    """Every snippet of docs/getting-started.md the docs test runs, run here with the wheel's
    environment: its python for ```python, its relay (first on PATH) for ```sh."""
    page = ROOT / "docs" / "getting-started.md"
    conninfo = support.create_database(services.database_url)
    python = str(venv / "bin" / "python")
    try:
        env = docs._env(docs._database_url(conninfo), services.kafka_bootstrap_servers)
        env.update(_clean_env(venv) | {k: v for k, v in env.items() if k.startswith("RELAY_")})
        ran = 0
        for p in docs.plans(page):
            if p.action == "file":
                (tmp_path / p.argument).write_text(p.snippet.code, encoding="utf-8")
                continue
            if p.action != "run":
                continue
            relay = None
            if "relay" in p.setups:
                log_path = tmp_path / "relay.log"
                started = log_path.read_bytes().count(b"relay starting") if log_path.exists() else 0
                relay = subprocess.Popen(
                    [str(venv / "bin" / "relay"), "run"],
                    cwd=tmp_path,
                    env=env,
                    stdout=log_path.open("ab"),
                    stderr=subprocess.STDOUT,
                )
                # Up (its SIGTERM handler set) before the snippet runs: a snippet that ends before
                # the interpreter has imported the relay would have its SIGTERM kill it (exit -15;
                # seen once in CI, the log then showing the previous snippet's relay only).
                support.wait_for(
                    partial(_relay_up, relay, log_path, started), 60, "the relay to start"
                )
            try:
                if p.snippet.lang == "python":
                    script = tmp_path / f"snippet_{p.snippet.line}.py"
                    script.write_text(p.snippet.code, encoding="utf-8")
                    command = [python, script.name]
                else:
                    command = ["bash", "-euo", "pipefail", "-c", p.snippet.code]
                _run(command, cwd=tmp_path, env=env, timeout=docs.TIMEOUT_S)
                ran += 1
            finally:
                if relay is not None:
                    code = support.stop_process(relay)
                    log = (tmp_path / "relay.log").read_text(errors="replace")
                    assert code == 0, log
        assert ran >= 4
    finally:
        support.drop_database(conninfo)

"""The README's and docs' ```python and ```sh snippets run against the suite's servers.

Snippets are found when the test runs, so a page or a snippet added on another branch is covered
without touching this file. Every such snippet runs unless an HTML comment right before its fence
(blank lines between are allowed) says otherwise:

- ``<!-- snippet: skip REASON -->``: not run; the reason is required (a fragment, a command that
  runs until stopped, the test suite itself).
- ``<!-- snippet: setup=NAME[,NAME] -->``: run after preparing the named context (see SETUPS).
- ``<!-- snippet: file=PATH -->`` before any fence: its text is written to PATH in the page's
  working directory (a config file the next snippets read); nothing runs.

The snippets of one page run in order in one working directory, with one fresh database: a page
is a story. The environment has ``RELAY_DATABASE_URL`` (a URL), ``RELAY_KAFKA_BOOTSTRAP_SERVERS``,
a unique ``RELAY_REPLICA_ID``, ``RELAY_METRICS_PORT=0`` and the project's virtualenv first on
``PATH``. A marker this test does not know fails the test, as does a skip without a reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.devtools.services import Services
from tests import contrib, support

ROOT = Path(__file__).resolve().parents[2]
RUN = {"python", "sh", "bash", "shell"}
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
TIMEOUT_S = 120
SETUPS = {
    "getting-started": "the files and the `relay migrate` of docs/getting-started.md",
    "relay": "a `relay run` process in the page's directory while the snippet runs",
}


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    lang: str
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(path: Path) -> list[Snippet]:
    """Every fenced block of a page with the marker before it (None: no marker)."""
    found: list[Snippet] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    marker: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            marker = m.group(1)
            i += 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent, lang = fence.group(1), fence.group(2).lower()
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                text = lines[i]
                body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
                i += 1
            start = i - len(body)
            found.append(
                Snippet(str(path.relative_to(ROOT)), start, lang, "\n".join(body) + "\n", marker)
            )
            marker = None
        elif line.strip():
            marker = None  # a marker applies only to the fence right after it
        i += 1
    return found


@dataclass(frozen=True)
class Plan:
    snippet: Snippet
    action: str  # "run", "skip", "file"
    setups: tuple[str, ...] = ()
    argument: str = ""  # the skip's reason or the file's path


def plan(snippet: Snippet) -> Plan | None:
    """What to do with a snippet; None for a block that is not a snippet (toml, sql, text...)
    and carries no marker. Raises AssertionError for a marker this test does not understand."""
    marker = snippet.marker
    if marker is None:
        return Plan(snippet, "run") if snippet.lang in RUN else None
    if marker.startswith("skip"):
        reason = marker[len("skip") :].strip()
        assert reason, f"{snippet.where}: 'snippet: skip' needs a reason"
        return Plan(snippet, "skip", argument=reason)
    if marker.startswith("file="):
        target = marker[len("file=") :].strip()
        assert target and not target.startswith("/") and ".." not in target, snippet.where
        return Plan(snippet, "file", argument=target)
    if marker.startswith("setup="):
        names = tuple(n.strip() for n in marker[len("setup=") :].split(","))
        unknown = [n for n in names if n not in SETUPS]
        assert not unknown, f"{snippet.where}: unknown setup {unknown}; known: {sorted(SETUPS)}"
        assert snippet.lang in RUN, f"{snippet.where}: a setup for a block that is not run"
        return Plan(snippet, "run", setups=names)
    raise AssertionError(f"{snippet.where}: unknown marker 'snippet: {marker}'")


def plans(path: Path) -> list[Plan]:
    return [p for p in (plan(s) for s in snippets(path)) if p is not None]


def test_every_snippet_is_run_or_skipped_with_a_reason() -> None:
    """The parser's own check over all pages, without servers: fails on a bad marker."""
    counted = {"run": 0, "skip": 0, "file": 0}
    for path in pages():
        for p in plans(path):
            counted[p.action] += 1
    assert counted["run"] > 0, counted


def test_the_marker_rules() -> None:
    def one(marker: str | None, lang: str = "python") -> Plan | None:
        return plan(Snippet("x.md", 1, lang, "pass\n", marker))

    assert one(None) == Plan(Snippet("x.md", 1, "python", "pass\n", None), "run")
    assert one(None, "toml") is None
    skipped = one("skip a fragment")
    assert skipped is not None and (skipped.action, skipped.argument) == ("skip", "a fragment")
    with pytest.raises(AssertionError, match="needs a reason"):
        one("skip")
    with pytest.raises(AssertionError, match="unknown setup"):
        one("setup=nothing")
    with pytest.raises(AssertionError, match="unknown marker"):
        one("sikp typo")
    made = one("setup=relay,getting-started")
    assert made is not None and made.setups == ("relay", "getting-started")


def _runnable_pages() -> list[Path]:
    return [p for p in pages() if any(x.action == "run" for x in plans(p))]


def _database_url(conninfo: str) -> str:
    p = contrib.parts(conninfo)
    auth = p["user"] + (f":{p['password']}" if p["password"] else "")
    return f"postgresql://{auth}@{p['host']}:{p['port']}/{p['dbname']}"


def _env(database_url: str, bootstrap: str) -> dict[str, str]:
    env = support.relay_env(
        RELAY_DATABASE_URL=database_url,
        RELAY_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        RELAY_REPLICA_ID=support.unique("docs"),
        RELAY_METRICS_PORT="0",
        RELAY_POLL_INTERVAL_S="0.2",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def _execute(snippet: Snippet, workdir: Path, env: dict[str, str]) -> None:
    if snippet.lang == "python":
        script = workdir / f"snippet_{snippet.line}.py"
        script.write_text(snippet.code, encoding="utf-8")
        command = [sys.executable, script.name]
    else:
        command = ["bash", "-euo", "pipefail", "-c", snippet.code]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, (
        f"{snippet.where} ({snippet.lang}) failed with exit code {done.returncode}\n"
        f"--- code\n{snippet.code}--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    )


@contextmanager
def _prepared(setups: tuple[str, ...], workdir: Path, env: dict[str, str]) -> Iterator[None]:
    if "getting-started" in setups:
        for p in plans(ROOT / "docs" / "getting-started.md"):
            if p.action == "file":
                (workdir / p.argument).write_text(p.snippet.code, encoding="utf-8")
        migrate = Snippet("(setup getting-started)", 0, "sh", "relay migrate\n", None)
        _execute(migrate, workdir, env)
    if "relay" not in setups:
        yield
        return
    log = workdir / f"relay-{len(list(workdir.glob('relay-*.log')))}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "run"],
        cwd=workdir,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        # Started (its SIGTERM handler set) before the snippet: a snippet that needs nothing of
        # this relay can end before the interpreter has imported it, and SIGTERM then kills it.
        support.wait_for(
            lambda: proc.poll() is not None or b"relay starting" in log.read_bytes(),
            60,
            "the relay to start",
        )
        yield
    finally:
        code = support.stop_process(proc)
        assert code == 0, log.read_bytes().decode("utf-8", "replace")


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_snippets_of_a_page_run(page: Path, services: Services, tmp_path: Path) -> None:
    conninfo = support.create_database(services.database_url)
    try:
        env = _env(_database_url(conninfo), services.kafka_bootstrap_servers)
        for p in plans(page):
            if p.action == "file":
                target = tmp_path / p.argument
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(p.snippet.code, encoding="utf-8")
            elif p.action == "run":
                with _prepared(p.setups, tmp_path, env):
                    _execute(p.snippet, tmp_path, env)
    finally:
        support.drop_database(conninfo)

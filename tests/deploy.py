"""Helpers of the deployment tests: the pinned tools the project's scripts install, and the paths
of the Dockerfile, the chart and the compose file."""

from __future__ import annotations

import fcntl
import functools
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "outbox-relay"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
RULES = ROOT / "ops" / "prometheus" / "relay-alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "relay-dashboard.json"


def run_script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """One of the project's scripts; one run of a given script at a time on this machine, so that
    two test workers never install the same tool into the cache at once."""
    locks = Path(os.environ.get("RELAY_DEV_CACHE", Path.home() / ".cache" / "relay-dev")) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run(
            ["bash", str(ROOT / "scripts" / name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )


@functools.cache
def helm_binary() -> str:
    """The pinned Helm 4, built from the Go module proxy by scripts/install-helm.sh (cached)."""
    done = run_script("install-helm.sh", timeout=1800)
    assert done.returncode == 0, f"scripts/install-helm.sh failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def render(*args: str, release: str = "orders") -> list[dict[str, Any]]:
    """``helm template`` of the chart: every object, in order."""
    done = helm("template", release, str(CHART), "--namespace", "payments", *args)
    assert done.returncode == 0, f"helm template {' '.join(args)} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    return str(users[-1])


def dockerfile_ports() -> set[int]:
    exposed = re.findall(r"^EXPOSE\s+(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    return {int(port.split("/")[0]) for line in exposed for port in line.split()}


def rule_jobs() -> set[str]:
    """The scrape job names the alert rules select on."""
    text = RULES.read_text()
    names: set[str] = set()
    for selector in re.findall(r'job=~?"([^"]+)"', text):
        names.update(selector.split("|"))
    return names

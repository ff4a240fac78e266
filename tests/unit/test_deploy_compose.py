"""compose.yaml, checked without a Docker engine: against the Compose specification (the
compose-spec package) and against the Dockerfile, the chart and the relay's own settings."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from relay.config import load_settings
from tests.deploy import (
    CHART,
    COMPOSE,
    DASHBOARD,
    ROOT,
    RULES,
    dockerfile_ports,
    dockerfile_user,
    rule_jobs,
)

RELAY_SERVICES = ("migrate", "relay", "reconciler")
PINNED = re.compile(r"^[a-z0-9./-]+:[A-Za-z0-9._-]*\d[A-Za-z0-9._-]*$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # PyYAML resolves the anchors and merge keys as Docker Compose does.
    return dict(yaml.safe_load(COMPOSE.read_text()))


def spec_check(compose: dict[str, Any]) -> PyCompose:
    """The compose-spec parser (strict: unknown keys and wrong types are errors, with their
    path) over the file with its anchors and merge keys resolved, which it does not do itself."""
    parsed = PyCompose.from_yaml(yaml.safe_dump(compose, sort_keys=False))
    parsed.validate()
    return parsed


def test_compose_meets_the_compose_specification(compose: dict[str, Any]) -> None:
    parsed = spec_check(compose)
    assert sorted(parsed.service_names()) == sorted(
        [
            "postgres",
            "kafka",
            "migrate",
            "relay",
            "reconciler",
            "console",
            "prometheus",
            "grafana",
        ]
    )


def test_the_specification_check_refuses_a_wrong_file(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["relay"]["read_only"] = "yes please"
    with pytest.raises(ValueError, match=r"services\.relay\.read_only"):
        spec_check(broken)


def test_every_image_is_pinned_and_dependencies_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        image = service["image"]
        assert PINNED.match(image) and not image.endswith(":latest"), f"{name}: {image}"
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on unknown service {needed}"


def test_relay_services_run_the_image_as_the_chart_does(compose: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ports = {
        "relay": values["metrics"]["relayPort"],
        "reconciler": values["metrics"]["reconcilerPort"],
    }
    assert set(ports.values()) == dockerfile_ports()
    commands = {"migrate": ["migrate"], "relay": ["run"], "reconciler": ["reconcile"]}
    for name in RELAY_SERVICES:
        service = compose["services"][name]
        assert service["build"]["context"] == "."
        assert service["user"] == dockerfile_user()
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert service["command"] == commands[name]
        env = service["environment"]
        assert env["RELAY_METRICS_HOST"] == "0.0.0.0"
        assert int(env["RELAY_METRICS_PORT"]) == ports["relay"]
        assert int(env["RELAY_RECONCILE_METRICS_PORT"]) == ports["reconciler"]
        assert env["RELAY_KAFKA_BOOTSTRAP_SERVERS"].split(":")[0] in compose["services"]
        assert "@postgres:" in env["RELAY_DATABASE_URL"]
    for name, port in ports.items():
        assert compose["services"][name]["ports"] == [f"127.0.0.1:{port}:{port}"]
    migrate = compose["services"]["migrate"]
    for name in ("relay", "reconciler"):
        assert compose["services"][name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    assert migrate["restart"] == "no"


def mounted_files(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (which must exist)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            host = ROOT / source
            assert host.exists(), f"{source} is mounted but does not exist"
            mounts[target] = host
    return mounts


def test_mounted_files_exist_and_are_the_ones_of_ops(compose: dict[str, Any]) -> None:
    prometheus = mounted_files(compose["services"]["prometheus"])
    config = yaml.safe_load(prometheus["/etc/prometheus/prometheus.yml"].read_text())
    assert prometheus[config["rule_files"][0]] == RULES
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == rule_jobs()
    assert jobs["outbox-relay"]["static_configs"][0]["targets"] == ["relay:9400"]
    assert jobs["outbox-relay-reconciler"]["static_configs"][0]["targets"] == ["reconciler:9401"]

    grafana = mounted_files(compose["services"]["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "relay.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert grafana[f"{folder}/relay-dashboard.json"] == DASHBOARD
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    # A provisioned dashboard is not imported: ${DS_PROMETHEUS} must be one of its variables.
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert {"name": "DS_PROMETHEUS", "type": "datasource"}.items() <= variables[0].items()


def test_the_relay_config_of_compose_loads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = compose["services"]["relay"]
    config = mounted_files(relay)[relay["environment"]["RELAY_CONFIG"]]
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    for name, value in relay["environment"].items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    assert settings.replica_id == "compose-relay-1"
    assert settings.metrics_port_of("reconciler") == 9401
    assert sorted(settings.effect_types) == ["email", "wire"]


def test_the_console_service_runs_the_image_with_a_users_file_on_loopback(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`relay console` in compose: the same locked-down image, after the migrations, its port
    published on the host's loopback only, a users file the console accepts."""
    from relay.console.auth import Guard

    console = compose["services"]["console"]
    assert console["command"] == ["console"]
    assert console["user"] == dockerfile_user() and console["read_only"] is True
    assert console["ports"] == ["127.0.0.1:8400:8400"]
    assert console["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    env = console["environment"]
    assert env["RELAY_CONSOLE_HOST"] == "0.0.0.0"
    files = mounted_files(console)
    users = files[env["RELAY_CONSOLE_USERS_FILE"]]
    config = files[env["RELAY_CONFIG"]]
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RELAY_CONSOLE_USERS_FILE", str(users))
    settings = load_settings(config)
    assert settings.console_port == 8400
    guard = Guard(settings)
    user = guard.sign_in("admin", "relay-console-local")
    assert user is not None and user.right == "operator"

"""The Helm chart, rendered by the real (pinned) Helm 4 and checked against the Kubernetes OpenAPI
schemas, the relay's own settings model, the Dockerfile and the alert rules."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay.config import EffectTypeSpec, Settings, load_settings
from tests.deploy import (
    CHART,
    DASHBOARD,
    RULES,
    dockerfile_user,
    helm,
    render,
    rule_jobs,
)

# Cold, the first test builds the pinned helm from the Go module proxy (minutes).
pytestmark = pytest.mark.timeout(2400)
FULL = str(CHART / "ci" / "full-values.yaml")
FIRST_EFFECT = str(CHART / "examples" / "first-effect.yaml")
WORKLOADS = (("StatefulSet", "relay"), ("Deployment", "reconciler"), ("Job", "migrate"))
# The chart's kubeVersion floor and the newest schemas kubernetes-validate 1.37.0 carries.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Settings the chart sets itself (from Secrets, the pod, or its own ports), never from values.
CHART_OWNED = {
    "database_url",
    "kafka_bootstrap_servers",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "kafka_ssl_password",
    "replica_id",
    "metrics_host",
    "metrics_port",
    "reconcile_metrics_port",
    "effect_types",
    # The console's Deployment: its address in the pod, its users file and its Secret.
    "console_host",
    "console_port",
    "console_users_file",
    "console_viewer_database_url",
    "console_secret",
}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [
        obj
        for obj in by_kind(objects, kind)
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects of component {component}"
    return found[0]


def config_map(objects: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    found = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{len(found)} ConfigMaps named *{suffix}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


@pytest.fixture(scope="module")
def defaults() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def full() -> list[dict[str, Any]]:
    return render("-f", FULL)


def test_lint_strict_with_defaults_and_with_everything_on() -> None:
    for extra in ([], ["-f", FULL]):
        done = helm("lint", "--strict", str(CHART), *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 chart(s) failed" in done.stdout


def test_every_object_is_valid_kubernetes(
    defaults: list[dict[str, Any]], full: list[dict[str, Any]]
) -> None:
    checked = 0
    for obj in defaults + full:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # not in the Kubernetes OpenAPI; their content is asserted below
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    kinds = {obj["kind"] for obj in full}
    assert {
        "StatefulSet",
        "Deployment",
        "Job",
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    assert checked >= 15


def test_a_broken_object_is_caught_by_the_validation(defaults: list[dict[str, Any]]) -> None:
    relay = one(defaults, "StatefulSet", "relay")
    broken = json.loads(json.dumps(relay))
    pod_spec(broken)["containers"][0]["livenessProbe"]["httpGet"]["port"] = {"name": "metrics"}
    broken["spec"]["template"]["spec"] = pod_spec(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(
    ("kind", "component", "port"),
    [("StatefulSet", "relay", 9400), ("Deployment", "reconciler", 9401)],
)
def test_probes_and_ports(
    defaults: list[dict[str, Any]], kind: str, component: str, port: int
) -> None:
    container = pod_spec(one(defaults, kind, component))["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = env_of(container)
    # The relay's default address may become loopback: the chart must not depend on it.
    assert env["RELAY_METRICS_HOST"]["value"] == "0.0.0.0"
    assert env["RELAY_METRICS_PORT"]["value"] == "9400"
    assert env["RELAY_RECONCILE_METRICS_PORT"]["value"] == "9401"
    assert container["args"] == (["run"] if component == "relay" else ["reconcile"])


def test_every_pod_runs_locked_down(full: list[dict[str, Any]]) -> None:
    uid, gid = (int(part) for part in dockerfile_user().split(":"))
    workloads = [obj for obj in full if obj["kind"] in {"StatefulSet", "Deployment", "Job"}]
    assert len(workloads) == 4  # the relay, the reconciler, the migration hook, the console
    for workload in workloads:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
            uid,
            gid,
        )
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"] and container["resources"]["limits"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts  # the only writable place


def test_secrets_come_from_existing_secrets_only(full: list[dict[str, Any]]) -> None:
    values = yaml.safe_load(Path(FULL).read_text())
    for workload in (obj for obj in full if obj["kind"] in {"StatefulSet", "Deployment", "Job"}):
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == "console":
            continue  # its own Secret, no Kafka: test_the_console_is_off_by_default_and_on_...
        spec = pod_spec(workload)
        env = env_of(spec["containers"][0])
        assert env["RELAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": values["database"]["existingSecret"],
            "key": "database-url",
        }
        for name, key in [
            ("RELAY_KAFKA_SASL_USERNAME", "username"),
            ("RELAY_KAFKA_SASL_PASSWORD", "password"),
        ]:
            assert env[name]["valueFrom"]["secretKeyRef"] == {
                "name": values["kafka"]["sasl"]["existingSecret"],
                "key": key,
            }
        assert "value" not in env["RELAY_DATABASE_URL"]
        ca = env["RELAY_KAFKA_SSL_CAFILE"]["value"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["kafka-ca"]["secret"]["secretName"] == values["kafka"]["tls"]["caSecret"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "kafka-ca")
        assert ca == f"{mount['mountPath']}/ca.crt"
        # mTLS: the client certificate and key from their Secret, the key's password by reference.
        client = values["kafka"]["tls"]["clientSecret"]
        assert volumes["kafka-client"]["secret"]["secretName"] == client
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert env["RELAY_KAFKA_SSL_CERTFILE"]["value"] == f"{mounts['kafka-client']}/tls.crt"
        assert env["RELAY_KAFKA_SSL_KEYFILE"]["value"] == f"{mounts['kafka-client']}/tls.key"
        assert env["RELAY_KAFKA_SSL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": client,
            "key": values["kafka"]["tls"]["clientKeyPasswordKey"],
        }
    for config in by_kind(full, "ConfigMap"):
        text = json.dumps(config["data"]).lower()
        assert "password" not in text and "database_url" not in text
    assert not by_kind(full, "Secret")


def test_each_workload_logs_in_with_its_own_database_secret() -> None:
    """The role split (docs/security.md): migrate as the schema owner, the relay and the
    reconciler each under its own role, from a Secret (and key) of its own."""
    per_role = render(
        "-f",
        FULL,
        "--set",
        "database.migrate.existingSecret=relay-db-owner",
        "--set",
        "database.relay.existingSecret=relay-db-relay",
        "--set",
        "database.relay.urlKey=url",
        "--set",
        "database.reconciler.existingSecret=relay-db-reconciler",
    )
    expected = {
        ("Job", "migrate"): {"name": "relay-db-owner", "key": "database-url"},
        ("StatefulSet", "relay"): {"name": "relay-db-relay", "key": "url"},
        ("Deployment", "reconciler"): {"name": "relay-db-reconciler", "key": "database-url"},
    }
    for (kind, component), ref in expected.items():
        container = pod_spec(one(per_role, kind, component))["containers"][0]
        assert env_of(container)["RELAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == ref
    # Unset, a workload falls back to database.existingSecret (one login for all, as before).
    partly = render("-f", FULL, "--set", "database.relay.existingSecret=relay-db-relay")
    shared = {"name": "relay-database", "key": "database-url"}
    for kind, component in (("Job", "migrate"), ("Deployment", "reconciler")):
        container = pod_spec(one(partly, kind, component))["containers"][0]
        assert env_of(container)["RELAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == shared
    relay_pod = pod_spec(one(partly, "StatefulSet", "relay"))["containers"][0]
    assert env_of(relay_pod)["RELAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == (
        "relay-db-relay"
    )


def test_the_rendered_config_is_valid_for_the_relay(
    full: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_map(full, "-relay-config")
    path = tmp_path / "relay.toml"
    path.write_text(config["data"]["relay.toml"])
    # Values reach templates as floats: whole numbers must still be written as TOML integers.
    assert "\nbatch_size = 200\n" in "\n" + config["data"]["relay.toml"]
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    container = pod_spec(one(full, "StatefulSet", "relay"))["containers"][0]
    for name, item in env_of(container).items():
        if name.startswith("RELAY_") and "value" in item and "$(" not in item["value"]:
            monkeypatch.setenv(name, item["value"])
    settings = load_settings(path)
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_bootstrap_servers.count(",") == 2
    assert settings.batch_size == 200 and settings.lease_s == 60
    assert settings.metrics_host == "0.0.0.0"
    assert sorted(settings.effect_types) == ["email", "wire", "wire-reversal"]
    assert settings.effect_types["wire"].compensation == "wire-reversal"
    assert settings.effect_types["wire"].observer is not None


def test_migrations_run_as_a_hook_before_install_and_upgrade(full: list[dict[str, Any]]) -> None:
    job = by_kind(full, "Job")[0]
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert pod_spec(job)["containers"][0]["args"] == ["migrate"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    # Hooks run before the release's own objects exist: its config is a hook made before it.
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    hook_config = config_map(full, volumes["config"]["configMap"]["name"])
    assert "pre-install" in hook_config["metadata"]["annotations"]["helm.sh/hook"]
    weight = int(hook_config["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert weight < int(annotations["helm.sh/hook-weight"])
    main = config_map(full, "-relay-config")
    assert hook_config["data"] == main["data"]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value from variables defined before it."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], value)


@pytest.mark.parametrize(("values", "prefix"), [((), "payments"), (("-f", FULL), "prod-eu1")])
def test_relay_replicas_have_stable_unique_identities(values: tuple[str, ...], prefix: str) -> None:
    objects = render(*values)
    relay = one(objects, "StatefulSet", "relay")
    assert relay["kind"] == "StatefulSet"  # pod names survive restarts, one live pod per name
    container = pod_spec(relay)["containers"][0]
    names = [item["name"] for item in container["env"]]
    assert names.index("POD_NAME") < names.index("RELAY_REPLICA_ID")  # $(POD_NAME) needs order
    env = env_of(container)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ids = []
    for ordinal in range(relay["spec"]["replicas"]):
        pod = {"POD_NAME": f"{relay['metadata']['name']}-{ordinal}", "POD_NAMESPACE": "payments"}
        ids.append(expand(env["RELAY_REPLICA_ID"]["value"], pod))
    assert ids == [f"{prefix}-orders-outbox-relay-relay-{n}" for n in range(len(ids))]
    assert len({f"relay-{replica}" for replica in ids}) == len(ids)  # transactional ids
    for replica in ids:
        assert 1 <= len(replica) <= 200  # Settings.replica_id's bounds


def test_the_rules_are_ops_prometheus_relay_alerts(full: list[dict[str, Any]]) -> None:
    assert (CHART / "files" / "relay-alerts.yml").read_bytes() == RULES.read_bytes(), (
        "helm/outbox-relay/files/relay-alerts.yml differs: "
        "cp ops/prometheus/relay-alerts.yml helm/outbox-relay/files/"
    )
    rule = by_kind(full, "PrometheusRule")[0]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_scrape_jobs_are_named_as_the_rules_expect(full: list[dict[str, Any]]) -> None:
    monitor = by_kind(full, "ServiceMonitor")[0]
    label = monitor["spec"]["jobLabel"]
    # The console's Service has no metrics and no job label: the ServiceMonitor leaves it alone.
    scraped = [s for s in by_kind(full, "Service") if label in s["metadata"]["labels"]]
    assert [s["metadata"]["name"] for s in by_kind(full, "Service") if s not in scraped] == [
        "orders-outbox-relay-console"
    ]
    assert {"key": label, "operator": "Exists"} in monitor["spec"]["selector"]["matchExpressions"]
    jobs = {svc["metadata"]["labels"][label] for svc in scraped}
    assert jobs == rule_jobs() == {"outbox-relay", "outbox-relay-reconciler"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    for svc in scraped:
        assert selector.items() <= svc["metadata"]["labels"].items()
        port = monitor["spec"]["endpoints"][0]["port"]
        assert [p["name"] for p in svc["spec"]["ports"]] == [port]


def test_the_network_policy_opens_only_the_metrics_port_to_prometheus(
    full: list[dict[str, Any]],
) -> None:
    """Issue 18, item 5: only Prometheus (and the kubelet, from the node) reaches the endpoints,
    so nobody else can hold them busy; every pod of the chart is covered."""
    policy = by_kind(full, "NetworkPolicy")[0]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    selector = policy["podSelector"]["matchLabels"]
    for workload in by_kind(full, "StatefulSet") + by_kind(full, "Deployment"):
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        ports = [p["name"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])]
        console = workload["metadata"]["labels"]["app.kubernetes.io/component"] == "console"
        assert ports == (["console"] if console else ["metrics"])
    # The console's rule (its own port, from console.ingressFrom) is tested with the console.
    [rule] = [r for r in policy["ingress"] if r["ports"][0]["port"] == "metrics"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]


def test_the_dashboard_is_ops_grafana_relay_dashboard(full: list[dict[str, Any]]) -> None:
    assert (CHART / "files" / "relay-dashboard.json").read_bytes() == DASHBOARD.read_bytes(), (
        "helm/outbox-relay/files/relay-dashboard.json differs: "
        "cp ops/grafana/relay-dashboard.json helm/outbox-relay/files/"
    )
    board = config_map(full, "-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["relay-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def test_optional_parts_are_off_by_default(defaults: list[dict[str, Any]]) -> None:
    kinds = [obj["kind"] for obj in defaults]
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    # Off by default: a scraper not labelled as Prometheus would lose the metrics unseen
    # (docs/deployment.md); NOTES say so while it is off.
    assert "NetworkPolicy" not in kinds
    assert not [c for c in by_kind(defaults, "ConfigMap") if "dashboard" in c["metadata"]["name"]]
    container = pod_spec(one(defaults, "StatefulSet", "relay"))["containers"][0]
    assert "RELAY_KAFKA_SASL_PASSWORD" not in env_of(container)
    assert [b["spec"]["maxUnavailable"] for b in by_kind(defaults, "PodDisruptionBudget")] == [1, 1]


def test_schema_config_covers_every_setting_the_chart_does_not_own() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["config"]["properties"])
    assert allowed.isdisjoint(CHART_OWNED)
    assert allowed | CHART_OWNED == set(Settings.model_fields), (
        "values.schema.json config properties and relay.config.Settings disagree: "
        f"missing {set(Settings.model_fields) - allowed - CHART_OWNED}, "
        f"unknown {allowed - set(Settings.model_fields)}"
    )


def test_schema_effect_types_cover_every_field_of_an_effect_type() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["$defs"]["effectType"]["properties"])
    # The name is the key of the map the chart renders into [effect_types.NAME].
    assert allowed == set(EffectTypeSpec.model_fields) - {"name"}


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "relay.replicas=-1"], "replicas"),
        (["--set-string", "relay.replicas=two"], "replicas"),
        (["--set", "config.database_url=postgresql://u:p@db/x"], "database_url"),
        (["--set", "kafka.sasl.mechanism=SCRAM"], "mechanism"),
        (["--set", "database.existingSecret="], "existingSecret"),
        (["--set", "database.relay.existingSecret=Not_A_Name"], "existingSecret"),
        (["--set", "database.owner.existingSecret=x"], "owner"),
        (["--set", "effectTypes.wire.topic=payments.wires"], "effectTypes"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "config.batch_size=0"], "batch_size"),
    ],
)
def test_the_schema_refuses_wrong_values(args: list[str], complaint: str) -> None:
    done = helm("template", "orders", str(CHART), *args)
    assert done.returncode != 0, f"accepted {args}"
    assert "values don't meet the specifications of the schema" in done.stderr
    assert complaint in done.stderr, done.stderr


def test_notes_name_the_replica_ids_and_the_effect_types() -> None:
    for extra, replica, types in [
        ([], "payments-<pod name>", "none (set effectTypes)"),
        (["-f", FULL], "prod-eu1-<pod name>", "email, wire, wire-reversal"),
    ]:
        done = helm("install", "orders", str(CHART), "-n", "payments", "--dry-run=client", *extra)
        assert done.returncode == 0, done.stderr
        notes = done.stdout.split("NOTES:", 1)[1]
        assert f"replica_id = {replica}" in notes
        assert f"Effect types declared: {types}" in notes
        assert "relay list --state UNKNOWN" in notes


def test_extra_env_volumes_and_mounts_reach_every_container(
    defaults: list[dict[str, Any]], full: list[dict[str, Any]]
) -> None:
    """Issue 21.2: tracing, a Python observer, compression settings without a forked chart."""
    values = yaml.safe_load(Path(FULL).read_text())
    for kind, component in WORKLOADS:
        spec = pod_spec(one(full, kind, component))
        container = spec["containers"][0]
        env = env_of(container)
        for item in values["extraEnv"]:
            assert env[item["name"]] == item
        # after the chart's own variables, which they cannot replace
        names = [e["name"] for e in container["env"]]
        assert names.index("RELAY_DATABASE_URL") < names.index("OTEL_SERVICE_NAME")
        assert container["envFrom"] == values["extraEnvFrom"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["observers"] == values["extraVolumes"][0]
        assert {"config", "tmp"} <= volumes.keys()  # the chart's own stay
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["observers"] == values["extraVolumeMounts"][0]
        # none of it by default
        plain = pod_spec(one(defaults, kind, component))
        assert "envFrom" not in plain["containers"][0]
        assert {v["name"] for v in plain["volumes"]} == {"config", "tmp"}
        assert "OTEL_SERVICE_NAME" not in env_of(plain["containers"][0])


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "extraEnv[0].name=RELAY_DATABASE_URL", "--set", "extraEnv[0].value=x"], "name"),
        (["--set", "extraEnv[0].name=RELAY_KAFKA_SASL_PASSWORD"], "name"),
        (["--set", "extraEnv[0].value=no-name"], "name"),
        (["--set", "extraVolumes[0].name=tmp"], "extraVolumes"),
        (["--set", "extraVolumeMounts[0].name=x,extraVolumeMounts[0].mountPath=rel"], "mountPath"),
        (["--set", "extraEnvFrom[0].prefix=X_"], "extraEnvFrom"),
        (["--set", "probes.startup.failureThreshold=0"], "failureThreshold"),
        (["--set", "relay.topologySpread.whenUnsatisfiable=Never"], "whenUnsatisfiable"),
    ],
)
def test_the_schema_refuses_wrong_extras(args: list[str], complaint: str) -> None:
    done = helm("template", "orders", str(CHART), *args)
    assert done.returncode != 0, f"accepted {args}"
    assert "values don't meet the specifications of the schema" in done.stderr
    assert complaint in done.stderr, done.stderr


@pytest.mark.parametrize(("kind", "component"), WORKLOADS[:2])
def test_a_startup_probe_holds_liveness_until_the_process_serves(
    defaults: list[dict[str, Any]], full: list[dict[str, Any]], kind: str, component: str
) -> None:
    container = pod_spec(one(defaults, kind, component))["containers"][0]
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert "enabled" not in startup
    tuned = pod_spec(one(full, kind, component))["containers"][0]["startupProbe"]
    assert (tuned["periodSeconds"], tuned["failureThreshold"]) == (3, 40)
    off = render("--set", "probes.startup.enabled=false")
    assert "startupProbe" not in pod_spec(one(off, kind, component))["containers"][0]
    assert "livenessProbe" in pod_spec(one(off, kind, component))["containers"][0]


def test_replicas_are_spread_across_nodes(
    defaults: list[dict[str, Any]], full: list[dict[str, Any]]
) -> None:
    for kind, component in WORKLOADS[:2]:
        workload = one(defaults, kind, component)
        [spread] = pod_spec(workload)["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["maxSkew"] == 1
        # ScheduleAnyway: a one-node cluster still runs every replica
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        # it counts exactly this workload's pods
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert spread["labelSelector"]["matchLabels"] == labels
    relay_spread = pod_spec(one(full, "StatefulSet", "relay"))["topologySpreadConstraints"]
    assert relay_spread[0]["whenUnsatisfiable"] == "DoNotSchedule"
    zones = pod_spec(one(full, "Deployment", "reconciler"))["topologySpreadConstraints"]
    assert zones[0]["topologyKey"] == "topology.kubernetes.io/zone"
    off = render("--set", "relay.topologySpread.enabled=false")
    assert "topologySpreadConstraints" not in pod_spec(one(off, "StatefulSet", "relay"))
    assert "topologySpreadConstraints" in pod_spec(one(off, "Deployment", "reconciler"))


def lookup_chart(tmp_path: Path, secrets: dict[str, list[str]] | None) -> Path:
    """A parent chart around a copy of this one whose only template calls the chart's secret
    check with a given ``lookup`` answer: ``helm template`` has no cluster, so ``lookup`` itself
    returns nothing there. ``secrets``: name -> its keys (the namespace's Secrets); None: the
    empty answer of ``lookup`` without a cluster."""
    parent = tmp_path / "parent"
    shutil.copytree(CHART, parent / "charts" / "outbox-relay")
    (parent / "templates").mkdir()
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: parent\nversion: 0.0.1\nkubeVersion: '>=1.25.0-0'\n"
    )
    found: dict[str, Any] = {}
    if secrets is not None:
        found = {
            "apiVersion": "v1",
            "kind": "SecretList",
            "items": [
                {"metadata": {"name": name}, "data": dict.fromkeys(keys, "eA==")}
                for name, keys in secrets.items()
            ],
        }
    (parent / "values.yaml").write_text(yaml.safe_dump({"found": found}))
    (parent / "templates" / "check.yaml").write_text(
        '{{- $sub := dict "Values" (index .Values "outbox-relay") "Release" .Release -}}\n'
        '{{- include "outbox-relay.requireSecrets" (dict "root" $sub "found" .Values.found) -}}\n'
    )
    return parent


@pytest.mark.parametrize(
    ("args", "secrets", "complaint"),
    [
        ([], {}, 'Secret "outbox-relay-database" (database.existingSecret) does not exist'),
        ([], {"outbox-relay-database": ["url"]}, 'has no key "database-url"'),
        (
            ["--set", "outbox-relay.database.reconciler.existingSecret=relay-db-reconciler"],
            {"outbox-relay-database": ["database-url"]},
            'Secret "relay-db-reconciler" (database.reconciler.existingSecret) does not exist',
        ),
        (
            ["-f", "FULL"],
            {
                "relay-database": ["database-url"],
                "relay-kafka-user": ["username"],
                "kafka-ca": ["ca.crt"],
                "relay-kafka-client": ["tls.crt", "tls.key", "key-password"],
            },
            'Secret "relay-kafka-user" (kafka.sasl.existingSecret) in namespace "payments" '
            'has no key "password"',
        ),
        (
            ["-f", "FULL"],
            {
                "relay-database": ["database-url"],
                "relay-kafka-user": ["username", "password"],
                "relay-kafka-client": ["tls.crt", "tls.key", "key-password"],
            },
            'Secret "kafka-ca" (kafka.tls.caSecret) does not exist in namespace "payments"',
        ),
        (
            ["-f", "FULL"],
            {
                "relay-database": ["database-url"],
                "relay-kafka-user": ["username", "password"],
                "kafka-ca": ["ca.crt"],
                "relay-kafka-client": ["tls.crt", "tls.key"],
            },
            'has no key "key-password"',
        ),
        (
            ["-f", "FULL"],
            {
                "relay-database": ["database-url"],
                "relay-kafka-user": ["username", "password"],
                "kafka-ca": ["ca.crt"],
                "relay-kafka-client": ["tls.crt", "tls.key", "key-password"],
                "relay-console-database": ["operator-url", "session-secret"],
                "relay-console-users": ["users"],
            },
            'Secret "relay-console-database" (console.database.existingSecret) in namespace '
            '"payments" has no key "viewer-url"',
        ),
    ],
)
def test_a_missing_secret_fails_the_install_with_its_name(
    tmp_path: Path, args: list[str], secrets: dict[str, list[str]], complaint: str
) -> None:
    """Issue 21.2: a Secret the pods read, or a key in it, missing from the namespace stops
    `helm install` at once with the value that names it, instead of a hook Job waiting in
    CreateContainerConfigError until its deadline."""
    parent = lookup_chart(tmp_path, secrets)
    full_values = yaml.safe_load(Path(FULL).read_text())
    if args[:2] == ["-f", "FULL"]:
        wrapped = tmp_path / "full-wrapped.yaml"
        wrapped.write_text(yaml.safe_dump({"outbox-relay": full_values}))
        args = ["-f", str(wrapped)]
    done = helm("template", "orders", str(parent), "--namespace", "payments", *args)
    assert done.returncode != 0, done.stdout[:2000]
    assert complaint in done.stderr, done.stderr


@pytest.mark.parametrize("secrets", [None, "all"])
def test_secrets_present_or_no_cluster_render(tmp_path: Path, secrets: str | None) -> None:
    found = None
    if secrets == "all":
        found = {
            "relay-database": ["database-url"],
            "relay-kafka-user": ["username", "password"],
            "kafka-ca": ["ca.crt"],
            "relay-kafka-client": ["tls.crt", "tls.key", "key-password"],
            "relay-console-database": ["operator-url", "viewer-url", "session-secret"],
            "relay-console-users": ["users"],
        }
    parent = lookup_chart(tmp_path, found)
    wrapped = tmp_path / "full-wrapped.yaml"
    wrapped.write_text(yaml.safe_dump({"outbox-relay": yaml.safe_load(Path(FULL).read_text())}))
    done = helm("template", "orders", str(parent), "--namespace", "payments", "-f", str(wrapped))
    assert done.returncode == 0, done.stderr
    # The chart itself calls the check with lookup's answer, before any object.
    configmap = (CHART / "templates" / "configmap.yaml").read_text()
    assert '(lookup "v1" "Secret" .Release.Namespace "")' in configmap
    assert "outbox-relay.requireSecrets" in configmap


def test_the_first_effect_example_publishes_something(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helm/outbox-relay/examples/first-effect.yaml declares a type the relay publishes, and
    the NOTES say how to enqueue one and read its story."""
    objects = render("-f", FIRST_EFFECT)
    path = tmp_path / "relay.toml"
    path.write_text(config_map(objects, "-relay-config")["data"]["relay.toml"])
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    settings = load_settings(path)
    assert list(settings.effect_types) == ["email"]
    email = settings.effect_types["email"]
    assert email.topic == "app.emails" and email.idempotent and email.result_topic is None
    done = helm(
        "install", "orders", str(CHART), "-n", "payments", "--dry-run=client", "-f", FIRST_EFFECT
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert 'relay enqueue email hello-1 \'{"hello": "world"}\'' in notes
    assert "relay show hello-1" in notes
    bare = helm("install", "orders", str(CHART), "-n", "payments", "--dry-run=client")
    assert "examples/first-effect.yaml" in bare.stdout.split("NOTES:", 1)[1]
    assert "No NetworkPolicy" in bare.stdout.split("NOTES:", 1)[1]


def test_the_console_is_off_by_default_and_on_with_its_own_logins(
    defaults: list[dict[str, Any]], full: list[dict[str, Any]]
) -> None:
    """console.enabled: a Deployment running `relay console` on 0.0.0.0 in the pod, reading as
    the viewers' login and deciding as the operator's (both from its own Secret), its users file
    from a Secret, a Service and a NetworkPolicy rule on the port named console."""
    assert not [o for o in defaults if o["metadata"]["name"].endswith("-console")]
    deployment = one(full, "Deployment", "console")
    pod = pod_spec(deployment)
    (container,) = pod["containers"]
    assert container["args"] == ["console"] and deployment["spec"]["replicas"] == 2
    env = env_of(container)
    assert env["RELAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "relay-console-database",
        "key": "operator-url",
    }
    assert env["RELAY_CONSOLE_VIEWER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "relay-console-database",
        "key": "viewer-url",
    }
    assert env["RELAY_CONSOLE_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "session-secret"
    assert env["RELAY_CONSOLE_HOST"]["value"] == "0.0.0.0"
    (port,) = container["ports"]
    assert port == {"name": "console", "containerPort": 8400, "protocol": "TCP"}
    assert container["readinessProbe"]["httpGet"]["port"] == "console"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    users = env["RELAY_CONSOLE_USERS_FILE"]["value"]
    assert users == mounts["console-users"] + "/users"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["console-users"]["secret"]["secretName"] == "relay-console-users"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The settings the pod starts with are valid for the console.
    settings = Settings(
        database_url="postgresql://op@db/x",
        console_viewer_database_url="postgresql://viewer@db/x",
        console_host=env["RELAY_CONSOLE_HOST"]["value"],
        console_port=int(env["RELAY_CONSOLE_PORT"]["value"]),
        console_users_file=users,
    )
    assert settings.console_port == 8400 and settings.console_host == "0.0.0.0"
    service = one(full, "Service", "console")
    assert service["spec"]["ports"] == [
        {"name": "console", "port": 8400, "targetPort": "console", "protocol": "TCP"}
    ]
    (policy,) = by_kind(full, "NetworkPolicy")
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert rules["console"]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    # Proxy mode: no users file, and the proxy's settings from config.
    proxied = render(
        "-f",
        FULL,
        "--set",
        "console.usersSecret=",
        "--set",
        "config.console_auth=proxy",
        "--set-json",
        'config.console_proxy_addresses=["10.0.0.0/16"]',
    )
    container = pod_spec(one(proxied, "Deployment", "console"))["containers"][0]
    assert "RELAY_CONSOLE_USERS_FILE" not in env_of(container)
    assert "console-users" not in {m["name"] for m in container["volumeMounts"]}
    toml = config_map(proxied, "-relay-config")["data"]["relay.toml"]
    assert "console_auth = 'proxy'" in toml or 'console_auth = "proxy"' in toml

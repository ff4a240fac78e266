"""End to end: a real Prometheus (Debian's package) scrapes a real ``relay run`` subprocess and
evaluates the shipped alert rules (with shorter ``for:``): the UNKNOWN alert fires, clears once
the effect is resolved, and the daemon-down alerts fire when the relay stops."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devservices import Services
from relay.observability import alerts
from relay.observability.promql import metric_names
from relay.states import EffectState
from tests import support
from tests.unit.test_observability_dashboard import load as load_dashboard
from tests.unit.test_observability_dashboard import queries as dashboard_queries
from tests.unit.test_observability_rules import prometheus_bin

# Series only the reconciler exports (it is not part of this run yet).
RECONCILER_ONLY = {
    "relay_observations_total",
    "relay_results_total",
    "relay_results_quarantined_total",
    "relay_reconciler_consumer_lag_records",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.base}/api/v1/{path}{query}")
        assert status == 200, body
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]

    def firing(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in self.api("alerts")["alerts"]:
            if alert["state"] == "firing":
                found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Start Prometheus scraping ``target`` every second with the test copy of the rules."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> Prometheus:
        binary = prometheus_bin() / "prometheus"
        rules = tmp_path / "rules.yml"
        rules.write_text(
            alerts.render(
                for_overrides={
                    "RelayUnknownEffectsTooOld": "0s",
                    "RelayDaemonDown": "0s",
                    "RelayNoLiveRelay": "0s",
                }
            )
        )
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(rules))}]\n"
            "scrape_configs:\n"
            f"  - job_name: {alerts.RELAY_JOB}\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
        )
        port = free_port()
        log = open(tmp_path / "prometheus.log", "ab")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        base = f"http://127.0.0.1:{port}"
        support.wait_for(lambda: http_get(base + "/-/ready")[0] == 200, 30, "Prometheus ready")
        return Prometheus(base)

    yield start
    for proc in procs:
        support.stop_process(proc, timeout=15)


def counted(prom: Prometheus, expr: str) -> bool:
    return (prom.value(expr) or 0) >= 1


def insert_unknown(url: str, settings: Settings, key: str) -> int:
    """An effect that was published an hour ago and whose downstream outcome is unknown (the
    reconciler's PUBLISHED -> UNKNOWN), with the transitions that tell its story."""
    topic = settings.effect_types["email"].topic
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO relay.effect (operation_key, effect_type, topic, payload, state, attempts,"
            " published_partition, published_offset, published_at, created_at, updated_at)"
            " VALUES (%s, 'email', %s, '{}', 'UNKNOWN', 1, 0, 0, now() - interval '1 hour',"
            " now() - interval '1 hour', now()) RETURNING id",
            (key, topic),
        ).fetchone()
        assert row is not None
        effect_id = int(row[0])
        conn.execute(
            "INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,"
            " at) VALUES (%(id)s, NULL, 'PENDING', 'enqueued', 'application', 0,"
            "             now() - interval '1 hour'),"
            " (%(id)s, 'PUBLISHED', 'UNKNOWN', 'outcome deadline passed', 'test', 1,"
            "  now() - interval '50 minutes')",
            {"id": effect_id},
        )
    return effect_id


def resolve_confirmed(url: str, effect_id: int) -> None:
    """What ``relay resolve KEY --confirm`` records: the state and its transition."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "UPDATE relay.effect SET state = 'CONFIRMED', updated_at = now() WHERE id = %s",
            (effect_id,),
        )
        conn.execute(
            "INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt)"
            " VALUES (%s, 'UNKNOWN', 'CONFIRMED', 'seen in the mail log', 'operator:test', 1)",
            (effect_id,),
        )


def test_unknown_alert_fires_and_clears_on_a_real_prometheus(
    settings: Settings, services: Services, tmp_path: Path, prometheus_for: Any
) -> None:
    url = settings.require_database_url()
    metrics_port = free_port()
    run_settings = settings.model_copy(
        update={"metrics_host": "127.0.0.1", "metrics_port": metrics_port, "metrics_cache_s": 1.0}
    )
    config = support.write_config(tmp_path / "relay.toml", run_settings)
    proc = support.start_relay(config, tmp_path / "relay.log")
    target = f"127.0.0.1:{metrics_port}"
    try:
        support.wait_for(
            lambda: http_get(f"http://{target}/healthz")[0] == 200, 30, "the relay's /healthz"
        )
        status, body = http_get(f"http://{target}/readyz")
        assert status == 200, body
        assert body.splitlines()[1:] == ["database: ok", "migrations: ok", "kafka: ok"]

        prom = prometheus_for(target)
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "email", "obs-mail-1", {"to": "a@example.com"})
            conn.commit()
        support.wait_for(
            lambda: (prom.value('sum(relay_attempts_total{outcome="acked"})') or 0) >= 1,
            30,
            "the ack counted by the relay and scraped",
        )
        assert (prom.value("sum(relay_publish_latency_seconds_count)") or 0) >= 1
        for source, target in (("PENDING", "DISPATCHING"), ("DISPATCHING", "PUBLISHED")):
            moved = f'sum(relay_transitions_total{{from_state="{source}", to_state="{target}"}})'
            support.wait_for(partial(counted, prom, moved), 10, moved)
        assert "RelayUnknownEffectsTooOld" not in prom.firing()

        effect_id = insert_unknown(url, settings, "obs-unknown-1")
        support.wait_for(
            lambda: "RelayUnknownEffectsTooOld" in prom.firing(), 30, "the UNKNOWN alert to fire"
        )
        [alert] = prom.firing()["RelayUnknownEffectsTooOld"]
        assert float(alert["value"]) >= 50 * 60  # entered UNKNOWN 50 minutes ago
        assert prom.value('max(relay_effects{effect_type="email", state="UNKNOWN"})') == 1

        # Every metric the dashboard and the rules read is really scraped from the relay (the
        # reconciler's own series aside), and every dashboard query is valid PromQL.
        scraped = set(prom.api("label/__name__/values"))
        for expr in dashboard_queries(load_dashboard()):
            missing = metric_names(expr) - scraped - RECONCILER_ONLY
            assert not missing, f"{expr!r}: never scraped {missing}"
            prom.api("query", query=expr.replace("$__rate_interval", "1m"))
        for rule in alerts.rules():
            assert not metric_names(rule.expr) - scraped - RECONCILER_ONLY, rule.expr

        resolve_confirmed(url, effect_id)
        support.wait_for(
            lambda: "RelayUnknownEffectsTooOld" not in prom.firing(),
            30,
            "the UNKNOWN alert to clear",
        )
        assert prom.value('max(relay_effects{effect_type="email", state="UNKNOWN"})') == 0
        assert support.count_states(url).get(EffectState.CONFIRMED.value) == 1

        assert "RelayDaemonDown" not in prom.firing()
        support.stop_process(proc)
        support.wait_for(
            lambda: {"RelayDaemonDown", "RelayNoLiveRelay"} <= set(prom.firing()),
            30,
            "the daemon-down alerts after the relay stopped",
        )
    finally:
        support.stop_process(proc)
        log_text = (tmp_path / "relay.log").read_text(errors="replace")
        assert "Traceback" not in log_text, log_text[-3000:]

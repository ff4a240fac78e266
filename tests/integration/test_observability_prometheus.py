"""End to end: a real Prometheus (Debian's package) scrapes a real ``relay run`` and a real
``relay reconcile`` subprocess and evaluates the shipped alert rules (with shorter thresholds).

A wire transfer whose downstream never answers becomes UNKNOWN (the reconciler's deadline), the
UNKNOWN alert fires, and it clears once both such effects are resolved: one by an operator
(``relay resolve KEY --confirm``), one by the reconciler's observer. Then the daemon-down alerts
fire when the daemons stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

import relay
from relay.devtools.services import Services
from relay.observability import alerts
from relay.observability.promql import metric_names
from tests import support
from tests.downstream import harness as h
from tests.unit.test_observability_dashboard import load as load_dashboard
from tests.unit.test_observability_dashboard import queries as dashboard_queries
from tests.unit.test_observability_rules import prometheus_bin

RELAY = alerts.RELAY_JOB
RECONCILER = alerts.RECONCILER_JOB
# What only the reconciler records: the dashboard's reconciliation panels must find them there.
RECONCILER_SERIES = (
    "relay_observations_total",
    "relay_results_total",
    "relay_results_quarantined_total",
    "relay_reconciler_consumer_lag_records",
)
UNKNOWN_AGE_S = 2  # the test copy of RelayUnknownEffectsTooOld fires past this age


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

    def at_least(self, expr: str, wanted: float) -> bool:
        return (self.value(expr) or 0) >= wanted


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Start Prometheus scraping the given jobs every second with the test copy of the rules."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(targets: dict[str, str]) -> Prometheus:
        binary = prometheus_bin() / "prometheus"
        rules = tmp_path / "rules.yml"
        rules.write_text(
            alerts.render(
                alerts.rules(unknown_age_s=UNKNOWN_AGE_S),
                for_overrides={
                    "RelayUnknownEffectsTooOld": "0s",
                    "RelayDaemonDown": "0s",
                    "RelayNoLiveRelay": "0s",
                    "RelayNoLiveReconciler": "0s",
                },
            )
        )
        config = tmp_path / "prometheus.yml"
        lines = [
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}",
            f"rule_files: [{json.dumps(str(rules))}]",
            "scrape_configs:",
        ]
        for job, target in targets.items():
            lines += [
                f"  - job_name: {job}",
                f"    static_configs: [{{targets: [{json.dumps(target)}]}}]",
            ]
        config.write_text("\n".join(lines) + "\n")
        port = support.free_port()
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


class Bank:
    """The downstream's lookup by business key, as the wire type's HTTP observer asks it: a
    transfer it has booked answers ``{"count": 1}``; anything else answers 503 (inconclusive)."""

    def __init__(self) -> None:
        self.booked: set[str] = set()
        self.asked = 0
        bank = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                bank.asked += 1
                business_key = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
                if business_key in bank.booked:
                    self._send(200, b'{"count": 1}')
                else:
                    self._send(503, b"the books are being closed")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test's output is for failures."""

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/wires/{{business_key}}"

    def __enter__(self) -> Bank:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def alive(target: str) -> bool:
    return http_get(f"http://{target}/healthz")[0] == 200


def start_reconciler(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``relay reconcile`` as a real subprocess, logging to a file."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "--config", str(config), "reconcile"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=support.relay_env(),
    )


def relay_resolve(config: Path, key: str, reason: str) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "relay.cli", "--config", str(config),
            "resolve", key, "--confirm", "--reason", reason,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=support.relay_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{key}: CONFIRMED" in done.stdout


def test_unknown_alert_fires_and_clears_with_both_daemons_scraped(
    database_url: str,
    services: Services,
    prefix: str,
    tmp_path: Path,
    prometheus_for: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h.isolate_from_environment(monkeypatch)
    relay_port, reconciler_port = support.free_port(), support.free_port()
    with Bank() as bank:
        settings = h.reconciler_settings(
            database_url,
            services.kafka_bootstrap_servers,
            prefix,
            effect_types=h.wire_types(prefix, observer_url=bank.url, outcome_timeout_s=1.0),
            # Inconclusive answers keep an effect UNKNOWN (and asked again) for this whole test.
            observe_max_tries=10_000,
            metrics_host="127.0.0.1",
            metrics_port=relay_port,
            reconcile_metrics_port=reconciler_port,
            metrics_cache_s=1.0,
        )
        url = settings.require_database_url()
        config = support.write_config(tmp_path / "relay.toml", settings)
        relay_proc = support.start_relay(config, tmp_path / "relay.log")
        reconciler_proc = start_reconciler(config, tmp_path / "reconciler.log")
        targets = {RELAY: f"127.0.0.1:{relay_port}", RECONCILER: f"127.0.0.1:{reconciler_port}"}
        try:
            for job, target in targets.items():
                support.wait_for(partial(alive, target), 30, f"{job} up")
                status, body = http_get(f"http://{target}/readyz")
                assert status == 200, body
                checks = ["database: ok", "migrations: ok", "kafka: ok"]
                if job == RECONCILER:  # and its loops advance (reconcile_stall_rounds)
                    checks.append("progress: ok")
                assert body.splitlines()[1:] == checks

            prom = prometheus_for(targets)
            _run_story(prom, url, config, bank, prefix)

            assert "RelayDaemonDown" not in prom.firing()
            support.stop_process(reconciler_proc)
            support.wait_for(
                lambda: {"RelayDaemonDown", "RelayNoLiveReconciler"} <= set(prom.firing()),
                30,
                "the daemon-down alerts after the reconciler stopped",
            )
            [down] = prom.firing()["RelayDaemonDown"]
            assert down["labels"]["job"] == RECONCILER
            support.stop_process(relay_proc)
            support.wait_for(
                lambda: "RelayNoLiveRelay" in prom.firing(), 30, "no live relay after it stopped"
            )
        finally:
            support.stop_process(reconciler_proc)
            support.stop_process(relay_proc)
            for name in ("relay.log", "reconciler.log"):
                log_text = (tmp_path / name).read_text(errors="replace")
                assert "Traceback" not in log_text, f"{name}: {log_text[-3000:]}"


def _run_story(prom: Prometheus, url: str, config: Path, bank: Bank, prefix: str) -> None:
    reconciler = f'job="{RECONCILER}"'
    with psycopg.connect(url) as conn:
        for key, amount in (("by-operator", 1), ("by-observer", 2)):
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": amount})
        conn.commit()

    # The relay publishes both; no result comes; the reconciler's deadline makes them UNKNOWN.
    published = f'sum(relay_transitions_total{{job="{RELAY}", to_state="PUBLISHED"}})'
    support.wait_for(lambda: prom.at_least(published, 2), 30, "publication, scraped")
    assert prom.at_least(f'sum(relay_attempts_total{{job="{RELAY}", outcome="acked"}})', 2)
    assert prom.at_least(f'sum(relay_publish_latency_seconds_count{{job="{RELAY}"}})', 2)
    expired = (
        f'sum(relay_transitions_total{{{reconciler}, from_state="PUBLISHED", to_state="UNKNOWN"}})'
    )
    support.wait_for(lambda: prom.at_least(expired, 2), 30, "the deadline's moves, scraped")
    inconclusive = f'sum(relay_observations_total{{{reconciler}, answer="inconclusive"}})'
    support.wait_for(lambda: prom.at_least(inconclusive, 2), 30, "observations, scraped")
    support.wait_for(
        lambda: "RelayUnknownEffectsTooOld" in prom.firing(), 30, "the UNKNOWN alert to fire"
    )
    [alert] = prom.firing()["RelayUnknownEffectsTooOld"]
    assert float(alert["value"]) > UNKNOWN_AGE_S
    assert prom.value('max(relay_effects{effect_type="wire", state="UNKNOWN"})') == 2
    # Both daemons read the same outbox: the same number from each.
    both = 'count(relay_effects{effect_type="wire", state="UNKNOWN"} == 2) == 2'
    support.wait_for(lambda: prom.value(both) is not None, 10, "the same count from both")
    lag = f'relay_reconciler_consumer_lag_records{{{reconciler}, topic="{prefix}.wire-results"}}'
    assert prom.value(lag) == 0

    # Every metric the dashboard and the rules read is really scraped; the reconciliation panels'
    # series come from the reconciler; every dashboard query is valid PromQL.
    scraped = set(prom.api("label/__name__/values"))
    for expr in dashboard_queries(load_dashboard()):
        missing = metric_names(expr) - scraped
        assert not missing, f"{expr!r}: never scraped {missing}"
        prom.api("query", query=expr.replace("$__rate_interval", "1m"))
    for rule in alerts.rules():
        assert not metric_names(rule.expr) - scraped, rule.expr
    for name in RECONCILER_SERIES:
        assert prom.at_least(f"count({name}{{{reconciler}}})", 1), name

    # An operator resolves one: the alert still fires for the other.
    relay_resolve(config, "by-operator", "seen in the bank's books as T-1")
    one_left = 'max(relay_effects{effect_type="wire", state="UNKNOWN"}) == 1'
    support.wait_for(lambda: prom.value(one_left) is not None, 30, "one UNKNOWN left, scraped")
    assert "RelayUnknownEffectsTooOld" in prom.firing()

    # The bank books the other; the reconciler's observer finds it: the alert clears.
    bank.booked.add(f"{h.WIRE['account']}:2:{h.WIRE['date']}")
    support.wait_for(
        lambda: "RelayUnknownEffectsTooOld" not in prom.firing(), 30, "the UNKNOWN alert to clear"
    )
    assert prom.value('max(relay_effects{effect_type="wire", state="UNKNOWN"})') == 0
    assert h.states(url, ["by-operator", "by-observer"]) == {
        "by-operator": "CONFIRMED",
        "by-observer": "CONFIRMED",
    }
    confirmed = (
        f'sum(relay_transitions_total{{{reconciler}, from_state="UNKNOWN", to_state="CONFIRMED"}})'
    )
    support.wait_for(lambda: prom.at_least(confirmed, 1), 10, "the observer's move, scraped")
    assert prom.at_least(f'sum(relay_observations_total{{{reconciler}, answer="present"}})', 1)
    # The operator's decision was the CLI's, not the reconciler's: counted once, by nobody here.
    assert prom.value(confirmed) == 1

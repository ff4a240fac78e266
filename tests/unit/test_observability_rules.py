"""The shipped alert rules: rendered from their source, valid for promtool, unit-tested by
promtool, and reading only metrics the daemons export."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from relay.observability import alerts
from relay.observability.metrics import REGISTRY, OutboxCollector, series_names
from relay.observability.promql import metric_names
from tests.deploy import run_script

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "relay-alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "relay-alerts.test.yml"
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def prometheus_bin() -> Path:
    """Debian's promtool/prometheus, installed by the project's script; a test is skipped only
    when the script says it cannot install them, with its reason."""
    done = run_script("install-prometheus-tools.sh", timeout=600)
    if done.returncode != 0:
        pytest.skip(f"promtool unavailable: {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def test_rules_file_is_the_rendered_source() -> None:
    assert RULES.read_text(encoding="utf-8") == alerts.render(), (
        "ops/prometheus/relay-alerts.yml differs from relay/observability/alerts.py: "
        "python -m relay.observability.alerts > ops/prometheus/relay-alerts.yml"
    )


def test_promtool_check_rules() -> None:
    done = subprocess.run(
        [str(prometheus_bin() / "promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts.rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules() -> None:
    done = subprocess.run(
        [str(prometheus_bin() / "promtool"), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_promtool_test_and_a_runbook() -> None:
    tests = RULE_TESTS.read_text(encoding="utf-8")
    runbooks = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for rule in alerts.rules():
        assert f"alertname: {rule.alert}\n" in tests, f"no promtool test for {rule.alert}"
        assert f'<a id="{rule.alert.lower()}"></a>' in runbooks, f"no runbook for {rule.alert}"


def test_rules_read_only_exported_metrics() -> None:
    exported = series_names(REGISTRY, OutboxCollector("postgresql://unused")) | PROMETHEUS_OWN
    for rule in alerts.rules():
        names = metric_names(rule.expr)
        assert names, rule.expr
        assert names <= exported, f"{rule.alert} reads unexported {names - exported}"


def test_outbox_gauges_are_never_summed_over_replicas() -> None:
    """The database-derived gauges are the same on every replica: a sum would multiply them by
    the number of replicas."""
    outbox = {m.name for m in OutboxCollector("postgresql://unused").describe()}
    for rule in alerts.rules():
        if metric_names(rule.expr) & outbox:
            assert rule.expr.startswith("max by"), rule.expr


def test_for_overrides_make_a_test_copy_and_reject_unknown_names() -> None:
    fast = alerts.render(for_overrides={"RelayUnknownEffectsTooOld": "0s"})
    block = fast.split("- alert: RelayUnknownEffectsTooOld", 1)[1].split("- alert:", 1)[0]
    assert "for: 0s" in block
    assert fast.count("for: 0s") == alerts.render().count("for: 0s") + 1
    with pytest.raises(KeyError):
        alerts.render(for_overrides={"NoSuchAlert": "0s"})


def test_a_console_url_links_each_alert_to_its_console_page() -> None:
    """With --console-url, the alerts an operator acts on link to the console's list of what
    they fired on (beside the runbook); the rules stay valid for promtool."""
    text = alerts.render(console_url="https://console.example.com/")
    assert "console: 'https://console.example.com/effects?state=UNKNOWN'" in text
    assert (
        "console: 'https://console.example.com/effects?state=STUCK&type={{ $labels.effect_type }}'"
        in text
    )
    assert "console: 'https://console.example.com/groups'" in text
    assert text.count("runbook: ") == len(alerts.rules())
    assert "console: " not in alerts.render()
    promtool = str(prometheus_bin() / "promtool")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(text, encoding="utf-8")
        done = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "relay.observability.alerts", "--console-url", "ftp://x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--console-url must start with" in done.stderr

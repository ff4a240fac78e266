"""The Grafana dashboard: importable, and every query names metrics the daemons export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay.observability import alerts, metrics
from relay.observability.metrics import REGISTRY, OutboxCollector, series_names
from relay.observability.promql import metric_names
from relay.states import EffectState

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "relay-dashboard.json"


def load() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def section(dashboard: dict[str, Any], row_title: str) -> list[dict[str, Any]]:
    """The panels under the row titled ``row_title``, down to the next row."""
    found: list[dict[str, Any]] = []
    inside = False
    for panel in panels(dashboard):
        if panel["type"] == "row":
            inside = panel["title"] == row_title
        elif inside:
            found.append(panel)
    return found


def test_dashboard_is_importable() -> None:
    dashboard = load()
    assert dashboard["uid"] == "outbox-relay"
    assert dashboard["title"]
    assert dashboard["id"] is None  # an exported dashboard carries no instance id
    assert isinstance(dashboard["schemaVersion"], int)
    # The datasource is chosen at import time.
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_unknown_and_stuck_are_prominent_and_apart_from_pending() -> None:
    dashboard = load()
    top = [p for p in panels(dashboard) if p["type"] == "stat" and p["gridPos"]["y"] <= 1]
    exprs = " ".join(t["expr"] for p in top for t in p["targets"])
    assert 'state="UNKNOWN"' in exprs
    assert 'state="STUCK"' in exprs
    assert 'state="PENDING"' in exprs


def test_every_query_names_exported_metrics() -> None:
    exported = series_names(REGISTRY, OutboxCollector("postgresql://unused")) | {"up"}
    seen: set[str] = set()
    for expr in queries(load()):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names unexported {names - exported}"
        seen |= names
    # The list: by state, lag, latency, throughput, reconciliation outcomes.
    for required in (
        "relay_effects",
        "relay_oldest_pending_age_seconds",
        "relay_oldest_unknown_age_seconds",
        "relay_publish_latency_seconds_bucket",
        "relay_attempts_total",
        "relay_observations_total",
        "relay_results_quarantined_total",
        "relay_reconciler_consumer_lag_records",
    ):
        assert required in seen, f"the dashboard shows no {required}"


def test_outbox_gauges_are_aggregated_with_max() -> None:
    outbox = {m.name for m in OutboxCollector("postgresql://unused").describe()}
    for expr in queries(load()):
        if metric_names(expr) & outbox and "relay_effects_query_success" not in expr:
            assert "max" in expr, f"{expr!r} would count each replica's copy of a DB gauge"


# Series that only ``relay reconcile`` records.
RECONCILER_SERIES = {
    "relay_observations_total",
    "relay_results_total",
    "relay_results_quarantined_total",
    "relay_reconciler_consumer_lag_records",
}


def test_the_reconciliation_row_shows_what_the_reconciler_exports() -> None:
    reconciliation = section(load(), "Reconciliation")
    exprs = [t["expr"] for p in reconciliation for t in p["targets"]]
    names = set().union(*(metric_names(e) for e in exprs))
    assert names >= RECONCILER_SERIES, f"no panel for {RECONCILER_SERIES - names}"
    # The outcomes the reconciler decided: the transitions it wrote itself, by from and to.
    own = f'relay_transitions_total{{job="{alerts.RECONCILER_JOB}"'
    assert any(own in e and "by (from_state, to_state)" in e for e in exprs), exprs
    # Everywhere else the reconciler's series are read only in this row.
    elsewhere = [q for q in queries(load()) if q not in exprs]
    assert not any(metric_names(q) & RECONCILER_SERIES for q in elsewhere)


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
_EQUALS = re.compile(r'([A-Za-z_]\w*)\s*=\s*"([^"]*)"')


def test_every_label_value_a_query_selects_is_exported() -> None:
    """``reason="failed"`` where no such series exists is an empty panel nobody notices: each
    exact label value a query selects must be one the daemons create (at 0) when they start."""
    metrics.prepare("relay")
    metrics.prepare("reconciler")
    exported: dict[str, set[tuple[str, str]]] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels.items())
    checked = 0
    for expr in queries(load()):
        for name, matchers in _SELECTOR.findall(expr):
            for label, wanted in _EQUALS.findall(matchers):
                if label == "job":
                    continue
                if name == "relay_effects" and label == "state":
                    assert wanted in {s.value for s in EffectState}, expr  # every state reported
                    continue
                if name not in exported:
                    continue  # made by Prometheus itself (up)
                assert (label, wanted) in exported[name], (
                    f"{expr!r}: no {name}{{{label}={wanted!r}}}"
                )
                checked += 1
    assert checked >= 5

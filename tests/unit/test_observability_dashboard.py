"""The Grafana dashboard: importable, and every query names metrics the daemons export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay.observability.metrics import REGISTRY, OutboxCollector, series_names
from relay.observability.promql import metric_names

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

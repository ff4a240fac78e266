"""The benchmark's pure parts (ratios, percentiles, targets, the files it writes) keep working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.all import parse_args, plan_for
from bench.common import pad_for, payload_text
from bench.report import (
    Figure,
    Target,
    latency_summary,
    markdown_table,
    percentile,
    ratio,
    write_plots,
    write_results,
)


def test_ratio_needs_both_figures_and_a_positive_ceiling() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99.9) == 7.0
    summary = latency_summary(list(reversed(values)))
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99.9"] == pytest.approx(99.901)
    assert summary["max"] == 100.0 and summary["count"] == 100.0


def test_percentile_refuses_what_has_no_answer() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="unknown comparison"):
        Target("ratio", "=>", 1.0)


def test_targets_judge_the_ratio_or_the_figure() -> None:
    enqueue = Figure(
        "a", "enqueue", 850.0, "intents/s", 1000.0, "plain", targets=(Target("ratio", ">=", 0.85),)
    )
    assert enqueue.ratio == pytest.approx(0.85) and enqueue.met is True
    slow = Figure("c", "p99", 21.0, "ms", targets=(Target("value", "<=", 20.0),))
    assert slow.met is False
    both = Figure(
        "d",
        "reconciler",
        6000.0,
        "results/s",
        40000.0,
        "bare",
        targets=(Target("value", ">=", 5000), Target("ratio", ">=", 0.2)),
    )
    assert both.met is False  # 6,000/s but only 0.15 of the bare consumer
    missing = Figure(
        "b", "drain", None, "effects/s", 100.0, "bare", targets=(Target("ratio", ">=", 0.8),)
    )
    assert missing.met is None
    assert Figure("b", "no target", 1.0, "x").met is None


def test_table_json_and_plots_are_written(tmp_path: Path) -> None:
    figures = [
        Figure(
            "a",
            "enqueue | relay stopped",
            3000.0,
            "intents/s",
            6000.0,
            "plain insert",
            targets=(Target("ratio", ">=", 0.85),),
        ),
        Figure(
            "c",
            "p99 at 300/s",
            12.5,
            "ms",
            targets=(Target("value", "<=", 20.0),),
            extra={"offered_per_s": 300.0, "p50": 4.0, "p99": 12.5, "p99.9": 30.0},
        ),
    ]
    table = markdown_table(figures)
    rows = table.strip().splitlines()
    assert len(rows) == 4
    assert "enqueue / relay stopped" in rows[2]  # a | in a name cannot break the table
    assert "| 0.50 |" in rows[2] and "**missed**" in rows[2]
    assert "| 12.5 ms |" in rows[3] and rows[3].endswith("| met |")
    md, js = write_results(tmp_path, figures, {"fsync": "off", "sizes": {"n": 1}}, ["a note"])
    assert "fsync: off" in md.read_text() and "- a note" in md.read_text()
    document = json.loads(js.read_text())
    assert document["meta"]["sizes"] == {"n": 1}
    assert document["figures"][0]["ratio"] == 0.5
    assert document["figures"][0]["met"] is False
    assert document["figures"][1]["targets"] == "figure <= 20"
    plots = write_plots(tmp_path, figures)
    if plots:  # matplotlib is the optional `bench` extra
        assert {p.name for p in plots} == {"throughput.png", "latency.png"}
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)


def test_payloads_have_the_size_asked_for() -> None:
    for size in (64, 256, 4096):
        for n in (0, 7, 123_456):
            assert len(payload_text(n, size)) == size
    assert pad_for(10) == 1  # never an empty body


def test_quick_plan_is_smaller_and_knobs_override_it() -> None:
    full = plan_for(parse_args([]))
    quick = plan_for(parse_args(["--quick", "--drain-effects", "123"]))
    assert full.drain.effects == 100_000 and full.rss.large == 1_000_000
    assert quick.drain.effects == 123
    assert quick.rss.large < full.rss.large and quick.commits.seconds < full.commits.seconds
    with pytest.raises(SystemExit):
        parse_args(["--parts", "az"])


def test_the_drains_server_cpu_names_the_relays_backends_that_took_some() -> None:
    from bench.drain import Drained, _roles_note

    split = Drained(4000.0, 10, 0, 3.0, pg_us=30.0, pg_roles={"claimer": 25.5, "doorbell": 0.0})
    assert _roles_note(split) == "the relay's backends, us/effect: claimer 25.5"
    assert _roles_note(Drained(4000.0, 10, 0, 3.0, pg_us=30.0)) == ""

"""relay.tracing: parents and links from traceparents, attributes, no cost without a provider."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay import tracing
from relay.tracing import EffectRef
from tests.otel import memory_exporter

TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "4bf92f3577b34da6a3ce929d0e0e4736"
TP_A = f"00-{TRACE_A}-b7ad6b7169203331-01"
TP_B = f"00-{TRACE_B}-00f067aa0ba902b7-01"
ROOT = Path(__file__).resolve().parents[2]


def test_without_opentelemetry_nothing_is_imported_and_spans_cost_nothing() -> None:
    # -S: no site-packages, so opentelemetry cannot be found; the module is loaded by path
    # because the package's __init__ needs psycopg.
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tracing", {str(ROOT / "relay" / "tracing.py")!r})
tracing = sys.modules["tracing"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tracing)
assert "opentelemetry" not in sys.modules
with tracing.span("relay.x", [tracing.EffectRef("k", 1, {TP_A!r})]) as span:
    span.set_attribute("a", 1)
assert not tracing.enabled()
assert importlib.util.find_spec("opentelemetry") is None
assert not any(m.startswith("opentelemetry") for m in sys.modules)
print("no-op")
"""
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no-op"


def test_installed_but_no_provider_set_records_nothing() -> None:
    code = """
from relay import tracing
with tracing.span("relay.x", [tracing.EffectRef("k", 1)]) as span:
    span.set_attribute("a", 1)
print(tracing.enabled(), type(span).__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False _NoSpan"


def test_one_effect_parents_the_span_and_several_link_it() -> None:
    exporter = memory_exporter()
    assert tracing.enabled()
    with tracing.span("relay.one", [EffectRef("k1", 7, TP_A)], {"x": "y"}) as span:
        span.set_attribute("relay.verdict", "applied")
    refs = [EffectRef("k1", 7, TP_A), EffectRef("k2", 8, TP_B), EffectRef("k3", 9)]
    with tracing.span("relay.many", refs, kind="PRODUCER"):
        pass
    one, many = exporter.get_finished_spans()

    assert one.name == "relay.one"
    assert one.parent is not None and one.parent.is_remote
    assert format(one.parent.span_id, "016x") == "b7ad6b7169203331"
    assert format(one.context.trace_id, "032x") == TRACE_A
    assert dict(one.attributes or {}) == {
        "relay.operation_key": "k1",
        "relay.effect_id": 7,
        "x": "y",
        "relay.verdict": "applied",
    }
    assert one.links == ()

    assert many.parent is None  # no current span: a root with a link per traceparent
    assert many.kind.name == "PRODUCER"
    assert format(many.context.trace_id, "032x") not in {TRACE_A, TRACE_B}
    linked = [
        (format(link.context.trace_id, "032x"), dict(link.attributes or {})) for link in many.links
    ]
    assert linked == [
        (TRACE_A, {"relay.operation_key": "k1", "relay.effect_id": 7}),
        (TRACE_B, {"relay.operation_key": "k2", "relay.effect_id": 8}),
    ]
    attrs = dict(many.attributes or {})
    assert attrs["relay.effect_count"] == 3
    assert list(attrs["relay.operation_keys"]) == ["k1", "k2", "k3"]  # type: ignore[arg-type]
    assert list(attrs["relay.effect_ids"]) == [7, 8, 9]  # type: ignore[arg-type]


def test_a_batch_span_is_a_child_of_the_current_span_and_errors_are_recorded() -> None:
    exporter = memory_exporter()
    with tracing.span("relay.outer"), tracing.span("relay.batch", [EffectRef("a"), EffectRef("b")]):
        pass
    with pytest.raises(ValueError, match="boom"), tracing.span("relay.fails", [EffectRef("c")]):
        raise ValueError("boom")
    batch, outer, fails = exporter.get_finished_spans()
    assert batch.parent is not None and batch.parent.span_id == outer.context.span_id
    assert fails.parent is None  # one effect without a traceparent: nothing to join
    assert fails.status.status_code.name == "ERROR"
    assert [e.name for e in fails.events] == ["exception"]

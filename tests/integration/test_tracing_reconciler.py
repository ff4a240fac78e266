"""The reconciler's spans, on the real broker and database, joined to the requests' traces."""

from __future__ import annotations

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from tests import support
from tests.downstream import harness as h
from tests.downstream import observers
from tests.otel import memory_exporter

TP_RESULT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP_OBSERVED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def rsettings(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    types = h.wire_types(
        prefix, python_observer="tests.downstream.observers:observe", outcome_timeout_s=1.0
    )
    return h.reconciler_settings(
        database_url, services.kafka_bootstrap_servers, prefix, effect_types=types
    )


def test_result_applied_and_observation_are_spans_in_the_requests_traces(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    exporter = memory_exporter()
    url = rsettings.require_database_url()
    observers.ANSWERS["tr-observed"] = "present"
    # Should its result come after the 1 s deadline, tr-result is asked about too, in vain.
    observers.ANSWERS["tr-result"] = "inconclusive"
    with psycopg.connect(url) as conn:
        by_result = relay.enqueue(conn, "wire", "tr-result", h.WIRE, traceparent=TP_RESULT)
        observed = relay.enqueue(
            conn, "wire", "tr-observed", {**h.WIRE, "amount": 7}, traceparent=TP_OBSERVED
        )
        conn.commit()
    keys = ["tr-result", "tr-observed"]
    with support.running(Relay(rsettings)), h.running_reconciler(rsettings):
        support.wait_for(lambda: h.state(url, "tr-result") == "PUBLISHED", 30, "publication")
        h.produce(
            services.kafka_bootstrap_servers,
            f"{prefix}.wire-results",
            [h.result("tr-result", external_id="bank-1")],
        )
        support.wait_for(
            lambda: set(h.states(url, keys).values()) == {"CONFIRMED"}, 60, "both confirmed"
        )

    spans = [
        (s.name, (s.attributes or {}).get("relay.operation_key"), s)
        for s in exporter.get_finished_spans()
    ]
    applied = [s for name, key, s in spans if (name, key) == ("relay.apply_result", "tr-result")]
    observations = [
        s for name, key, s in spans if (name, key) == ("relay.observation", "tr-observed")
    ]
    assert len(applied) == 1, spans
    assert len(observations) == 1, spans

    result_span = applied[0]
    assert result_span.kind.name == "CONSUMER"
    assert result_span.parent is not None
    assert format(result_span.context.trace_id, "032x") == TP_RESULT.split("-")[1]
    assert format(result_span.parent.span_id, "016x") == TP_RESULT.split("-")[2]
    assert dict(result_span.attributes or {}) == {
        "relay.operation_key": "tr-result",
        "relay.effect_id": by_result.effect_id,
        "relay.result.outcome": "committed",
        "relay.verdict": "applied",
    }

    observation_span = observations[0]
    assert observation_span.parent is not None
    assert format(observation_span.context.trace_id, "032x") == TP_OBSERVED.split("-")[1]
    assert format(observation_span.parent.span_id, "016x") == TP_OBSERVED.split("-")[2]
    assert dict(observation_span.attributes or {}) == {
        "relay.operation_key": "tr-observed",
        "relay.effect_id": observed.effect_id,
        "relay.observation.answer": "present",
        "relay.observation.failed": False,
        "relay.verdict": "applied",
        "relay.state": "CONFIRMED",
    }

    # The relay's publish of each intent is a span in (or linked to) the request's trace.
    published: dict[str, str] = {}
    for name, _, s in spans:
        if name != "relay.publish_batch":
            continue
        assert s.kind.name == "PRODUCER"
        acked = (s.attributes or {}).get("relay.outcome.acked")
        assert isinstance(acked, int) and acked >= 1
        joined = [link.context for link in s.links] + ([s.parent] if s.parent else [])
        for context in joined:
            published[format(context.trace_id, "032x")] = format(context.span_id, "016x")
    for traceparent in (TP_RESULT, TP_OBSERVED):
        _, trace_id, span_id, _ = traceparent.split("-")
        assert published.get(trace_id) == span_id, (traceparent, published)

"""One OpenTelemetry SDK tracer provider for the test process, exporting to memory.

OpenTelemetry lets a process set its global tracer provider once, so every test that looks at
spans shares this one and clears it first."""

from __future__ import annotations

from functools import cache

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@cache
def _exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another tracer provider was set first"
    return exporter


def memory_exporter() -> InMemorySpanExporter:
    """The process's exporter, emptied."""
    exporter = _exporter()
    exporter.clear()
    return exporter

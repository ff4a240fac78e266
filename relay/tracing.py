"""OpenTelemetry spans for the relay's work, linked to the trace of the request behind each effect.

Nothing here imports OpenTelemetry until the first span is asked for, and then only once: when
``opentelemetry-api`` is not installed, or no tracer provider has been set, :func:`span` yields a
do-nothing span after one attribute read. An application that sets a provider (the SDK's, or an
auto-instrumentation agent's) sees the relay's spans in the traces of the requests that wrote the
intents.

The ``traceparent`` an intent was enqueued with decides a span's place: a span about one effect
becomes a child of that traceparent (it is part of the request's trace); a span about several
becomes a child of the current span and carries one link per effect's traceparent (a batch has
many causes, which a single parent cannot say).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

AttributeValue = str | bool | int | float | Sequence[str] | Sequence[int]

OPERATION_KEY = "relay.operation_key"
EFFECT_ID = "relay.effect_id"
EFFECT_COUNT = "relay.effect_count"


@dataclass(frozen=True)
class EffectRef:
    """What a span says about one effect."""

    operation_key: str
    effect_id: int | None = None
    traceparent: str | None = None


class Span(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> None: ...


class _NoSpan:
    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None


_NO_SPAN = _NoSpan()
_api: ModuleType | None = None
_checked = False


def _trace_api() -> ModuleType | None:
    """``opentelemetry.trace`` if it can be imported; looked for once per process."""
    global _api, _checked
    if not _checked:
        _checked = True
        if importlib.util.find_spec("opentelemetry") is not None:
            try:
                from opentelemetry import trace
            except ImportError:  # pragma: no cover - a broken installation records nothing
                trace = None  # type: ignore[assignment]
            _api = trace
    return _api


def enabled() -> bool:
    """True when spans would be recorded: the API is installed and a provider has been set."""
    api = _trace_api()
    if api is None:
        return False
    provider = api.get_tracer_provider()
    return not isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider)


def _context_of(traceparent: str | None) -> Any:
    """The remote span context a traceparent names, or None when it names none."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    api = _trace_api()
    assert api is not None
    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    remote = api.get_current_span(ctx).get_span_context()
    return remote if remote.is_valid else None


@contextmanager
def span(
    name: str,
    effects: Sequence[EffectRef] = (),
    attributes: Mapping[str, AttributeValue] | None = None,
    *,
    kind: str = "INTERNAL",
) -> Iterator[Span]:
    """A span about some effects (see the module's note on parents and links).

    ``kind`` is the name of an OpenTelemetry ``SpanKind`` (``"PRODUCER"`` for a publish). An
    exception leaving the block is recorded on the span and marks it as an error.
    """
    if not enabled():
        yield _NO_SPAN
        return
    api = _trace_api()
    assert api is not None
    attrs: dict[str, AttributeValue] = {}
    parent: Any = None
    links: list[Any] = []
    if len(effects) == 1:
        one = effects[0]
        attrs[OPERATION_KEY] = one.operation_key
        if one.effect_id is not None:
            attrs[EFFECT_ID] = one.effect_id
        remote = _context_of(one.traceparent)
        if remote is not None:
            parent = api.set_span_in_context(api.NonRecordingSpan(remote))
    elif effects:
        attrs[EFFECT_COUNT] = len(effects)
        attrs[OPERATION_KEY + "s"] = [e.operation_key for e in effects]
        ids = [e.effect_id for e in effects if e.effect_id is not None]
        if ids:
            attrs[EFFECT_ID + "s"] = ids
        for effect in effects:
            remote = _context_of(effect.traceparent)
            if remote is not None:
                link_attrs: dict[str, AttributeValue] = {OPERATION_KEY: effect.operation_key}
                if effect.effect_id is not None:
                    link_attrs[EFFECT_ID] = effect.effect_id
                links.append(api.Link(remote, link_attrs))
    attrs.update(attributes or {})
    tracer = api.get_tracer("relay")
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=getattr(api.SpanKind, kind),
        attributes=attrs,
        links=links,
    ) as current:
        yield current

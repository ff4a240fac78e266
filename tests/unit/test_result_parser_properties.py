"""Property: whatever bytes arrive on a result topic, the parser answers with a result message or
a reason to quarantine the record, never an exception; and what it keeps is storable text."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.messages import ResultMessage
from relay.reconciler.consumer import parse
from relay.reconciler.effects import clean_text

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "operation_key": st.text(max_size=600) | JSON_VALUES,
        "outcome": st.sampled_from(["committed", "rejected", "unknown", "COMMITTED", ""])
        | JSON_VALUES,
        "external_id": st.none() | st.text(max_size=600) | JSON_VALUES,
        "detail": st.none() | st.text(max_size=5000),
        "extra": JSON_VALUES,
    },
)


def _encoded(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


RECORDS = (
    st.none()
    | st.binary(max_size=300)
    | FIELDS.map(_encoded)
    | JSON_VALUES.map(_encoded)
    | st.tuples(FIELDS.map(_encoded), st.integers(0, 400)).map(lambda t: t[0][: t[1]])
)


@settings(max_examples=200, deadline=None)
@given(RECORDS)
def test_any_record_is_parsed_or_quarantined(value: bytes | None) -> None:
    parsed = parse(value)
    if isinstance(parsed, str):
        assert parsed  # a reason to quarantine, stored as evidence
        stored = clean_text(parsed)
        assert stored is not None
        stored.encode("utf-8")
        return
    assert isinstance(parsed, ResultMessage)
    assert 1 <= len(parsed.operation_key) <= 512
    for text in (parsed.operation_key, parsed.external_id, parsed.detail):
        kept = clean_text(text)
        if kept is not None:
            assert "\x00" not in kept
            kept.encode("utf-8")  # PostgreSQL text: no NUL, no lone surrogate

"""Property: any key, type and payload handed to the enqueue API is either accepted and read
back intact, or refused with an EnqueueError subclass; never another exception (issue 11)."""

from __future__ import annotations

import math
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relay
from relay.config import Settings
from relay.errors import EnqueueError, OperationKeyConflictError

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=16,
)
PAYLOADS = st.dictionaries(st.text(), JSON_VALUES, max_size=5)
KEYS = st.text(max_size=520) | st.text(alphabet="ab\x00\n", max_size=5)
TYPES = st.sampled_from(["email", "wire"]) | st.text(max_size=20)


def same(sent: Any, read: Any) -> bool:
    """JSON equality: a number is a number (jsonb keeps 1e16 as 10000000000000000)."""
    if isinstance(sent, bool) or sent is None or isinstance(sent, str):
        return bool(sent == read and type(sent) is type(read))
    if isinstance(sent, int | float):
        return (
            not isinstance(read, bool)
            and isinstance(read, int | float)
            and (sent == read or math.isclose(float(sent), float(read), rel_tol=1e-15))
        )
    if isinstance(sent, list):
        return (
            isinstance(read, list)
            and len(sent) == len(read)
            and all(same(a, b) for a, b in zip(sent, read, strict=True))
        )
    assert isinstance(sent, dict)
    return (
        isinstance(read, dict)
        and sent.keys() == read.keys()
        and all(same(v, read[k]) for k, v in sent.items())
    )


@pytest.fixture
def conn(settings: Settings) -> Any:
    with psycopg.connect(settings.require_database_url(), autocommit=True) as made:
        yield made


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(effect_type=TYPES, key=KEYS, payload=PAYLOADS)
def test_enqueue_accepts_intact_or_refuses_cleanly(
    conn: psycopg.Connection[Any], effect_type: str, key: str, payload: dict[str, Any]
) -> None:
    try:
        made = relay.enqueue(conn, effect_type, key, payload)
    except OperationKeyConflictError:
        return  # an earlier example used this key for another intent: refused, as it must be
    except EnqueueError as exc:
        assert str(exc)
        return
    effect = relay.get_effect(conn, key)
    assert effect is not None and effect.id == made.effect_id
    if made.created:
        assert effect.effect_type == effect_type and effect.operation_key == key
        assert same(payload, effect.payload), (payload, effect.payload)

"""relay.intents without a database: what is refused before anything is sent, and how each
driver's error shape (psycopg 3, psycopg 2, asyncpg, wrapped by SQLAlchemy or Django) becomes the
relay's exception. The errors are the drivers' own classes, built as the drivers build them."""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pytest
import sqlalchemy.exc
from django.db.utils import DatabaseErrorWrapper
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.pq import DiagnosticField

from relay.errors import (
    EffectNotFoundError,
    InvalidIntentError,
    InvalidTransitionError,
    MigrationError,
    OperationKeyConflictError,
    PayloadTooLargeError,
    RelayError,
    UnknownEffectTypeError,
)
from relay.intents import (
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_DEPTH,
    Effect,
    Enqueued,
    Intent,
    _bad_char,
    as_effect,
    as_enqueued,
    check_intent,
    intent_params,
    translate_errors,
)
from relay.states import EffectState

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _intent(**changes: Any) -> Intent:
    fields: dict[str, Any] = {"effect_type": "email", "operation_key": "k", "payload": {"a": 1}}
    fields.update(changes)
    return Intent(**fields)


def _nested(containers: int) -> dict[str, Any]:
    """A payload of exactly ``containers`` nested objects."""
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(containers - 1):
        doc = {"d": doc}
    return doc


# -- the checks made before the database ----------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "k" * 513, None, 7, "k\x00", "k\ud800"],
    ids=["empty", "513 chars", "None", "int", "NUL", "lone surrogate"],
)
def test_refused_operation_keys(key: Any) -> None:
    with pytest.raises(InvalidIntentError, match="operation key"):
        check_intent(_intent(operation_key=key))


def test_a_key_of_512_characters_is_accepted() -> None:
    assert intent_params(_intent(operation_key="k" * 512))["operation_key"] == "k" * 512


class _Opaque:
    """Not JSON-serialisable, with a repr that is the same in every process (a test id made
    from object()'s repr held its address, and two xdist workers collected different tests)."""

    def __repr__(self) -> str:
        return "_Opaque()"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"effect_type": ""}, "effect type"),
        ({"effect_type": None}, "effect type"),
        ({"effect_type": "e\x00"}, "effect type contains a NUL"),
        ({"business_key": 5}, "business key must be a string"),
        ({"business_key": ""}, "business key must be a string of 1 to 512"),
        ({"business_key": "b" * 513}, "business key must be a string of 1 to 512"),
        ({"business_key": "b\udfff"}, "business key contains a lone surrogate"),
        ({"ordering_group": ""}, "ordering group"),
        ({"ordering_group": "g" * 513}, "ordering group"),
        ({"ordering_group": "g\x00"}, "ordering group contains a NUL"),
        ({"payload": [1, 2]}, "payload must be a JSON object"),
        ({"payload": {"a": "x\x00y"}}, "a payload string contains a NUL"),
        ({"payload": {"a\x00": 1}}, "a payload field name contains a NUL"),
        ({"payload": {"a": ["\ud800"]}}, "a payload string contains a lone surrogate"),
        ({"payload": {"a": float("nan")}}, "not JSON-serialisable"),
        ({"payload": {"a": _Opaque()}}, "not JSON-serialisable"),
        ({"traceparent": TRACE + "\n"}, "not a W3C traceparent"),
        ({"traceparent": TRACE.upper()}, "not a W3C traceparent"),
        ({"traceparent": 1}, "not a W3C traceparent"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None,
)
def test_malformed_intents_are_refused_with_the_reason(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidIntentError, match=match):
        check_intent(_intent(**changes))


def test_nesting_up_to_the_depth_limit_is_accepted_and_one_more_level_refused() -> None:
    check_intent(_intent(payload=_nested(MAX_PAYLOAD_DEPTH)))
    with pytest.raises(InvalidIntentError, match=f"deeper than {MAX_PAYLOAD_DEPTH} levels"):
        check_intent(_intent(payload=_nested(MAX_PAYLOAD_DEPTH + 1)))
    lists: Any = [1]
    for _ in range(MAX_PAYLOAD_DEPTH):
        lists = [lists]
    with pytest.raises(InvalidIntentError, match="deeper"):
        check_intent(_intent(payload={"l": lists}))


def test_a_cycle_is_refused_by_the_depth_limit() -> None:
    doc: dict[str, Any] = {}
    doc["self"] = doc
    with pytest.raises(InvalidIntentError, match="deeper"):
        check_intent(_intent(payload=doc))


def test_payload_size_is_counted_in_utf8_bytes_of_compact_json() -> None:
    limit = 100
    empty = len(b'{"b":""}')
    check_intent(_intent(payload={"b": "x" * (limit - empty)}), max_payload_bytes=limit)
    with pytest.raises(PayloadTooLargeError, match=f"{limit + 1} bytes of JSON"):
        check_intent(_intent(payload={"b": "x" * (limit - empty + 1)}), max_payload_bytes=limit)
    with pytest.raises(PayloadTooLargeError, match="max_payload_bytes"):  # é: two bytes
        check_intent(_intent(payload={"b": "é" * (limit - empty)}), max_payload_bytes=limit)
    assert issubclass(PayloadTooLargeError, InvalidIntentError)


def test_the_default_payload_limit_applies() -> None:
    with pytest.raises(PayloadTooLargeError):
        check_intent(_intent(payload={"b": "x" * MAX_PAYLOAD_BYTES}))


def test_params_are_the_checked_intent_with_compact_json() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    params = intent_params(
        Intent("email", "k1", {"to": "a", "n": [1, 2]}, "b-1", TRACE, at, "g"), 1000
    )
    assert params == {
        "operation_key": "k1",
        "effect_type": "email",
        "payload": '{"to":"a","n":[1,2]}',
        "business_key": "b-1",
        "traceparent": TRACE,
        "available_at": at,
        "ordering_group": "g",
    }
    assert json.loads(params["payload"]) == {"to": "a", "n": [1, 2]}


def test_rows_become_values() -> None:
    assert as_enqueued("k", {"effect_id": 7, "state": "PENDING", "created": True}) == Enqueued(
        7, "k", EffectState.PENDING, True
    )
    now = datetime(2026, 1, 2, tzinfo=UTC)
    row = {
        "id": 1,
        "operation_key": "k",
        "effect_type": "email",
        "topic": "t",
        "payload": {"a": 1},
        "business_key": None,
        "traceparent": None,
        "state": "PUBLISHED",
        "attempts": 1,
        "available_at": now,
        "created_at": now,
        "updated_at": now,
        "reason": None,
        "published_partition": 0,
        "published_offset": 5,
        "published_at": now,
        "outcome_deadline": None,
    }
    effect = as_effect(row)
    assert isinstance(effect, Effect)
    assert effect.state is EffectState.PUBLISHED
    assert effect.published_offset == 5


# -- each driver's error shape ---------------------------------------------------------------------

# What the relay's SQL functions raise (and the SQL-side checks among them: reserved names, the
# business-key template's fields), and the missing-schema codes.
CODES: list[tuple[str, str, type[RelayError]]] = [
    ("RL001", "effect type 'sms' is not declared", UnknownEffectTypeError),
    ("RL002", "effect type 'relay.x' is reserved for the relay", InvalidIntentError),
    ("RL002", "payload of 'k' lacks field 'id' needed by the business key", InvalidIntentError),
    ("RL003", "operation key 'k' names another intent", OperationKeyConflictError),
    ("RL004", "no effect has operation key 'k'", EffectNotFoundError),
    ("RL005", "cannot cancel a PUBLISHED effect", InvalidTransitionError),
    ("RL006", "payload is over max_payload_bytes", PayloadTooLargeError),
    ("42883", "function relay.enqueue does not exist", MigrationError),
    ("3F000", 'schema "relay" does not exist', MigrationError),
    ("42P01", 'relation "relay.effect" does not exist', MigrationError),
]


def _psycopg3(code: str, message: str) -> BaseException:
    """As psycopg 3 builds a server error: the class for the code, the result's fields."""
    info: dict[int, bytes | None] = {
        DiagnosticField.SQLSTATE: code.encode(),
        DiagnosticField.MESSAGE_PRIMARY: message.encode(),
    }
    try:
        cls = psycopg.errors.lookup(code)
    except KeyError:  # the relay's own codes: psycopg's base class for an unknown code
        cls = psycopg.DatabaseError
    return cls(f"ERROR:  {message}\nCONTEXT:  PL/pgSQL function", info=info)


def _psycopg2(code: str, message: str) -> BaseException:
    """As psycopg 2 hands an error across processes (its pickling): ``pgcode`` and ``pgerror``."""
    exc: BaseException = psycopg2.DatabaseError(f"ERROR:  {message}\nCONTEXT:  PL/pgSQL function")
    exc.__setstate__({"pgerror": str(exc), "pgcode": code})
    return exc


def _asyncpg(code: str, message: str) -> BaseException:
    """As asyncpg builds a server error from the message's fields."""
    error: BaseException = asyncpg.exceptions.PostgresError.new({"C": code, "M": message})
    return error


DRIVERS: dict[str, Callable[[str, str], BaseException]] = {
    "psycopg 3": _psycopg3,
    "psycopg 2": _psycopg2,
    "asyncpg": _asyncpg,
}


def _raise(exc: BaseException) -> None:
    with translate_errors():
        raise exc


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(("code", "message", "error"), CODES)
def test_each_drivers_error_becomes_the_relays(
    driver: str, code: str, message: str, error: type[RelayError]
) -> None:
    exc = DRIVERS[driver](code, message)
    with pytest.raises(error) as raised:
        _raise(exc)
    assert type(raised.value) is error
    assert message in str(raised.value)
    if not code.startswith("RL"):
        assert "relay migrate" in str(raised.value)
    elif driver != "psycopg 2":
        # the server's message alone, not the driver's decoration (psycopg 2 has it in ``diag``
        # only for an error read from a server's result, not for one built here)
        assert str(raised.value) == message
    # the driver's error is replaced: its message is the new one's
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


@pytest.mark.parametrize("driver", ["psycopg 3", "psycopg 2"])
def test_sqlalchemys_wrapper_is_looked_through_and_kept_as_the_cause(driver: str) -> None:
    orig = DRIVERS[driver]("RL003", "operation key 'k' names another intent")
    wrapper = sqlalchemy.exc.DBAPIError.instance("SELECT relay.enqueue(...)", {}, orig, Exception)
    with (
        pytest.raises(OperationKeyConflictError, match="names another intent") as raised,
        translate_errors(),
    ):
        raise wrapper from orig
    assert raised.value.__cause__ is wrapper


@pytest.mark.parametrize("driver", ["psycopg 3", "psycopg 2"])
def test_djangos_wrapper_is_looked_through_and_kept_as_the_cause(driver: str) -> None:
    orig = DRIVERS[driver]("RL001", "effect type 'sms' is not declared")
    database = psycopg if driver == "psycopg 3" else psycopg2
    backend = types.SimpleNamespace(Database=database, errors_occurred=False)
    with (
        pytest.raises(UnknownEffectTypeError, match="not declared") as raised,
        translate_errors(),
        DatabaseErrorWrapper(backend),
    ):
        raise orig
    wrapper = raised.value.__cause__
    assert wrapper is not None
    assert type(wrapper).__module__ == "django.db.utils"
    assert wrapper.__cause__ is orig


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.OperationalError("server closed the connection"),
        asyncpg.exceptions.PostgresError.new({"C": "40001", "M": "serialization failure"}),
        ValueError("not a database error"),
        InvalidIntentError("already the relay's"),
    ],
    ids=["another sqlstate", "no sqlstate", "asyncpg other", "not a driver's", "a relay error"],
)
def test_any_other_error_passes_through_unchanged(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as raised:
        _raise(exc)
    assert raised.value is exc


@settings(deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=())), extra=st.text())
def test_a_text_is_refused_exactly_when_postgresql_cannot_store_it(text: str, extra: str) -> None:
    # The check answers an ASCII text without encoding it: it must refuse what the full check
    # refuses (a NUL, a lone surrogate) and nothing else, ASCII or not.
    for candidate in (text, extra, text + extra, extra + "\x00", "\udc80" + extra):
        try:
            candidate.encode("utf-8")
            storable = "\x00" not in candidate
        except UnicodeEncodeError:
            storable = False
        assert (_bad_char(candidate) is None) == storable


@pytest.mark.parametrize(
    "payload",
    [
        {"n": 1, "f": 1.5, "b": True, "none": None, "big": 10**30, "s": "Zoë 🚀"},
        {"deep": [[{"x": [1, 2, {"y": "z"}]}]], "t": (1, "two")},
    ],
)
def test_payload_scalars_and_containers_of_every_kind_pass(payload: dict[str, object]) -> None:
    params = intent_params(Intent("t", "k-1", payload))
    assert json.loads(params["payload"]) == json.loads(json.dumps(payload))

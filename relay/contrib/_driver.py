"""What every integration shares: the same checks, the same rows, the same exceptions.

Frameworks wrap the driver's exception (SQLAlchemy in ``.orig``, Django in ``__cause__``), and
the drivers name the SQLSTATE differently (psycopg 3 and asyncpg ``sqlstate``, psycopg 2
``pgcode``): the code is dug out of the chain and looked up in :mod:`relay.errors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from relay.errors import RelayError, relay_error
from relay.outbox import Enqueued, Intent, _params, _result

__all__ = ["Enqueued", "Intent", "intent_params", "many_params", "result", "translate_errors"]


def intent_params(
    effect_type: str,
    operation_key: str,
    payload: Mapping[str, Any],
    business_key: str | None,
    traceparent: str | None,
    available_at: datetime | None,
    ordering_group: str | None = None,
) -> dict[str, Any]:
    """The checked parameters of one intent; raises before anything reaches the database."""
    return _params(
        Intent(
            effect_type,
            operation_key,
            payload,
            business_key,
            traceparent,
            available_at,
            ordering_group,
        )
    )


def many_params(intents: Iterable[Intent]) -> list[tuple[str, dict[str, Any]]]:
    """Every intent checked first, so one bad intent refuses the batch before any is written."""
    return [(intent.operation_key, _params(intent)) for intent in intents]


def result(operation_key: str, row: Any) -> Enqueued:
    return _result(operation_key, None if row is None else tuple(row))


def _sqlstate(exc: BaseException) -> tuple[str | None, BaseException]:
    """The first SQLSTATE in the exception's chain, and the exception that carried it."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for attr in ("sqlstate", "pgcode"):
            code = getattr(current, attr, None)
            if isinstance(code, str) and len(code) == 5:
                return code, current
        orig = getattr(current, "orig", None)
        pending.extend([orig if isinstance(orig, BaseException) else None, current.__cause__])
    return None, exc


def _message(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if isinstance(primary, str) and primary:
        return primary
    message = getattr(exc, "message", None)  # asyncpg
    if isinstance(message, str) and message:
        return message
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def translate_errors() -> Iterator[None]:
    """A driver error with one of the relay's SQLSTATEs becomes the relay's own exception."""
    try:
        yield
    except RelayError:
        raise
    except Exception as exc:
        code, carrier = _sqlstate(exc)
        error = relay_error(code, _message(carrier))
        if error is None:
            raise
        raise error from exc

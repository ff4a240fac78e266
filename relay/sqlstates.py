"""The SQLSTATEs of the relay's SQL functions and what each means as a relay exception.

One table for every driver: psycopg 3 (``sqlstate``), psycopg 2 (``pgcode``) and asyncpg
(``sqlstate``) all report the same five-character code, so each integration looks the code up
here instead of keeping its own copy.
"""

from __future__ import annotations

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

ERRORS: dict[str, type[RelayError]] = {
    "RL001": UnknownEffectTypeError,
    "RL002": InvalidIntentError,
    "RL003": OperationKeyConflictError,
    "RL004": EffectNotFoundError,
    "RL005": InvalidTransitionError,
    "RL006": PayloadTooLargeError,
}
# undefined function / schema / table: the relay's schema was never migrated into this database
SCHEMA_MISSING = frozenset({"42883", "3F000", "42P01"})


def relay_error(sqlstate: str | None, message: str) -> RelayError | None:
    """The relay exception for a driver error's SQLSTATE, or None when it is not the relay's."""
    if sqlstate in ERRORS:
        return ERRORS[sqlstate](message)
    if sqlstate in SCHEMA_MISSING:
        return MigrationError(f"the relay schema is missing ({message}): run 'relay migrate' first")
    return None

"""The one error hierarchy of the relay, the SQLSTATEs that map onto it, and how an exception is
told in one line.

Every error a caller or operator can meet derives from :class:`RelayError`, so an application can
catch one base class and the CLI can turn any of them into one clear line. The relay's SQL
functions raise their own SQLSTATEs; psycopg 3 (``sqlstate``), psycopg 2 (``pgcode``) and asyncpg
(``sqlstate``) all report the same five-character code, so every driver looks it up here.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base class of every error raised by the relay on purpose."""


class ConfigError(RelayError):
    """The config file or a ``RELAY_*`` variable is invalid; the message names the setting."""


class EffectTypeError(ConfigError):
    """An effect type declaration is unsafe or incomplete (for example a non-idempotent type that
    declares no way to resolve an UNKNOWN outcome)."""


class EnqueueError(RelayError):
    """An intent was refused at enqueue; nothing was written."""


class UnknownEffectTypeError(EnqueueError):
    """The intent names an effect type that is not declared (or not synced by ``relay migrate``)."""


class InvalidIntentError(EnqueueError):
    """The intent is malformed: empty key, payload not a JSON object, business-key field missing."""


class PayloadTooLargeError(InvalidIntentError):
    """The payload's JSON text is larger than the configured limit (``max_payload_bytes``): a
    record the brokers refuse would only be REJECTED later, after holding memory in every claim."""


class OperationKeyConflictError(EnqueueError):
    """The operation key already names an effect with another type or payload.

    Reusing a key for a different intent is almost always a bug in the caller: returning the old
    effect would hide it, and writing a second one would break the key's uniqueness.
    """


class GroupFullError(EnqueueError):
    """The intent's ordering group already holds ``max_pending_per_group`` intents not yet
    published: nothing was written. Retry once the group drains, or raise the limit; one group
    cannot grow without bound behind a head that does not settle."""


class CompensationLimitError(RelayError):
    """The evidence calls for more compensations of one effect than are made automatically: a
    count that large is more likely a broken answer than real executions, so a person decides."""


class EffectNotFoundError(RelayError):
    """No effect has this operation key."""


class InvalidTransitionError(RelayError):
    """The requested change is not allowed from the effect's current state."""


class NotPermittedError(RelayError):
    """The caller may not change this effect: an application cancels only the effects its own
    login enqueued, and never one the relay made (a compensation)."""


class MigrationError(RelayError):
    """The database schema is missing, older or newer than this code, or a migration failed."""


class TickerError(RelayError):
    """The ticker refused a snapshot older than the last tick's: ticks must never go backwards,
    and one that would means the database is not the server the ticks were taken on."""


class ReceiptsUnreadableError(RelayError):
    """The receipts of a producer's transactions cannot prove that a batch did not commit (the
    topic is gone, or records of the batch's time were deleted): it is looked for otherwise."""


class ServiceUnavailableError(RelayError):
    """PostgreSQL or Kafka could not be reached; daemons wait these out, commands report them."""


ERRORS: dict[str, type[RelayError]] = {
    "RL001": UnknownEffectTypeError,
    "RL002": InvalidIntentError,
    "RL003": OperationKeyConflictError,
    "RL004": EffectNotFoundError,
    "RL005": InvalidTransitionError,
    "RL006": PayloadTooLargeError,
    "RL007": NotPermittedError,
    "RL008": GroupFullError,
}
# undefined function / schema / table: the relay's schema was never migrated into this database
SCHEMA_MISSING = frozenset({"42883", "3F000", "42P01"})


def relay_error(sqlstate: str | None, message: str) -> RelayError | None:
    """The relay exception for a driver error's SQLSTATE, or None when it is not the relay's."""
    if sqlstate in ERRORS:
        return ERRORS[sqlstate](message)
    if sqlstate == "22P02" and "relay.effect_type_name" in message:
        # The intake's enum refused the type (an intent's plain INSERT has no other check).
        name = message.rpartition(": ")[2].strip('"')
        return UnknownEffectTypeError(
            f"effect type '{name}' is not declared (declare it in the config file and run "
            "relay migrate as the schema owner)"
        )
    if sqlstate in SCHEMA_MISSING:
        return MigrationError(f"the relay schema is missing ({message}): run 'relay migrate' first")
    return None


def describe(exc: BaseException) -> str:
    """One line for an exception: its class and its text, once (kafka-python repeats the name)."""
    text = str(exc).strip()
    name = type(exc).__name__
    if not text or text == name:
        return name
    prefix = f"{name}: "
    while text.startswith(prefix):
        text = text.removeprefix(prefix).strip()
    return f"{prefix}{text}" if text else name

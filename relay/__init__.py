"""A transactional outbox relay for PostgreSQL and Apache Kafka that knows what it does not know.

Applications record intents with :func:`enqueue` inside their own transaction; ``relay run``
publishes them; an ambiguous publish becomes a durable UNKNOWN state instead of a blind retry.
"""

from relay.errors import (
    ConfigError,
    EffectNotFoundError,
    EffectTypeError,
    EnqueueError,
    GroupFullError,
    InvalidIntentError,
    InvalidTransitionError,
    MigrationError,
    NotPermittedError,
    OperationKeyConflictError,
    PayloadTooLargeError,
    RelayError,
    ServiceUnavailableError,
    UnknownEffectTypeError,
)
from relay.outbox import (
    MAX_PAYLOAD_BYTES,
    Effect,
    Enqueued,
    Intent,
    cancel,
    cancel_async,
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
    get_effect,
    get_effect_async,
)
from relay.states import EffectState

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "ConfigError",
    "Effect",
    "EffectNotFoundError",
    "EffectState",
    "EffectTypeError",
    "EnqueueError",
    "Enqueued",
    "GroupFullError",
    "Intent",
    "InvalidIntentError",
    "InvalidTransitionError",
    "MigrationError",
    "NotPermittedError",
    "OperationKeyConflictError",
    "PayloadTooLargeError",
    "RelayError",
    "ServiceUnavailableError",
    "UnknownEffectTypeError",
    "cancel",
    "cancel_async",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "get_effect",
    "get_effect_async",
]

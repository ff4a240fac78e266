"""How one publish attempt ended, and how an exception is classified.

The whole product rests on this distinction: a *definite* refusal (the broker or the client said
no, nothing was appended) may end an effect; an *ambiguous* end (timeout, lost connection, an
error after the request may have reached the broker) must never be treated as a failure and
retried blindly. When in doubt, an exception is ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kafka import errors as kerr

from relay.errors import describe
from relay.states import EffectState


class AttemptOutcome(StrEnum):
    ACKED = "acked"  # Kafka acknowledged the record: it is in the log at (partition, offset)
    REJECTED = "rejected"  # definitely refused; retrying the same record cannot succeed
    UNKNOWN = "unknown"  # may or may not be in the log: to be verified, never blindly retried
    NOT_SENT = "not_sent"  # provably never handed to the network; safe to try again later
    RELEASED = "released"  # given back unsent at shutdown
    ABORTED = "aborted"  # its Kafka transaction was aborted: invisible to read_committed readers


STATE_AFTER: dict[AttemptOutcome, EffectState] = {
    AttemptOutcome.ACKED: EffectState.PUBLISHED,
    AttemptOutcome.REJECTED: EffectState.REJECTED,
    AttemptOutcome.UNKNOWN: EffectState.UNKNOWN,
    AttemptOutcome.NOT_SENT: EffectState.PENDING,
    AttemptOutcome.RELEASED: EffectState.PENDING,
    AttemptOutcome.ABORTED: EffectState.PENDING,
}

# Broker answers that mean the batch was refused and not appended, and that the same record
# would be refused again. Retriable errors are absent on purpose: after the client's own retries
# they end as timeouts, which are ambiguous.
_DEFINITE_BROKER_ERRORS: tuple[type[Exception], ...] = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.InvalidTopicError,
    kerr.TopicAuthorizationFailedError,
    kerr.ClusterAuthorizationFailedError,
    kerr.InvalidRecordError,
    kerr.InvalidTimestampError,
    kerr.UnsupportedForMessageFormatError,
    kerr.PolicyViolationError,
    kerr.InvalidRequiredAcksError,
)


@dataclass(frozen=True)
class Classified:
    outcome: AttemptOutcome
    reason: str


def classify_send_error(exc: BaseException) -> Classified:
    """An exception raised by ``producer.send()`` itself, before the record entered the buffer.

    Nothing was handed to the network, so the only question is whether trying again can help.
    """
    if isinstance(exc, kerr.MessageSizeTooLargeError):
        return Classified(AttemptOutcome.REJECTED, f"refused by the client: {describe(exc)}")
    if isinstance(exc, _DEFINITE_BROKER_ERRORS):
        return Classified(AttemptOutcome.REJECTED, describe(exc))
    return Classified(AttemptOutcome.NOT_SENT, f"not sent: {describe(exc)}")


def classify_delivery_error(exc: BaseException) -> Classified:
    """An exception delivered through a send's future: the record was in flight."""
    if isinstance(exc, _DEFINITE_BROKER_ERRORS):
        return Classified(AttemptOutcome.REJECTED, f"refused by the broker: {describe(exc)}")
    return Classified(AttemptOutcome.UNKNOWN, f"ambiguous end of publish: {describe(exc)}")

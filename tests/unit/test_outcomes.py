from __future__ import annotations

from datetime import UTC, datetime

import pytest
from kafka import errors as kerr

from relay.dispatch.outcomes import (
    STATE_AFTER,
    AttemptOutcome,
    classify_delivery_error,
    classify_send_error,
)
from relay.headers import dispatch_headers
from relay.states import EffectState


@pytest.mark.parametrize(
    "exc",
    [
        kerr.KafkaTimeoutError("Batch expired"),
        kerr.KafkaConnectionError("reset"),
        kerr.RequestTimedOutError(),
        kerr.NotLeaderForPartitionError(),
        kerr.OutOfOrderSequenceNumberError(),
        RuntimeError("something nobody expected"),
    ],
)
def test_in_flight_failures_are_ambiguous(exc: Exception) -> None:
    verdict = classify_delivery_error(exc)
    assert verdict.outcome is AttemptOutcome.UNKNOWN
    assert STATE_AFTER[verdict.outcome] is EffectState.UNKNOWN


@pytest.mark.parametrize(
    "exc",
    [
        kerr.MessageSizeTooLargeError(),
        kerr.InvalidTopicError(),
        kerr.TopicAuthorizationFailedError(),
        kerr.RecordListTooLargeError(),
    ],
)
def test_definite_refusals_are_rejections(exc: Exception) -> None:
    assert classify_delivery_error(exc).outcome is AttemptOutcome.REJECTED


def test_send_errors_never_left_the_client() -> None:
    too_big = classify_send_error(kerr.MessageSizeTooLargeError("2000000 bytes"))
    assert too_big.outcome is AttemptOutcome.REJECTED
    assert "2000000" in too_big.reason
    no_metadata = classify_send_error(kerr.KafkaTimeoutError("no metadata"))
    assert no_metadata.outcome is AttemptOutcome.NOT_SENT
    assert STATE_AFTER[no_metadata.outcome] is EffectState.PENDING


def test_headers_follow_cloudevents_binary_binding() -> None:
    created = datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC)
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    headers = dict(
        dispatch_headers(
            effect_id=42,
            effect_type="wire",
            attempt=2,
            created_at=created,
            source="/relay",
            business_key="ACC:100",
            traceparent=traceparent,
        )
    )
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == b"42"
    assert headers["ce_type"] == b"wire"
    assert headers["ce_source"] == b"/relay"
    assert headers["ce_time"] == b"2026-11-22T12:00:00.123456Z"
    assert headers["content-type"] == b"application/json"
    assert headers["relay_attempt"] == b"2"
    assert headers["relay_business_key"] == b"ACC:100"
    assert headers["traceparent"] == traceparent.encode()


def test_optional_headers_are_absent_when_unknown() -> None:
    headers = dict(
        dispatch_headers(
            effect_id=1,
            effect_type="email",
            attempt=1,
            created_at=datetime.now(UTC),
            source="/relay",
            business_key=None,
            traceparent=None,
        )
    )
    assert "traceparent" not in headers
    assert "relay_business_key" not in headers


def test_describe_names_the_error_once() -> None:
    from kafka import errors as kerr

    from relay.errors import describe

    assert describe(kerr.KafkaTimeoutError("no answer")) == "KafkaTimeoutError: no answer"
    nested = kerr.KafkaError("KafkaError: Cannot execute transactional method")
    assert describe(nested) == "KafkaError: Cannot execute transactional method"
    assert describe(ValueError()) == "ValueError"


def test_every_attempt_outcome_has_its_metric_series() -> None:
    """Observability names the outcomes itself (it imports nothing from dispatch): same names."""
    from relay.observability.metrics import ATTEMPT_OUTCOMES

    assert sorted(ATTEMPT_OUTCOMES) == sorted(o.value for o in AttemptOutcome)

"""The Kafka side of the relay: one producer, and one batch published with every future checked."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kafka import KafkaProducer
from kafka import errors as kerr

from relay.config import Settings
from relay.headers import dispatch_headers
from relay.outcomes import (
    AttemptOutcome,
    Classified,
    classify_delivery_error,
    classify_send_error,
    describe,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedEffect:
    """One effect claimed for publication, with the number of the attempt recorded for it."""

    id: int
    operation_key: str
    effect_type: str
    topic: str
    payload: str
    business_key: str | None
    traceparent: str | None
    attempt: int
    created_at: datetime


@dataclass(frozen=True)
class PublishResult:
    effect: ClaimedEffect
    outcome: AttemptOutcome
    reason: str | None = None
    partition: int | None = None
    offset: int | None = None


def kafka_security(settings: Settings) -> dict[str, Any]:
    """Client settings shared by every Kafka client the relay makes."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile:
        config["ssl_cafile"] = settings.kafka_ssl_cafile
    return config


def make_producer(settings: Settings) -> KafkaProducer:
    """An idempotent producer with acks=all, set explicitly (see pitfalls: silent downgrade)."""
    timeout_ms = int(settings.publish_timeout_s * 1000)
    return KafkaProducer(
        **kafka_security(settings),
        client_id=f"relay-{settings.replica_id}",
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        linger_ms=settings.linger_ms,
        batch_size=256 * 1024,
        max_request_size=settings.max_request_size,
        delivery_timeout_ms=timeout_ms,
        request_timeout_ms=max(1000, min(30_000, timeout_ms - 500)),
        max_block_ms=min(10_000, timeout_ms),
    )


def publish_batch(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    *,
    source: str,
    timeout_s: float,
) -> list[PublishResult]:
    """Send every record and wait for each one's own answer, within ``timeout_s`` in all.

    ``flush()`` alone would hide failed records; each future is asked. A topic whose metadata
    could not be had is not tried again within the batch, so one bad topic costs one wait.
    """
    results: list[PublishResult | None] = [None] * len(batch)
    pending: list[tuple[int, Any]] = []
    unavailable: dict[str, Classified] = {}
    for index, effect in enumerate(batch):
        if effect.topic in unavailable:
            verdict = unavailable[effect.topic]
            results[index] = PublishResult(effect, verdict.outcome, verdict.reason)
            continue
        headers = dispatch_headers(
            effect_id=effect.id,
            effect_type=effect.effect_type,
            attempt=effect.attempt,
            created_at=effect.created_at,
            source=source,
            business_key=effect.business_key,
            traceparent=effect.traceparent,
        )
        try:
            future = producer.send(
                effect.topic,
                key=effect.operation_key.encode(),
                value=effect.payload.encode(),
                headers=headers,
            )
        except Exception as exc:
            verdict = classify_send_error(exc)
            if isinstance(exc, kerr.KafkaTimeoutError):
                unavailable[effect.topic] = verdict
            results[index] = PublishResult(effect, verdict.outcome, verdict.reason)
            continue
        pending.append((index, future))

    deadline = time.monotonic() + timeout_s
    try:
        producer.flush(timeout=timeout_s)
    except kerr.KafkaTimeoutError:
        log.warning("flush did not finish within %.1fs; unanswered records end UNKNOWN", timeout_s)
    for index, future in pending:
        effect = batch[index]
        remaining = max(0.0, deadline - time.monotonic())
        try:
            metadata = future.get(timeout=remaining)
        except Exception as exc:
            if not future.is_done:
                reason = f"ambiguous end of publish: no answer within {timeout_s:.1f}s"
                results[index] = PublishResult(effect, AttemptOutcome.UNKNOWN, reason)
            else:
                verdict = classify_delivery_error(exc)
                results[index] = PublishResult(effect, verdict.outcome, verdict.reason)
            continue
        reason = f"acknowledged by Kafka: partition {metadata.partition} offset {metadata.offset}"
        results[index] = PublishResult(
            effect, AttemptOutcome.ACKED, reason, metadata.partition, metadata.offset
        )
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # pragma: no cover - defensive: every index is filled above
        raise AssertionError(f"records without an outcome: {missing}")
    return [r for r in results if r is not None]


def close_quietly(producer: KafkaProducer | None, timeout_s: float = 5.0) -> None:
    if producer is None:
        return
    try:
        producer.close(timeout=timeout_s)
    except Exception as exc:
        log.warning("closing the Kafka producer failed: %s", describe(exc))

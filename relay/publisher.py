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
    failed_in_flight: bool = False  # the error came through the future: the producer is suspect


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


def estimated_record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of the record's size in a one-record batch (v2 format overheads)."""
    header_bytes = sum(len(k.encode()) + len(v) + 10 for k, v in headers)
    return 61 + 21 + len(key) + len(value) + header_bytes


def publish_batch(
    producer: KafkaProducer,
    batch: Sequence[ClaimedEffect],
    *,
    source: str,
    timeout_s: float,
    limit_bytes: int,
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
        key, value = effect.operation_key.encode(), effect.payload.encode()
        size = estimated_record_size(key, value, headers)
        if size > limit_bytes:
            reason = (
                f"refused by the relay: a record of about {size} bytes exceeds the limit of "
                f"{limit_bytes} bytes (max_message_bytes / max_request_size)"
            )
            results[index] = PublishResult(effect, AttemptOutcome.REJECTED, reason)
            continue
        try:
            future = producer.send(
                effect.topic,
                key=key,
                value=value,
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
                results[index] = PublishResult(
                    effect, AttemptOutcome.UNKNOWN, reason, failed_in_flight=True
                )
            else:
                verdict = classify_delivery_error(exc)
                results[index] = PublishResult(
                    effect, verdict.outcome, verdict.reason, failed_in_flight=True
                )
            continue
        reason = f"acknowledged by Kafka: partition {metadata.partition} offset {metadata.offset}"
        results[index] = PublishResult(
            effect, AttemptOutcome.ACKED, reason, metadata.partition, metadata.offset
        )
    # kafka-python's idempotent producer treats a broker refusal as fatal and aborts its other
    # batches with the same error: with several refusals, which record was at fault is unknown.
    refused = [
        r
        for r in results
        if r is not None
        and r.outcome is AttemptOutcome.REJECTED
        and r.reason
        and r.reason.startswith("refused by the broker")
    ]
    if len(refused) > 1:
        for i, r in enumerate(results):
            if r is not None and r in refused:
                results[i] = PublishResult(
                    r.effect,
                    AttemptOutcome.UNKNOWN,
                    f"ambiguous: {len(refused)} records failed together ({r.reason}); the "
                    "producer aborts its other batches after a refusal, so the culprit is unknown",
                    failed_in_flight=True,
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

"""Kafka clients as the relay makes them: the connection and security settings every client
shares, the producer's settings, and closing a producer that may be broken."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from kafka import KafkaProducer
from kafka.structs import MemberState

from relay.config import Settings
from relay.errors import describe

log = logging.getLogger(__name__)


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
    if settings.kafka_ssl_certfile:
        # Mutual TLS: the brokers authenticate the relay by this certificate.
        config["ssl_certfile"] = settings.kafka_ssl_certfile
        if settings.kafka_ssl_keyfile:
            config["ssl_keyfile"] = settings.kafka_ssl_keyfile
        if settings.kafka_ssl_password is not None:
            config["ssl_password"] = settings.kafka_ssl_password.get_secret_value()
    return config


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict[str, Any]:
    """The producer's configuration: idempotent, acks=all set explicitly (see pitfalls: silent
    downgrade), transactional when given a transactional id."""
    timeout_ms = int(settings.publish_timeout_s * 1000)
    extra: dict[str, Any] = {}
    if transactional_id is not None:
        extra["transactional_id"] = transactional_id
        extra["transaction_timeout_ms"] = int(settings.transaction_timeout_s * 1000)
        # A transaction begun right after a commit meets CONCURRENT_TRANSACTIONS while the
        # markers are written; the default 100 ms backoff (and the sender's sleep before each
        # retry) then dominate the latency of small batches.
        extra["retry_backoff_ms"] = 3
    return {
        **kafka_security(settings),
        **extra,
        "client_id": f"relay-{settings.replica_id}",
        "acks": "all",
        "enable_idempotence": True,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": settings.linger_ms,
        "compression_type": settings.kafka_compression_type,
        "batch_size": 256 * 1024,
        "max_request_size": settings.max_request_size,
        "delivery_timeout_ms": timeout_ms,
        # kafka-python requires delivery > linger + request timeout (Settings checks the room).
        "request_timeout_ms": max(1000, min(30_000, timeout_ms - settings.linger_ms - 500)),
        "max_block_ms": min(10_000, timeout_ms),
        "bootstrap_timeout_ms": min(10_000, timeout_ms),
    }


def make_producer(settings: Settings, transactional_id: str | None = None) -> KafkaProducer:
    """A producer of :func:`producer_config` (the caller runs init_transactions when it is
    transactional)."""
    return KafkaProducer(**producer_config(settings, transactional_id))


def close_quietly(producer: KafkaProducer | None, timeout_s: float = 5.0) -> None:
    if producer is None:
        return
    try:
        producer.close(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - closing a broken producer must not hide the cause
        log.warning("closing the Kafka producer failed: %s", describe(exc))
        # close() gave up at its flush and left its network thread running, holding connections
        # and unsent records: stop the thread (its records fail), then finish closing.
        if producer._sender is not None:
            producer._sender.force_close()
            producer._sender.join(timeout_s)
        with contextlib.suppress(Exception):
            producer.close(timeout=0)


def rejoin_if_stranded(consumer: Any) -> bool:
    """Start the group join again if kafka-python stranded the last one; True if it did.

    kafka-python 3.0.12 loses a join whose answer arrives after the ``poll()`` that started it
    gave up waiting, when the join was started by a change of the topics' partitions: the
    member stays "rebalancing" with no partitions and no heartbeats, its finished join never
    read, until the partitions change again (a test's consumer waited 60 s so). Private
    attributes, read defensively: on a client without them this does nothing."""
    coordinator = getattr(consumer, "_coordinator", None)
    join = getattr(coordinator, "_join_task", None)
    if coordinator is None or join is None:
        return False
    if getattr(coordinator, "state", None) != MemberState.REBALANCING:
        return False
    if not getattr(join, "is_done", False) or coordinator.need_rejoin():
        return False
    log.warning("kafka-python left a finished group join unread: joining the group again")
    coordinator.request_rejoin()
    return True

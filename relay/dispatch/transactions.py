"""Kafka transactions with every call bounded, and fencing of another replica's producer.

kafka-python's ``commit_transaction()`` and ``abort_transaction()`` wait without a timeout: a
coordinator that stops answering would hang the relay forever. The bounded forms below wait on
the same request result with a deadline; on expiry the caller must throw the producer away (a
new one, with a new epoch, fences whatever the old one left open).
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaProducer
from kafka import errors as kerr

from relay.config import Settings
from relay.kafka_client import close_quietly, kafka_security

log = logging.getLogger(__name__)


class TransactionTimeoutError(kerr.KafkaTimeoutError):  # type: ignore[misc]
    """A transaction call did not finish within its bound: its outcome is unknown."""


def transactional_id(replica_id: str) -> str:
    """Stable per replica, so a restarted or replaced replica fences its predecessor."""
    return f"relay-{replica_id}"


def _wait(result: Any, timeout_s: float, what: str) -> None:
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise TransactionTimeoutError(f"{what} did not complete within {timeout_s:.1f}s")


def commit(producer: KafkaProducer, timeout_s: float) -> None:
    """``commit_transaction()`` with a deadline (see the module docstring)."""
    result = producer._transaction_manager.begin_commit()
    producer._sender.wakeup()
    _wait(result, timeout_s, "commit_transaction")


def abort(producer: KafkaProducer, timeout_s: float) -> None:
    """``abort_transaction()`` with a deadline."""
    result = producer._transaction_manager.begin_abort()
    producer._sender.wakeup()
    _wait(result, timeout_s, "abort_transaction")


def fence(settings: Settings, replica_id: str) -> None:
    """Fence every earlier producer of ``replica_id``: its open transaction is aborted, and it
    can neither write nor commit any more. Raises a KafkaError if Kafka cannot be reached."""
    timeout_ms = int(min(settings.publish_timeout_s, 30.0) * 1000)
    producer = KafkaProducer(
        **kafka_security(settings),
        client_id=f"relay-fence-{settings.replica_id}",
        transactional_id=transactional_id(replica_id),
        enable_idempotence=True,
        acks="all",
        max_block_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )
    try:
        producer.init_transactions()
    finally:
        close_quietly(producer, timeout_s=1.0)
    log.info("fenced the producers of replica %s", replica_id)

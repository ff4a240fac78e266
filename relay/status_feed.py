"""Status events for applications: one per transition, typed, filtered by effect type.

The events are made from the transitions log: a transition written while status events are on
(switched by ``relay reconcile`` at start) is marked pending in the same transaction, and the
relay's status-event stage (:mod:`relay.dispatch.status_events`) publishes the pending ones in
log order, transitions they imply (the enqueue, the claim) included, in Kafka transactions: they
are never lost nor published twice, and are read ``read_committed``. Their Kafka key is the
operation key of the effect they report on, so one effect's events share a partition, and one
publisher at a time keeps them in the order of its transitions. With Kafka transactions on, the
events of an intent claimed in a batch whose type awaits no result ride in the batch's
transaction instead (enqueued, claimed, published; ``ce_id`` ``<effect id>.b<batch id>.<part>``):
visible if and only if its record is, and told once either way.

Example::

    from relay.reconciler import StatusFeed

    with StatusFeed.from_settings(settings, group_id="billing", effect_types={"wire"}) as feed:
        for event in feed:                       # relay.messages.StatusMessage
            if event.state == "CONFIRMED":
                mark_paid(event.operation_key)
            feed.commit()                        # after handling: at-least-once
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from types import TracebackType
from typing import Any

from kafka import KafkaConsumer
from pydantic import ValidationError

from relay.config import Settings
from relay.kafka_client import kafka_security
from relay.messages import StatusMessage

log = logging.getLogger(__name__)


class StatusFeed:
    """A read_committed Kafka consumer of the status topic that yields :class:`StatusMessage`.

    ``effect_types`` limits the events to those types (None: all). With a ``group_id`` the feed
    resumes where the group committed (call :meth:`commit` after handling events); without one it
    reads from the beginning (or the end, ``from_beginning=False``) and commits nothing.
    Malformed records are skipped and counted in ``skipped``.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str = "relay.status",
        group_id: str | None = None,
        effect_types: Collection[str] | None = None,
        from_beginning: bool = True,
        **kafka_config: Any,
    ) -> None:
        self.topic = topic
        self.effect_types = frozenset(effect_types) if effect_types is not None else None
        self.skipped = 0
        self._closed = False
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers.split(","),
            "group_id": group_id,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "auto_offset_reset": "earliest" if from_beginning else "latest",
            **kafka_config,
        }
        self._consumer = KafkaConsumer(**config)
        self._consumer.subscribe([topic])

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        group_id: str | None = None,
        effect_types: Collection[str] | None = None,
        from_beginning: bool = True,
    ) -> StatusFeed:
        """A feed with the relay's own Kafka connection settings and status topic."""
        security = kafka_security(settings)
        bootstrap = ",".join(security.pop("bootstrap_servers"))
        return cls(
            bootstrap,
            topic=settings.status_topic,
            group_id=group_id,
            effect_types=effect_types,
            from_beginning=from_beginning,
            **security,
        )

    def poll(self, timeout_s: float = 1.0) -> list[StatusMessage]:
        """The events that arrived within ``timeout_s`` (maybe none), in partition order."""
        batch = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        events: list[StatusMessage] = []
        for records in batch.values():
            for record in records:
                try:
                    event = StatusMessage.model_validate_json(record.value or b"")
                except ValidationError as exc:
                    self.skipped += 1
                    log.warning(
                        "skipped a malformed status record at %s/%s@%s: %s",
                        record.topic,
                        record.partition,
                        record.offset,
                        exc.errors()[0]["msg"],
                    )
                    continue
                if self.effect_types is None or event.effect_type in self.effect_types:
                    events.append(event)
        return events

    def __iter__(self) -> Iterator[StatusMessage]:
        while not self._closed:
            yield from self.poll()

    def commit(self) -> None:
        """Commit what has been polled so far (only with a ``group_id``)."""
        self._consumer.commit()

    def close(self) -> None:
        self._closed = True
        self._consumer.close(autocommit=False)

    def __enter__(self) -> StatusFeed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

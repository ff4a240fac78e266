"""Status events at the cost of a log: the relay publishes the transitions log itself.

Every transition written while status events are on waits in a small partial index
(``status_pending``). One relay replica at a time (a lease row) reads them in log order, records
which ones it hands to Kafka (``inflight``) before sending them in one Kafka transaction, and
clears them once committed. One effect's transitions are written in order under its row lock,
so log order is their order, and a single publisher keeps it on the effect's partition (the key
is the effect's operation key).

Exactly once: the publisher's transactional id is shared by every holder, so a new holder's
``init_transactions`` fences the old one and aborts its open transaction. If a holder dies or a
commit ends without an answer between Kafka and the database, the next pass (by any replica)
looks for the in-flight events in the status topic, read_committed, after fencing: found (a
transaction is all or nothing), they are recorded as published; absent, they are sent again.

The happy path of an intent claimed in a batch whose type awaits no result writes no log at all:
its events ride in the batch's own Kafka transaction (:func:`relay.dispatch.publisher.
batch_status_records`). The log's events of such an intent whose transaction's commit went
unanswered are held (``relay.status_held``, skipped here) until its record is looked for.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from kafka import KafkaProducer
from kafka import errors as kerr

from relay.config import Settings
from relay.dispatch import transactions
from relay.dispatch.appender import Appender
from relay.dispatch.lookup import Found, Unprovable, Wanted, find_attempts, open_consumer
from relay.dispatch.publisher import estimated_record_size, key_partition
from relay.dispatch.stage import Held, Identity, Stage
from relay.dispatch.status_records import status_value
from relay.errors import describe
from relay.headers import STATUS_EVENT_TYPE, status_headers
from relay.kafka_client import close_quietly, make_producer
from relay.logs import KAFKA
from relay.sql import query

log = logging.getLogger(__name__)

STATUS_TRANSACTIONAL_ID = "relay-status-events"
"""The status publisher's transactional id, before the suffix naming its database."""
STATUS_BATCH = 2000
IDLE_WAIT_S = 0.02
IDLE_WAIT_MAX_S = 0.5


class _Event(NamedTuple):
    """A transition whose status event is due (columns of status_batch): the row itself
    (part 2) or a transition it implies (0: the enqueue, 1: the claim)."""

    transition_id: int
    part: int
    effect_id: int
    operation_key: str
    effect_type: str
    from_state: str | None
    to_state: str
    reason: str
    attempt: int
    at: datetime
    traceparent: str | None


def status_transactional_id(conn: psycopg.Connection[Any]) -> str:
    """One per database: the replicas of one installation share it, so that each holder of the
    lease fences the one before; two installations sharing a Kafka cluster never do (one fixed
    id had each fence the other's publisher at every turn, and neither published for long)."""
    return f"{STATUS_TRANSACTIONAL_ID}-{installation_digest(conn)}"


def installation_digest(conn: psycopg.Connection[Any]) -> str:
    """What tells installations sharing a Kafka cluster apart: made from the cluster's system
    identifier (kept by its physical standbys through a failover) and the database's name."""
    try:
        row = conn.execute(query("database_identity")).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        if not conn.autocommit:
            conn.rollback()
        row = conn.execute(query("database_name")).fetchone()
    assert row is not None
    return hashlib.sha256(f"{row[0]}/{row[1]}".encode()).hexdigest()[:16]


class StatusPublisher(Stage):
    """The stage that publishes status events while this replica holds the status lease."""

    name = "status"

    def __init__(self, settings: Settings, who: Identity, held: Held, stop: threading.Event):
        super().__init__(settings, who, held, stop)
        self.producer: KafkaProducer | None = None
        self.published = 0
        self._lease_s = max(10.0, settings.lease_s / 3)
        self._renew_at = 0.0
        self._idle_s = 0.0
        self._inflight: list[int] = []
        self._inflight_at: datetime | None = None

    def drop_producer(self) -> None:
        close_quietly(self.producer, timeout_s=2.0)
        self.producer = None

    def step(self) -> None:
        try:
            self._step()
        except BaseException:
            self._renew_at = 0.0  # whatever went wrong: read the in-flight set again first
            raise

    def _step(self) -> None:
        conn = self.connect()
        if time.monotonic() >= self._renew_at:
            row = conn.execute(
                query("take_status_lease"),
                {"owner": self.who.replica_id, "epoch": self.who.epoch, "lease_s": self._lease_s},
            ).fetchone()
            if row is None:  # another replica publishes them
                self.drop_producer()
                self.stop.wait(self._lease_s / 3)
                return
            # Renewed well before it lapses; a lapse under us is caught by status_inflight.
            self._renew_at = time.monotonic() + self._lease_s / 3
            self._inflight, self._inflight_at = list(row[0] or []), row[1]
        try:
            producer = self._producer(conn)
            if self._inflight:
                self._settle(conn, self._inflight, self._inflight_at)
                self._inflight = []
                return
            rows = conn.execute(query("status_batch"), {"limit": STATUS_BATCH}).fetchall()
            if not rows:
                # Nothing due: look again soon, less often the longer it stays quiet.
                self._idle_s = min(IDLE_WAIT_MAX_S, max(IDLE_WAIT_S, self._idle_s * 2))
                self.stop.wait(self._idle_s)
                return
            self._idle_s = 0.0
            self._publish(conn, producer, [_Event(*r) for r in rows])
        except (kerr.KafkaError, OSError) as exc:
            self.drop_producer()
            self._renew_at = 0.0  # read what is in flight again before going on
            KAFKA.down(f"status events: {describe(exc)}")  # once per outage, not per retry
            self.stop.wait(2.0)

    def _producer(self, conn: psycopg.Connection[Any]) -> KafkaProducer:
        if self.producer is None:
            producer = make_producer(self.settings, status_transactional_id(conn))
            try:
                # Fences every earlier holder: its open transaction is aborted, and from here on
                # what it left in flight can be looked for.
                producer.init_transactions()
            except BaseException:
                close_quietly(producer, timeout_s=1.0)
                raise
            self.producer = producer
        return self.producer

    def _publish(
        self, conn: psycopg.Connection[Any], producer: KafkaProducer, events: list[_Event]
    ) -> None:
        ids = sorted({e.transition_id for e in events})
        # Legacy status effects (before migration 0004) report nothing about themselves.
        due = [e for e in events if e.effect_type != STATUS_EVENT_TYPE]
        recorded = conn.execute(
            query("status_inflight"),
            {"ids": ids, "owner": self.who.replica_id, "epoch": self.who.epoch},
        ).fetchone()
        if recorded is None:
            return  # the lease lapsed under us: the next holder goes on from here
        if not due:
            self._record(conn, ids)
            return
        timeout_s = self.settings.publish_timeout_s
        try:
            topic = self.settings.status_topic
            # Partitions as kafka-python's partitioner would pick them from the keys, so that
            # the records go through the appender (relay/dispatch/appender.py).
            ordered = sorted(producer.partitions_for(topic))
            producer.begin_transaction()
            appender = Appender(producer)
            slots = []
            for e in due:
                key = e.operation_key.encode()
                headers = status_headers(
                    effect_id=e.effect_id,
                    transition_id=e.transition_id,
                    part=e.part,
                    at=e.at,
                    source=self.settings.cloudevents_source,
                    traceparent=e.traceparent,
                )
                value = _event_value(e)
                # send() refused a record over max_request_size before it went out; so does this.
                size = estimated_record_size(key, value, headers)
                if size > producer.config["max_request_size"]:
                    raise kerr.MessageSizeTooLargeError(
                        f"a status event of about {size} bytes exceeds max_request_size"
                    )
                partition = key_partition(key, ordered) if ordered else None
                slots.append(appender.add(topic, partition, key, value, headers))
            sent = appender.flush()
            for slot in slots:
                if isinstance(sent[slot], Exception):
                    raise sent[slot]
            producer.flush(timeout=timeout_s)
            for slot in slots:
                sent[slot].get(timeout=timeout_s)
            transactions.commit(producer, timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure: settle the in-flight set later
            if isinstance(exc, kerr.KafkaError):
                KAFKA.down(f"status events not published (looked for before resending): {exc}")
            else:
                log.warning("status events not published (looked for before resending): %s", exc)
            self.drop_producer()
            self._renew_at = 0.0
            return
        self._record(conn, ids)
        self.published += len(due)

    def _record(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        conn.execute(
            query("status_published"),
            {"ids": ids, "owner": self.who.replica_id, "epoch": self.who.epoch},
        )

    def _settle(
        self, conn: psycopg.Connection[Any], inflight: list[int], inflight_at: datetime | None
    ) -> None:
        """Look for what the last holder handed to Kafka but did not record (our producer has
        fenced it): in Kafka, record it published; absent, give it back to be sent again."""
        rows = conn.execute(query("status_inflight_keys"), {"ids": inflight}).fetchall()
        if inflight_at is None or not rows:
            self._record(conn, [])
            return
        wanted = [Wanted(str(r[2]), int(r[1]), 0, inflight_at, int(r[0])) for r in rows]
        consumer = open_consumer(self.settings)
        try:
            found = find_attempts(
                consumer,
                self.settings,
                self.settings.status_topic,
                wanted,
                self.settings.publish_timeout_s,
            )
        finally:
            consumer.close()
        present = any(isinstance(v, Found) for v in found.values())
        unprovable = not present and any(isinstance(v, Unprovable) for v in found.values())
        log.log(
            logging.WARNING if unprovable else logging.INFO,
            "status events left in flight by the last holder: %s",
            "found in Kafka"
            if present
            else "not found, but retention may have deleted them: sending them again (they may "
            "be delivered twice)"
            if unprovable
            else "absent, sending them again",
            extra={"count": len(inflight)},
        )
        self._record(conn, inflight if present else [])


def _event_value(e: _Event) -> bytes:
    return status_value(
        operation_key=e.operation_key,
        effect_type=e.effect_type,
        state=e.to_state,
        previous_state=e.from_state,
        reason=e.reason,
        attempt=e.attempt,
        at=e.at,
        traceparent=e.traceparent,
    )

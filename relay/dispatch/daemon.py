"""``relay run``: claim PENDING effects, publish them, record how each attempt ended.

A pipeline of stages (``stage.py``): the claimer (``claimer.py``) commits each batch's claim
before any publish and keeps the next batch ready; this loop publishes a batch in one Kafka
transaction and waits for every record's own answer; the marker (``marker.py``) records the
outcomes with compare-and-set on this replica's owner/epoch while the next batch is already in
flight. Each transaction carries a receipt (``receipts.py``). Housekeeping (heartbeat, the
settling of batches left without an outcome by their receipts, ``settler.py``, lease expiry, and
the verifier's rounds, ``verifier.py``, which check ambiguous publishes) runs here between
batches, and the status-event stage (``status_events.py``) publishes the transitions log.
Outages of PostgreSQL or Kafka are waited out with backoff; an ambiguous publish is recorded as
UNKNOWN and never re-sent blindly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg
from kafka import KafkaProducer
from kafka import errors as kerr

from relay import db, observability, tracing
from relay.backoff import Backoff
from relay.config import Settings
from relay.dispatch.claimer import Claimer
from relay.dispatch.marker import Marker
from relay.dispatch.outcomes import AttemptOutcome
from relay.dispatch.publisher import (
    ClaimedEffect,
    PublishResult,
    ack_latencies_s,
    publish_batch,
    publish_batch_transactional,
)
from relay.dispatch.receipts import ReceiptSpec, receipt_bound_s
from relay.dispatch.settler import Settler
from relay.dispatch.stage import Claimed, Held, Identity, expire_leases, released
from relay.dispatch.status_events import StatusPublisher, installation_digest
from relay.dispatch.transactions import transactional_id
from relay.dispatch.verifier import Verifier
from relay.errors import RelayError, ServiceUnavailableError, describe
from relay.kafka_client import close_quietly, make_producer
from relay.logs import KAFKA
from relay.migrations import apply_status_events, check_current, sync_effect_types
from relay.sql import query

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 5.0
TAKE_WAIT_S = 0.1  # longest wait for the next claimed batch before housekeeping runs again
SETTLE_RETRY_S = 1.0  # a batch whose commit went unanswered: how often its settling is tried
LATE_RECEIPTS_LIMIT = 3  # batches in a row too late for their receipts before receipts stop


LOCK_TRIES = 12
LOCK_RETRY_S = 0.25  # a process killed a moment ago may hold its lock until its backend notices


class ReplicaFencedError(RelayError):
    """Another process registered this replica id after us: we must stop touching the outbox."""


class ReplicaInUseError(RelayError):
    """A live process runs this replica id: a second one refuses to start (unless taking over)."""


def replica_in_use_message(replica_id: str, age_s: float, epoch: int) -> str:
    return (
        f"replica id {replica_id!r} is in use by a running relay (epoch {epoch}, last heartbeat "
        f"{age_s:.0f}s ago): to run a second replica give it its own replica_id "
        "(RELAY_REPLICA_ID) and its own metrics_port (RELAY_METRICS_PORT, 0: none); to replace "
        "the running one, start this one with 'relay run --take-over'"
    )


class Relay:
    """The relay daemon. ``run()`` blocks until ``stop()`` is called (e.g. by SIGTERM)."""

    def __init__(self, settings: Settings, *, take_over: bool = False) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id
        self.take_over = take_over
        self.epoch = 0
        self._id_locked = False
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._producer: KafkaProducer | None = None
        self._last_heartbeat = 0.0
        self._last_expiry = 0.0
        self._held = Held()
        self._stages_stop = threading.Event()
        self._claimer: Claimer | None = None
        self._marker: Marker | None = None
        self._status: StatusPublisher | None = None
        self._verifier: Verifier | None = None
        self._settler: Settler | None = None
        # Set while this incarnation writes a receipt into each of its Kafka transactions.
        self._receipts: ReceiptSpec | None = None
        # This incarnation's batches whose commit went unanswered -> when (monotonic): settled
        # by their receipts once the producer is replaced, by lease expiry after a lease.
        self._unanswered: dict[int, tuple[float, list[int]]] = {}
        self._last_settle_try = 0.0
        self._settle_retry_s = SETTLE_RETRY_S
        # Batches in a row aborted because they reached their receipt past its bound.
        self._late_receipts = 0
        self.published_total = 0
        self.outcomes: Counter[str] = Counter()

    # -- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        backoff = Backoff(0.5, self.settings.outage_backoff_max_s)
        log.info("relay starting", extra={"replica": self.replica_id})
        metrics = observability.start_observability(
            self.settings, daemon="relay", liveness={"stages": self.stages_alive}
        )
        try:
            while not self.stopping:
                try:
                    self._ensure_connected()
                    self._heartbeat_if_due()  # also while Kafka is down: this replica lives
                    self._ensure_producer()
                    self._cycle()
                    backoff.reset()
                except (psycopg.OperationalError, ServiceUnavailableError) as exc:
                    self._drop_database()
                    self._wait(backoff.next_delay(), f"PostgreSQL unavailable: {describe(exc)}")
                except psycopg.Error as exc:
                    # Not an outage: a bug or a schema problem. The claimed rows are safe (their
                    # lease expires into UNKNOWN); log loudly and keep the daemon alive.
                    log.exception("database error in the relay loop")
                    self._drop_database()
                    self._wait(backoff.next_delay(), f"database error: {describe(exc)}")
                except kerr.KafkaError as exc:
                    self._drop_producer()
                    self._verify_while_kafka_is_down()
                    # One line when Kafka goes away, one when it is back: not one per retry.
                    KAFKA.down(describe(exc))
                    self._stop.wait(backoff.next_delay())
        finally:
            self._stop_stages()
            self._drop_producer()
            self._drop_database()
            observability.stop_observability(metrics)
            log.info("relay stopped", extra={"published": self.published_total})

    def _wait(self, delay: float, why: str) -> None:
        log.warning("%s; retrying in %.1fs", why, delay)
        self._stop.wait(delay)

    # -- connections ---------------------------------------------------------------------------

    def _ensure_connected(self) -> None:
        """Connect (again). The replica registers once per process: a reconnect keeps its epoch,
        and the pipeline's stages start once it has one."""
        if self._conn is not None and not self._conn.closed:
            return
        self._drop_database()
        conn = db.connect(self.settings, purpose=f"relay-{self.replica_id}")
        self._conn = conn
        self._id_locked = False
        if self.epoch == 0:
            check_current(conn)
            sync_effect_types(conn, self.settings)
            self._switch_status_events(conn)
            self._claim_replica_id(conn)
            row = conn.execute(
                query("register_replica"), {"replica_id": self.replica_id}
            ).fetchone()
            assert row is not None
            self.epoch = int(row[0])
            self._last_heartbeat = time.monotonic()
            log.info("registered replica", extra={"replica": self.replica_id, "epoch": self.epoch})
            self._register_receipts(conn)
        else:
            self._lock_replica_id()  # lost with the old connection
        if self._claimer is None:
            # Once registered, also when the connection was lost before the stages started.
            # A previous incarnation's DISPATCHING rows are ambiguous now, not after their lease;
            # its batches with receipts are settled at the first cycle, once Kafka answers.
            self._expire_leases(leave_receipted=True)
            self._last_expiry = 0.0
            self._start_stages()

    def _register_receipts(self, conn: psycopg.Connection[Any]) -> None:
        """Record, before anything is published, that this incarnation writes receipts."""
        topic = self.settings.receipts_topic
        if not self.settings.kafka_transactions or topic is None:
            return
        install = installation_digest(conn)
        conn.execute(
            query("register_receipts"),
            {
                "replica_id": self.replica_id,
                "epoch": self.epoch,
                "topic": topic,
                "install": install,
                "window_s": receipt_bound_s(self.settings.lease_s, self.settings.publish_timeout_s),
            },
        )
        self._receipts = ReceiptSpec(
            topic, transactional_id(self.replica_id).encode(), install, self.replica_id, self.epoch
        )

    def _stop_receipts(self, why: str) -> None:
        """Record that this incarnation writes receipts no more (before it commits a transaction
        without one); raises if that cannot be recorded."""
        assert self._conn is not None
        self._conn.execute(
            query("stop_receipts"), {"replica_id": self.replica_id, "epoch": self.epoch}
        )
        self._receipts = None
        log.warning(
            "receipts stopped until the relay restarts: %s; a batch left without an outcome "
            "becomes UNKNOWN and is looked for effect by effect",
            why,
        )

    def _receipt_deadline(self, claimed_at: float) -> float:
        """The latest (monotonic) a batch claimed at ``claimed_at`` sends its receipt: the bound
        this incarnation registered (a seam for tests: an earlier deadline is always safe)."""
        return claimed_at + receipt_bound_s(self.settings.lease_s, self.settings.publish_timeout_s)

    def _receipt_late(self) -> None:
        """A batch reached its receipt past the bound a settler reads up to, and was aborted
        (innocent, to go again). A publisher that slow every time would abort every batch for
        ever: after a few in a row, receipts stop (the old path: UNKNOWN and a search)."""
        self._late_receipts += 1
        if self._late_receipts >= LATE_RECEIPTS_LIMIT and self._receipts is not None:
            self._stop_receipts(
                f"{self._late_receipts} batches in a row reached their receipts more than "
                f"{receipt_bound_s(self.settings.lease_s, self.settings.publish_timeout_s):.1f} s "
                "after their claim (lease_s / 2 + 2 x publish_timeout_s), and were aborted"
            )

    def _switch_status_events(self, conn: psycopg.Connection[Any]) -> None:
        """Status events as the settings say, from the first effect on (not from the first start
        of `relay reconcile`)."""
        try:
            apply_status_events(conn, self.settings)
        except psycopg.errors.InsufficientPrivilege:
            log.warning(
                "status_events is %s but this login may not switch status events: run 'relay "
                "migrate' (or 'relay reconcile') with the same setting",
                "on" if self.settings.status_events else "off",
            )

    def _lock_replica_id(self) -> bool:
        assert self._conn is not None
        row = self._conn.execute(query("lock_replica_id"), {"replica_id": self.replica_id})
        self._id_locked = bool(row.fetchone() == (True,))
        return self._id_locked

    def _claim_replica_id(self, conn: psycopg.Connection[Any]) -> None:
        """Refuse to take the id of a live replica. Live: a process holds the id's lock (it goes
        with the process) and its heartbeat is recent (a frozen process is fenced instead)."""
        age_s, epoch = 0.0, 0
        for _ in range(LOCK_TRIES):
            if self._lock_replica_id():
                return
            row = conn.execute(
                query("replica_last_heartbeat"), {"replica_id": self.replica_id}
            ).fetchone()
            if row is None or float(row[1]) > self.settings.lease_s:
                return
            age_s, epoch = float(row[1]), int(row[0])
            if self.take_over:
                log.warning(
                    "taking over replica id %r from the process that runs it (epoch %s)",
                    self.replica_id,
                    epoch,
                )
                return
            if self._stop.wait(LOCK_RETRY_S):
                break
        raise ReplicaInUseError(replica_in_use_message(self.replica_id, age_s, epoch))

    def _start_stages(self) -> None:
        who = Identity(self.replica_id, self.epoch)
        stop = self._stages_stop
        self._verifier = Verifier(
            self.settings, who, producer_ready=lambda: self._producer is not None, stop=self._stop
        )
        self._settler = Settler(
            self.settings,
            who,
            producer_ready=lambda: self._producer is not None,
            between=self._heartbeat_if_due,
        )
        self._claimer = Claimer(self.settings, who, self._held, stop)
        self._marker = Marker(self.settings, who, self._held, stop)
        self._status = StatusPublisher(self.settings, who, self._held, stop)
        for stage in (self._claimer, self._marker, self._status):
            stage.start()

    def _stop_stages(self) -> None:
        """Stop claiming, give back what was claimed but not published, mark everything."""
        self._stages_stop.set()
        claimer, marker, status = self._claimer, self._marker, self._status
        if claimer is not None:
            claimer.thread.join(30)
            for batch in claimer.leftovers():
                if marker is not None:
                    marker.submit(released(batch), batch.at)
        if marker is not None:
            marker.close(timeout_s=self.settings.lease_s)
        if status is not None:
            status.thread.join(30)
            status.drop_producer()

    def stages_alive(self) -> None:
        """Liveness check: raises when a stage thread has died (they never end on their own)."""
        if self.stopping:
            return
        for stage in (self._claimer, self._marker, self._status):
            if stage is not None and stage.thread.ident is not None and not stage.alive():
                raise RuntimeError(f"the relay's {stage.name} stage died")

    def _drop_database(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _ensure_producer(self) -> None:
        if self._producer is None:
            if self.settings.kafka_transactions:
                producer = make_producer(self.settings, transactional_id(self.replica_id))
                try:
                    # Fences every earlier producer of this replica and aborts its open
                    # transaction: from here on, its attempts can be checked in Kafka.
                    producer.init_transactions()
                except BaseException:
                    close_quietly(producer, timeout_s=1.0)
                    raise
                self._producer = producer
            else:
                self._producer = make_producer(self.settings)
            log.info(
                "Kafka producer ready", extra={"bootstrap": self.settings.kafka_bootstrap_servers}
            )
            KAFKA.up()
        if self._claimer is not None:
            self._claimer.publisher_ready.set()

    def _drop_producer(self) -> None:
        if self._claimer is not None:
            self._claimer.publisher_ready.clear()
        close_quietly(self._producer, timeout_s=2.0)
        self._producer = None

    # -- the loop ------------------------------------------------------------------------------

    def _cycle(self) -> None:
        assert self._conn is not None and self._producer is not None
        now = time.monotonic()
        self._heartbeat_if_due()
        if self._unanswered and now - self._last_settle_try >= self._settle_retry_s:
            self._settle_unanswered(now)
        if now - self._last_expiry >= min(5.0, self.settings.lease_s / 4):
            self._expire_leases()
        if self.settings.kafka_transactions:
            self._verify_due()
        assert self._claimer is not None
        batch = self._claimer.take(TAKE_WAIT_S)
        if batch is not None:
            self._publish_and_mark(batch)

    def _verify_while_kafka_is_down(self) -> None:
        """Count the failed checks of due UNKNOWN publishes even while no producer can be had,
        so that their budget runs out and they go STUCK instead of waiting unseen forever."""
        if not self.settings.kafka_transactions or self.stopping:
            return
        if self._verifier is not None and not self._verifier.due():
            return
        try:
            self._ensure_connected()
            self._verify_due()
        except (psycopg.Error, ServiceUnavailableError) as exc:
            log.warning("could not check UNKNOWN publishes: %s", describe(exc))
            self._drop_database()

    def _verify_due(self) -> None:
        """A round of the verifier, when one is due."""
        assert self._conn is not None and self._verifier is not None
        if self._verifier.due():
            self._verifier.run_once(self._conn)

    def _heartbeat_if_due(self) -> None:
        if time.monotonic() - self._last_heartbeat >= HEARTBEAT_EVERY_S:
            self._heartbeat()

    def _heartbeat(self) -> None:
        assert self._conn is not None
        if not self._id_locked:
            self._lock_replica_id()  # taken over from a process that held it: held once it ends
        cur = self._conn.execute(
            query("heartbeat"), {"replica_id": self.replica_id, "epoch": self.epoch}
        )
        self._last_heartbeat = time.monotonic()
        if cur.rowcount == 0:
            raise ReplicaFencedError(
                f"replica id {self.replica_id!r} was registered again by another process "
                f"(our epoch {self.epoch} is fenced); give each replica its own replica_id"
            )

    def _expire_leases(self, *, leave_receipted: bool = False) -> None:
        """Settle what receipts can settle, then expire the rest (also the batches that could
        not be settled: they become UNKNOWN, to be looked for effect by effect)."""
        assert self._conn is not None
        self._last_expiry = time.monotonic()
        if (
            not leave_receipted
            and self._settler is not None
            and self._producer is not None
            and self.settings.kafka_transactions
        ):
            leave_receipted = self._settler.run_once(self._conn).left == 0
        expire_leases(
            self._conn,
            Identity(self.replica_id, self.epoch),
            self._held,
            leave_receipted=leave_receipted,
            lease_s=self.settings.lease_s,
        )

    def _settle_unanswered(self, now: float) -> None:
        """Settle the batches whose commit went unanswered (this producer replaced the one that
        made them, which fenced it); those not settled within a lease go to lease expiry."""
        assert self._conn is not None and self._settler is not None
        self._last_settle_try = now
        done = self._settler.run_once(self._conn, list(self._unanswered))
        # After a failure (Kafka, a receipts topic whose end stays undecided), wait longer.
        failed = done.left > 0
        self._settle_retry_s = (
            min(self._settle_retry_s * 2, self.settings.lease_s / 4) if failed else SETTLE_RETRY_S
        )
        for batch, (since, ids) in list(self._unanswered.items()):
            if batch in done.settled or now - since > self.settings.lease_s:
                # Held until now: a reconnecting claimer would have made them UNKNOWN.
                self._held.discard(ids)
                del self._unanswered[batch]

    def _withhold_unanswered(self, results: list[PublishResult]) -> list[PublishResult]:
        """The outcomes to mark now: a batch's intents whose transaction carried a receipt and
        whose commit went unanswered are not made UNKNOWN; their batch is settled instead."""
        if self._settler is None or not any(r.receipted for r in results):
            return results
        withheld = [r for r in results if r.receipted and r.effect.batch is not None]
        now = time.monotonic()
        for r in withheld:
            assert r.effect.batch is not None
            self._unanswered.setdefault(r.effect.batch, (now, []))[1].append(r.effect.id)
        return [r for r in results if not (r.receipted and r.effect.batch is not None)]

    def _publish_and_mark(self, claimed: Claimed) -> None:
        assert self._producer is not None and self._marker is not None
        if time.monotonic() - claimed.at > self.settings.lease_s / 2:
            # Waited too long in hand (an outage): its lease could end mid-publish. Give it back.
            self._submit_outcomes(released(claimed), claimed.at)
            return
        batch = claimed.effects
        refs = (
            [tracing.EffectRef(e.operation_key, e.id, e.traceparent) for e in batch]
            if tracing.enabled()
            else []
        )
        attributes = {"relay.replica_id": self.replica_id}
        with tracing.span("relay.publish_batch", refs, attributes, kind="PRODUCER") as span:
            results = self._publish(batch, claimed.at)
            span.set_attribute(
                "relay.outcome.acked", sum(r.outcome is AttemptOutcome.ACKED for r in results)
            )
        if any(r.outcome is AttemptOutcome.ACKED for r in results):
            self._late_receipts = 0
        self._account(results)
        self._submit_outcomes(self._withhold_unanswered(results), claimed.at)

    def _publish(self, batch: Sequence[ClaimedEffect], claimed_at: float) -> list[PublishResult]:
        assert self._producer is not None
        limit = min(self.settings.max_message_bytes, self.settings.max_request_size)
        if self.settings.kafka_transactions:
            return publish_batch_transactional(
                self._producer,
                batch,
                source=self.settings.cloudevents_source,
                timeout_s=self.settings.publish_timeout_s,
                limit_bytes=limit,
                before_commit=self._before_commit,
                status_topic=self.settings.status_topic,
                on_status_unavailable=self._status_unavailable,
                receipt=self._receipts,
                stop_receipts=self._stop_receipts,
                receipt_deadline=self._receipt_deadline(claimed_at),
                receipt_late=self._receipt_late,
            )
        return publish_batch(
            self._producer,
            batch,
            source=self.settings.cloudevents_source,
            timeout_s=self.settings.publish_timeout_s,
            limit_bytes=limit,
        )

    def _account(self, results: Sequence[PublishResult]) -> None:
        """Log and count how the batch's attempts ended."""
        counts = Counter(r.outcome.value for r in results)
        self.outcomes.update(counts)
        self.published_total += counts.get(AttemptOutcome.ACKED.value, 0)
        for r in results:
            if r.outcome is not AttemptOutcome.ACKED:
                log.warning(
                    "attempt ended %s",
                    r.outcome.value,
                    extra={
                        "operation_key": r.effect.operation_key,
                        "effect_id": r.effect.id,
                        "attempt": r.effect.attempt,
                        "reason": r.reason,
                    },
                )
        if any(r.failed_in_flight for r in results):
            # After an error in flight the producer's sequence state cannot be trusted (and
            # kafka-python may have put it in a fatal state): start a new one, with a new epoch.
            self._drop_producer()
        observability.record_publish(counts, ack_latencies_s(results))

    def _submit_outcomes(self, results: Sequence[PublishResult], claimed_at: float) -> None:
        """Hand the outcomes to the marker (a seam for tests that lose them on purpose)."""
        assert self._marker is not None
        self._marker.submit(results, claimed_at)

    def _status_unavailable(self) -> None:
        if self._claimer is None:
            return
        self._claimer.status_route.pause()
        log.warning(
            "the status topic %r is unavailable: intents claimed for the next %.0f s have their "
            "status events published from the log",
            self.settings.status_topic,
            self._claimer.status_route.pause_s,
        )

    def _before_commit(self) -> None:
        """A seam for fault-injection tests (for example, to hang the coordinator here)."""

"""``relay run``: claim PENDING effects, publish them, record how each attempt ended.

One loop, on purpose: claim (the attempt rows commit first), publish the batch and wait for every
record's own answer, then mark the outcomes with compare-and-set on this replica's owner/epoch.
Outages of PostgreSQL or Kafka are waited out with backoff; an ambiguous publish is recorded as
UNKNOWN and never re-sent by this loop.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from kafka import KafkaProducer
from kafka import errors as kerr

from relay import db, observability
from relay.backoff import Backoff
from relay.config import Settings
from relay.errors import RelayError, ServiceUnavailableError
from relay.migrations import check_current, sync_effect_types
from relay.outcomes import STATE_AFTER, AttemptOutcome, describe
from relay.publisher import (
    ClaimedEffect,
    PublishResult,
    close_quietly,
    make_producer,
    publish_batch,
    publish_batch_transactional,
)
from relay.sql import query
from relay.states import EffectState
from relay.transactions import fence, transactional_id
from relay.verify import Absent, Found, Wanted, find_attempts, open_consumer

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 5.0
VERIFY_EVERY_S = 1.0
VERIFY_ROUND = 200  # UNKNOWN publishes checked per round, with one read of their window
# Short polls after the last work seen, before the relay arms the doorbell (150 ms in all).
QUIET_POLLS_S = (0.01, 0.02, 0.04, 0.08)


class ReplicaFencedError(RelayError):
    """Another process registered this replica id after us: we must stop touching the outbox."""


class _Check(NamedTuple):
    """An UNKNOWN attempt claimed for a check (columns of claim_verifications)."""

    effect_id: int
    key: str
    message_key: str
    topic: str
    attempt: int
    tries: int
    replica: str
    replica_epoch: int
    started_at: datetime


class Relay:
    """The relay daemon. ``run()`` blocks until ``stop()`` is called (e.g. by SIGTERM)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id
        self.epoch = 0
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._listener: psycopg.Connection[Any] | None = None
        self._producer: KafkaProducer | None = None
        self._last_heartbeat = 0.0
        self._last_expiry = 0.0
        self._quiet_polls = len(QUIET_POLLS_S)
        self._last_verify = 0.0
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
        metrics = observability.start_observability(self.settings, daemon="relay")
        try:
            while not self.stopping:
                try:
                    self._ensure_connected()
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
                    self._wait(backoff.next_delay(), f"Kafka unavailable: {describe(exc)}")
        finally:
            self._drop_producer()
            self._drop_database()
            observability.stop_observability(metrics)
            log.info("relay stopped", extra={"published": self.published_total})

    def _wait(self, delay: float, why: str, *, interruptible: bool = True) -> None:
        log.warning("%s; retrying in %.1fs", why, delay)
        if interruptible:
            self._stop.wait(delay)
        else:
            time.sleep(delay)  # outcomes in hand are recorded even while stopping

    # -- connections ---------------------------------------------------------------------------

    def _ensure_connected(self, *, batch_in_hand: bool = False) -> None:
        """Connect (again). The replica registers once per process: a reconnect keeps its epoch."""
        if self._conn is not None and not self._conn.closed:
            return
        reconnect = self.epoch != 0
        self._drop_database()
        conn = db.connect(self.settings, purpose=f"relay-{self.replica_id}")
        try:
            listener = db.connect(self.settings, purpose=f"relay-doorbell-{self.replica_id}")
        except BaseException:
            conn.close()
            raise
        self._conn, self._listener = conn, listener
        listener.execute(query("listen_doorbell"))
        if self.epoch == 0:
            check_current(conn)
            sync_effect_types(conn, self.settings)
            row = conn.execute(
                query("register_replica"), {"replica_id": self.replica_id}
            ).fetchone()
            assert row is not None
            self.epoch = int(row[0])
            self._last_heartbeat = time.monotonic()
            log.info("registered replica", extra={"replica": self.replica_id, "epoch": self.epoch})
            # A previous incarnation's DISPATCHING rows are ambiguous now, not after their lease.
            self._expire_leases(force=True)
        elif reconnect and not batch_in_hand:
            # A claim whose answer died with the connection left rows we do not hold.
            self._expire_leases(force=True, all_own=True)

    def _drop_database(self) -> None:
        for conn in (self._conn, self._listener):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self._conn = self._listener = None

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

    def _drop_producer(self) -> None:
        close_quietly(self._producer, timeout_s=2.0)
        self._producer = None

    # -- the loop ------------------------------------------------------------------------------

    def _cycle(self) -> None:
        assert self._conn is not None and self._producer is not None
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_EVERY_S:
            self._heartbeat()
        if now - self._last_expiry >= min(5.0, self.settings.lease_s / 4):
            self._expire_leases()
        if self.settings.kafka_transactions and now - self._last_verify >= VERIFY_EVERY_S:
            self._verify_due()
        batch = self._claim()
        if batch:
            self._quiet_polls = 0
            self._publish_and_mark(batch)
            return
        self._idle()

    def _verify_while_kafka_is_down(self) -> None:
        """Count the failed checks of due UNKNOWN publishes even while no producer can be had,
        so that their budget runs out and they go STUCK instead of waiting unseen forever."""
        if not self.settings.kafka_transactions or self.stopping:
            return
        if time.monotonic() - self._last_verify < VERIFY_EVERY_S:
            return
        try:
            self._ensure_connected()
            self._verify_due()
        except (psycopg.Error, ServiceUnavailableError) as exc:
            log.warning("could not check UNKNOWN publishes: %s", describe(exc))
            self._drop_database()

    def _verify_due(self) -> None:
        """Resolve UNKNOWN publishes by looking in Kafka (see relay.verify), a round at a time."""
        assert self._conn is not None
        self._last_verify = time.monotonic()
        rows = self._conn.execute(
            query("claim_verifications"),
            {
                "owner": self.replica_id,
                "epoch": self.epoch,
                "lease_s": self.settings.lease_s,
                "limit": VERIFY_ROUND,
            },
        ).fetchall()
        if not rows:
            return
        checks = [_Check(*row) for row in rows]
        answers = self._check_round(checks)
        for check in checks:
            self._finish_check(check, answers[check.effect_id])
        if len(rows) == VERIFY_ROUND:
            self._last_verify = 0.0  # more are due: the next cycle goes on at once

    def _check_round(self, checks: Sequence[_Check]) -> dict[int, Found | Absent | str]:
        """A verdict per effect, or why Kafka could not be asked (after one such failure the
        rest of the round is rescheduled at once instead of each waiting out its timeout)."""
        if self.stopping:
            return {c.effect_id: "the relay is stopping" for c in checks}
        try:
            consumer = open_consumer(self.settings)
        except kerr.KafkaError as exc:
            return {c.effect_id: describe(exc) for c in checks}
        answers: dict[int, Found | Absent | str] = {}
        down: str | None = None
        try:
            ready: list[_Check] = []
            for replica in sorted({c.replica for c in checks}):
                theirs = [c for c in checks if c.replica == replica]
                why = down or self._fence_for_check(replica)
                if why is None:
                    ready.extend(theirs)
                    continue
                answers.update((c.effect_id, why) for c in theirs)
                if replica != self.replica_id:
                    down = why
            by_topic: dict[str, list[_Check]] = {}
            for c in ready:
                by_topic.setdefault(c.topic, []).append(c)
            for topic, group in by_topic.items():
                wanted = {
                    Wanted(c.message_key, c.effect_id, c.attempt, c.started_at): c for c in group
                }
                if down is None:
                    try:
                        found = find_attempts(
                            consumer,
                            self.settings,
                            topic,
                            list(wanted),
                            self.settings.publish_timeout_s,
                        )
                    except (kerr.KafkaError, OSError) as exc:
                        down = describe(exc)
                    else:
                        answers.update((c.effect_id, found[w]) for w, c in wanted.items())
                        continue
                answers.update((c.effect_id, down) for c in group)
        finally:
            consumer.close()
        return answers

    def _fence_for_check(self, replica: str) -> str | None:
        """Make sure the producer that made these attempts can no longer commit; or say why not.

        Our own initialised producer fenced our earlier ones. Another replica's is fenced here,
        or its open transaction could commit after we looked."""
        if replica == self.replica_id:
            return (
                None
                if self._producer is not None
                else ("this replica's producer is not initialised yet")
            )
        try:
            fence(self.settings, replica)
        except (kerr.KafkaError, OSError) as exc:
            return describe(exc)
        return None

    def _finish_check(self, check: _Check, answer: Found | Absent | str) -> None:
        """Record the check: PUBLISHED, PENDING (absent), or UNKNOWN again and later STUCK."""
        assert self._conn is not None
        key, effect_id, attempt, tries = check.key, check.effect_id, check.attempt, check.tries
        base = {
            "id": effect_id,
            "attempt": attempt,
            "owner": self.replica_id,
            "epoch": self.epoch,
            "partition": None,
            "offset": None,
            "retry_in_s": 0.0,
        }
        if isinstance(answer, str):
            give_up = tries + 1 >= self.settings.verify_max_tries
            retry_in = min(self.settings.verify_backoff_max_s, 2.0 * 2 ** min(tries, 16))
            why = f"check {tries + 1} of attempt {attempt} could not be made: {answer}"
            params = {
                **base,
                "state": EffectState.STUCK.value if give_up else EffectState.UNKNOWN.value,
                "reason": (f"{why}; {tries + 1} checks failed, a person decides")
                if give_up
                else why,
                "verification": why,
                "retry_in_s": retry_in,
            }
            log.warning(why, extra={"operation_key": key, "effect_id": effect_id})
        else:
            if isinstance(answer, Found):
                found = f"found at partition {answer.partition} offset {answer.offset}"
                params = {
                    **base,
                    "state": EffectState.PUBLISHED.value,
                    "reason": f"verified in Kafka: attempt {attempt} {found}",
                    "verification": found,
                    "partition": answer.partition,
                    "offset": answer.offset,
                }
            else:
                absent = (
                    f"absent: not among {answer.scanned} committed records of the attempt's "
                    f"window in {answer.partitions} partitions, after fencing its producer"
                )
                params = {
                    **base,
                    "state": EffectState.PENDING.value,
                    "reason": f"verified absent from Kafka; attempt {attempt} published "
                    "nothing, a new attempt may be made",
                    "verification": absent,
                }
            log.info(
                "verified an ambiguous publish: %s",
                params["verification"],
                extra={"operation_key": key, "effect_id": effect_id, "attempt": attempt},
            )
        moved = self._conn.execute(query("finish_verification"), params).fetchone()
        observability.record_verification(str(params["state"]), int(moved[0]) if moved else 0)

    def _heartbeat(self) -> None:
        assert self._conn is not None
        cur = self._conn.execute(
            query("heartbeat"), {"replica_id": self.replica_id, "epoch": self.epoch}
        )
        self._last_heartbeat = time.monotonic()
        if cur.rowcount == 0:
            raise ReplicaFencedError(
                f"replica id {self.replica_id!r} was registered again by another process "
                f"(our epoch {self.epoch} is fenced); give each replica its own replica_id"
            )

    def _expire_leases(self, *, force: bool = False, all_own: bool = False) -> None:
        assert self._conn is not None
        self._last_expiry = time.monotonic()
        params = {"owner": self.replica_id, "epoch": self.epoch, "limit": 1000, "all_own": all_own}
        row = self._conn.execute(query("expire_leases"), params).fetchone()
        if row and row[0]:
            observability.record_leases_expired(int(row[0]))
            log.warning(
                "effects left DISPATCHING without an outcome are now UNKNOWN",
                extra={"count": row[0], "forced": force},
            )

    def _claim(self) -> list[ClaimedEffect]:
        assert self._conn is not None
        rows = self._conn.execute(
            query("claim_batch"),
            {
                "owner": self.replica_id,
                "epoch": self.epoch,
                "limit": self.settings.batch_size,
                "lease_s": self.settings.lease_s,
            },
        ).fetchall()
        observability.record_transition("PENDING", "DISPATCHING", len(rows))
        return [ClaimedEffect(*row) for row in rows]

    def _idle(self) -> None:
        """Wait for work without taxing the writers.

        Right after work, poll the partial index at short, growing intervals: under steady load
        new intents arrive within them and no writer pays for a NOTIFY. Only after a quiet spell
        arm the doorbell, so the next enqueue rings once; look once more after arming (closing
        the race with a commit that read the doorbell before it was armed), then wait for a ring
        or the poll interval, whichever comes first.
        """
        assert self._conn is not None and self._listener is not None
        if self._quiet_polls < len(QUIET_POLLS_S):
            delay = QUIET_POLLS_S[self._quiet_polls]
            self._quiet_polls += 1
            self._stop.wait(delay)
            return
        self._listener.execute(query("arm_doorbell"))
        batch = self._claim()
        if batch:
            self._listener.execute(query("disarm_doorbell"))
            self._publish_and_mark(batch)
            return
        rang = False
        for _ in self._listener.notifies(timeout=self.settings.poll_interval_s, stop_after=1):
            rang = True
        if rang or self.stopping:
            self._listener.execute(query("disarm_doorbell"))

    def _publish_and_mark(self, batch: Sequence[ClaimedEffect]) -> None:
        assert self._producer is not None
        limit = min(self.settings.max_message_bytes, self.settings.max_request_size)
        if self.settings.kafka_transactions:
            results = publish_batch_transactional(
                self._producer,
                batch,
                source=self.settings.cloudevents_source,
                timeout_s=self.settings.publish_timeout_s,
                limit_bytes=limit,
                before_commit=self._before_commit,
            )
        else:
            results = publish_batch(
                self._producer,
                batch,
                source=self.settings.cloudevents_source,
                timeout_s=self.settings.publish_timeout_s,
                limit_bytes=limit,
            )
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
        observability.record_publish(results)
        self._mark(results)

    def _mark(self, results: Sequence[PublishResult]) -> None:
        """Record the outcomes; keep trying through a database outage (CAS makes retries safe)."""
        states = [self._state_after(r).value for r in results]
        params = {
            "owner": self.replica_id,
            "epoch": self.epoch,
            "ids": [r.effect.id for r in results],
            "attempts": [r.effect.attempt for r in results],
            "states": states,
            "outcomes": [r.outcome.value for r in results],
            "reasons": [self._reason(r) for r in results],
            "partitions": [r.partition for r in results],
            "offsets": [r.offset for r in results],
            "delays_s": [self._not_sent_delay(r) for r in results],
        }
        backoff = Backoff(0.2, self.settings.outage_backoff_max_s)
        deadline = time.monotonic() + self.settings.lease_s
        while True:
            try:
                self._ensure_connected(batch_in_hand=True)
                assert self._conn is not None
                marked = self._conn.execute(query("mark_outcomes"), params).fetchall()
                break
            except (psycopg.OperationalError, ServiceUnavailableError) as exc:
                self._drop_database()
                if time.monotonic() > deadline:
                    log.error(
                        "could not record %d outcomes before the lease ran out; they will be "
                        "resolved as UNKNOWN: %s",
                        len(results),
                        describe(exc),
                    )
                    return
                self._wait(
                    backoff.next_delay(),
                    f"recording outcomes failed: {describe(exc)}",
                    interruptible=False,
                )
        observability.record_marked(results, states, [row[0] for row in marked])
        if len(marked) != len(results):
            log.warning(
                "some outcomes were not recorded: the lease was lost or the replica fenced",
                extra={"expected": len(results), "recorded": len(marked)},
            )

    def _gave_up(self, result: PublishResult) -> bool:
        """Attempts that provably published nothing are retried, but not forever."""
        retriable = STATE_AFTER[result.outcome] is EffectState.PENDING
        return (
            retriable
            and result.suspect
            and result.effect.attempt >= self.settings.max_publish_attempts
        )

    def _state_after(self, result: PublishResult) -> EffectState:
        return EffectState.REJECTED if self._gave_up(result) else STATE_AFTER[result.outcome]

    def _reason(self, result: PublishResult) -> str | None:
        if self._gave_up(result):
            return (
                f"gave up after {result.effect.attempt} attempts that published nothing; "
                f"last: {result.reason}"
            )
        return result.reason

    def _before_commit(self) -> None:
        """A seam for fault-injection tests (for example, to hang the coordinator here)."""

    def _not_sent_delay(self, result: PublishResult) -> float:
        if STATE_AFTER[result.outcome] is not EffectState.PENDING or not result.suspect:
            # An innocent record of an aborted transaction goes again at once; the suspects
            # wait (with jitter), so the next batch is not poisoned by the same record.
            return 0.0
        exponent = min(result.effect.attempt - 1, 20)
        cap = self.settings.not_sent_backoff_max_s
        return float(min(cap, self.settings.not_sent_backoff_s * 2**exponent)) * random.uniform(
            0.5, 1.5
        )

"""The relay's database stages, each on its own thread and connection: claiming ahead of the
publisher, and recording outcomes behind it.

The publisher (``dispatch.daemon``) only talks to Kafka. While it waits for a batch's commit, the
claimer has the next batch claimed (its claim committed, so the attempt is durable before any
publish) and the marker records the previous batch's outcomes in one set-based statement. The
hand-offs are small bounded queues: at most two batches claimed ahead, two waiting to be marked.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from relay import db, observability
from relay.backoff import Backoff
from relay.config import Settings
from relay.dispatch.outcomes import STATE_AFTER, AttemptOutcome
from relay.dispatch.publisher import ClaimedEffect, PublishResult
from relay.errors import ServiceUnavailableError, describe
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)

# Short polls after the last work seen, before the relay arms the doorbell (150 ms in all).
QUIET_POLLS_S = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08)
HANDOFF_POLL_S = 0.05


@dataclass(frozen=True)
class Identity:
    """Who claims and marks: the replica and the epoch it registered with."""

    replica_id: str
    epoch: int


@dataclass
class Claimed:
    """A claimed batch, and when (monotonic) it was claimed: its lease runs from then."""

    effects: list[ClaimedEffect]
    at: float = field(default_factory=time.monotonic)


class Held:
    """The effect ids this process holds (claimed, not yet marked). A stage that reconnects
    expires its replica's DISPATCHING rows except these: a claim whose answer was lost with the
    connection left rows that nobody here will publish."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[int] = set()

    def add(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.update(ids)

    def discard(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self._ids)


def expire_leases(
    conn: psycopg.Connection[Any], who: Identity, held: Held, *, all_own: bool = False
) -> int:
    """Effects left DISPATCHING past their lease (or, with ``all_own``, this replica's rows that
    no stage holds) become UNKNOWN; returns how many."""
    params = {
        "owner": who.replica_id,
        "epoch": who.epoch,
        "limit": 1000,
        "all_own": all_own,
        "held": held.snapshot() if all_own else [],
    }
    row = conn.execute(query("expire_leases"), params).fetchone()
    expired = int(row[0]) if row else 0
    if expired:
        observability.record_leases_expired(expired)
        log.warning(
            "effects left DISPATCHING without an outcome are now UNKNOWN",
            extra={"count": expired, "all_own": all_own},
        )
    return expired


class Stage:
    """A thread with its own connection that waits out outages and survives its own bugs."""

    name = "stage"

    def __init__(self, settings: Settings, who: Identity, held: Held, stop: threading.Event):
        self.settings = settings
        self.who = who
        self.held = held
        self.stop = stop
        self.conn: psycopg.Connection[Any] | None = None
        self.thread = threading.Thread(target=self._run, name=f"relay-{self.name}", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def connect(self) -> psycopg.Connection[Any]:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        self.drop()
        self.conn = db.connect(self.settings, purpose=f"{self.name}-{self.who.replica_id}")
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None

    def _run(self) -> None:
        backoff = Backoff(0.2, self.settings.outage_backoff_max_s)
        try:
            while not self.finished():
                try:
                    self.step()
                    backoff.reset()
                except (psycopg.OperationalError, ServiceUnavailableError) as exc:
                    self.drop()
                    self.pause(backoff.next_delay(), f"PostgreSQL unavailable: {describe(exc)}")
                except Exception as exc:
                    log.exception("unexpected error in the relay's %s stage", self.name)
                    self.drop()
                    self.pause(backoff.next_delay(), describe(exc))
        except BaseException as exc:  # pragma: no cover - recorded for /healthz
            self.failure = exc
            raise
        finally:
            self.drop()

    def pause(self, delay: float, why: str) -> None:
        log.warning("%s stage: %s; retrying in %.1fs", self.name, why, delay)
        self.stop.wait(delay)

    def finished(self) -> bool:
        return self.stop.is_set()

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Claimer(Stage):
    """Claims batches ahead of the publisher; when there is nothing to claim, waits without
    taxing the writers.

    Right after work it polls the partial index at short, growing intervals: under steady load
    new intents arrive within them and no writer pays for a NOTIFY. Only after a quiet spell does
    it arm the doorbell (for a short while, re-armed at every wait, so it lapses when this relay
    dies), look once more (closing the race with a commit that read the doorbell before it was
    armed), then wait for a ring or the poll interval."""

    name = "claimer"

    def __init__(self, settings: Settings, who: Identity, held: Held, stop: threading.Event):
        super().__init__(settings, who, held, stop)
        self.batches: queue.Queue[Claimed] = queue.Queue(maxsize=1)
        self._taken = threading.Event()
        self.listener: psycopg.Connection[Any] | None = None
        self._quiet = len(QUIET_POLLS_S)
        self._in_hand: Claimed | None = None
        self._connected_once = False
        # Set by the publisher while it has a Kafka producer: nothing is claimed before, so no
        # lease runs out while Kafka cannot be reached.
        self.publisher_ready = threading.Event()

    def connect(self) -> psycopg.Connection[Any]:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        conn = super().connect()
        conn.execute(query("claimer_session"))
        if self._connected_once:
            # A claim whose answer was lost with the connection left rows that nobody here will
            # publish: expire them now (held ones are still in hand), not after their lease.
            expire_leases(conn, self.who, self.held, all_own=True)
        self._connected_once = True
        return conn

    def take(self, timeout_s: float) -> Claimed | None:
        try:
            batch = self.batches.get(timeout=timeout_s)
        except queue.Empty:
            return None
        self._taken.set()
        return batch

    def leftovers(self) -> list[Claimed]:
        """Batches claimed but never handed over (after the thread ended)."""
        left = [self._in_hand] if self._in_hand is not None else []
        self._in_hand = None
        while True:
            try:
                left.append(self.batches.get_nowait())
            except queue.Empty:
                return left

    def drop(self) -> None:
        super().drop()
        if self.listener is not None:
            with contextlib.suppress(psycopg.Error):
                self.listener.close()
        self.listener = None

    def step(self) -> None:
        if self._in_hand is not None:
            self._hand_over()
            return
        if not self.publisher_ready.wait(HANDOFF_POLL_S):
            return
        if self.batches.full():
            # A batch already waits for the publisher: claim when it is taken, so that what
            # arrives meanwhile goes out in one batch after it (at low load, a second batch
            # claimed ahead would cost its effects a whole extra Kafka transaction of waiting).
            self._taken.clear()
            if self.batches.full():
                self._taken.wait(HANDOFF_POLL_S)
            return
        conn = self.connect()
        if self.listener is None or self.listener.closed:
            self.listener = db.connect(self.settings, purpose=f"doorbell-{self.who.replica_id}")
            self.listener.execute(query("listen_doorbell"))
            self._quiet = len(QUIET_POLLS_S)  # a new listener may have missed a ring: look now
        if self._claim(conn):
            return
        self._idle(conn)

    def _claim(self, conn: psycopg.Connection[Any]) -> bool:
        rows = conn.execute(
            query("claim_batch"),
            {
                "owner": self.who.replica_id,
                "epoch": self.who.epoch,
                "limit": self.settings.batch_size,
                "max_bytes": self.settings.max_claim_bytes,
                "lease_s": self.settings.lease_s,
            },
        ).fetchall()
        if not rows:
            return False
        effects = [ClaimedEffect(*row) for row in rows]
        self.held.add(e.id for e in effects)
        observability.record_transition("PENDING", "DISPATCHING", len(effects))
        self._quiet = 0
        self._in_hand = Claimed(effects)
        self._hand_over()
        return True

    def _hand_over(self) -> None:
        assert self._in_hand is not None
        while not self.stop.is_set():
            try:
                self.batches.put(self._in_hand, timeout=HANDOFF_POLL_S)
            except queue.Full:
                continue
            self._in_hand = None
            return

    def _idle(self, conn: psycopg.Connection[Any]) -> None:
        assert self.listener is not None
        if self._quiet < len(QUIET_POLLS_S):
            delay = QUIET_POLLS_S[self._quiet]
            self._quiet += 1
            self.stop.wait(delay)
            return
        armed_for = self.settings.poll_interval_s * 2 + 1.0
        self.listener.execute(query("arm_doorbell"), {"armed_for_s": armed_for})
        if self._claim(conn):
            self.listener.execute(query("disarm_doorbell"))
            return
        rang = False
        for _ in self.listener.notifies(timeout=self.settings.poll_interval_s, stop_after=1):
            rang = True
        if rang or self.stop.is_set():
            self.listener.execute(query("disarm_doorbell"))
            self._quiet = 0


class Marker(Stage):
    """Records how each attempt of a batch ended, in one statement per batch.

    A database outage is waited out until the batch's lease would end (compare-and-set makes
    retries safe); after that the lease expiry makes the attempts UNKNOWN."""

    name = "marker"

    def __init__(
        self,
        settings: Settings,
        who: Identity,
        held: Held,
        stop: threading.Event,
        on_marked: Callable[[Sequence[PublishResult]], None] | None = None,
    ):
        super().__init__(settings, who, held, stop)
        self.inbox: queue.Queue[tuple[Sequence[PublishResult], float]] = queue.Queue(maxsize=2)
        self._closing = threading.Event()
        self._current: tuple[Sequence[PublishResult], float] | None = None
        self._on_marked = on_marked

    def submit(self, results: Sequence[PublishResult], claimed_at: float) -> None:
        """Blocks while two batches already wait: the publisher cannot run far ahead."""
        if results:
            self.inbox.put((results, claimed_at))

    def close(self, timeout_s: float) -> None:
        """Mark everything submitted, then end the thread."""
        self._closing.set()
        self.thread.join(timeout_s)

    def finished(self) -> bool:
        return self._closing.is_set() and self._current is None and self.inbox.empty()

    def pause(self, delay: float, why: str) -> None:
        log.warning("%s stage: %s; retrying in %.1fs", self.name, why, delay)
        time.sleep(delay)  # outcomes in hand are recorded even while stopping

    def step(self) -> None:
        if self._current is None:
            try:
                self._current = self.inbox.get(timeout=HANDOFF_POLL_S)
            except queue.Empty:
                return
        results, claimed_at = self._current
        if time.monotonic() - claimed_at > self.settings.lease_s:
            log.error(
                "could not record %d outcomes before the lease ran out; they will be "
                "resolved as UNKNOWN",
                len(results),
            )
        else:
            self._mark(self.connect(), results)
        self.held.discard(r.effect.id for r in results)
        self._current = None

    def _mark(self, conn: psycopg.Connection[Any], results: Sequence[PublishResult]) -> None:
        """One statement for the batch. A row the database refuses (a value it cannot store, a
        constraint an operator added) must not keep the others unrecorded: the batch is split
        until the refused row stands alone; it is left to its lease expiry (UNKNOWN, then
        verified) and the rest are recorded."""
        try:
            self._mark_set(conn, results)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            if len(results) == 1:
                r = results[0]
                log.error(
                    "the outcome of this attempt could not be recorded; its lease expiry will "
                    "make it UNKNOWN, to be verified",
                    extra={
                        "operation_key": r.effect.operation_key,
                        "effect_id": r.effect.id,
                        "attempt": r.effect.attempt,
                        "outcome": r.outcome.value,
                        "reason": describe(exc),
                    },
                )
                return
            half = len(results) // 2
            self._mark(conn, results[:half])
            self._mark(conn, results[half:])

    def _mark_set(self, conn: psycopg.Connection[Any], results: Sequence[PublishResult]) -> None:
        states = [state_after(self.settings, r).value for r in results]
        params = {
            "owner": self.who.replica_id,
            "epoch": self.who.epoch,
            "ids": [r.effect.id for r in results],
            "attempts": [r.effect.attempt for r in results],
            "states": states,
            "outcomes": [r.outcome.value for r in results],
            "reasons": [reason_of(self.settings, r) for r in results],
            "partitions": [r.partition for r in results],
            "offsets": [r.offset for r in results],
            "delays_s": [not_sent_delay(self.settings, r) for r in results],
        }
        marked = conn.execute(query("mark_outcomes"), params).fetchall()
        observability.record_marked(results, states, [row[0] for row in marked])
        if len(marked) != len(results):
            log.warning(
                "some outcomes were not recorded: the lease was lost or the replica fenced",
                extra={"expected": len(results), "recorded": len(marked)},
            )
        if self._on_marked is not None:
            self._on_marked(results)


def released(batch: Claimed) -> list[PublishResult]:
    """A batch given back unsent (shutdown, or claimed too long ago to publish safely)."""
    return [
        PublishResult(e, AttemptOutcome.RELEASED, "given back unsent by the relay", suspect=False)
        for e in batch.effects
    ]


def gave_up(settings: Settings, result: PublishResult) -> bool:
    """Attempts that provably published nothing are retried, but not forever."""
    retriable = STATE_AFTER[result.outcome] is EffectState.PENDING
    return retriable and result.suspect and result.effect.attempt >= settings.max_publish_attempts


def state_after(settings: Settings, result: PublishResult) -> EffectState:
    return EffectState.REJECTED if gave_up(settings, result) else STATE_AFTER[result.outcome]


def reason_of(settings: Settings, result: PublishResult) -> str | None:
    """The reason recorded with the outcome (a broker's words can hold what text cannot)."""
    reason = result.reason
    if gave_up(settings, result):
        reason = (
            f"gave up after {result.effect.attempt} attempts that published nothing; last: {reason}"
        )
    return None if reason is None else reason.replace("\x00", "\ufffd")


def not_sent_delay(settings: Settings, result: PublishResult) -> float:
    if STATE_AFTER[result.outcome] is not EffectState.PENDING or not result.suspect:
        # An innocent record of an aborted transaction goes again at once; the suspects wait
        # (with jitter), so the next batch is not poisoned by the same record.
        return 0.0
    exponent = min(result.effect.attempt - 1, 20)
    cap = settings.not_sent_backoff_max_s
    return float(min(cap, settings.not_sent_backoff_s * 2**exponent)) * random.uniform(0.5, 1.5)

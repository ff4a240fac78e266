"""The claimer stage: reads the intake into effect rows (claiming at once what can be published
at once), claims batches ahead of the publisher while there is a backlog (when the publisher is
free under live load), and waits cheaply when there is nothing to claim (short polls after work,
then the doorbell and the intake's sequence).

Each claim commits before the batch is handed over, so an attempt is durable before any publish.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import threading
import time
from typing import Any

import psycopg

from relay import db, observability
from relay.config import Settings
from relay.dispatch.intake import Claim, IntakeReader, Promoted
from relay.dispatch.publisher import ClaimedEffect
from relay.dispatch.stage import HANDOFF_POLL_S, Claimed, Held, Identity, Stage, expire_leases
from relay.dispatch.status_records import StatusRoute
from relay.sql import query

log = logging.getLogger(__name__)

# Short polls after the last work seen, before the relay arms the doorbell (150 ms in all).
QUIET_POLLS_S = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08)
# While idle, how often the intake's sequence is read (an intent is a plain INSERT: no doorbell).
INTAKE_POLL_S = 0.01
# A claim of this many effects is a backlog's, whatever batch_size is: a claim from the pool
# (group heads let go, retries) seldom fills a batch of 5,000, and the claimer would then wait for
# the publisher before each claim instead of claiming ahead.
FULL_BATCH = 500


def doorbell_rang(listener: psycopg.Connection[Any], timeout_s: float) -> bool:
    """Whether a ring arrived on the listening connection within ``timeout_s``.

    A look at what psycopg already holds (a ring received while the connection ran a command:
    the socket no longer shows it), then a wait on the socket, then a look again, neither look
    waiting. psycopg's own ``notifies(timeout=...)`` polls while it waits: about 1 ms of CPU per
    10 ms call, so an idle relay, which waits in 10 ms slices, took 10-14 % of a core (measured
    with ``time.process_time``)."""
    if _rang(listener):
        return True
    fd = listener.pgconn.socket
    if hasattr(select, "poll"):  # no limit on the descriptor's number, unlike select.select
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(max(0, round(timeout_s * 1000)))
    else:  # Windows: select.select takes any socket there
        select.select([fd], [], [], timeout_s)
    return _rang(listener)


def _rang(listener: psycopg.Connection[Any]) -> bool:
    rang = False
    for _ in listener.notifies(timeout=0, stop_after=1):  # consumed whole: it holds a lock
        rang = True
    return rang


def claim_was_cut(
    effects: list[ClaimedEffect], *, more: bool, batch_size: int, max_bytes: int
) -> bool:
    """Whether a claim stopped short of the work there was (a backlog), not for want of work
    (live load): it filled a batch (or took ``FULL_BATCH``), work was left behind it (``more``:
    rows of the pair unread, or rows its read left in the pool), or its payloads came near the
    byte cap. The cap counts payloads as stored (jsonb, perhaps compressed), so half of it in
    UTF-8 counts as reached: a wrong guess errs toward "backlog", which claims ahead as before
    (throughput), never toward waiting."""
    if more or len(effects) >= min(batch_size, FULL_BATCH):
        return True
    chars = sum(len(e.payload) for e in effects)
    if chars * 8 < max_bytes:  # at most 4 bytes a character: far from half the cap
        return False
    return sum(len(e.payload.encode()) for e in effects) * 2 >= max_bytes


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
        # Whether the status events of what is claimed now may ride in its Kafka transaction.
        self.status_route = StatusRoute()
        # One claim's worth of intake rows per read: what is due and ungrouped is claimed by the
        # read itself (promoting a whole backlog before claiming left the publisher idle).
        self.intake = IntakeReader(limit=min(50_000, settings.batch_size))
        self._pool_turn = True
        # Set while the publisher waits for a batch: it has none in hand.
        self.publisher_waiting = threading.Event()
        # The last claim took all there was (claim_was_cut says no): the intake is read as it is
        # written (live load), not drained.
        self._live = False

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
        self.publisher_waiting.set()
        try:
            batch = self.batches.get(timeout=timeout_s)
        except queue.Empty:
            return None
        self.publisher_waiting.clear()
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
        if self._live and not self.publisher_waiting.is_set():
            # Live load: claim when the publisher is free. What arrives while it publishes then
            # goes out in the next transaction, instead of waiting a whole transaction more in a
            # batch claimed ahead (at 300/s: p50 from enqueue to a reader was about 2.5
            # transactions). A backlog (full batches) is claimed ahead, so that the claim's read
            # and the publish overlap.
            self.publisher_waiting.wait(HANDOFF_POLL_S)
            return
        conn = self.connect()
        if self.listener is None or self.listener.closed:
            self.listener = db.connect(self.settings, purpose=f"doorbell-{self.who.replica_id}")
            self.listener.execute(query("listen_doorbell"))
            self._quiet = len(QUIET_POLLS_S)  # a new listener may have missed a ring: look now
        # The pool of PENDING effect rows (retries, scheduled and grouped intents, effects from
        # before the intake) and the intake take turns, so that neither starves the other.
        pool_first, self._pool_turn = self._pool_turn, not self._pool_turn
        if pool_first and self._claim(conn):
            return
        read = self._read_intake(conn)
        if read.claimed:
            return
        # Rows just written PENDING (grouped, scheduled) are the pool's: claim them now.
        if (read.promoted or not pool_first) and self._claim(conn):
            return
        self._idle(conn)

    def _read_intake(self, conn: psycopg.Connection[Any]) -> Promoted:
        """Tick and promote when the intake may have news, claiming the rows that can be
        published at once (handed over like a claim)."""
        claim = Claim(
            owner=self.who.replica_id,
            epoch=self.who.epoch,
            lease_s=self.settings.lease_s,
            limit=self.settings.batch_size,
            max_bytes=self.settings.max_claim_bytes,
            status_in_txn=(
                self.settings.status_events
                and self.settings.kafka_transactions
                and self.status_route.in_txn()
            ),
        )
        asked = time.monotonic()
        done = self.intake.run_once(conn, asked, claim)
        if done.claimed:
            # Rows written to the pool by this read (over the byte cap, grouped, not yet due)
            # are work left behind too.
            self._hold(list(done.claimed), asked, more=done.more or done.promoted > 0)
        if done.rows:
            observability.record_intake_read(
                done.promoted + len(done.claimed), done.rejected, done.refused
            )
            if done.rejected or done.refused:
                log.warning(
                    "intake: %d intents REJECTED when read (relay list --state REJECTED), %d "
                    "refused as naming another effect's key (relay.intake_refused)",
                    done.rejected,
                    done.refused,
                )
        return done

    def _claim(self, conn: psycopg.Connection[Any]) -> bool:
        asked = time.monotonic()
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
        # A pool claim while the intake's pair has rows left is part of a backlog.
        self._hold([ClaimedEffect(*row) for row in rows], asked, more=self.intake.more)
        return True

    def _hold(self, effects: list[ClaimedEffect], asked: float, *, more: bool = False) -> None:
        """Claimed (committed): held until marked, and handed to the publisher. Its lease is
        counted from ``asked``, before the claim was sent, as the database counts it from the
        claim's start: an answer that came late (a slow statement, a process paused while the
        answer was on its way) must not make the claim look fresher than it is, or the
        publisher could send it after another replica took it over."""
        self.held.add(e.id for e in effects)
        observability.record_transition("PENDING", "DISPATCHING", len(effects))
        self._quiet = 0
        self._live = not claim_was_cut(
            effects,
            more=more,
            batch_size=self.settings.batch_size,
            max_bytes=self.settings.max_claim_bytes,
        )
        self._in_hand = Claimed(effects, asked)
        self._hand_over()

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
        deadline = time.monotonic() + self.settings.poll_interval_s
        while not rang and not self.stop.is_set() and time.monotonic() < deadline:
            rang = doorbell_rang(self.listener, INTAKE_POLL_S)
            if not rang and self._read_intake(conn).rows:
                rang = True
        if rang or self.stop.is_set():
            self.listener.execute(query("disarm_doorbell"))
            self._quiet = 0

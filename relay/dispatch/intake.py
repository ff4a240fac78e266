"""The batch read of the intake: the rows committed between two ticks, in id order.

A batch is the rows "visible in tick b and not visible in tick a" (docs/design/intake.md §4),
read with the tick pair in one statement (``read_intake_batch``), so that the statement's
snapshot, taken after tick b committed, sees every row tick b saw: a reader can read nothing, never
part of a batch. Batches are defined by stored snapshots, not by ids or xids, which is what makes
the reader immune to the traps of §9:

- an identity cursor across time skips a row whose transaction drew its id early and committed
  late; here a row belongs to the first tick that sees its transaction committed, whatever its id;
- xids are not commit order: nothing is ordered by xid. Across batches the order is commit order
  at tick granularity; within a batch it is id order, which inside an ordering group is commit
  order (the group's lock is taken before the id is drawn);
- a long or PREPAREd transaction closes no batch: it stays in the snapshots' in-progress lists and
  its rows are found by an exact txid probe in the first pair that sees it committed;
- a row written in a SAVEPOINT carries the top-level xid (``txid``, ``pg_current_xact_id()``),
  the xid snapshots speak of, not ``xmin``.

The set of rows between two stored snapshots is fixed, so a pair with more rows than ``limit``
is read in parts by an id cursor inside that pair (:class:`Position`), which cannot skip. The
relay's read (``promote_intake``, migration 0026) also ends a part early: after 500 rows once it
meets an ordering group, and where its rows reach the claim's byte cap; :func:`read_batch` does
not.

``relay run`` reads the intake through :class:`IntakeReader`: the claimer asks it for a tick and
the next batches before each claim, and ``relay.promote_intake`` (migrations 0011 to 0013) reads
a batch and claims for the caller, in one statement, the rows it can publish at once: the
ungrouped ones by one ``relay.dispatch_batch`` row (their effect rows are written once, with their
outcome), the grouped ones as DISPATCHING effect rows; the other rows are written as effect rows
for the pool (``read_batch`` here is the same read without the writes, for the tests and the
bench). Lanes and a position kept in Kafka are the design's next slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from relay.dispatch.publisher import ClaimedEffect
from relay.dispatch.ticker import HEARTBEAT_S, Ticker
from relay.sql import query

BATCH_LIMIT = 2000
"""Rows per batch by default (the design's proposed transaction size; slice 3 measures it)."""
MAX_TICKS = 1000
"""At most this many ticks merged into one pair, so that a pair stays bounded after an outage."""


TICK_LOCK_TIMEOUT_S = 0.05
"""Another replica is ticking: wait this long at most, then go on with the ticks there are."""


class Position(NamedTuple):
    """Where a reader is: after tick ``tick_from`` (and, inside a split pair fixed at
    ``tick_to``, after id ``after_id``). A reader starts at tick 0, which sees nothing."""

    tick_from: int = 0
    tick_to: int | None = None
    after_id: int = 0


class IntakeRow(NamedTuple):
    """One intake row as the reader gets it (payload as JSON text: it goes on to Kafka as is)."""

    id: int
    operation_key: str
    effect_type: str
    payload: str
    business_key: str | None
    traceparent: str | None
    available_at: datetime | None
    ordering_group: str | None
    enqueued_by: str
    txid: int


@dataclass(frozen=True)
class Batch:
    """The rows read between ``tick_from`` and ``tick_to`` after ``after_id``, in id order.

    ``tick_to`` is None when no tick follows ``tick_from`` yet (nothing to read)."""

    tick_from: int
    tick_to: int | None
    after_id: int
    limit: int
    rows: tuple[IntakeRow, ...]

    @property
    def exhausted(self) -> bool:
        """The pair has no row after these: the next batch starts from ``tick_to``."""
        return len(self.rows) < self.limit

    def next_position(self) -> Position:
        """Where the next read starts: the same place when there was no pair; the rest of the
        same pair when it was cut at ``limit``; else after ``tick_to``."""
        if self.tick_to is None:
            return Position(self.tick_from, None, self.after_id)
        if self.exhausted:
            return Position(self.tick_to)
        return Position(self.tick_from, self.tick_to, self.rows[-1].id)


def read_batch(
    conn: psycopg.Connection[Any],
    position: Position,
    *,
    limit: int = BATCH_LIMIT,
    max_ticks: int = MAX_TICKS,
) -> Batch:
    """One statement: the next pair after ``position`` (or the pair it fixes) and up to
    ``limit`` of its rows. Run on the primary, in READ COMMITTED or with a snapshot at least as
    new as the tick (an older one finds no tick b and reads nothing)."""
    if limit < 1 or max_ticks < 1:
        raise ValueError("limit and max_ticks must be at least 1")
    found = conn.execute(
        query("read_intake_batch"),
        {
            "tick_from": position.tick_from,
            "tick_to": position.tick_to,
            "after_id": position.after_id,
            "max_ticks": max_ticks,
            "limit": limit,
        },
    ).fetchall()
    if not found:
        return Batch(position.tick_from, None, position.after_id, limit, ())
    rows = tuple(IntakeRow._make((*row[2:11], int(row[11]))) for row in found if row[2] is not None)
    return Batch(int(found[0][0]), int(found[0][1]), position.after_id, limit, rows)


@dataclass(frozen=True)
class Claim:
    """Whose claim a read writes for the rows it can publish at once (claim_batch's terms)."""

    owner: str
    epoch: int
    lease_s: float
    limit: int
    max_bytes: int
    # The caller publishes in Kafka transactions and status events are on: the status events of
    # a batch's intents whose type awaits no result ride in the batch's transaction.
    status_in_txn: bool = False


@dataclass(frozen=True)
class Promoted:
    """One call of ``relay.promote_intake``: effect rows written PENDING (``promoted``), claimed
    for the caller (``claimed``, the rows themselves: ungrouped ones in a batch, without an effect
    row until their outcome), REJECTED (``rejected``: the checks the
    intake does not make), intents set aside because their key names another effect
    (``refused``), and whether the pair has rows left (``more``). ``read`` is False when another
    replica held the reader, or no tick followed."""

    read: bool
    promoted: int = 0
    rejected: int = 0
    refused: int = 0
    more: bool = False
    last_id: int = 0
    claimed: tuple[ClaimedEffect, ...] = ()

    @property
    def rows(self) -> int:
        return self.promoted + len(self.claimed) + self.rejected + self.refused


def promote(
    conn: psycopg.Connection[Any],
    *,
    limit: int,
    max_ticks: int = MAX_TICKS,
    claim: Claim | None = None,
) -> Promoted:
    """The next batch after the reader's position, written as effect rows (those ``claim``
    allows already claimed), the position moved, all in one transaction (the connection in
    autocommit mode: one statement)."""
    found = conn.execute(
        query("promote_intake"),
        {
            "limit": limit,
            "max_ticks": max_ticks,
            "owner": claim.owner if claim else None,
            "epoch": claim.epoch if claim else None,
            "lease_s": claim.lease_s if claim else None,
            "claim": claim.limit if claim else 0,
            "max_bytes": claim.max_bytes if claim else None,
            "status_in_txn": claim.status_in_txn if claim else False,
        },
        binary=True,
    ).fetchall()
    if not found:
        return Promoted(read=False)
    *rows, summary = found
    promoted, _claimed, rejected, refused, _tick_from, _tick_to, more, last_id = summary[12:20]
    return Promoted(
        True,
        int(promoted),
        int(rejected),
        int(refused),
        bool(more),
        int(last_id or 0),
        tuple(
            # One constructor call a row (dataclasses.replace doubled the Python cost of a read).
            ClaimedEffect(*(*row[:12], bool(row[20]), row[21]))
            for row in rows
        ),
    )


class IntakeReader:
    """What the claimer calls before each claim: a tick when one may be due, then batches.

    Ticking costs a lock and a snapshot (several hundred microseconds of the server's CPU), so it
    is asked for only when the intake's sequence moved past what was read (for at most a
    heartbeat: an id drawn by a transaction that rolled back is never read), when the last batch
    was cut (at the limit, or early: see the module's docstring), or when the heartbeat is due
    (a transaction that drew its id before the last tick and committed after it, with no writer
    since)."""

    def __init__(self, *, limit: int, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.limit = limit
        self.heartbeat_s = heartbeat_s
        self.ticker = Ticker(heartbeat_s=heartbeat_s, lock_timeout_s=TICK_LOCK_TIMEOUT_S)
        self._seen = 0
        self._read_max = 0
        self._chase_until = 0.0
        self._last_tick = float("-inf")
        self._more = False

    @property
    def more(self) -> bool:
        """The last batch read left rows of its pair unread."""
        return self._more

    def news(self, conn: psycopg.Connection[Any], now: float) -> bool:
        """Whether a tick may find something: cheap (one sequence read)."""
        row = conn.execute(query("intake_sequence")).fetchone()
        seq = int(row[0]) if row is not None else 0
        if seq != self._seen:
            self._seen = seq
            self._chase_until = now + self.heartbeat_s
        chasing = now < self._chase_until and self._read_max < self._seen
        return self._more or chasing or now - self._last_tick >= self.heartbeat_s

    def run_once(
        self, conn: psycopg.Connection[Any], now: float, claim: Claim | None = None
    ) -> Promoted:
        """Tick if worth it, then promote one batch (claiming what ``claim`` allows): one per
        claim, so that the claimer claims between them (a relay that promoted a whole backlog
        before claiming left its publisher idle, and a second relay with it)."""
        if not self.news(conn, now):
            return Promoted(read=False)
        if not self._more:
            self.ticker.run_once(conn)
            self._last_tick = now
        done = promote(conn, limit=self.limit, claim=claim)
        self._more = done.more
        self._read_max = max(self._read_max, done.last_id)
        return done

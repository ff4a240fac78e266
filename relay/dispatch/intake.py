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
is read in parts by an id cursor inside that pair (:class:`Position`), which cannot skip.

Slice 1: nothing calls this outside the tests yet. Slice 3 wires it into ``relay run`` with
lanes and per-batch bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from relay.sql import query

BATCH_LIMIT = 2000
"""Rows per batch by default (the design's proposed transaction size; slice 3 measures it)."""
MAX_TICKS = 1000
"""At most this many ticks merged into one pair, so that a pair stays bounded after an outage."""


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

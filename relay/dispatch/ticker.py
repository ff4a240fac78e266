"""The ticker: stores ``pg_current_snapshot()`` as numbered ticks, which the intake is read between.

A batch of the intake is "the rows visible in tick b and not in tick a" (``intake.py``), so the
ticks must never go backwards: every transaction a tick sees committed, every later tick sees
committed too (docs/design/intake.md §3). Two things make that hold:

- **One ticker at a time, and the snapshot taken after the lock.** A tick is one READ COMMITTED
  transaction of two statements: ``LOCK TABLE relay.tick IN SHARE ROW EXCLUSIVE MODE``, then the
  INSERT of the snapshot. The snapshot belongs to the second statement, so it is taken after the
  lock was granted, that is after the previous tick's transaction committed and became visible:
  a snapshot taken after another one's transaction committed sees everything that one saw. (PgQ
  warns that its ticker "cannot be protected with locks as the snapshot is taken before
  locking": a lock taken in the snapshot's own statement, or any statement of a REPEATABLE READ
  transaction, comes too late; tests/integration/test_intake.py shows the latter going
  backwards.) The INSERT also refuses, and this module raises, a snapshot whose xmin or xmax is
  below the last tick's: a restored or different server.
- **Why a table lock, not an advisory lock.** ``pg_advisory_xact_lock`` can be taken by any role
  that can connect, so an application (or anything else) could hold the ticker's key and stall
  every publication. A SHARE ROW EXCLUSIVE lock on ``relay.tick`` needs UPDATE, DELETE or
  TRUNCATE on the table, which only the relay role has (``relay roles``: INSERT and DELETE, the
  latter for the ticks' retention). It conflicts with itself and with writes of the table, never
  with plain reads (ACCESS SHARE), so readers of ticks never wait for the ticker; it writes
  nothing (a row lock on a one-row table would dirty a page on every tick).

A tick is stored only when something new is visible: an intake row visible in the snapshot that
the last tick did not see, decided by the same statement and the same snapshot that is stored, so
the check is exact (a long transaction's commit counts too, with no new insert). Otherwise a tick
is stored when the last one is older than the heartbeat, so that readers and metrics see the
ticker alive. Ids are the last id + 1 under the lock, so ticks commit in id order.

Not wired into ``relay run`` yet (slice 3 of the design adds the ticker lease and the loop);
``run_once`` is what that loop will call every ``TICK_EVERY_S``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

from relay.errors import TickerError
from relay.sql import query

TICK_EVERY_S = 0.005
"""How often the loop (slice 3) asks for a tick: the floor of enqueue-to-read latency."""
HEARTBEAT_S = 1.0
"""With nothing new, a tick at least this often, so that readers and metrics see the ticker."""
LOCK_TIMEOUT_S = 5.0
"""How long a ticker waits for another one's tick before it reports itself busy."""


class TickReason(enum.StrEnum):
    """Why a tick was stored, or why not."""

    FIRST = "first"
    """There was no tick at all (tick 0 comes with the migration, so only after a wipe)."""
    NEWS = "news"
    """An intake row is visible that the last tick did not see."""
    HEARTBEAT = "heartbeat"
    """Nothing new, but the last tick is older than the heartbeat."""
    NOTHING_NEW = "nothing_new"
    """Nothing new and the last tick is recent: nothing stored."""
    BUSY = "busy"
    """Another ticker held the lock longer than the lock timeout: nothing stored."""


STORING = frozenset({TickReason.FIRST, TickReason.NEWS, TickReason.HEARTBEAT})


def reason_of(*, first: bool, news: bool, heartbeat_due: bool) -> TickReason:
    """The tick statement's decision, told as one reason (news wins over the heartbeat)."""
    if first:
        return TickReason.FIRST
    if news:
        return TickReason.NEWS
    if heartbeat_due:
        return TickReason.HEARTBEAT
    return TickReason.NOTHING_NEW


@dataclass(frozen=True)
class Ticked:
    """What one ``run_once`` did: the tick it stored (``stored``), else the last one, and why."""

    stored: bool
    reason: TickReason
    tick_id: int | None


class Ticker:
    """Stores a tick when one is needed; one ``run_once`` is one short transaction.

    The connection must be in autocommit mode (each tick commits on its own) and on the primary:
    a standby cannot take the lock or write the tick.
    """

    def __init__(
        self, *, heartbeat_s: float = HEARTBEAT_S, lock_timeout_s: float = LOCK_TIMEOUT_S
    ) -> None:
        if heartbeat_s <= 0 or lock_timeout_s <= 0:
            raise ValueError("heartbeat_s and lock_timeout_s must be positive")
        self.heartbeat_s = heartbeat_s
        self._lock = sql.SQL(query("tick_lock")).format(
            timeout=sql.Literal(f"{max(1, round(lock_timeout_s * 1000))}ms")
        )

    def run_once(self, conn: psycopg.Connection[Any]) -> Ticked:
        """Take the lock, then store the snapshot if something new is visible or the heartbeat
        is due. Raises :class:`TickerError` on a snapshot below the last tick's."""
        try:
            with conn.transaction():
                conn.execute(self._lock)
                row = conn.execute(query("tick"), {"heartbeat_s": self.heartbeat_s}).fetchone()
        except psycopg.errors.LockNotAvailable:
            return Ticked(stored=False, reason=TickReason.BUSY, tick_id=None)
        assert row is not None
        last_id, stored_id, first, news, heartbeat_due, backwards, snap, last_snap = row
        if backwards:
            raise TickerError(
                f"the snapshot {snap} is older than tick {last_id}'s ({last_snap}): this server "
                "is not the one the ticks were taken on (restored, or a standby promoted "
                "behind it); nothing was stored"
            )
        reason = reason_of(first=bool(first), news=bool(news), heartbeat_due=bool(heartbeat_due))
        stored = stored_id is not None
        assert stored == (reason in STORING), (reason, stored_id)
        tick_id = stored_id if stored else last_id
        return Ticked(stored, reason, None if tick_id is None else int(tick_id))

"""What every database stage of the dispatch side shares, and what they hand to each other.

The relay's database work runs in stages, each on its own thread and connection: the claimer
(``claimer.py``) claims ahead of the publisher (``daemon.py``), the marker (``marker.py``) records
outcomes behind it, the status-event publisher (``status_events.py``) follows the transitions log.
The hand-offs are small bounded queues: at most two batches claimed ahead, two waiting to be marked.
Here: the stage thread that waits out outages, who the stages act as, the claimed batch handed
along, the ids in hand, and lease expiry, which every stage that reconnects needs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from relay import db, observability
from relay.backoff import Backoff
from relay.config import Settings
from relay.dispatch.outcomes import AttemptOutcome
from relay.dispatch.publisher import ClaimedEffect, PublishResult
from relay.errors import ServiceUnavailableError, describe
from relay.sql import query

log = logging.getLogger(__name__)

HANDOFF_POLL_S = 0.05  # how often a stage waiting on a hand-off looks at its stop signal


@dataclass(frozen=True)
class Identity:
    """Who claims and marks: the replica and the epoch it registered with."""

    replica_id: str
    epoch: int


@dataclass
class Claimed:
    """A claimed batch, and when (monotonic) its claim was sent: its lease runs from then. No
    default: the time taken after the claim's answer makes a late answer look fresh."""

    effects: list[ClaimedEffect]
    at: float


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
    conn: psycopg.Connection[Any],
    who: Identity,
    held: Held,
    *,
    all_own: bool = False,
    leave_receipted: bool = False,
    lease_s: float = 0.0,
) -> int:
    """Effects left DISPATCHING past their lease (or, with ``all_own``, this replica's rows and
    batches that no stage holds) become UNKNOWN; returns how many. With ``leave_receipted``,
    batches whose incarnation writes receipts are left to the settler (``settler.py``): this
    replica's, and another's until ``lease_s`` past its lease."""
    params = {
        "owner": who.replica_id,
        "epoch": who.epoch,
        "limit": 1000,
        "all_own": all_own,
        "held": held.snapshot() if all_own else [],
        "leave_receipted": leave_receipted,
        "lease_s": lease_s,
    }
    expired = 0
    for name in ("expire_leases", "expire_batches"):
        row = conn.execute(query(name), params).fetchone()
        expired += int(row[0]) if row else 0
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


def released(batch: Claimed) -> list[PublishResult]:
    """A batch given back unsent (shutdown, or claimed too long ago to publish safely)."""
    return [
        PublishResult(e, AttemptOutcome.RELEASED, "given back unsent by the relay", suspect=False)
        for e in batch.effects
    ]

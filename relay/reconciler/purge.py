"""Housekeeping: finished effects past retention go, with their attempts, transitions and evidence.

Finished means CONFIRMED, REJECTED, CANCELLED, or PUBLISHED with no downstream result awaited
(``outcome_deadline`` unset: the type had no result topic when the effect was published, whatever
the configuration says now). Nothing else is ever removed. An effect and its compensations are one
family, removed together in one statement once every member is finished and past retention; a
compensation never goes alone while its parent exists, so it is never created again for the same
extra execution. Each batch is its own short transaction that skips rows somebody holds (and the
families they belong to), so the purge never blocks enqueue, dispatch or the reconciler. The
keys of purged effects are remembered for ``dedupe_window_s`` (``relay.purged_key``): an
application retrying an old intent is refused (OperationKeyConflictError), never published again.

Each batch is a call of a ``SECURITY DEFINER`` function owned by the schema owner
(``relay.purge_batch``, ``relay.purge_unattached_evidence``, ``relay.purge_forgotten_keys``:
migration 0008; ``relay.purge_refused_intake``: 0020), so ``relay purge`` runs under the
operator role, which may delete no row itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg

from relay.config import Settings
from relay.sql import query


@dataclass(frozen=True)
class PurgeCounts:
    effects: int
    attempts: int
    transitions: int
    evidence: int
    refused: int  # intents set aside when read (relay.intake_refused), never effects


class Purged(NamedTuple):
    """What one purge removed."""

    effects: int
    evidence: int  # unattached: malformed and orphaned results
    refused: int  # intents set aside when read, with their intake rows


def would_purge(conn: psycopg.Connection[Any], retention_s: float) -> PurgeCounts:
    row = conn.execute(query("purge_counts"), {"retention_s": retention_s}).fetchone()
    assert row is not None
    return PurgeCounts(*(int(v) for v in row))


def purge(
    conn: psycopg.Connection[Any], settings: Settings, retention_s: float | None = None
) -> Purged:
    """Delete in batches until nothing is left; returns what was removed.

    A batch takes up to ``purge_batch_size`` families; every member removed counts as an effect.
    """
    keep_s = settings.retention_s if retention_s is None else retention_s
    params = {
        "retention_s": keep_s,
        "limit": settings.purge_batch_size,
        "dedupe_window_s": settings.dedupe_window_s,
    }
    removed = dict.fromkeys(PURGES, 0)
    for name in PURGES:
        while True:
            with conn.transaction():
                done = len(conn.execute(query(name), params).fetchall())
            removed[name] += done
            if done == 0:
                break
    return Purged(
        removed["purge_batch"],
        removed["purge_unattached_evidence"],
        removed["purge_refused_intake"],
    )


# Each a SECURITY DEFINER function, called in batches until it removes nothing.
PURGES = (
    "purge_batch",
    "purge_unattached_evidence",
    "purge_refused_intake",
    "purge_forgotten_keys",
)

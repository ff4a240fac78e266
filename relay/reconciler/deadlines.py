"""Timers: a PUBLISHED effect without a result past its deadline is UNKNOWN; results that came
while their effect was still DISPATCHING are applied once the relay has recorded the publish."""

from __future__ import annotations

from typing import Any

import psycopg

from relay import observability
from relay.config import Settings
from relay.messages import ResultMessage, ResultOutcome
from relay.reconciler.results import StoredResult, apply_results
from relay.sql import query


def expire_deadlines(conn: psycopg.Connection[Any], actor: str, limit: int = 500) -> int:
    """One batch, in its own transaction (``FOR UPDATE SKIP LOCKED``: replicas share the work)."""
    with conn.transaction():
        rows = conn.execute(query("expire_deadlines"), {"limit": limit, "actor": actor}).fetchall()
    observability.record_transition("PUBLISHED", "UNKNOWN", len(rows))
    return len(rows)


def apply_deferred(
    conn: psycopg.Connection[Any], settings: Settings, actor: str, limit: int = 200
) -> int:
    """Apply the results that waited for the relay to record their effect's publication, as the
    consumer applies a batch (in arrival order: a result still waits behind an earlier one)."""
    with observability.deferred(), conn.transaction():
        rows = conn.execute(query("claim_deferred_evidence"), {"limit": limit}).fetchall()
        stored = [
            StoredResult(
                int(evidence_id),
                ResultMessage(
                    operation_key=key,
                    outcome=ResultOutcome(outcome),
                    external_id=external_id,
                    detail=detail,
                ),
                topic,
            )
            for evidence_id, key, topic, _partition, _offset, outcome, external_id, detail in rows
        ]
        apply_results(conn, settings, actor, stored)
    return len(rows)

"""What operators read: effects filtered by state, type, group and age (``relay list``), and
counted by type and state (``relay stats``). The queries are in ``sql/inspection.sql``."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.sql import query


def list_effects(
    conn: psycopg.Connection[Any],
    *,
    state: str | None = None,
    effect_type: str | None = None,
    group: str | None = None,
    older_than_s: float | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Effects oldest change first; ``state`` may be PARKED (PENDING behind a failed effect of
    its group, with the effect it waits for as its reason)."""
    params = {
        "state": state,
        "effect_type": effect_type,
        "group": group,
        "older_than_s": older_than_s,
        "limit": limit,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("list_effects"), params)
        return cur.fetchall()


def stats(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Effects by type and state, with the age in seconds of the oldest change in each."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("stats"))
        return cur.fetchall()

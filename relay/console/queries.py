"""What the console reads: the overview, the lists (keyset-paged by id), an effect's story with
its schedule. The SQL is in ``relay/sql/console.sql`` (and ``inspection.sql`` for the counts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.sql import query
from relay.story import load_story

# Lists: which state each tab shows. PARKED is a list of groups, not of effects.
LIST_STATES = ("UNKNOWN", "STUCK", "REJECTED", "PENDING", "DISPATCHING", "PUBLISHED")
ALL_STATES = (
    "PENDING",
    "DISPATCHING",
    "PUBLISHED",
    "CONFIRMED",
    "REJECTED",
    "UNKNOWN",
    "STUCK",
    "CANCELLED",
)


@dataclass(frozen=True)
class Filters:
    """A list's filters, as the URL's query string carries them."""

    state: str | None = None
    effect_type: str | None = None
    group: str | None = None
    key: str | None = None
    key_part: str | None = None
    error: str | None = None
    older_than: str | None = None  # as typed: 15m, 2h; parsed to older_than_s
    older_than_s: float | None = None
    after: int = 0

    def params(self, limit: int) -> dict[str, Any]:
        return {
            "state": self.state,
            "effect_type": self.effect_type,
            "group": self.group,
            "key": self.key,
            "key_part": self.key_part,
            "error": self.error,
            "older_than_s": self.older_than_s,
            "after": self.after,
            "limit": limit,
        }

    def query_string(self, **changes: Any) -> dict[str, str]:
        """The filters as URL parameters (empty ones left out), with ``changes`` applied."""
        values = {
            "state": self.state,
            "type": self.effect_type,
            "group": self.group,
            "key": self.key,
            "key_part": self.key_part,
            "error": self.error,
            "older_than": self.older_than,
            "after": str(self.after) if self.after else None,
        }
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v not in (None, "")}


def overview(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Counts and oldest ages by type and state (but the finished ones), and what the alerts
    watch."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("console_overview"))
        stats = cur.fetchall()
        cur.execute(query("console_alerts"))
        alerts = cur.fetchone() or {}
    return {"stats": stats, "alerts": alerts}


def page(
    conn: psycopg.Connection[Any], name: str, filters: Filters, size: int
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of ``console_effects`` or ``console_parked_groups``, and the id after which the
    next page starts (None: this is the last)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query(name), filters.params(size + 1))
        rows = cur.fetchall()
    more = len(rows) > size
    rows = rows[:size]
    return rows, (int(rows[-1]["id"]) if more else None)


def story(conn: psycopg.Connection[Any], operation_key: str) -> dict[str, Any] | None:
    """``relay show``'s story, with the schedule and, for an effect that parks its group, the
    group and how many wait behind it."""
    found = load_story(conn, operation_key)
    if found is None:
        return None
    effect = found["effect"]
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("console_schedule"), {"effect_id": effect["id"]})
        found["schedule"] = cur.fetchone()
        found["blocks"] = None
        if effect["ordering_group"] is not None:
            cur.execute(query("console_group_blocker"), {"group": effect["ordering_group"]})
            blocker = cur.fetchone()
            if blocker is not None and blocker["id"] == effect["id"] and blocker["waiting"]:
                found["blocks"] = blocker
    return found


def group_blocker(conn: psycopg.Connection[Any], group: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("console_group_blocker"), {"group": group})
        return cur.fetchone()


def audit_page(
    conn: psycopg.Connection[Any], key: str | None, before: int | None, size: int
) -> tuple[list[dict[str, Any]], int | None]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            query("console_audit_page"),
            {"key": key, "before": before or 2**63 - 1, "limit": size + 1},
        )
        rows = cur.fetchall()
    more = len(rows) > size
    rows = rows[:size]
    return rows, (int(rows[-1]["id"]) if more else None)

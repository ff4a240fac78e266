"""The console's append-only audit (``relay.console_audit``): every decision asked for, applied or
refused, with who asked (as the console knew them), from where, what they saw and why."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from relay.console.auth import Identity
from relay.reconciler.effects import clean_text
from relay.sql import query


def record(
    conn: psycopg.Connection[Any],
    *,
    identity: Identity | None,
    client: str | None,
    action: str,
    operation_key: str | None,
    seen: dict[str, Any],
    reason: str | None,
    group: str | None = None,
    outcome: str,
    detail: str | None,
) -> None:
    """One row. Outside text (a reason, a key) is stored cleaned of NULs and capped, as evidence."""
    conn.execute(
        query("console_insert_audit"),
        {
            "actor": identity.name if identity else "(not signed in)",
            "auth": identity.auth if identity else "none",
            "access": identity.right if identity else "none",
            "client_address": client,
            "action": (clean_text(action) or "")[:64],
            "operation_key": clean_text(operation_key),
            "ordering_group": clean_text(group),
            "seen": json.dumps(
                {k: clean_text(str(v)) if isinstance(v, str) else v for k, v in seen.items()}
            ),
            "reason": clean_text(reason),
            "outcome": outcome,
            "detail": clean_text(detail),
        },
    )

"""An effect's whole story (intent, attempts, evidence, transitions) as read and as printed;
shared by ``relay show`` and the demo."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

from relay.sql import query


def load_story(conn: psycopg.Connection[Any], operation_key: str) -> dict[str, Any] | None:
    """One effect with its attempts, evidence and transitions, each in order; None if unknown."""
    with conn.cursor(row_factory=dict_row) as cur:
        # The payload as text: one that nests too deep to decode must still be shown.
        cur.adapters.register_loader("jsonb", TextLoader)
        cur.execute(query("get_effect"), {"operation_key": operation_key})
        effect = cur.fetchone()
        if effect is None:
            # An intent not read by the relay yet, for a login that may see the intake.
            cur.execute(query("may_read_intake"))
            allowed = cur.fetchone()
            if allowed is None or not next(iter(allowed.values())):
                return None
            cur.execute(query("get_intake_effect"), {"operation_key": operation_key})
            effect = cur.fetchone()
            if effect is None:
                return None
        story: dict[str, Any] = {"effect": effect}
        cur.execute(query("parked_behind"), {"effect_id": effect["id"]})
        story["parked_behind"] = cur.fetchone()
        for part, name in (
            ("attempts", "get_attempts"),
            ("evidence", "get_evidence"),
            ("transitions", "get_transitions"),
        ):
            cur.execute(query(name), {"effect_id": effect["id"]})
            story[part] = cur.fetchall()
    return story


def story_lines(story: dict[str, Any]) -> list[str]:
    """The text of ``relay show``: intent, attempts, evidence, transitions."""
    effect = story["effect"]
    lines = [f"effect {effect['id']}  {effect['operation_key']}  [{effect['state']}]"]
    for field in (
        "effect_type",
        "topic",
        "ordering_group",
        "business_key",
        "traceparent",
        "attempts",
        "reason",
    ):
        if effect.get(field) is not None:
            lines.append(f"  {field:<13} {effect[field]}")
    blocker = story.get("parked_behind")
    if blocker is not None:
        lines.append(
            f"  {'PARKED':<13} behind {blocker['operation_key']} ({blocker['state']}"
            + (f": {blocker['reason']}" if blocker["reason"] else "")
            + "): relay unblock releases the group"
        )
    if effect.get("group_released_at") is not None:
        lines.append(
            f"  {'released':<13} {effect['group_released_at']:%Y-%m-%d %H:%M:%S%z}: its group "
            "went on without it; it is not published again"
        )
    if effect["published_offset"] is not None:
        lines.append(
            f"  {'published':<13} partition {effect['published_partition']} "
            f"offset {effect['published_offset']} at {effect['published_at']:%Y-%m-%d %H:%M:%S%z}"
        )
    if effect["outcome_deadline"] is not None:
        lines.append(f"  {'result due':<13} {effect['outcome_deadline']:%Y-%m-%d %H:%M:%S%z}")
    lines.append(f"  {'payload':<13} {shown_payload(effect['payload'])}")
    lines.append("attempts:")
    for a in story["attempts"]:
        where = f" p{a['partition']}@{a['offset']}" if a["offset"] is not None else ""
        lines.append(
            f"  #{a['attempt']} by {a['replica_id']} (epoch {a['replica_epoch']}) "
            f"{a['started_at']:%H:%M:%S.%f} -> {a['outcome'] or 'in flight'}{where}"
            + (f": {a['reason']}" if a["reason"] else "")
        )
        if a["verification"]:
            lines.append(f"      checked in Kafka {a['verified_at']:%H:%M:%S}: {a['verification']}")
    if not story["attempts"]:
        lines.append("  (none)")
    lines.append("evidence:")
    for v in story["evidence"]:
        facts = [
            f"external id {v['external_id']}" if v["external_id"] is not None else "",
            f"count {v['observed_count']}" if v["observed_count"] is not None else "",
            f"{v['topic']} p{v['partition']}@{v['offset']}" if v["topic"] is not None else "",
            f"attempt {v['attempt']}" if v["attempt"] is not None else "",
        ]
        said = "; ".join(f for f in facts if f)
        lines.append(
            f"  {v['received_at']:%Y-%m-%d %H:%M:%S.%f} {v['kind']} {v['outcome'] or '-'}"
            + (f" ({said})" if said else "")
            + f" -> {v['verdict']} by {v['actor']}"
            + (f": {v['reason']}" if v["reason"] else "")
        )
        if v["detail"] and v["detail"] not in (v["reason"] or ""):
            lines.append(f"      detail: {v['detail']}")
        if v["kind"] == "operator":
            # The actor is what the operator claimed; these are who the systems saw.
            lines.append(f"      login {v['db_role'] or '?'}, OS user {v['os_user'] or '?'}")
    if not story["evidence"]:
        lines.append("  (none)")
    lines.append("transitions:")
    for t in story["transitions"]:
        lines.append(
            f"  {t['at']:%Y-%m-%d %H:%M:%S.%f} {t['from_state'] or '-':>11} -> {t['to_state']:<11}"
            f" by {t['actor']}: {t['reason']}"
        )
    return lines


def shown_payload(text: str, limit: int = 200) -> str:
    """The payload as JSON, or, when it cannot be decoded (a row from before the enqueue limits),
    why not and its start: the story must be told whatever the payload holds."""
    try:
        return json.dumps(json.loads(text))
    except (RecursionError, ValueError) as exc:
        return (
            f"(cannot be decoded: {type(exc).__name__}; {len(text)} characters) "
            f"{text[:limit]}{'...' if len(text) > limit else ''}"
        )

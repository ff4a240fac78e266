"""Decisions taken in the console, through the CLI's own code: ``resolve`` (confirm, reject,
redispatch, compensate), ``unblock`` (release a REJECTED blocker, skip an UNKNOWN or STUCK one)
and ``cancel``.

A decision carries what the operator's page showed (state, updated_at, attempts). The effect is
locked, compared with it and changed in one transaction, so that a decision on an effect that
moved meanwhile is refused with what changed and who changed it. Every decision is audited
(``relay.console_audit``): an applied one in its own transaction, a refused one after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay import outbox
from relay.config import Settings
from relay.console.audit import record
from relay.console.auth import Identity
from relay.errors import RelayError
from relay.reconciler.resolve import RESOLVABLE, TARGET, Decision, resolve
from relay.reconciler.unblock import unblock
from relay.sql import query
from relay.states import EffectState

RESOLVE_ACTIONS = {d.value: d for d in Decision}
TARGET_OF = {d.value: TARGET[d].value for d in Decision}
# Decisions an operator may take for every effect a list's filter finds (release and skip are
# about one group's blocker: one at a time).
BULK_ACTIONS = ("confirm", "reject", "redispatch", "compensate", "cancel")
LABELS = {
    "confirm": "Confirm: it happened, once",
    "reject": "Reject: it did not happen; give up",
    "redispatch": "Redispatch: it did not happen; publish it again",
    "compensate": "Compensate: undo it with a compensation effect",
    "cancel": "Cancel: withdraw it before it is published",
    "release": "Release its group: the group goes on without this REJECTED effect",
    "skip": "Skip it: its group goes on without it (it may have happened)",
}


@dataclass(frozen=True)
class Seen:
    """What the operator's page showed when they chose."""

    state: str
    updated_at: str  # ISO 8601, as the page printed it
    attempts: int

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "updated_at": self.updated_at, "attempts": self.attempts}


@dataclass(frozen=True)
class Outcome:
    applied: bool
    message: str


class Refused(Exception):
    """A decision the console does not apply; the message says why."""


def actions(settings: Settings, effect: dict[str, Any], blocks: dict[str, Any] | None) -> list[str]:
    """The decisions valid in the effect's current state."""
    state = EffectState(effect["state"])
    found: list[str] = []
    if state in RESOLVABLE:
        found += ["confirm", "reject", "redispatch"]
        spec = settings.effect_type(effect["effect_type"])
        if spec is not None and spec.compensation is not None:
            found.append("compensate")
    if state is EffectState.PENDING:
        found.append("cancel")
    if blocks is not None:
        found.append("release" if state is EffectState.REJECTED else "skip")
    return found


def preview(settings: Settings, story: dict[str, Any], action: str) -> list[str]:
    """What the decision will do: the state change, the messages it emits, the group it frees."""
    effect, schedule, blocks = story["effect"], story["schedule"], story["blocks"]
    status = bool(schedule and schedule["status_events"])
    event = " A status event records the transition on the status topic." if status else ""
    group = effect["ordering_group"]
    lines: list[str] = []
    if action in RESOLVE_ACTIONS:
        target = TARGET[Decision(action)].value
        lines.append(f"{effect['state']} -> {target}.{event}")
        if action == "redispatch":
            lines.append(
                f"The relay publishes it again (attempt {int(effect['attempts']) + 1}) to "
                f"{effect['topic']}: the downstream may receive it a second time."
            )
        if action == "compensate":
            spec = settings.effect_type(effect["effect_type"])
            lines.append(
                f"A compensation effect of type {spec.compensation if spec else '?'} is "
                f"enqueued ({effect['operation_key']}#compensation) and published by the relay."
            )
        if blocks is not None:
            if action in ("confirm", "compensate"):
                lines.append(
                    f"Ordering group {group} is released: its {blocks['waiting']} waiting "
                    "effect(s) go on, in order."
                )
            elif action == "reject":
                lines.append(
                    f"Ordering group {group} stays parked behind it ({blocks['waiting']} "
                    "waiting) until it is released."
                )
            else:
                lines.append(f"Ordering group {group} waits for its new attempt.")
        lines.append("Recorded as operator evidence and a transition, with your name and reason.")
    elif action == "cancel":
        lines.append(f"PENDING -> CANCELLED: it is never published.{event}")
    elif action in ("release", "skip"):
        waiting = blocks["waiting"] if blocks else 0
        lines.append(
            f"It stays {effect['state']} and is never published again; ordering group {group} "
            f"goes on without it: {waiting} waiting effect(s) are published, in order."
        )
        lines.append("Recorded as operator evidence on it, with your name and reason.")
    return lines


def apply(
    conn: psycopg.Connection[Any],
    settings: Settings,
    identity: Identity,
    client: str | None,
    operation_key: str,
    action: str,
    seen: Seen,
    reason: str,
    *,
    audit_conn: psycopg.Connection[Any] | None = None,
    bulk: str | None = None,
) -> Outcome:
    """Apply one decision if the effect is as the operator saw it; audited either way (a
    refusal through ``audit_conn`` when given: a login that may not decide may not audit
    either). ``bulk`` names the bulk decision this one is part of, for the audit."""
    audit: dict[str, Any] = {
        "identity": identity,
        "client": client,
        "action": action,
        "operation_key": operation_key,
        "seen": seen.as_dict(),
        "reason": reason,
    }
    group: str | None = None
    try:
        if not reason.strip():
            raise Refused("a decision needs a reason")
        if action not in LABELS:
            raise Refused(f"no such decision: {action!r}")
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query("console_lock_effect"), {"operation_key": operation_key})
            row = cur.fetchone()
            if row is None:
                raise Refused("no effect has this operation key")
            group = row["ordering_group"]
            changed = _changes(cur, row, seen)
            if changed:
                raise Refused("it changed since your page showed it: " + "; ".join(changed))
            message = _act(conn, settings, identity, operation_key, action, reason, group)
            record(conn, **audit, group=group, outcome="applied", detail=_tagged(message, bulk))
        return Outcome(True, message)
    except (Refused, RelayError) as exc:
        message = str(exc)
    except psycopg.errors.InsufficientPrivilege as exc:
        message = f"the console's database login may not do this: {exc.diag.message_primary}"
    writer = audit_conn or conn
    with writer.transaction():
        record(writer, **audit, group=group, outcome="refused", detail=_tagged(message, bulk))
    return Outcome(False, message)


def _tagged(message: str, bulk: str | None) -> str:
    return f"{message} [{bulk}]" if bulk else message


def _act(
    conn: psycopg.Connection[Any],
    settings: Settings,
    identity: Identity,
    key: str,
    action: str,
    reason: str,
    group: str | None,
) -> str:
    if action in RESOLVE_ACTIONS:
        state, made = resolve(
            conn, settings, key, Decision(action), reason=reason, actor=identity.actor
        )
        return f"{action}: now {state.value}" + (
            f"; compensation enqueued: {', '.join(made)}" if made else ""
        )
    if action == "cancel":
        outbox.cancel(conn, key, reason=reason, actor=identity.actor)
        return "cancel: now CANCELLED"
    if group is None:
        raise Refused("it belongs to no ordering group")
    released = unblock(
        conn,
        group,
        skip=key if action == "skip" else None,
        reason=reason,
        actor=identity.actor,
    )
    if released.operation_key != key:
        raise Refused(f"group {group} waits behind {released.operation_key}, not this effect")
    return f"{action}: group {group} goes on ({released.waiting} effect(s) were waiting)"


def _changes(cur: psycopg.Cursor[dict[str, Any]], row: dict[str, Any], seen: Seen) -> list[str]:
    """What differs from what the operator saw, and the transitions since: who moved it."""
    diffs: list[str] = []
    if row["state"] != seen.state:
        diffs.append(f"state {seen.state} -> {row['state']}")
    if row["attempts"] != seen.attempts:
        diffs.append(f"attempts {seen.attempts} -> {row['attempts']}")
    try:
        seen_at = datetime.fromisoformat(seen.updated_at)
    except ValueError:
        return [*diffs, "the page's timestamp cannot be read: reload the effect"]
    if row["updated_at"] != seen_at:
        diffs.append(f"last changed {row['updated_at'].isoformat()} (you saw {seen.updated_at})")
    if diffs:
        cur.execute(query("console_changes_since"), {"effect_id": row["id"], "since": seen_at})
        for t in cur.fetchall():
            diffs.append(
                f"{t['at'].isoformat()} {t['from_state'] or '-'} -> {t['to_state']} by "
                f"{t['actor']}: {t['reason']}"
            )
    return diffs

"""Commands about effects: ``relay enqueue``, ``cancel``, ``show``, ``list`` and ``stats``."""

from __future__ import annotations

import json
import sys

import click

from relay import inspection, outbox
from relay.cli.support import (
    clean_errors,
    json_default,
    parse_duration,
    settings_of,
)
from relay.db import connect
from relay.errors import EffectNotFoundError, InvalidIntentError
from relay.redaction import escape_controls
from relay.states import EffectState
from relay.story import load_story, story_lines


@click.command()
@click.argument("effect_type")
@click.argument("operation_key")
@click.argument("payload", default="-")
@click.option("--business-key", help="Overrides the key computed from the type's template.")
@click.option("--traceparent", help="W3C traceparent to carry into Kafka headers.")
@click.option(
    "--ordering-group",
    help="Publish after every earlier effect of this group, one at a time, to one partition.",
)
@click.pass_context
@clean_errors
def enqueue(
    ctx: click.Context,
    effect_type: str,
    operation_key: str,
    payload: str,
    business_key: str | None,
    traceparent: str | None,
    ordering_group: str | None,
) -> None:
    """Record one intent. PAYLOAD is a JSON object, or '-' to read it from stdin."""
    settings = settings_of(ctx)
    text = sys.stdin.read() if payload == "-" else payload
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidIntentError(f"PAYLOAD is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidIntentError("PAYLOAD must be a JSON object")
    intent = outbox.Intent(
        effect_type,
        operation_key,
        document,
        business_key,
        traceparent,
        ordering_group=ordering_group,
    )
    # Everything that needs no database is checked before connecting: bad input is reported as
    # what it is, even when PostgreSQL is down.
    outbox.check_intent(intent, max_payload_bytes=settings.max_payload_bytes)
    with connect(settings, purpose="cli", autocommit=False) as conn:
        result = outbox.enqueue(
            conn,
            effect_type,
            operation_key,
            document,
            business_key=business_key,
            traceparent=traceparent,
            ordering_group=ordering_group,
            max_payload_bytes=settings.max_payload_bytes,
        )
        conn.commit()
    verb = "enqueued" if result.created else "already present"
    click.echo(
        f"{verb}: {escape_controls(operation_key)} (effect {result.effect_id}, {result.state})"
    )


@click.command()
@click.argument("operation_key")
@click.option("--reason", default="cancelled by an operator", show_default=True)
@click.option("--actor", help="Who decides [default: $USER, else 'operator'].")
@click.pass_context
@clean_errors
def cancel(ctx: click.Context, operation_key: str, reason: str, actor: str | None) -> None:
    """Withdraw a PENDING effect before any attempt; who and why are recorded."""
    from relay.reconciler.effects import operator_actor

    who = operator_actor(actor)
    with connect(settings_of(ctx), purpose="cli") as conn:
        outbox.cancel(conn, operation_key, reason=reason, actor=who)
    click.echo(f"cancelled: {escape_controls(operation_key)} (by {escape_controls(who)})")


@click.command()
@click.argument("operation_key")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@clean_errors
def show(ctx: click.Context, operation_key: str, as_json: bool) -> None:
    """The whole story of one effect: intent, attempts, evidence and transitions, in order."""
    with connect(settings_of(ctx), purpose="cli") as conn:
        story = load_story(conn, operation_key)
    if story is None:
        raise EffectNotFoundError(f"no effect has operation key {operation_key!r}")
    if as_json:
        click.echo(json.dumps(story, default=json_default, indent=2))
        return
    # Keys, reasons and a downstream's detail are outside text: each line is escaped whole, so
    # a newline or an escape sequence in them shows as text instead of acting on the terminal.
    click.echo("\n".join(escape_controls(line) for line in story_lines(story)))


@click.command("list")
@click.option(
    "--state",
    type=click.Choice([*(s.value for s in EffectState), "PARKED"], case_sensitive=False),
    help="Only effects in this state (PARKED: PENDING behind a failed effect of its group).",
)
@click.option("--type", "effect_type", help="Only effects of this type.")
@click.option("--group", help="Only effects of this ordering group.")
@click.option("--older-than", help="Only effects unchanged for this long (30s, 15m, 2h, 1d).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@clean_errors
def list_effects(
    ctx: click.Context,
    state: str | None,
    effect_type: str | None,
    group: str | None,
    older_than: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Effects filtered by state, type, group and age, oldest change first (intents not read
    yet are PENDING, intents claimed in a batch DISPATCHING, as relay stats counts them)."""
    older_than_s = parse_duration(older_than) if older_than else None
    with connect(settings_of(ctx), purpose="cli") as conn:
        rows = inspection.list_effects(
            conn,
            state=state.upper() if state else None,
            effect_type=effect_type,
            group=group,
            older_than_s=older_than_s,
            limit=limit,
        )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=json_default))
        return
    if not rows:
        click.echo("no effects match")
        return
    click.echo(f"{'updated (UTC)':<19} {'state':<11} {'effect type':<20} operation key  (reason)")
    for row in rows:
        line = (
            f"{row['updated_at']:%Y-%m-%d %H:%M:%S} {row['state']:<11} {row['effect_type']:<20}"
            f" {row['operation_key']}" + (f"  ({row['reason']})" if row["reason"] else "")
        )
        click.echo(escape_controls(line))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@clean_errors
def stats(ctx: click.Context, as_json: bool) -> None:
    """Effects by type and state, with the age of the oldest change in each."""
    with connect(settings_of(ctx), purpose="cli") as conn:
        rows = inspection.stats(conn)
    if as_json:
        click.echo(json.dumps(rows, default=json_default))
        return
    click.echo(f"{'effect type':<24} {'state':<12} {'effects':>9} {'oldest':>10}")
    for row in rows:
        line = (
            f"{row['effect_type']:<24} {row['state']:<12} {row['effects']:>9}"
            f" {row['oldest_age_s']:>9.0f}s"
        )
        click.echo(escape_controls(line))


COMMANDS = (enqueue, cancel, show, list_effects, stats)

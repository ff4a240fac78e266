"""The ``relay`` command: a thin layer over the library. Errors are one line and a non-zero exit."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import click
from psycopg.rows import dict_row

from relay import outbox
from relay.cli.support import (
    EXIT_FAILURE,
    EXIT_USAGE,
    clean_errors,
    fail,
    parse_duration,
    run_until_signalled,
)
from relay.config import Settings, load_settings
from relay.db import connect
from relay.errors import InvalidIntentError, RelayError
from relay.logs import configure
from relay.migrations import migrate as apply_migrations
from relay.migrations import sync_effect_types
from relay.redaction import escape_controls
from relay.sql import query
from relay.states import EffectState
from relay.story import load_story, story_lines


def _settings(ctx: click.Context) -> Settings:
    return cast(Settings, ctx.obj["settings"])


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RELAY_CONFIG",
    help="TOML config file [env RELAY_CONFIG; default ./relay.toml if present].",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Overrides log_format.")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    help="Overrides log_level.",
)
@click.pass_context
def main(
    ctx: click.Context, config_path: Path | None, log_format: str | None, log_level: str | None
) -> None:
    """Transactional outbox relay for PostgreSQL and Kafka.

    Settings come from the config file, overridden by RELAY_* environment variables
    (for example RELAY_DATABASE_URL, RELAY_KAFKA_BOOTSTRAP_SERVERS).
    """
    overrides: dict[str, Any] = {}
    if log_format:
        overrides["log_format"] = log_format
    if log_level:
        overrides["log_level"] = log_level
    try:
        settings = load_settings(config_path, **overrides)
    except RelayError as exc:
        fail(str(exc), EXIT_USAGE)
    configure(settings.log_level, settings.log_format)
    ctx.obj = {"settings": settings}


@main.command()
@click.pass_context
@clean_errors
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the relay schema and sync the declared effect types. Safe to rerun."""
    settings = _settings(ctx)
    with connect(settings, purpose="migrate") as conn:
        applied = apply_migrations(conn)
        changed = sync_effect_types(conn, settings)
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")
    if not applied:
        click.echo("schema is up to date")
    click.echo(f"effect types declared: {len(settings.effect_types)} ({changed} changed)")


@main.command()
@click.pass_context
@clean_errors
def run(ctx: click.Context) -> None:
    """Run the relay daemon: publish PENDING effects to Kafka until SIGTERM or Ctrl-C.

    Any number of replicas may run at once; give each its own replica_id
    (RELAY_REPLICA_ID, default: the host name).
    """
    from relay.db import warn_unless_verified_tls
    from relay.dispatch.daemon import Relay

    warn_unless_verified_tls(_settings(ctx), "run")
    run_until_signalled(Relay(_settings(ctx)))


@main.command()
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
    settings = _settings(ctx)
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


@main.command()
@click.argument("operation_key")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@clean_errors
def show(ctx: click.Context, operation_key: str, as_json: bool) -> None:
    """The whole story of one effect: intent, attempts, evidence and transitions, in order."""
    with connect(_settings(ctx), purpose="cli") as conn:
        story = load_story(conn, operation_key)
    if story is None:
        fail(f"no effect has operation key {operation_key!r}", EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps(story, default=_json_default, indent=2))
        return
    # Keys, reasons and a downstream's detail are outside text: each line is escaped whole, so
    # a newline or an escape sequence in them shows as text instead of acting on the terminal.
    click.echo("\n".join(escape_controls(line) for line in story_lines(story)))


@main.command("list")
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
    """Effects filtered by state, type, group and age, oldest change first."""
    params = {
        "state": state.upper() if state else None,
        "effect_type": effect_type,
        "group": group,
        "older_than_s": parse_duration(older_than) if older_than else None,
        "limit": limit,
    }
    with connect(_settings(ctx), purpose="cli") as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("list_effects"), params)
        rows = cur.fetchall()
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, default=_json_default))
        else:
            line = (
                f"{row['updated_at']:%Y-%m-%d %H:%M:%S} {row['state']:<11} {row['effect_type']:<20}"
                f" {row['operation_key']}" + (f"  ({row['reason']})" if row["reason"] else "")
            )
            click.echo(escape_controls(line))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@clean_errors
def stats(ctx: click.Context, as_json: bool) -> None:
    """Effects by type and state, with the age of the oldest change in each."""
    with connect(_settings(ctx), purpose="cli") as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("stats"))
        rows = cur.fetchall()
    if as_json:
        click.echo(json.dumps(rows, default=_json_default))
        return
    click.echo(f"{'effect type':<24} {'state':<12} {'effects':>9} {'oldest':>10}")
    for row in rows:
        line = (
            f"{row['effect_type']:<24} {row['state']:<12} {row['effects']:>9}"
            f" {row['oldest_age_s']:>9.0f}s"
        )
        click.echo(escape_controls(line))


@main.command()
@click.option(
    "--prefix", default="relay_", show_default=True, help="Roles are named PREFIX + kind."
)
@click.option("--apply", "apply_now", is_flag=True, help="Run the script instead of printing it.")
@click.pass_context
@clean_errors
def roles(ctx: click.Context, prefix: str, apply_now: bool) -> None:
    """Print (or --apply) the SQL of the role split: PREFIXapplication, PREFIXrelay,
    PREFIXreconciler, PREFIXoperator.

    Run it as the owner of the relay schema, after `relay migrate`, then grant each login its
    role: GRANT relay_application TO app_user. See docs/security.md.
    """
    from relay import roles as role_split

    if not apply_now:
        names = role_split.role_names(prefix)
        click.echo(role_split.grants(prefix).as_string(None))
        click.echo(f"-- roles: {', '.join(names.values())}")
        return
    with connect(_settings(ctx), purpose="roles") as conn:
        made = role_split.apply(conn, prefix)
    click.echo(f"granted: {', '.join(made.values())}")


@main.command()
@click.argument("group")
@click.option("--skip", "skip_key", metavar="KEY", help="Give up on this UNKNOWN or STUCK effect.")
@click.option("--reason", required=True, help="Why; recorded with the release.")
@click.option("--actor", help="Who decides [default: $USER, else 'operator'].")
@click.pass_context
@clean_errors
def unblock(
    ctx: click.Context, group: str, skip_key: str | None, reason: str, actor: str | None
) -> None:
    """Let a parked ordering group go on without the effect it waits behind.

    A REJECTED blocker is released as is; an UNKNOWN or STUCK one may have happened and must be
    named with --skip KEY. The released effect is never published again; who and why are
    recorded as evidence on it.
    """
    from relay.reconciler.effects import operator_actor
    from relay.reconciler.unblock import unblock as do_unblock

    who = operator_actor(actor)
    with connect(_settings(ctx), purpose="cli") as conn:
        released = do_unblock(conn, group, skip=skip_key, reason=reason, actor=who)
    click.echo(
        escape_controls(
            f"{group}: released from {released.operation_key} ({released.state.value}); "
            f"{released.waiting} effect(s) go on (by {who})"
        )
    )


@main.command()
@click.argument("operation_key")
@click.option("--reason", default="cancelled by an operator", show_default=True)
@click.pass_context
@clean_errors
def cancel(ctx: click.Context, operation_key: str, reason: str) -> None:
    """Withdraw a PENDING effect before any attempt."""
    with connect(_settings(ctx), purpose="cli") as conn:
        outbox.cancel(conn, operation_key, reason=reason, actor="operator")
    click.echo(f"cancelled: {escape_controls(operation_key)}")


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas/json"),
    show_default=True,
)
@click.option("--check", is_flag=True, help="Exit 1 if the files differ from the models.")
def schemas(directory: Path, check: bool) -> None:
    """Write (or check) the JSON Schemas of the dispatch, result and status messages."""
    from relay.messages import MESSAGE_MODELS, json_schema, write_json_schemas

    if check:
        stale = [
            name
            for name in MESSAGE_MODELS
            if not (directory / f"{name}.schema.json").is_file()
            or (directory / f"{name}.schema.json").read_text(encoding="utf-8") != json_schema(name)
        ]
        if stale:
            click.echo(f"error: stale JSON Schemas in {directory}: {', '.join(stale)}", err=True)
            sys.exit(1)
        click.echo("JSON Schemas are up to date")
        return
    for path in write_json_schemas(directory):
        click.echo(f"wrote {path}")


@main.command()
@click.option("--effects", default=20, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--keep-running", is_flag=True, help="Leave the daemons running until Ctrl-C.")
@click.pass_context
@clean_errors
def demo(ctx: click.Context, effects: int, keep_running: bool) -> None:
    """Start local PostgreSQL and Kafka (unless RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS
    are set), run the relay, the reconciler and a demo bank, enqueue sample intents and show them
    move through their states."""
    from relay.devtools.demo import run_demo

    run_demo(_settings(ctx), effects=effects, keep_running=keep_running)


from relay.reconciler.commands import register as _register_reconciler  # noqa: E402

_register_reconciler(main)


if __name__ == "__main__":  # pragma: no cover
    main()

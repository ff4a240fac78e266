"""Operators' commands: ``relay migrate``, ``roles``, ``unblock`` and ``schemas``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from relay.cli.support import clean_errors, settings_of
from relay.db import connect
from relay.migrations import apply_status_events, sync_effect_types
from relay.migrations import migrate as apply_migrations
from relay.redaction import escape_controls


@click.command()
@click.pass_context
@clean_errors
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the relay schema and sync the declared effect types. Safe to rerun."""
    settings = settings_of(ctx)
    with connect(settings, purpose="migrate") as conn:
        applied = apply_migrations(conn)
        changed = sync_effect_types(conn, settings)
        apply_status_events(conn, settings)
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")
    if not applied:
        click.echo("schema is up to date")
    click.echo(f"effect types declared: {len(settings.effect_types)} ({changed} changed)")
    click.echo(f"status events: {'on' if settings.status_events else 'off'}")


@click.command()
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
    with connect(settings_of(ctx), purpose="roles") as conn:
        made = role_split.apply(conn, prefix)
    click.echo(f"granted: {', '.join(made.values())}")


@click.command()
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
    with connect(settings_of(ctx), purpose="cli") as conn:
        released = do_unblock(conn, group, skip=skip_key, reason=reason, actor=who)
    click.echo(
        escape_controls(
            f"{group}: released from {released.operation_key} ({released.state.value}); "
            f"{released.waiting} effect(s) go on (by {who})"
        )
    )


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the *.schema.json files [default: the package's schemas/json, wherever "
    "the command is run from].",
)
@click.option("--check", is_flag=True, help="Exit 1 if the files differ from the models.")
@clean_errors
def schemas(directory: Path | None, check: bool) -> None:
    """Write (or check) the JSON Schemas of the dispatch, result and status messages."""
    from relay.messages import MESSAGE_MODELS, json_schema, write_json_schemas
    from relay.migrations import schemas_dir

    if directory is None:
        directory = schemas_dir() / "json"

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


COMMANDS = (migrate, roles, unblock, schemas)

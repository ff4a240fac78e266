"""The reconciler's commands: ``relay reconcile``, ``relay resolve``, ``relay purge``."""

from __future__ import annotations

from typing import cast

import click

from relay.config import Settings
from relay.db import connect


def register(main: click.Group) -> None:
    """Add the reconciler's commands to the ``relay`` group."""
    main.add_command(reconcile)
    main.add_command(resolve)
    main.add_command(purge)


def _settings(ctx: click.Context) -> Settings:
    return cast(Settings, ctx.obj["settings"])


@click.command()
@click.pass_context
def reconcile(ctx: click.Context) -> None:
    """Run the reconciler: apply downstream results, expire deadlines, observe UNKNOWN effects.

    Any number of replicas may run at once (one Kafka consumer group, reconcile_group_id).
    Stops cleanly on SIGTERM or Ctrl-C.
    """
    from relay.cli.support import clean_errors, run_until_signalled
    from relay.db import warn_unless_verified_tls
    from relay.reconciler.daemon import Reconciler

    @clean_errors
    def body() -> None:
        warn_unless_verified_tls(_settings(ctx), "reconcile")
        run_until_signalled(Reconciler(_settings(ctx)))

    body()


@click.command()
@click.argument("operation_key")
@click.option("--confirm", is_flag=True, help="It happened, once.")
@click.option("--reject", is_flag=True, help="It did not happen; give up.")
@click.option("--redispatch", is_flag=True, help="It did not happen; try again.")
@click.option("--compensate", is_flag=True, help="Undo it with a compensation effect.")
@click.option("--reason", required=True, help="Why; recorded with the decision.")
@click.option("--actor", help="Who decides [default: $USER, else 'operator'].")
@click.pass_context
def resolve(
    ctx: click.Context,
    operation_key: str,
    confirm: bool,
    reject: bool,
    redispatch: bool,
    compensate: bool,
    reason: str,
    actor: str | None,
) -> None:
    """Decide the outcome of an UNKNOWN or STUCK effect; who and why are recorded."""
    from relay.cli.support import clean_errors
    from relay.reconciler.effects import operator_actor
    from relay.reconciler.resolve import Decision
    from relay.reconciler.resolve import resolve as do_resolve

    # Separate flags, not one shared destination: "--confirm --reject" must be refused, not
    # decided by whichever came last.
    flags = {
        "confirm": confirm,
        "reject": reject,
        "redispatch": redispatch,
        "compensate": compensate,
    }
    chosen = [name for name, given in flags.items() if given]
    if len(chosen) != 1:
        raise click.UsageError("choose one of --confirm, --reject, --redispatch, --compensate")
    decision = Decision(chosen[0])

    @clean_errors
    def body() -> None:
        who = operator_actor(actor)
        with connect(_settings(ctx), purpose="cli") as conn:
            state, made = do_resolve(
                conn, _settings(ctx), operation_key, decision, reason=reason, actor=who
            )
        click.echo(f"{operation_key}: {state.value} (by {who})")
        for key in made:
            click.echo(f"compensation enqueued: {key}")

    body()


@click.command()
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.option("--older-than", help="Overrides retention_s (30s, 15m, 2h, 1d).")
@click.pass_context
def purge(ctx: click.Context, dry_run: bool, older_than: str | None) -> None:
    """Remove finished effects past retention, with their attempts, transitions and evidence.

    Also results that belong to no effect, and intents set aside when read (their key names
    another effect), past retention. Nothing that is not finished (CONFIRMED, REJECTED,
    CANCELLED, or PUBLISHED without an awaited result) is ever removed. Works in small batches
    that never block the relay.
    """
    from relay.cli.support import clean_errors, human_duration, parse_duration
    from relay.reconciler.purge import purge as do_purge
    from relay.reconciler.purge import would_purge

    settings = _settings(ctx)
    retention = parse_duration(older_than) if older_than else settings.retention_s

    @clean_errors
    def body() -> None:
        with connect(settings, purpose="purge") as conn:
            if dry_run:
                c = would_purge(conn, retention)
                click.echo(
                    f"would remove {c.effects} effects, {c.attempts} attempts, "
                    f"{c.transitions} transitions, {c.evidence} evidence records, "
                    f"{c.refused} refused intents "
                    f"(finished more than {human_duration(retention)} ago)"
                )
                return
            done = do_purge(conn, settings, retention)
        click.echo(
            f"removed {done.effects} effects, {done.evidence} unattached evidence records and "
            f"{done.refused} refused intents"
        )

    body()

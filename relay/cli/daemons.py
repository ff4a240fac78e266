"""Commands that run until stopped: ``relay run`` (the relay daemon) and ``relay demo``."""

from __future__ import annotations

import click

from relay.cli.support import clean_errors, run_until_signalled, settings_of


@click.command()
@click.option(
    "--take-over",
    is_flag=True,
    help="Start even if a live process runs this replica_id: that one is fenced and exits 2.",
)
@click.pass_context
@clean_errors
def run(ctx: click.Context, take_over: bool) -> None:
    """Run the relay daemon: publish PENDING effects to Kafka until SIGTERM or Ctrl-C.

    Any number of replicas may run at once; give each its own replica_id
    (RELAY_REPLICA_ID, default: the host name) and, on one machine, its own metrics_port.
    A second process with the replica_id of a live one refuses to start (exit 2) unless
    given --take-over.
    """
    from relay.db import warn_unless_verified_tls
    from relay.dispatch.daemon import Relay

    warn_unless_verified_tls(settings_of(ctx), "run")
    run_until_signalled(Relay(settings_of(ctx), take_over=take_over))


@click.command()
@click.option("--effects", default=20, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--keep-running", is_flag=True, help="Leave the daemons running until Ctrl-C.")
@click.option(
    "--console",
    "with_console",
    is_flag=True,
    help="Also serve the operator console on loopback while the demo runs (a throwaway "
    "operator login is printed).",
)
@click.pass_context
@clean_errors
def demo(ctx: click.Context, effects: int, keep_running: bool, with_console: bool) -> None:
    """Start local PostgreSQL and Kafka (unless RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS
    are set), run the relay, the reconciler and a demo bank, enqueue sample intents and show them
    move through their states."""
    from relay.devtools.demo import run_demo

    run_demo(settings_of(ctx), effects=effects, keep_running=keep_running, console=with_console)


COMMANDS = (run, demo)

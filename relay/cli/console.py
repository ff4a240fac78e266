"""``relay console``: the operator console in a browser (needs the ``console`` extra)."""

from __future__ import annotations

import sys

import click

from relay.cli.support import clean_errors, settings_of


@click.command()
@click.option("--host", help="Listen address [default: console_host, 127.0.0.1].")
@click.option("--port", type=click.IntRange(1, 65535), help="Port [default: console_port, 8400].")
@click.option(
    "--hash-password",
    "hash_for",
    metavar="NAME",
    help="Print a console_users_file line for NAME (password read from stdin or a prompt) "
    "and exit.",
)
@click.option(
    "--right",
    type=click.Choice(["viewer", "operator"]),
    default="viewer",
    show_default=True,
    help="The right of --hash-password's user.",
)
@click.pass_context
@clean_errors
def console(
    ctx: click.Context, host: str | None, port: int | None, hash_for: str | None, right: str
) -> None:
    """Serve the operator console: what needs a person, stories, and decisions.

    Lists UNKNOWN, STUCK and REJECTED effects and parked groups, tells an effect's story (as
    relay show) with what happens next, and lets operators resolve, unblock and cancel through
    the same code as the CLI; every decision is audited in relay.console_audit. Listens on
    127.0.0.1 unless console_host says otherwise. See docs/console.md.

    \b
    Examples:
      relay console --hash-password alice --right operator >> console-users
      RELAY_CONSOLE_USERS_FILE=console-users relay console
      RELAY_CONSOLE_AUTH=proxy RELAY_CONSOLE_PROXY_ADDRESSES=10.0.0.5 \\
        RELAY_CONSOLE_OPERATORS=alice@example.com relay console --host 0.0.0.0
    """
    if hash_for is not None:
        from relay.console.auth import hash_password

        if not hash_for or ":" in hash_for or hash_for != hash_for.strip():
            raise click.BadParameter("a name must be non-empty, without ':' or outer spaces")
        if sys.stdin.isatty():
            password = click.prompt("password", hide_input=True, confirmation_prompt=True)
        else:
            password = sys.stdin.readline().rstrip("\n")
        if len(password) < 12:
            raise click.BadParameter("use a password of 12 characters or more")
        click.echo(f"{hash_for}:{right}:{hash_password(password)}")
        return
    try:
        from relay.console.server import ConsoleServer
    except ImportError as exc:
        raise click.ClickException(
            f"the console needs its extra: pip install 'outbox-relay[console]' ({exc.name} "
            "is missing)"
        ) from None
    server = ConsoleServer(settings_of(ctx), host=host, port=port)
    click.echo(f"relay console at {server.address} (Ctrl-C stops it)")
    server.run()


COMMANDS = (console,)

"""What every command shares: the settings, JSON output, durations, one-line errors with exit
codes, running a daemon until a signal. Below ``relay.cli``, its command modules and the commands
that live elsewhere (reconciler).

The exit-code contract, the same for every command (README, ``relay --help``):

0  done (a daemon stopped by SIGTERM or Ctrl-C included).
1  unexpected error: a bug, named by its type on one line (the traceback goes to the log at
   DEBUG); and ``relay schemas --check`` when the files are stale, as ``diff`` does.
2  refused: bad usage, configuration or input; no such effect; not permitted (the login lacks
   a right: the line names the role to run the command with); a state that does not allow the
   change; a schema older than the code.
3  unavailable: PostgreSQL or Kafka could not be reached; trying again later may succeed.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn, Protocol, TypeVar, cast

import click
import psycopg

from relay.config import Settings
from relay.errors import RelayError, ServiceUnavailableError
from relay.logs import redact
from relay.redaction import escape_controls

F = TypeVar("F", bound=Callable[..., Any])
EXIT_OK = 0
EXIT_FAILURE = 1
"""Unexpected: a bug (or ``relay schemas --check`` finding stale files)."""
EXIT_USAGE = 2
"""Refused: usage, configuration, input, not found, not permitted, invalid transition."""
EXIT_REFUSED = EXIT_USAGE
EXIT_UNAVAILABLE = 3
"""PostgreSQL or Kafka unreachable."""

EXIT_CODES_HELP = """\b
Exit codes (every command):
  0  done
  1  unexpected error (a bug; the traceback is logged at DEBUG),
     or `relay schemas --check` found stale files
  2  refused: bad usage, configuration or input; no such effect;
     permission denied (the message names the role to use);
     a state that does not allow the change; schema not migrated
  3  PostgreSQL or Kafka unreachable: try again later"""

# The role each command needs (docs/security.md): named when the database refuses a right.
ROLE_OF_COMMAND = {
    "migrate": "schema owner",
    "roles": "schema owner",
    "run": "relay",
    "reconcile": "reconciler",
    "enqueue": "application",
    "cancel": "operator",
    "show": "operator",
    "list": "operator",
    "stats": "operator",
    "resolve": "operator",
    "unblock": "operator",
    "purge": "operator",
}
# One example per command, shown in its --help above the exit codes.
EXAMPLES = {
    "config": "relay config --check && relay config",
    "migrate": "RELAY_DATABASE_URL=postgresql://owner@db/app relay migrate",
    "roles": "relay roles --prefix relay_ --apply",
    "run": "RELAY_REPLICA_ID=$(hostname)-2 RELAY_METRICS_PORT=9402 relay run",
    "reconcile": "relay reconcile",
    "enqueue": 'relay enqueue wire wire-42 \'{"account": "A1", "amount": 100}\'',
    "cancel": "relay cancel wire-42 --reason 'customer withdrew' --actor alice",
    "show": "relay show wire-42",
    "list": "relay list --state UNKNOWN --older-than 15m",
    "stats": "relay stats --json",
    "resolve": "relay resolve wire-42 --confirm --reason 'bank statement line 17'",
    "unblock": "relay unblock customer-7 --skip wire-41 --reason 'refunded by hand'",
    "purge": "relay purge --dry-run --older-than 7d",
    "schemas": "relay schemas --check",
    "demo": "relay demo --effects 5",
    "console": "RELAY_CONSOLE_USERS_FILE=users.txt relay console --port 8400",
}


def finish_help(group: click.Group) -> None:
    """Give every command of ``group`` its example and the exit codes at the end of its help."""
    for name, command in group.commands.items():
        if command.epilog and "Exit codes" in command.epilog:
            continue
        example = EXAMPLES.get(name)
        parts = [f"\b\nExample:\n  {example}"] if example else []
        command.epilog = "\n\n".join([*parts, EXIT_CODES_HELP])


def human_duration(seconds: float) -> str:
    """2592000 -> '30 days', 5400 -> '1.5 hours', 90 -> '90 seconds'."""
    for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
        if seconds >= size:
            amount = seconds / size
            text = f"{amount:.1f}".removesuffix(".0")
            return f"{text} {unit}{'' if text == '1' else 's'}"
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text} second{'' if text == '1' else 's'}"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def settings_of(ctx: click.Context) -> Settings:
    """The settings the ``relay`` group loaded for this invocation."""
    return cast(Settings, ctx.obj["settings"])


def json_default(value: Any) -> Any:
    """``json.dumps``'s fallback for what rows hold: timestamps in ISO 8601, the rest as text."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m, 2h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _first_line(exc: BaseException) -> str:
    lines = redact(str(exc)).strip().splitlines()
    return escape_controls(lines[0]) if lines else type(exc).__name__


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, secrets masked and control characters escaped; then exit."""
    click.echo(f"error: {escape_controls(redact(message))}", err=True)
    sys.exit(code)


def permission_message(exc: BaseException) -> str:
    """'permission denied for table attempt; run 'relay purge' with the operator role ...'."""
    what = _first_line(exc)
    if not what.lower().startswith("permission denied"):
        what = f"permission denied: {what}"
    ctx = click.get_current_context(silent=True)
    command = ctx.info_name if ctx is not None else None
    kind = ROLE_OF_COMMAND.get(command or "")
    if kind == "schema owner":
        return f"{what}; run 'relay {command}' as the owner of the relay schema (docs/security.md)"
    if kind is not None:
        return (
            f"{what}; run 'relay {command}' with the {kind} role (relay_{kind} unless "
            "'relay roles --prefix' named it otherwise; docs/security.md)"
        )
    return f"{what}; this login lacks a right the command needs (docs/security.md)"


def clean_errors(func: F) -> F:
    """Turn the relay's errors and unreachable services into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ServiceUnavailableError as exc:
            fail(_first_line(exc), EXIT_UNAVAILABLE)
        except RelayError as exc:
            fail(str(exc), EXIT_REFUSED)
        except psycopg.errors.InsufficientPrivilege as exc:
            fail(permission_message(exc), EXIT_REFUSED)
        except psycopg.OperationalError as exc:
            if "permission denied" in str(exc):  # at connect: no CONNECT on the database
                fail(permission_message(exc), EXIT_REFUSED)
            fail(f"PostgreSQL unavailable: {_first_line(exc)}", EXIT_UNAVAILABLE)
        except (
            psycopg.errors.UndefinedTable,
            psycopg.errors.UndefinedFunction,
            psycopg.errors.InvalidSchemaName,
        ) as exc:
            # A database the code is newer than: say what to do rather than print a traceback.
            fail(f"{_first_line(exc)}: run 'relay migrate'", EXIT_REFUSED)
        except click.exceptions.ClickException:
            raise
        except Exception as exc:
            # A traceback would print whatever the failing frame held (a URL, a password); the
            # whole trace goes to the log at DEBUG, through the redacting formatter.
            logging.getLogger("relay").debug("unexpected error", exc_info=True)
            fail(f"unexpected {type(exc).__name__}: {_first_line(exc)}", EXIT_FAILURE)

    return cast(F, wrapper)


class Daemon(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signalled(daemon: Daemon) -> None:
    """Run ``daemon``; SIGTERM or Ctrl-C lets it finish the batch in hand, then it returns."""

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger("relay").info("signal %s: finishing the batch in hand", signum)
        daemon.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.run()

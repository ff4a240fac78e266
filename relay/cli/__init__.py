"""The ``relay`` command: a thin layer over the library. Errors are one line and a non-zero exit.

The group and its options are here; the commands are in ``effects`` (enqueue, cancel, show, list,
stats), ``operations`` (migrate, roles, unblock, schemas), ``daemons`` (run, demo), ``config``
(config), ``console`` (the operator console) and ``relay.reconciler.commands`` (reconcile,
resolve, purge). None of them holds SQL. Every command's help ends with an example and the exit
codes (``support.finish_help``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from relay.cli import config, console, daemons, effects, operations
from relay.cli.support import EXIT_CODES_HELP, EXIT_USAGE, fail, finish_help
from relay.config import load_settings
from relay.errors import RelayError
from relay.logs import configure
from relay.reconciler.commands import register as _register_reconciler


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("outbox-relay")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown (not installed)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(
    _version(), "--version", "-V", prog_name="relay", message="%(prog)s %(version)s"
)
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
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Overrides log_level (any case: debug, INFO).",
)
@click.pass_context
def main(
    ctx: click.Context, config_path: Path | None, log_format: str | None, log_level: str | None
) -> None:
    """Transactional outbox relay for PostgreSQL and Kafka.

    Settings come from the config file, overridden by RELAY_* environment variables
    (for example RELAY_DATABASE_URL, RELAY_KAFKA_BOOTSTRAP_SERVERS); `relay config` shows
    the result. Shell completion: eval "$(_RELAY_COMPLETE=bash_source relay)".

    \b
    Example:
      relay --config relay.toml migrate && relay run
    """
    overrides: dict[str, Any] = {}
    if log_format:
        overrides["log_format"] = log_format
    if log_level:
        overrides["log_level"] = log_level.upper()
    try:
        settings = load_settings(config_path, **overrides)
    except RelayError as exc:
        fail(str(exc), EXIT_USAGE)
    configure(settings.log_level, settings.log_format)
    ctx.obj = {"settings": settings, "config_path": config_path, "options": set(overrides)}


for _command in (
    *effects.COMMANDS,
    *operations.COMMANDS,
    *daemons.COMMANDS,
    *config.COMMANDS,
    *console.COMMANDS,
):
    main.add_command(_command)
_register_reconciler(main)
finish_help(main)

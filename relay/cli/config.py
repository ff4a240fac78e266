"""``relay config``: the effective configuration, secrets masked, each setting with where its
value came from; ``--check`` only validates it (exit 0, or 2 naming the setting and its source).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import click

from relay.cli.support import clean_errors, settings_of
from relay.config import ENV_PREFIX, Settings, config_path_from_env
from relay.redaction import escape_controls, redact

MASK = "********"


def _file_values(path: Path | None) -> dict[str, Any]:
    source = config_path_from_env(path)
    if source is None or not source.is_file():
        return {}
    return tomllib.loads(source.read_text(encoding="utf-8"))


def source_of(name: str, file_values: dict[str, Any], file: Path | None, options: set[str]) -> str:
    """Where a setting's value came from: an option, a variable, the file, or the default."""
    if name in options:
        return "command-line option"
    variable = f"{ENV_PREFIX}{name.upper()}"
    if name != "effect_types" and any(
        k.upper() == variable and v != "" for k, v in os.environ.items()
    ):
        return f"environment {variable}"
    if name in file_values:
        return f"file {file}"
    return "default"


def _shown(value: Any) -> str:
    """A TOML value, secrets masked (a password in a URL too)."""
    if hasattr(value, "get_secret_value"):
        return json.dumps(MASK)
    return escape_controls(redact(json.dumps(value)))


def config_lines(
    settings: Settings, config_path: Path | None, options: set[str] | None = None
) -> list[str]:
    file = config_path_from_env(config_path)
    file_values = _file_values(config_path)
    plain = settings.model_dump(exclude={"effect_types"})
    lines = [
        f"# effective configuration (file: {file or 'none'}; secrets masked)",
        "# each value: TOML, then where it came from",
    ]
    for name in Settings.model_fields:
        if name == "effect_types":
            continue
        value = getattr(settings, name) if name.endswith("password") else plain[name]
        where = source_of(name, file_values, file, options or set())
        if value is None:
            lines.append(f"# {name} is unset  # {where}")
        else:
            lines.append(f"{name} = {_shown(value)}  # {where}")
    for type_name, spec in settings.effect_types.items():
        lines.append(f"\n[effect_types.{json.dumps(type_name)}]")
        for key, value in spec.model_dump(exclude={"name"}, exclude_none=True).items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {_shown(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {_shown(value)}")
    return lines


@click.command("config")
@click.option(
    "--check",
    is_flag=True,
    help="Only validate: exit 0 when valid, 2 naming the setting and its source when not.",
)
@click.pass_context
@clean_errors
def config(ctx: click.Context, check: bool) -> None:
    """Print the effective configuration (secrets masked), or --check it.

    Each setting is shown with where its value came from: a command-line option, a RELAY_*
    environment variable, the config file, or the default. Nothing is connected to.
    """
    settings = settings_of(ctx)
    if check:
        settings.require_database_url()
        file = config_path_from_env(ctx.obj.get("config_path"))
        click.echo(
            f"configuration is valid: {len(settings.effect_types)} effect type(s); "
            f"file {file or 'none'} and RELAY_* environment variables"
        )
        return
    options = set(ctx.obj.get("options", ()))
    click.echo("\n".join(config_lines(settings, ctx.obj.get("config_path"), options)))


COMMANDS = (config,)

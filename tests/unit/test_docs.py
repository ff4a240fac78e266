"""The README's reference stays true to the code."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from relay.cli import main
from relay.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_with_its_variable() -> None:
    for name in Settings.model_fields:
        assert f"| `{name}` |" in README, f"setting {name} is missing from the README"
        if name != "effect_types":
            assert f"`RELAY_{name.upper()}`" in README


def test_every_command_is_documented_and_has_help() -> None:
    # The group reads its settings before a command's --help: no RELAY_* from the shell.
    runner = CliRunner(env={name: None for name in os.environ if name.startswith("RELAY_")})
    for name, command in main.commands.items():
        assert f"`relay {name}" in README, f"command {name} is missing from the README"
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert (command.help or "").split("\n")[0].strip()[:30] in result.output
        assert "Example:" in result.output and f"relay {name}" in result.output, name
        assert "Exit codes" in result.output, name


def test_shell_completion_and_take_over_are_documented() -> None:
    assert "_RELAY_COMPLETE=bash_source relay" in README
    assert "relay run --take-over" in README
    assert "`relay config" in README and "relay --version" in README

"""relay/cli: the commands and what they run, without a server."""

from __future__ import annotations

from click.testing import CliRunner

from relay.cli import main
from relay.sql import names


def test_commands_and_queries_are_registered() -> None:
    assert {"reconcile", "resolve", "purge"} <= set(main.commands)
    assert {"move_effect", "expire_deadlines", "claim_observations", "purge_batch"} <= set(names())
    result = CliRunner().invoke(main, ["resolve", "--help"])
    assert result.exit_code == 0 and "--redispatch" in result.output

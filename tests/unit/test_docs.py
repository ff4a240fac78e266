"""The README's reference stays true to the code."""

from __future__ import annotations

import os
import re
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


ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _pages() -> dict[str, str]:
    found = {"README.md": README, "CHANGELOG.md": (ROOT / "CHANGELOG.md").read_text("utf-8")}
    for page in sorted(DOCS.glob("*.md")):
        found[f"docs/{page.name}"] = page.read_text(encoding="utf-8")
    return found


def test_no_page_installs_from_a_package_index_the_project_is_not_on() -> None:
    """Issue 21.1: `pip install outbox-relay` names no real package."""
    for name, text in _pages().items():
        assert not re.search(r"pip install ['\"]?outbox-relay", text), name


def test_every_span_the_code_makes_is_documented() -> None:
    """Issue 21.7: operations.md once said the relay creates no spans."""
    made = set()
    for path in (ROOT / "relay").rglob("*.py"):
        made |= set(re.findall(r'tracing\.span\(\s*"([a-z_.]+)"', path.read_text("utf-8")))
    assert {"relay.publish_batch", "relay.verification_round"} <= made
    tracing_page = (DOCS / "tracing.md").read_text("utf-8")
    operations = (DOCS / "operations.md").read_text("utf-8")
    for span in made:
        assert f"`{span}`" in tracing_page and f"`{span}`" in operations, span
    assert "does not create spans" not in operations
    assert "status events the reconciler emits" not in operations


def test_every_compensation_names_a_type_declared_beside_it() -> None:
    """Issue 21.7: one page said wire-reversal, another wire_reversal."""
    texts = {
        **_pages(),
        "full-values": (ROOT / "helm/outbox-relay/ci/full-values.yaml").read_text(),
    }
    spellings: set[str] = set()
    for name, text in texts.items():
        for wanted in re.findall(r'compensation\s*[=:]\s*"?([A-Za-z0-9_.\-]+)"?', text):
            declared = f"[effect_types.{wanted}]" in text or f"\n  {wanted}:\n" in text
            assert declared, f"{name}: compensation {wanted!r} is not declared there"
            spellings.add(wanted)
    assert spellings == {"wire-reversal"}, spellings  # one name for the example, everywhere


def test_the_unknown_page_covers_every_outcome_and_is_linked() -> None:
    """Issue 21.9: every outcome the system can meet, with the metric and alert that show it."""
    from relay.observability import alerts, metrics

    page = (DOCS / "unknown.md").read_text("utf-8")
    for values in (
        metrics.ATTEMPT_OUTCOMES,
        metrics.OBSERVATION_ANSWERS,
        metrics.RESULT_OUTCOMES,
        metrics.QUARANTINE_REASONS,
        metrics.VERIFICATION_RESULTS,
    ):
        for value in values:
            assert f"`{value}`" in page, value
    names = set(re.findall(r"`(relay_[a-z_]+)", page))
    # as the operations page's metric reference lists them
    table = (DOCS / "operations.md").read_text("utf-8")
    listed = set(re.findall(r"^\| `(relay_[a-z_]+)` \|", table, re.MULTILINE))
    assert names and names <= listed, names - listed
    rules = {rule.alert for rule in alerts.rules()}
    mentioned = set(re.findall(r"`(Relay[A-Za-z]+)`", page))
    assert {"RelayUnknownEffectsTooOld", "RelayStuckEffects"} <= mentioned <= rules
    assert "relay show KEY" in page and "relay resolve KEY --confirm" in page
    assert "(docs/unknown.md)" in README
    assert "(unknown.md)" in (DOCS / "operations.md").read_text("utf-8")


def test_the_changelog_names_the_version_and_the_newest_migration() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text("utf-8")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None and f"## {version.group(1)}" in changelog
    assert "## Unreleased" in changelog
    newest = sorted((ROOT / "schemas" / "migrations").glob("*.sql"))[-1].stem
    assert newest in changelog
    assert (ROOT / "LICENSE").is_file()

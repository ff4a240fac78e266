"""The ``relay`` command as a user runs it: real subprocesses, a real database."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from relay.config import Settings
from tests import support


def relay_cli(
    config: Path | None, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    prefix = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *prefix, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=support.relay_env(**env),
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert text in result.stderr, result.stderr


def test_the_story_of_one_effect(settings: Settings, tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    payload = '{"account": "A", "amount": 5, "date": "d"}'
    made = relay_cli(config, "enqueue", "wire", "cli-1", payload)
    assert made.returncode == 0, made.stderr
    assert "enqueued: cli-1" in made.stdout
    again = relay_cli(config, "enqueue", "wire", "cli-1", "-", stdin=payload)
    assert "already present: cli-1" in again.stdout
    support.read_intake(settings.require_database_url())
    shown = relay_cli(config, "show", "cli-1")
    assert "[PENDING]" in shown.stdout and "business_key  A:5:d" in shown.stdout
    assert "- ->     PENDING" not in shown.stdout and "PENDING" in shown.stdout
    assert "attempts:\n  (none)\nevidence:\n  (none)\ntransitions:" in shown.stdout
    doc = json.loads(relay_cli(config, "show", "cli-1", "--json").stdout)
    assert doc["effect"]["state"] == "PENDING" and doc["transitions"][0]["to_state"] == "PENDING"
    assert doc["attempts"] == [] and doc["evidence"] == []
    listed = relay_cli(config, "list", "--state", "pending", "--type", "wire")
    assert "cli-1" in listed.stdout
    assert relay_cli(config, "list", "--state", "UNKNOWN").stdout == "no effects match\n"
    stats = json.loads(relay_cli(config, "stats", "--json").stdout)
    assert stats[0]["effect_type"] == "wire" and stats[0]["effects"] == 1
    assert relay_cli(config, "cancel", "cli-1").returncode == 0
    assert "[CANCELLED]" in relay_cli(config, "show", "cli-1").stdout
    assert_one_line_error(
        relay_cli(config, "cancel", "cli-1"), 2, "only a PENDING effect can be cancelled"
    )


def test_bad_input_gets_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    assert_one_line_error(
        relay_cli(config, "enqueue", "wire", "k", "{not json"), 2, "not valid JSON"
    )
    assert_one_line_error(relay_cli(config, "enqueue", "wire", "k", "[1]"), 2, "JSON object")
    assert_one_line_error(
        relay_cli(config, "enqueue", "nope", "k", "{}"),
        2,
        "error: effect type 'nope' is not declared",
    )
    assert_one_line_error(
        relay_cli(config, "enqueue", "wire", "k", '{"account": "A"}'), 2, "lacks field 'amount'"
    )
    relay_cli(config, "enqueue", "email", "dup", '{"a": 1}')
    assert_one_line_error(
        relay_cli(config, "enqueue", "email", "dup", '{"a": 2}'), 2, "already names another intent"
    )
    assert_one_line_error(
        relay_cli(config, "enqueue", "email", "t", "{}", "--traceparent", "xyz"), 2, "traceparent"
    )
    assert_one_line_error(relay_cli(config, "show", "missing"), 2, "no effect has operation key")
    assert_one_line_error(relay_cli(config, "list", "--state", "BOGUS"), 2, "Invalid value")
    assert_one_line_error(relay_cli(config, "list", "--older-than", "soon"), 2, "not a duration")


def test_bad_configuration_names_the_setting(tmp_path: Path) -> None:
    assert_one_line_error(relay_cli(tmp_path / "missing.toml", "stats"), 2, "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text('[effect_types.wire]\ntopic = "w"\n')
    assert_one_line_error(relay_cli(bad, "stats"), 2, "not idempotent but declares no business_key")
    assert_one_line_error(relay_cli(None, "stats", RELAY_BATCH_SIZE="many"), 2, "RELAY_BATCH_SIZE")
    assert_one_line_error(relay_cli(None, "stats"), 2, "RELAY_DATABASE_URL")


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    port = support.free_port()
    result = relay_cli(
        None, "stats", RELAY_DATABASE_URL=f"postgresql://app:hunter2@127.0.0.1:{port}/x"
    )
    assert_one_line_error(result, 3, "PostgreSQL unavailable")
    assert "hunter2" not in result.stderr


def test_migrate_is_safe_to_rerun(database_url: str, tmp_path: Path, prefix: str) -> None:
    settings = support.make_settings(database_url, "127.0.0.1:1", prefix)
    config = support.write_config(tmp_path / "relay.toml", settings)
    first = relay_cli(config, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    second = relay_cli(config, "migrate")
    assert "schema is up to date" in second.stdout


# --- One exit-code contract (issue 18, item 8g) -----------------------------------------------
# 0 done; 1 unexpected (a bug); 2 refused: usage, configuration, input, not found, not permitted,
# invalid transition, schema not migrated; 3 PostgreSQL or Kafka unreachable.


def test_a_missing_key_is_the_same_refusal_in_every_command(
    settings: Settings, tmp_path: Path
) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    missing = "no effect has operation key 'missing'"
    for args in (
        ("show", "missing"),
        ("show", "missing", "--json"),
        ("cancel", "missing"),
        ("resolve", "missing", "--confirm", "--reason", "r"),
    ):
        assert_one_line_error(relay_cli(config, *args), 2, missing)
    assert_one_line_error(relay_cli(config, "unblock", "nogroup", "--reason", "r"), 2, "nogroup")


@pytest.fixture
def nobody(settings: Settings, prefix: str) -> Iterator[str]:
    """The URL of a login with no right in the relay schema (roles are cluster-wide: named after
    this test, dropped after)."""
    url = settings.require_database_url()
    name = f"{prefix.lower()}_nobody"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
    try:
        yield make_conninfo(url, user=name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{name}"')
            conn.execute(f'DROP ROLE "{name}"')


def test_a_permission_error_names_the_role_to_use(
    settings: Settings, nobody: str, tmp_path: Path
) -> None:
    as_nobody = settings.model_copy(update={"database_url": nobody})
    config = support.write_config(tmp_path / "relay.toml", as_nobody)
    for args, role in (
        (("stats",), "with the operator role"),
        (("list",), "with the operator role"),
        (("show", "k"), "with the operator role"),
        (("purge", "--older-than", "1d"), "with the operator role"),
        (("cancel", "k"), "with the operator role"),
        (("resolve", "k", "--reject", "--reason", "r"), "with the operator role"),
        (("unblock", "g", "--reason", "r"), "with the operator role"),
        (("migrate",), "as the owner of the relay schema"),
    ):
        result = relay_cli(config, *args)
        assert_one_line_error(result, 2, "error: permission denied")
        assert f"run 'relay {args[0]}' {role}" in result.stderr, result.stderr
        assert "unexpected" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_the_exit_codes_are_in_the_help() -> None:
    shown = relay_cli(None, "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    for line in ("0 done", "1 unexpected error", "2 refused", "3 PostgreSQL or Kafka unreachable"):
        assert line in text, shown.stdout


# --- CLI basics (issue 21, item 6) -------------------------------------------------------------


def test_version_and_every_help_has_an_example_and_the_exit_codes() -> None:
    version = relay_cli(None, "--version")
    assert version.returncode == 0 and version.stdout.startswith("relay "), version
    for command in ("run", "reconcile", "enqueue", "list", "purge", "config", "schemas"):
        shown = relay_cli(None, command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "Example:" in shown.stdout and "relay " + command in shown.stdout, shown.stdout
        assert "Exit codes" in shown.stdout and "3  PostgreSQL or Kafka" in shown.stdout


def test_log_level_is_accepted_in_any_case(settings: Settings, tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    assert relay_cli(config, "--log-level", "debug", "stats").returncode == 0
    assert relay_cli(config, "stats", RELAY_LOG_LEVEL="warning").returncode == 0


def test_config_prints_the_effective_settings_redacted_with_their_sources(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        'replica_id = "cfg-r1"\n[effect_types.wire]\ntopic = "w"\nidempotent = true\n'
    )
    url = "postgresql://postgres:Hunter2-pw@127.0.0.1:1/x"
    shown = relay_cli(
        config,
        "--log-level",
        "warning",
        "config",
        RELAY_DATABASE_URL=url,
        RELAY_KAFKA_SASL_PASSWORD="Sasl-pw-77",
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "Hunter2-pw" not in out and "Sasl-pw-77" not in out, out
    assert "database_url = " in out and "# environment RELAY_DATABASE_URL" in out, out
    assert 'kafka_sasl_password = "********"' in out, out
    assert f'replica_id = "cfg-r1"  # file {config}' in out, out
    assert 'log_level = "WARNING"  # command-line option' in out, out
    assert "batch_size = 5000  # default" in out, out
    assert '[effect_types."wire"]' in out, out

    ok = relay_cli(config, "config", "--check", RELAY_DATABASE_URL=url)
    assert ok.returncode == 0 and "configuration is valid" in ok.stdout, ok
    bad = relay_cli(config, "config", "--check", RELAY_BATCH_SIZE="0")
    assert_one_line_error(bad, 2, "setting 'batch_size' from environment variable RELAY_BATCH_SIZE")
    (tmp_path / "bad.toml").write_text('lease_s = "long"\n')
    bad = relay_cli(tmp_path / "bad.toml", "config", "--check", RELAY_DATABASE_URL=url)
    assert_one_line_error(bad, 2, f"setting 'lease_s' in {tmp_path / 'bad.toml'}")
    nowhere = relay_cli(None, "config", "--check")
    assert_one_line_error(nowhere, 2, "RELAY_DATABASE_URL")


def test_list_has_a_header_and_cancel_an_actor(settings: Settings, tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    assert relay_cli(config, "enqueue", "email", "hdr-1", '{"to": "a"}').returncode == 0
    support.read_intake(settings.require_database_url())
    listed = relay_cli(config, "list").stdout.splitlines()
    assert listed[0].split()[:4] == ["updated", "(UTC)", "state", "effect"], listed
    assert "hdr-1" in listed[1]
    assert relay_cli(config, "list", "--state", "STUCK").stdout == "no effects match\n"
    assert relay_cli(config, "list", "--state", "STUCK", "--json").stdout == ""
    cancelled = relay_cli(config, "cancel", "hdr-1", "--actor", "alice", "--reason", "gone")
    assert cancelled.returncode == 0 and "(by alice)" in cancelled.stdout, cancelled
    story = json.loads(relay_cli(config, "show", "hdr-1", "--json").stdout)
    last = story["transitions"][-1]
    assert last["to_state"] == "CANCELLED" and last["actor"].startswith("alice"), last


def test_purge_dry_run_says_the_retention_in_words(settings: Settings, tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    dry = relay_cli(config, "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "finished more than 30 days ago" in dry.stdout and "e+06" not in dry.stdout, dry.stdout
    assert (
        "more than 1.5 hours ago"
        in relay_cli(config, "purge", "--dry-run", "--older-than", "90m").stdout
    )


def test_schemas_check_from_another_directory_checks_the_packages_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "schemas", "--check"],
        capture_output=True,
        text=True,
        env=support.relay_env(PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "up to date" in result.stdout

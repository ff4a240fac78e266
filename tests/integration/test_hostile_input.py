"""Hostile input on a real PostgreSQL and through the real CLI (issue 11, items 7, 8 and 14).

Every refusal is a specific EnqueueError raised before any statement, so the caller's own
transaction carries on; the CLI answers bad input with one line and exit 2, before connecting.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.errors import InvalidIntentError, PayloadTooLargeError
from relay.intents import MAX_PAYLOAD_DEPTH
from tests import support

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _nested(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        doc = {"d": doc}
    return doc


def _cycle() -> dict[str, Any]:
    doc: dict[str, Any] = {}
    doc["self"] = doc
    return doc


BAD: list[tuple[str, Callable[[], tuple[str, dict[str, Any], dict[str, Any]]], type[Exception]]] = [
    ("nul in key", lambda: ("k\x00", {"a": 1}, {}), InvalidIntentError),
    ("nul in value", lambda: ("k", {"a": "x\x00y"}, {}), InvalidIntentError),
    ("nul in field name", lambda: ("k", {"a\x00": 1}, {}), InvalidIntentError),
    ("surrogate in key", lambda: ("k\ud800", {"a": 1}, {}), InvalidIntentError),
    ("surrogate in value", lambda: ("k", {"a": ["\udfff"]}, {}), InvalidIntentError),
    ("nesting 5000", lambda: ("k", _nested(5000), {}), InvalidIntentError),
    ("a cycle", lambda: ("k", _cycle(), {}), InvalidIntentError),
    (
        "traceparent newline",
        lambda: ("k", {"a": 1}, {"traceparent": TRACE + "\n"}),
        InvalidIntentError,
    ),
    ("nul in business key", lambda: ("k", {"a": 1}, {"business_key": "b\x00"}), InvalidIntentError),
    ("10 MB", lambda: ("k", {"blob": "x" * 10_000_000}, {}), PayloadTooLargeError),
]


@pytest.mark.parametrize(("case", "make", "error"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_the_transaction_goes_on(
    settings: Settings,
    case: str,
    make: Callable[[], tuple[str, dict[str, Any], dict[str, Any]]],
    error: type[Exception],
) -> None:
    key, payload, extra = make()
    with psycopg.connect(settings.require_database_url()) as conn:
        conn.execute("CREATE TEMP TABLE mine (n int)")
        conn.execute("INSERT INTO mine VALUES (1)")
        with pytest.raises(error):
            relay.enqueue(conn, "email", key, payload, **extra)
        with pytest.raises(error):
            relay.enqueue_many(conn, [relay.Intent("email", key, payload, **extra)])
        # Nothing was sent: the caller's transaction is intact and still usable.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("INSERT INTO mine VALUES (2)")
        row = conn.execute("SELECT count(*) FROM mine").fetchone()
        assert row == (2,)
        assert relay.enqueue(conn, "email", "fine", {"a": 1}).created
        conn.commit()


def test_the_limits_are_at_their_documented_values(settings: Settings) -> None:
    with psycopg.connect(settings.require_database_url()) as conn:
        deepest = _nested(MAX_PAYLOAD_DEPTH - 1)  # the outer object is level 1
        assert relay.enqueue(conn, "email", "deep", deepest).created
        with pytest.raises(InvalidIntentError, match=f"deeper than {MAX_PAYLOAD_DEPTH}"):
            relay.enqueue(conn, "email", "deeper", _nested(MAX_PAYLOAD_DEPTH))
        assert relay.enqueue(conn, "email", "big", {"b": "x" * 900_000}).created
        with pytest.raises(PayloadTooLargeError, match="over the limit of 1000"):
            relay.enqueue(conn, "email", "small-limit", {"b": "x" * 1000}, max_payload_bytes=1000)
        conn.commit()
        effect = relay.get_effect(conn, "deep")
    assert effect is not None and effect.payload == deepest


def test_async_enqueue_refuses_the_same(settings: Settings) -> None:
    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(settings.require_database_url()) as conn:
            with pytest.raises(InvalidIntentError):
                await relay.enqueue_async(conn, "email", "k\x00", {"a": 1})
            with pytest.raises(PayloadTooLargeError):
                await relay.enqueue_many_async(
                    conn, [relay.Intent("email", "k", {"a": "xx"})], max_payload_bytes=4
                )
            assert (await relay.enqueue_async(conn, "email", "fine", {"a": 1})).created

    asyncio.run(scenario())


# -- the CLI --------------------------------------------------------------------------------------


def cli(config: Path | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    prefix = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *prefix, *args],
        capture_output=True,
        text=True,
        env=support.relay_env(**env),
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and text in result.stderr, result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_bad_input_in_one_line_before_connecting(tmp_path: Path) -> None:
    # A database that is down: each refusal must still name the input, not the outage.
    down = f"postgresql://app:Cli-Pw-9753@127.0.0.1:{support.free_port()}/x"
    settings = support.make_settings(down, "127.0.0.1:1", "t", max_payload_bytes=100)
    config = support.write_config(tmp_path / "relay.toml", settings)
    one_line(cli(config, "enqueue", "email", "k", '{"a": "\\u0000"}'), 2, "NUL")
    one_line(cli(config, "enqueue", "email", "k", "{not json"), 2, "not valid JSON")
    one_line(cli(config, "enqueue", "email", "", "{}"), 2, "operation key")
    one_line(cli(config, "enqueue", "email", "k", json.dumps({"b": "x" * 200})), 2, "limit of 100")
    one_line(cli(config, "enqueue", "email", "k", "[" * 100_000), 2, "not valid JSON")
    for result in (cli(config, "enqueue", "email", "k", "{}"), cli(config, "stats")):
        one_line(result, 3, "PostgreSQL unavailable")
        assert "Cli-Pw-9753" not in result.stderr


def test_cli_never_prints_a_database_url_that_does_not_parse() -> None:
    for bad in (
        "postgresql//app:Parse-Pw-1111@db/x",  # no colon: conninfo parser error quoting it
        "postgresql://app:Parse%zzPw-2222@db/x",  # bad percent-escape
        "host=db password='Parse-Pw-3333",  # unterminated quote
    ):
        result = cli(None, "stats", RELAY_DATABASE_URL=bad)
        one_line(result, 2, "database_url")
        assert "from environment variable RELAY_DATABASE_URL" in result.stderr
        assert "Parse" not in result.stderr, result.stderr


def test_cli_output_escapes_control_characters(settings: Settings, tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "relay.toml", settings)
    key = "evil\n2026-01-01 00:00:00 CONFIRMED   wire  forged\x1b]0;owned\x07\u202e"
    with psycopg.connect(settings.require_database_url()) as conn:
        relay.enqueue(conn, "email", key, {"a": 1})
        conn.commit()
        relay.cancel(conn, key, reason="why\x1b[2J\nnot")
        conn.commit()
    for args in (("list",), ("show", key), ("stats",)):
        result = cli(config, *args)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\u202e" not in result.stdout, args
        assert "\x07" not in result.stdout
    header, *rows = cli(config, "list").stdout.splitlines()
    assert header.startswith("updated (UTC)")  # relay list's header line
    listed = "\n".join(rows)
    assert len(rows) == 1 and "evil\\n2026" in listed and "\\x1b[2J" in listed
    shown = cli(config, "show", key).stdout
    assert "forged\\x1b]0;owned\\x07\\u202e" in shown
    assert json.loads(cli(config, "show", key, "--json").stdout)["effect"]["operation_key"] == key

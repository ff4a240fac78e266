"""Secrets never printed, hostile text never obeyed (issue 11, items 6, 7, 10 and 14)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from relay.config import Settings, load_settings
from relay.db import unprotected_hosts, warn_unless_verified_tls
from relay.errors import ConfigError
from relay.kafka_client import kafka_security
from relay.logs import JsonFormatter, TextFormatter
from relay.redaction import display_dsn, escape_controls, redact
from tests import support


@pytest.fixture(autouse=True)
def _no_relay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RELAY_") or name.startswith("PG"):
            monkeypatch.delenv(name)


# Each shape a database URL or conninfo can take, with the password it holds.
SHAPES = [
    ("postgresql://app:Url-Pw-1234@db.internal:5432/app", "Url-Pw-1234"),
    ("postgresql://app:Pct%2FPw%40567@db.internal/app", "Pct/Pw@567"),
    (
        "host=db.internal user=app password='Sp ace, comma \\'quote\\' 89'",
        "Sp ace, comma 'quote' 89",
    ),
    ("postgresql://app@db.internal/app?password=Query-Pw-4321&sslmode=require", "Query-Pw-4321"),
]


@pytest.mark.parametrize(("dsn", "password"), SHAPES)
def test_every_shape_of_database_url_is_redacted(dsn: str, password: str) -> None:
    support.make_settings(dsn, "k:9092", "t")  # the settings register the parsed password
    for text in (
        f"connect failed for {dsn}",
        f"password is {password}",
        json.dumps({"url": dsn}),
        repr(dsn),
    ):
        shown = redact(text)
        assert password not in shown, shown
        for part in password.split():
            if len(part) >= 4:
                assert part not in shown, shown
    assert password not in display_dsn(dsn)
    assert "db.internal" in display_dsn(dsn)


def test_a_url_that_does_not_parse_is_never_printed() -> None:
    bad = "postgresql://app:Bad%zzPw-999@db/app"  # a bad percent-escape: libpq cannot parse it
    with pytest.raises(ConfigError) as caught:
        load_settings(None, database_url=bad)
    assert "Bad%zzPw-999" not in str(caught.value) and "zzPw" not in str(caught.value)
    assert "database_url" in str(caught.value)
    with pytest.raises(ValidationError) as raw:
        Settings(database_url=bad)
    assert "zzPw" not in str(raw.value)
    assert "zzPw" not in display_dsn(bad)


def test_pgpassword_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "Env-Pw-2468")
    support.make_settings("host=db user=app", "k:9092", "t")
    assert "Env-Pw-2468" not in redact("libpq said Env-Pw-2468")


def test_kafka_passwords_are_masked_and_wired() -> None:
    settings = support.make_settings(
        "host=db",
        "k:9093",
        "t",
        kafka_security_protocol="SSL",
        kafka_ssl_cafile="/ca.pem",
        kafka_ssl_certfile="/client.pem",
        kafka_ssl_keyfile="/client.key",
        kafka_ssl_password="Key-Pw-1357",
        kafka_sasl_password="Sasl-Pw-8642",
    )
    config = kafka_security(settings)
    assert config["ssl_certfile"] == "/client.pem"
    assert config["ssl_keyfile"] == "/client.key"
    assert config["ssl_password"] == "Key-Pw-1357"
    shown = redact(str(config))
    assert "Key-Pw-1357" not in shown and "Sasl-Pw-8642" not in shown
    assert "Key-Pw-1357" not in repr(settings)


def test_an_unregistered_quoted_password_pair_is_masked() -> None:
    shown = redact("{'sasl_plain_password': 'a b, c\\'d', 'user': 'x'} password=\"e f,g\" ok")
    assert "a b" not in shown and "c\\'d" not in shown and "e f,g" not in shown
    assert "'user': 'x'" in shown and shown.endswith(" ok")


def test_bad_environment_variable_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("batch_size = 10\n")
    monkeypatch.setenv("RELAY_POLL_INTERVAL_S", "soon")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "from environment variable RELAY_POLL_INTERVAL_S" in message
    assert f"in {config}" not in message
    monkeypatch.delenv("RELAY_POLL_INTERVAL_S")
    config.write_text("batch_size = 'many'\n")
    with pytest.raises(ConfigError, match=rf"setting 'batch_size' in {config}"):
        load_settings(config)


# -- log and terminal injection -------------------------------------------------------------------

HOSTILE = "k1\n2026-01-01T00:00:00Z INFO relay: forged\x1b[31m\u202e\x85\x07end"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("relay.test.hostile")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)


def test_text_log_lines_cannot_be_forged(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(TextFormatter())
    logger.info("published %s", HOSTILE, extra={"operation_key": HOSTILE})
    out = stream.getvalue()
    assert out.count("\n") == 1  # one record, one line
    assert "\x1b" not in out and "\u202e" not in out and "\x85" not in out and "\x07" not in out
    assert "\\x1b[31m" in out and "\\u202e" in out and "k1\\n2026" in out


def test_json_log_lines_stay_json(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    key = 'k" password="x\n\ud800' + HOSTILE
    logger.info("published %s", key, extra={"operation_key": key, "n": float("nan")})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["msg"].startswith("published k")
    assert "\x1b" not in lines[0] and "\u202e" not in lines[0]


def test_escape_controls_keeps_ordinary_text() -> None:
    assert escape_controls("wire-42 café 東京 ok") == "wire-42 café 東京 ok"
    assert escape_controls("a\tb\x7f\x9b\r") == "a\\tb\\x7f\\x9b\\r"
    assert escape_controls("a\nb", keep_newlines=True) == "a\nb"


# -- PostgreSQL TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "warned"),
    [
        ("postgresql://app@db.example.com/app", ["db.example.com"]),
        ("postgresql://app@db.example.com/app?sslmode=require", ["db.example.com"]),
        ("host=10.0.0.5 sslmode=verify-ca", ["10.0.0.5"]),
        ("postgresql://app@db.example.com/app?sslmode=verify-full", []),
        ("postgresql://app@127.0.0.1/app", []),
        ("host=localhost,::1 dbname=x", []),
        ("host=/var/run/postgresql dbname=x", []),
    ],
)
def test_a_remote_database_without_verify_full_is_found(dsn: str, warned: list[str]) -> None:
    assert unprotected_hosts(dsn) == warned


def test_the_warning_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    settings = support.make_settings("postgresql://app:Warn-Pw-1@db.example.com/app", "k", "t")
    with caplog.at_level(logging.WARNING, logger="relay.db"):
        warn_unless_verified_tls(settings, "run")
    assert len(caplog.records) == 1
    assert "db.example.com" in caplog.records[0].getMessage()
    assert "sslmode=verify-full" in caplog.records[0].getMessage()

"""Logs of a real ``relay run``: one JSON document per line, effect lines carry the operation key
and effect id, and no secret (database password, SASL password) appears anywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

import relay
from relay.config import Settings
from relay.states import EffectState
from tests import support

DB_PASSWORD = "s3cret-db-Pw-4f1c"
SASL_PASSWORD = "s3cret-sasl-Pw-9e2d"


def url_with_password(conninfo: str, password: str) -> str:
    """postgresql://user:password@host:port/db: the test server trusts local connections, so any
    password is accepted, and the relay has to carry it through without ever logging it."""
    parts = conninfo_to_dict(conninfo)
    return (
        f"postgresql://{parts.get('user', 'postgres')}:{password}@{parts.get('host', '127.0.0.1')}"
        f":{parts.get('port', 5432)}/{parts['dbname']}"
    )


def test_json_logs_name_the_effect_and_hide_secrets(settings: Settings, tmp_path: Path) -> None:
    url = settings.require_database_url()
    # Small enough that a 2 KiB payload is refused before any send: a REJECTED attempt, which the
    # relay logs with the effect's identity.
    config = support.write_config(
        tmp_path / "relay.toml",
        settings.model_copy(update={"max_message_bytes": 1024, "metrics_port": 0}),
    )
    env = support.relay_env(
        RELAY_DATABASE_URL=url_with_password(url, DB_PASSWORD),
        RELAY_KAFKA_SASL_PASSWORD=SASL_PASSWORD,
    )
    with psycopg.connect(url, autocommit=True) as conn:
        big = relay.enqueue(conn, "email", "obs-log-big", {"to": "a@example.com", "x": "y" * 2048})
        relay.enqueue(conn, "email", "obs-log-ok", {"to": "b@example.com"})
    log_path = tmp_path / "relay.log"
    proc = support.start_relay(
        config, log_path, "--log-format", "json", "--log-level", "DEBUG", env=env
    )
    try:
        support.wait_for(
            lambda: (
                support.count_states(url).get(EffectState.REJECTED.value) == 1
                and support.count_states(url).get(EffectState.PUBLISHED.value) == 1
            ),
            60,
            "one effect REJECTED and one PUBLISHED",
        )
    finally:
        support.stop_process(proc)

    text = log_path.read_text(encoding="utf-8", errors="replace")
    assert DB_PASSWORD not in text
    assert SASL_PASSWORD not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) >= 3, text
    docs: list[dict[str, Any]] = []
    for line in lines:
        doc = json.loads(line)  # every line is one JSON document
        assert {"ts", "level", "logger", "msg"} <= set(doc), line
        docs.append(doc)
    assert any(d["msg"] == "relay stopped" for d in docs)

    about_big = [d for d in docs if "obs-log-big" in json.dumps(d)]
    assert about_big, "the rejected effect was not logged"
    for doc in about_big:
        assert doc.get("operation_key") == "obs-log-big", doc
        assert doc.get("effect_id") == big.effect_id, doc
    # Whatever mentions an effect by key carries both fields.
    for doc in docs:
        if "obs-log-" in doc["msg"]:
            assert "operation_key" in doc and "effect_id" in doc, doc


def test_a_stopped_broker_is_one_line_down_and_one_line_up(
    settings: Settings, tmp_path: Path
) -> None:
    """Issue 21.5: while the broker is down the log says so once, not once per reconnect of the
    Kafka client; kafka-python's own lines are DEBUG lines, hidden at INFO."""
    from relay.devtools.services import LocalKafka

    broker = LocalKafka()
    broker.start()
    try:
        config = support.write_config(
            tmp_path / "relay.toml",
            settings.model_copy(
                update={
                    "kafka_bootstrap_servers": broker.bootstrap_servers,
                    "metrics_port": 0,
                    # Retried every second at most: more reconnects during the outage to stay
                    # quiet about, and no long wait for the first publish after it.
                    "outage_backoff_max_s": 1.0,
                }
            ),
        )
        url = settings.require_database_url()
        with psycopg.connect(url, autocommit=True) as conn:
            relay.enqueue(conn, "email", "before-outage", {"to": "a@example.com"})
        log_path = tmp_path / "relay.log"
        proc = support.start_relay(config, log_path)
        try:
            support.wait_for(
                lambda: support.count_states(url).get("PUBLISHED") == 1, 60, "a first publish"
            )
            before = len(log_path.read_text(encoding="utf-8").splitlines())
            broker.kill()

            def lines() -> list[str]:
                return log_path.read_text(encoding="utf-8").splitlines()[before:]

            # Once the outage is reported, 8 s more: reconnects at most a second apart.
            support.wait_for(
                lambda: any("Kafka unavailable" in line for line in lines()),
                60,
                "the outage to be reported",
                explain=lambda: "\n".join(lines()),
            )
            time.sleep(8)
            during = lines()
            broker.launch()
            broker.wait_ready()
            with psycopg.connect(url, autocommit=True) as conn:
                relay.enqueue(conn, "email", "after-outage", {"to": "b@example.com"})
            support.wait_for(
                lambda: support.count_states(url).get("PUBLISHED") == 2, 90, "a publish after"
            )
        finally:
            support.stop_process(proc)
        text = log_path.read_text(encoding="utf-8")
        shown = "\n".join(during)
        assert not [line for line in during if " kafka." in line or " kafka:" in line], shown
        assert len(during) <= 3, shown
        assert sum("Kafka unavailable" in line for line in during) == 1, shown
        assert text.count("Kafka available again") == 1, text[-3000:]
    finally:
        broker.stop()

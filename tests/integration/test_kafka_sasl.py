"""The relay against a real SASL_PLAINTEXT listener taking SCRAM-SHA-512 (issue 11, item 13):
it authenticates and publishes, a wrong password is refused, and the password appears in no log
line, not even with DEBUG on (kafka-python logs its whole configuration at DEBUG)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError

import relay
from relay.devtools.services.kafka import LocalKafka
from relay.logs import TextFormatter
from relay.states import EffectState
from tests import support

SASL_USER = "relay-app"
SASL_PASSWORD = "Scram-Sasl-Pw-6a1f"


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[LocalKafka]:
    """A broker of its own (the shared one has no SASL listener), started once for the module."""
    broker = LocalKafka(partitions=1, scram_users={SASL_USER: SASL_PASSWORD})
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_relay_publishes_over_sasl_and_never_logs_the_password(
    sasl_broker: LocalKafka, database_url: str, prefix: str, tmp_path: Path
) -> None:
    settings = support.make_settings(
        database_url,
        sasl_broker.sasl_bootstrap_servers,
        prefix,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=SASL_USER,
        status_events=False,
    )
    support.prepare_database(settings)
    # The password reaches the relay only through its variable, as an operator would pass it.
    config = support.write_config(tmp_path / "relay.toml", settings)
    with psycopg.connect(database_url) as conn:
        relay.enqueue(conn, "email", "sasl-1", {"to": "a@example.com"})
        conn.commit()
    log_path = tmp_path / "relay.log"
    env = support.relay_env(RELAY_KAFKA_SASL_PASSWORD=SASL_PASSWORD)
    proc = support.start_relay(config, log_path, "--log-level", "DEBUG", env=env)
    try:
        support.wait_for(
            lambda: support.count_states(database_url).get(EffectState.PUBLISHED.value) == 1,
            90,
            "the effect PUBLISHED over SASL",
        )
    finally:
        support.stop_process(proc)
    records = support.read_topic(sasl_broker.bootstrap_servers, f"{prefix}.emails", 1)
    assert [r.key for r in records] == [b"sasl-1"]
    text = log_path.read_text(encoding="utf-8", errors="replace")
    assert "relay starting" in text and "relay stopped [published=1]" in text, text
    assert SASL_PASSWORD not in text


def test_a_wrong_password_is_refused(
    sasl_broker: LocalKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused by the broker for its credentials (not merely unreachable). The broker closes the
    connection as it refuses, and kafka-python sometimes sees the close before the refusal (a
    whole CI attempt saw only closed connections), so the broker's own log is the evidence: it
    says it failed this login's authentication. The client must fail, and its log must show it
    got as far as sending its credentials."""
    before = sasl_broker.log_path.stat().st_size
    with caplog.at_level(logging.DEBUG, logger="kafka"), pytest.raises(KafkaError):
        KafkaProducer(
            bootstrap_servers=sasl_broker.sasl_bootstrap_servers,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=SASL_USER,
            sasl_plain_password="Not-The-Password-1",
            max_block_ms=6000,
            bootstrap_timeout_ms=6000,
        )
    assert "SaslAuthenticateRequest" in caplog.text
    with sasl_broker.log_path.open("rb") as log:
        log.seek(before)
        broker_said = log.read().decode("utf-8", "replace")
    refusals = [line for line in broker_said.splitlines() if "Failed authentication" in line]
    assert refusals, broker_said[-3000:]
    assert "invalid credentials" in refusals[0], refusals[0]


def test_kafka_debug_output_is_masked_when_let_through(
    sasl_broker: LocalKafka, database_url: str, prefix: str
) -> None:
    """Even if someone lets kafka-python's DEBUG lines through, the formatter masks the password
    that the settings registered: the raw records hold it, the written lines do not."""
    from kafka import KafkaAdminClient

    from relay.kafka_client import kafka_security

    settings = support.make_settings(
        database_url,
        sasl_broker.sasl_bootstrap_servers,
        prefix,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=SASL_USER,
        kafka_sasl_password=SASL_PASSWORD,
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    raw: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raw.append(record.getMessage())

    kafka_logger = logging.getLogger("kafka")
    old_level = kafka_logger.level
    kafka_logger.addHandler(handler)
    kafka_logger.addHandler(keep := Keep())
    kafka_logger.setLevel(logging.DEBUG)
    try:
        # The admin client logs its whole configuration at DEBUG, password included.
        admin = KafkaAdminClient(**kafka_security(settings))
        assert admin.list_topics() is not None  # authenticated over SASL
        admin.close()
    finally:
        kafka_logger.removeHandler(handler)
        kafka_logger.removeHandler(keep)
        kafka_logger.setLevel(old_level)
    assert any(SASL_PASSWORD in line for line in raw), "kafka-python did not log its config"
    written = stream.getvalue()
    assert "sasl_plain_password" in written
    assert SASL_PASSWORD not in written

"""Pure pieces of the CLI and the log set-up (issue 21, items 5 and 6)."""

from __future__ import annotations

import logging

import pytest

from relay.cli.support import human_duration
from relay.logs import ConnectionState, configure


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (30 * 86400, "30 days"),
        (86400, "1 day"),
        (5400, "1.5 hours"),
        (120, "2 minutes"),
        (90, "1.5 minutes"),
        (1, "1 second"),
        (0.25, "0.25 seconds"),
    ],
)
def test_durations_are_said_in_words(seconds: float, words: str) -> None:
    assert human_duration(seconds) == words


def test_a_connection_state_is_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    state = ConnectionState("Kafka", logging.getLogger("relay.test"))
    with caplog.at_level(logging.INFO, logger="relay.test"):
        state.up()  # was never down: nothing to say
        for _ in range(50):
            state.down("connection refused")
        state.up()
        state.up()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("Kafka unavailable: connection refused")
    assert lines[1].startswith("Kafka available again after")


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("debug", True)])
def test_kafka_python_records_are_debug_records(
    level: str, shown: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(level)
    try:
        logging.getLogger("kafka.net.connection").error("<conn>: Connection lost: refused")
        logging.getLogger("kafka.conn").debug("config: sasl_plain_password=pw")
        logging.getLogger("relay.test").warning("own line")
    finally:
        configure("INFO")
    err = capsys.readouterr().err
    assert "own line" in err
    assert ("Connection lost" in err) is shown, err
    if shown:
        assert "DEBUG   kafka.net.connection" in err, err
    assert "sasl_plain_password" not in err  # kafka-python's own DEBUG records are never made

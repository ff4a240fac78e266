from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import pytest

from relay.backoff import Backoff
from relay.cli.support import parse_duration
from relay.logs import JsonFormatter, TextFormatter, redact
from relay.messages import MESSAGE_MODELS, ResultMessage, json_schema
from relay.migrations import available
from relay.sql import names, query
from relay.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, EffectState, is_allowed

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "json"


def test_json_schema_files_match_the_models() -> None:
    for name in MESSAGE_MODELS:
        stored = (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
        assert stored == json_schema(name), f"run 'relay schemas' to refresh {name}"


def test_result_message_refuses_unknown_outcomes() -> None:
    with pytest.raises(ValueError, match="outcome"):
        ResultMessage.model_validate({"operation_key": "k", "outcome": "maybe"})


def test_terminal_states_lead_nowhere() -> None:
    for state in TERMINAL_STATES:
        # An extra execution that cannot be compensated; a commit reported for a rejection.
        if state in (EffectState.CONFIRMED, EffectState.REJECTED):
            assert ALLOWED_TRANSITIONS[state] == {EffectState.STUCK}
        else:
            assert not ALLOWED_TRANSITIONS[state]
    assert not is_allowed(EffectState.UNKNOWN, EffectState.DISPATCHING)
    assert is_allowed(EffectState.DISPATCHING, EffectState.UNKNOWN)


def test_every_query_is_named_and_loadable() -> None:
    for name in ("claim_batch", "mark_outcomes", "expire_leases", "enqueue"):
        assert name in names()
        assert query(name).strip()


def test_migrations_are_numbered() -> None:
    versions = [m.version for m in available()]
    assert versions == sorted(versions)
    assert versions[0] == 1


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[0] < 1.3
    assert all(d <= 8.0 * 1.2 for d in delays)
    assert delays[-1] >= 8.0 * 0.8
    backoff.reset()
    assert backoff.next_delay() < 1.3


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("30s", 30.0), ("15m", 900.0), ("2h", 7200.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration_is_a_usage_error() -> None:
    with pytest.raises(click.BadParameter, match="not a duration"):
        parse_duration("soon")


def test_secrets_never_reach_a_log_line() -> None:
    assert "hunter2" not in redact("postgresql://app:hunter2@db:5432/app")
    assert "postgresql://app:***@db" in redact("postgresql://app:hunter2@db:5432/app")
    assert "hunter2" not in redact("host=db password=hunter2 user=app")
    assert "hunter2" not in redact("{'sasl_plain_password': 'hunter2'}")
    record = logging.LogRecord("relay", logging.INFO, "", 0, "url %s", ("x://u:pw@h",), None)
    record.operation_key = "k1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "url x://u:***@h"
    assert line["operation_key"] == "k1"
    assert "pw@" not in TextFormatter().format(record)


def test_overlapping_search_windows_merge_and_distant_ones_stay_apart() -> None:
    from datetime import UTC, datetime, timedelta

    from relay.config import Settings
    from relay.dispatch.lookup import Wanted, _merged_windows

    settings = Settings(publish_timeout_s=2.0, transaction_timeout_s=5.0, clock_skew_s=1.0)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    at = [t0, t0 + timedelta(seconds=3), t0 + timedelta(seconds=60), t0 + timedelta(seconds=1)]
    wanted = [Wanted(f"k{i}", i, 1, t) for i, t in enumerate(at)]
    merged = _merged_windows(settings, wanted)
    # each window is 1 s before the start to 2*2 + 5 + 1 s after: 0, 1 and 3 s overlap, 60 s not
    assert [sorted(w.effect_id for w in group) for _, _, group in merged] == [[0, 1, 3], [2]]
    start_ms = int(t0.timestamp() * 1000)
    assert merged[0][0] == start_ms - 1000
    assert merged[0][1] == start_ms + 3000 - 1000 + 9000 + 2000

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import load_settings
from relay.errors import ConfigError, EffectTypeError


@pytest.fixture(autouse=True)
def _no_relay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's shell (e.g. devservices' exports) must not change what these tests see."""
    import os

    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)


def test_file_is_read_and_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        'batch_size = 10\nkafka_bootstrap_servers = "a:1"\n'
        '[effect_types.wire]\ntopic = "wires"\nbusiness_key = "{account}"\n'
    )
    monkeypatch.setenv("RELAY_BATCH_SIZE", "20")
    settings = load_settings(config)
    assert settings.batch_size == 20
    assert settings.kafka_bootstrap_servers == "a:1"
    assert settings.effect_types["wire"].name == "wire"
    assert settings.effect_types["wire"].business_key == "{account}"
    # A command-line option (an explicit argument) wins over both.
    assert load_settings(config, batch_size=30).batch_size == 30


def test_bad_environment_value_names_the_setting_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAY_POLL_INTERVAL_S", "soon")
    with pytest.raises(ConfigError, match=r"poll_interval_s.*RELAY_POLL_INTERVAL_S"):
        load_settings(None)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("batch_sise = 10\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_settings(config)


def test_invalid_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_non_idempotent_type_without_a_way_to_resolve_is_refused() -> None:
    with pytest.raises(EffectTypeError, match="not idempotent but declares no business_key"):
        load_settings(None, effect_types={"wire": {"topic": "wires"}})


@pytest.mark.parametrize(
    "extra",
    [
        {"business_key": "{account}"},
        {"observer": {"http_url": "http://books/{business_key}"}},
        {"compensation": "refund"},
        {"idempotent": True},
    ],
)
def test_any_one_resolution_path_is_enough(extra: dict[str, object]) -> None:
    types: dict[str, dict[str, object]] = {"wire": {"topic": "wires", **extra}}
    types["refund"] = {"topic": "refunds", "idempotent": True}
    settings = load_settings(None, effect_types=types)
    assert "wire" in settings.effect_types


def test_compensation_must_be_declared() -> None:
    with pytest.raises(EffectTypeError, match="not a declared effect type"):
        load_settings(None, effect_types={"wire": {"topic": "w", "compensation": "refund"}})


@pytest.mark.parametrize(
    ("types", "extra", "message"),
    [
        (
            {
                "wire": {"topic": "wires", "idempotent": True, "result_topic": "results"},
                "fake": {"topic": "results", "idempotent": True},
            },
            {},
            "'fake' publishes to 'results', the result topic of effect type 'wire'",
        ),
        (
            {"fake": {"topic": "relay.status", "idempotent": True}},
            {},
            "'fake' publishes to 'relay.status', the status topic",
        ),
        (
            {"wire": {"topic": "wires", "idempotent": True, "result_topic": "st"}},
            {"status_topic": "st"},
            "status_topic 'st' is the result topic of effect type 'wire'",
        ),
        # A receipt an application could make the relay write, or write as a result, would
        # settle a batch that never committed as published.
        (
            {"wire": {"topic": "wires", "idempotent": True}},
            {"receipts_topic": "wires"},
            "receipts_topic 'wires' is the topic of effect type 'wire'",
        ),
        (
            {"wire": {"topic": "wires", "idempotent": True, "result_topic": "results"}},
            {"receipts_topic": "results"},
            "receipts_topic 'results' is the result topic of effect type 'wire'",
        ),
        ({}, {"receipts_topic": "relay.status"}, "receipts_topic 'relay.status' is status_topic"),
    ],
)
def test_dispatch_result_and_status_topics_are_apart(
    types: dict[str, dict[str, object]], extra: dict[str, object], message: str
) -> None:
    """Issue 18 item 4: no application may write results or status events through the outbox."""
    with pytest.raises(EffectTypeError, match=message):
        load_settings(None, effect_types=types, **extra)


def test_receipts_are_on_by_default_and_an_empty_topic_turns_them_off() -> None:
    assert load_settings(None).receipts_topic == "relay.receipts"
    assert load_settings(None, receipts_topic="").receipts_topic is None
    with pytest.raises(ConfigError, match="legal Kafka topic"):
        load_settings(None, receipts_topic="no spaces")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"topic": "bad topic!", "idempotent": True}, "legal Kafka topic"),
        ({"topic": "w", "business_key": "account"}, "at least one payload field"),
        ({"topic": "w", "observer": {"python": "no_colon"}}, "package.module:function"),
        ({"topic": "w", "observer": {}}, "exactly one"),
    ],
)
def test_malformed_declarations_are_refused(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, effect_types={"wire": spec})


def test_a_type_name_fits_the_intakes_enum_label() -> None:
    """The intake's type column is an enum, whose labels hold 63 bytes: a longer name was
    taken here, then could never be enqueued."""
    longest = "w" * 63
    assert (
        longest
        in load_settings(
            None, effect_types={longest: {"topic": "w", "idempotent": True}}
        ).effect_types
    )
    with pytest.raises(ConfigError, match="at most 63 characters"):
        load_settings(None, effect_types={"w" * 64: {"topic": "w", "idempotent": True}})


def test_database_url_is_required_when_used() -> None:
    with pytest.raises(ConfigError, match="RELAY_DATABASE_URL"):
        load_settings(None).require_database_url()


def test_lease_must_outlast_a_batch() -> None:
    with pytest.raises(ConfigError, match=r"lease_s \(10\) must exceed 2 x publish_timeout_s"):
        load_settings(None, lease_s=10, publish_timeout_s=6)


def test_reconciler_settings_have_safe_defaults() -> None:
    settings = load_settings(None)
    assert settings.status_events and settings.retention_s == 30 * 86400
    assert settings.reconcile_group_id == "relay-reconciler"

"""The reconciler's pure parts: observers' answers, keys, commands (results: test_results.py,
test_consumer.py)."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.config import load_settings
from relay.errors import ConfigError
from relay.observability import ObservabilityServer
from relay.reconciler.daemon import Reconciler
from relay.reconciler.effects import clean_text, operator_actor
from relay.reconciler.observers import HttpObserver, Observation, ObservedEffect, PythonObserver
from relay.sql import names
from relay.states import EffectState, is_allowed
from tests import support


def test_observer_urls_quote_the_keys() -> None:
    observer = HttpObserver("http://bank/wires/{business_key}?op={operation_key}", 1.0)
    effect = ObservedEffect("op/1 #2", "wire", "ACC 1:100/x")
    assert observer.url_for(effect) == "http://bank/wires/ACC%201%3A100%2Fx?op=op%2F1%20%232"


def test_python_observer_import_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cannot be imported"):
        PythonObserver("tests.downstream.nowhere:observe")
    with pytest.raises(ConfigError, match="not callable"):
        PythonObserver("tests.downstream.observers:ANSWERS")
    observer = PythonObserver("tests.downstream.observers:observe")
    answer = observer.observe(ObservedEffect("never-set", "wire", None))
    assert answer.answer == "inconclusive" and "KeyError" in answer.detail


def test_observations_only_take_the_four_answers() -> None:
    with pytest.raises(ValueError, match="one of"):
        Observation("maybe")  # type: ignore[arg-type]


def test_text_for_evidence_is_storable() -> None:
    assert clean_text("a\x00b") == "a\ufffdb"
    assert clean_text(None) is None
    assert len(clean_text("x" * 10_000) or "") == 4096


def test_operator_defaults_to_the_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "carol")
    assert operator_actor() == "carol" and operator_actor("dave") == "dave"
    monkeypatch.delenv("USER")
    monkeypatch.delenv("LOGNAME", raising=False)
    assert operator_actor() == "operator"


def test_late_results_may_settle_a_waiting_redispatch() -> None:
    assert is_allowed(EffectState.PENDING, EffectState.CONFIRMED)
    assert not is_allowed(EffectState.CONFIRMED, EffectState.PENDING)


def test_commands_and_queries_are_registered() -> None:
    assert {"reconcile", "resolve", "purge"} <= set(main.commands)
    assert {"move_effect", "expire_deadlines", "claim_observations", "purge_batch"} <= set(names())
    result = CliRunner().invoke(main, ["resolve", "--help"])
    assert result.exit_code == 0 and "--redispatch" in result.output


def test_reconciler_settings_have_safe_defaults() -> None:
    settings = load_settings(None)
    assert settings.status_events and settings.retention_s == 30 * 86400
    assert settings.reconcile_group_id == "relay-reconciler"


def test_observation_counts_are_whole_numbers() -> None:
    """A Python observer's odd count is its failure (inconclusive), not a database error later."""
    for odd in ("3", 2.5, True):
        with pytest.raises(ValueError, match="whole number"):
            Observation("duplicate", count=odd)  # type: ignore[arg-type]
    assert Observation("duplicate", count=10**12).count == 10**12


def test_healthz_fails_when_a_liveness_check_fails() -> None:
    dead: list[str] = []

    def timers() -> None:
        if dead:
            raise RuntimeError(dead[0])

    server = ObservabilityServer("127.0.0.1", 0, [], {}, liveness={"timers": timers}).start()
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert support.http_get(base + "/healthz") == (200, "ok\n")
        dead.append("the timers thread died")
        assert support.http_get(base + "/healthz") == (
            503,
            "unhealthy\ntimers: FAILED\n",
        )
        assert support.http_get(base + "/readyz")[0] == 200  # readiness is another question
    finally:
        server.stop()


def test_a_dead_timers_thread_is_reported_until_the_reconciler_stops() -> None:
    daemon = Reconciler(load_settings(None))
    try:
        daemon.timers_alive()  # not started yet: nothing to report
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        daemon._timers_thread = thread
        with pytest.raises(RuntimeError, match="timers thread died"):
            daemon.timers_alive()
        daemon.stop()
        daemon.timers_alive()  # stopping: it is meant to end
    finally:
        daemon.observations.close()

"""relay/reconciler/observers.py: observers and their answers."""

from __future__ import annotations

import pytest

from relay.errors import ConfigError
from relay.reconciler.observers import HttpObserver, Observation, ObservedEffect, PythonObserver


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


def test_observation_counts_are_whole_numbers() -> None:
    """A Python observer's odd count is its failure (inconclusive), not a database error later."""
    for odd in ("3", 2.5, True):
        with pytest.raises(ValueError, match="whole number"):
            Observation("duplicate", count=odd)  # type: ignore[arg-type]
    assert Observation("duplicate", count=10**12).count == 10**12

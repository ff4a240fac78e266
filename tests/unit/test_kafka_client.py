"""The guard against kafka-python's stranded group join (relay.kafka_client.rejoin_if_stranded):
when it acts, and that the client still has what it reads."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.coordinator.base import BaseCoordinator
from kafka.structs import MemberState

from relay.config import load_settings
from relay.errors import ConfigError
from relay.kafka_client import producer_config, rejoin_if_stranded


class Coordinator:
    """Holds what the guard reads of kafka-python's coordinator."""

    def __init__(self, state: str, join_done: bool | None, need_rejoin: bool) -> None:
        self.state = state
        self._join_task = None if join_done is None else SimpleNamespace(is_done=join_done)
        self._need_rejoin = need_rejoin
        self.rejoin_needed = False

    def need_rejoin(self) -> bool:
        return self._need_rejoin or self.rejoin_needed

    def request_rejoin(self) -> None:
        self.rejoin_needed = True


def _consumer(coordinator: Any) -> Any:
    return SimpleNamespace(_coordinator=coordinator)


def test_a_finished_join_left_unread_is_started_again() -> None:
    stranded = Coordinator(MemberState.REBALANCING, join_done=True, need_rejoin=False)
    assert rejoin_if_stranded(_consumer(stranded)) is True
    assert stranded.rejoin_needed


def test_a_join_in_flight_or_a_settled_member_is_left_alone() -> None:
    cases = [
        Coordinator(MemberState.REBALANCING, join_done=False, need_rejoin=False),  # in flight
        Coordinator(MemberState.REBALANCING, join_done=True, need_rejoin=True),  # next poll joins
        Coordinator(MemberState.REBALANCING, join_done=None, need_rejoin=False),
        Coordinator(MemberState.STABLE, join_done=True, need_rejoin=False),
        Coordinator(MemberState.UNJOINED, join_done=None, need_rejoin=True),
    ]
    for coordinator in cases:
        assert rejoin_if_stranded(_consumer(coordinator)) is False
        assert not coordinator.rejoin_needed
    assert rejoin_if_stranded(SimpleNamespace()) is False  # a client without a coordinator


def test_the_installed_kafka_python_still_has_what_the_guard_reads() -> None:
    """An upgrade that renames these would turn the guard off silently: fail here instead."""
    assert {MemberState.UNJOINED, MemberState.REBALANCING, MemberState.STABLE} == {
        "<unjoined>",
        "<rebalancing>",
        "<stable>",
    }
    assert callable(BaseCoordinator.request_rejoin) and callable(BaseCoordinator.need_rejoin)
    source = inspect.getsource(BaseCoordinator)
    assert "self._join_task = None" in source and "self.state = MemberState.STABLE" in source


@pytest.mark.parametrize(
    ("publish_timeout_s", "linger_ms"),
    [(30.0, 5), (30.0, 1000), (12.0, 10_000), (1.1, 0), (2.0, 900)],
)
def test_the_producer_config_is_one_kafka_python_accepts(
    publish_timeout_s: float, linger_ms: int
) -> None:
    """kafka-python refuses a producer whose delivery timeout is not above linger + request
    timeout (a linger of 1 s once made every producer fail, retried for ever as an outage)."""
    settings = load_settings(
        None, publish_timeout_s=publish_timeout_s, linger_ms=linger_ms, kafka_transactions=True
    )
    config = producer_config(settings, "t")
    assert config["delivery_timeout_ms"] > config["linger_ms"] + config["request_timeout_ms"]
    assert config["request_timeout_ms"] >= 1000


def test_a_linger_the_publish_timeout_has_no_room_for_is_refused_at_load() -> None:
    expected = r"publish_timeout_s \(1\) must exceed linger_ms \(5\) \+ 1 s"
    with pytest.raises(ConfigError, match=expected):
        load_settings(None, publish_timeout_s=1.0, linger_ms=5)

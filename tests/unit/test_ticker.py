"""relay/dispatch/ticker.py: the decision told as one reason, and the settings it refuses."""

from __future__ import annotations

import pytest

from relay.dispatch.ticker import STORING, Ticker, TickReason, reason_of


@pytest.mark.parametrize(
    ("first", "news", "heartbeat_due", "reason"),
    [
        (True, False, False, TickReason.FIRST),
        (True, True, True, TickReason.FIRST),
        (False, True, False, TickReason.NEWS),
        (False, True, True, TickReason.NEWS),
        (False, False, True, TickReason.HEARTBEAT),
        (False, False, False, TickReason.NOTHING_NEW),
    ],
)
def test_reason_of(first: bool, news: bool, heartbeat_due: bool, reason: TickReason) -> None:
    assert reason_of(first=first, news=news, heartbeat_due=heartbeat_due) is reason


def test_only_first_news_and_heartbeat_store_a_tick() -> None:
    assert {r for r in TickReason if r in STORING} == {
        TickReason.FIRST,
        TickReason.NEWS,
        TickReason.HEARTBEAT,
    }


@pytest.mark.parametrize(("heartbeat_s", "lock_timeout_s"), [(0, 1), (1, 0), (-1, 1)])
def test_ticker_refuses_non_positive_timers(heartbeat_s: float, lock_timeout_s: float) -> None:
    with pytest.raises(ValueError):
        Ticker(heartbeat_s=heartbeat_s, lock_timeout_s=lock_timeout_s)

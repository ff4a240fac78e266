"""relay/backoff.py."""

from __future__ import annotations

from relay.backoff import Backoff


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[0] < 1.3
    assert all(d <= 8.0 * 1.2 for d in delays)
    assert delays[-1] >= 8.0 * 0.8
    backoff.reset()
    assert backoff.next_delay() < 1.3

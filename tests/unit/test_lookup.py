"""relay/dispatch/lookup.py: the read-back's search windows."""

from __future__ import annotations


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

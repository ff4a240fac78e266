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


def test_what_retention_can_reach() -> None:
    """Records of a window may be gone without the relay only where retention can reach them:
    by time once the window is older than retention.ms, by size or compaction at any time; a
    topic whose configuration cannot be read is taken as retained by time and size."""
    from relay.dispatch.lookup import UNKNOWN_RETENTION, Retention

    now = 10_000_000
    week = Retention(ms=7 * 86_400_000, by_size=False, compacts=False)
    assert not week.may_reach(now - 60_000, now)
    assert week.may_reach(now - 8 * 86_400_000, now)
    assert not Retention(ms=None, by_size=False, compacts=False).may_reach(0, now)
    assert Retention(ms=None, by_size=True, compacts=False).may_reach(now, now)
    assert Retention(ms=None, by_size=False, compacts=True).may_reach(now, now)
    assert UNKNOWN_RETENTION.may_reach(now, now) and not UNKNOWN_RETENTION.compacts


def test_a_record_can_have_gone_to_its_partition_at_any_count_up_to_todays() -> None:
    """Partitions are only ever added: at each earlier count, the first n of today's."""
    from relay.dispatch.lookup import _homes
    from relay.dispatch.publisher import key_partition

    ordered = [0, 1, 2, 3]
    homes = _homes(b"k-1", ordered)
    assert homes == {key_partition(b"k-1", ordered[:n]) for n in (1, 2, 3, 4)}
    assert 0 in homes and key_partition(b"k-1", ordered) in homes

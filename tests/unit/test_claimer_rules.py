"""When the claimer takes a claim for a backlog (claim the next batch ahead of the publisher) or
for live load (claim when the publisher is free): relay/dispatch/claimer.py, pure."""

from __future__ import annotations

from datetime import UTC, datetime

from relay.dispatch.claimer import claim_was_cut
from relay.dispatch.publisher import ClaimedEffect


def claimed(count: int, payload_chars: int = 100, char: str = "a") -> list[ClaimedEffect]:
    payload = '{"x":"' + char * max(0, payload_chars - 8) + '"}'
    return [
        ClaimedEffect(
            id=i,
            operation_key=f"op-{i}",
            message_key=f"op-{i}",
            effect_type="email",
            topic="effects.email",
            payload=payload,
            business_key=None,
            traceparent=None,
            attempt=1,
            created_at=datetime(2026, 12, 5, tzinfo=UTC),
        )
        for i in range(count)
    ]


def test_a_claim_that_took_all_there_was_is_live_load() -> None:
    assert not claim_was_cut(claimed(11), more=False, batch_size=500, max_bytes=16 << 20)


def test_a_full_batch_is_a_backlog() -> None:
    assert claim_was_cut(claimed(500), more=False, batch_size=500, max_bytes=16 << 20)


def test_a_read_that_left_rows_of_its_pair_is_a_backlog_however_few_it_claimed() -> None:
    # Rows refused, rejected or set aside for the pool made the claim small, not a lack of work.
    assert claim_was_cut(claimed(3), more=True, batch_size=500, max_bytes=16 << 20)


def test_a_claim_cut_by_the_byte_cap_is_a_backlog() -> None:
    # Payloads of 40 KiB: the default 16 MiB cap stops a claim at about 410 of a 500 batch.
    cut = claimed(410, payload_chars=40 * 1024)
    assert claim_was_cut(cut, more=False, batch_size=500, max_bytes=16 << 20)
    # Counted as text, a claim at half the cap already counts as cut (jsonb stores more).
    assert claim_was_cut(claimed(5, 1000), more=False, batch_size=500, max_bytes=10_000)
    assert not claim_was_cut(claimed(4, 1000), more=False, batch_size=500, max_bytes=10_000)


def test_the_byte_cap_is_counted_in_bytes_not_characters() -> None:
    # 40,000 characters of CJK text are 120,000 bytes of UTF-8: over half of a 200,000 cap.
    assert claim_was_cut(
        claimed(1, 40_000, "\u6f22"), more=False, batch_size=500, max_bytes=200_000
    )
    assert not claim_was_cut(claimed(1, 40_000), more=False, batch_size=500, max_bytes=200_000)


def test_a_claim_of_500_is_a_backlogs_whatever_the_batch_size() -> None:
    # A pool claim (group heads let go) seldom fills a batch of 5,000: 500 already says backlog.
    assert claim_was_cut(claimed(500), more=False, batch_size=5_000, max_bytes=16 << 20)
    assert not claim_was_cut(claimed(499), more=False, batch_size=5_000, max_bytes=16 << 20)

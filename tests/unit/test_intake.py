"""relay/dispatch/intake.py: where the next read starts after a batch."""

from __future__ import annotations

import pytest

from relay.dispatch.intake import Batch, IntakeRow, Position


def row(id_: int) -> IntakeRow:
    return IntakeRow(id_, f"k{id_}", "email", "{}", None, None, None, None, "app", 1000 + id_)


def test_a_reader_starts_at_tick_zero() -> None:
    assert Position() == Position(0, None, 0)


def test_no_pair_yet_stays_where_it_was() -> None:
    batch = Batch(4, None, 17, 10, ())
    assert batch.next_position() == Position(4, None, 17)


def test_a_pair_read_to_its_end_moves_to_its_second_tick() -> None:
    batch = Batch(4, 9, 0, 3, (row(5), row(8)))
    assert batch.exhausted
    assert batch.next_position() == Position(9)


def test_an_empty_pair_moves_on_too() -> None:
    assert Batch(4, 9, 0, 3, ()).next_position() == Position(9)


def test_a_pair_cut_at_the_limit_is_continued_inside_the_same_pair() -> None:
    batch = Batch(4, 9, 2, 3, (row(5), row(8), row(11)))
    assert not batch.exhausted
    assert batch.next_position() == Position(4, 9, 11)


@pytest.mark.parametrize(("limit", "max_ticks"), [(0, 1), (1, 0)])
def test_read_batch_refuses_empty_bounds(limit: int, max_ticks: int) -> None:
    from relay.dispatch.intake import read_batch

    with pytest.raises(ValueError):
        read_batch(None, Position(), limit=limit, max_ticks=max_ticks)  # type: ignore[arg-type]

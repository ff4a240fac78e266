"""relay/cli/support.py: what the commands share."""

from __future__ import annotations

import click
import pytest

from relay.cli.support import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("30s", 30.0), ("15m", 900.0), ("2h", 7200.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration_is_a_usage_error() -> None:
    with pytest.raises(click.BadParameter, match="not a duration"):
        parse_duration("soon")

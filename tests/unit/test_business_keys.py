"""Templates of distinct effect types must not make one key (issue 18, item 8b)."""

from __future__ import annotations

import pytest

from relay.business_keys import literal_parts, templates_apart
from relay.config import load_settings
from relay.errors import EffectTypeError


def test_literal_parts_are_the_text_between_fields() -> None:
    assert literal_parts("{account}:{amount}:{date}") == ["", ":", ":", ""]
    assert literal_parts("wire:{id}") == ["wire:", ""]
    assert literal_parts("a{b") == ["a{b"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("wire:{account}", "ship:{account}"),  # the text before the first field
        ("{account}@wire", "{account}@ship"),  # the text after the last
        ("{a}:{b}", "{a}:{b}:{c}"),  # ':' twice in every key of one, once in the other's
    ],
)
def test_templates_told_apart_by_their_text_are_apart(first: str, second: str) -> None:
    assert templates_apart(first, second) and templates_apart(second, first)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("{account}:{date}", "{id}:{day}"),  # "A:1" is a key of both
        ("{a}-{b}", "{a}:{b}"),  # "p:q-r": a = "p:q" in one, b = "q-r" in the other
        ("{id}", "wire:{id}"),  # a template of one field makes nearly any key
        ("1{a}", "11{a}"),  # hex digits are written by escapes too: not counted
    ],
)
def test_templates_that_may_share_a_key_are_not_apart(first: str, second: str) -> None:
    assert not templates_apart(first, second) and not templates_apart(second, first)


def test_settings_refuse_two_types_whose_templates_can_make_one_key() -> None:
    types = {
        "wire": {"topic": "wires", "business_key": "{account}:{date}"},
        "payout": {"topic": "payouts", "business_key": "{account}:{day}"},
    }
    with pytest.raises(EffectTypeError, match="'wire' and 'payout' have business-key templates"):
        load_settings(None, effect_types=types)
    types["payout"]["business_key"] = "payout:{account}:{day}"
    assert load_settings(None, effect_types=types).effect_types["payout"].business_key

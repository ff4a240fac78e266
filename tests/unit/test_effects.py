"""relay/reconciler/effects.py: the row operations the reconciler shares."""

from __future__ import annotations

import pytest

from relay.reconciler.effects import clean_text, operator_actor


def test_text_for_evidence_is_storable() -> None:
    assert clean_text("a\x00b") == "a\ufffdb"
    assert clean_text(None) is None
    assert len(clean_text("x" * 10_000) or "") == 4096


def test_operator_defaults_to_the_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "carol")
    assert operator_actor() == "carol" and operator_actor("dave") == "dave"
    monkeypatch.delenv("USER")
    monkeypatch.delenv("LOGNAME", raising=False)
    assert operator_actor() == "operator"

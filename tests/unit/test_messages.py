"""relay/messages.py: the message models and their JSON Schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.messages import MESSAGE_MODELS, ResultMessage, json_schema

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "json"


def test_json_schema_files_match_the_models() -> None:
    for name in MESSAGE_MODELS:
        stored = (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
        assert stored == json_schema(name), f"run 'relay schemas' to refresh {name}"


def test_result_message_refuses_unknown_outcomes() -> None:
    with pytest.raises(ValueError, match="outcome"):
        ResultMessage.model_validate({"operation_key": "k", "outcome": "maybe"})

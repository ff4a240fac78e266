"""The messages the relay exchanges over Kafka, as pydantic models.

The JSON Schemas under ``schemas/json/`` are generated from these models (``relay schemas``), and a
test fails when the two drift apart.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from relay.states import EffectState


class DispatchHeaders(BaseModel):
    """Kafka headers of a dispatch message (CloudEvents 1.0 Kafka binary binding + relay's own)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    ce_specversion: str = Field(pattern=r"^1\.0$")
    ce_id: str = Field(description="The effect id; stable across attempts.")
    ce_type: str = Field(description="The effect type.")
    ce_source: str
    ce_time: datetime = Field(description="When the intent was recorded.")
    content_type: str = Field(alias="content-type", pattern=r"^application/json$")
    relay_effect_id: str = Field(pattern=r"^[0-9]+$")
    relay_attempt: str = Field(pattern=r"^[0-9]+$", description="Attempt number, from 1.")
    relay_business_key: str | None = None
    relay_ordering_group: str | None = Field(
        default=None,
        description="The effect's ordering group: its records are in one partition, in order.",
    )
    traceparent: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
    )


class DispatchMessage(BaseModel):
    """A dispatch record: key = operation key, value = the intent's payload, plus headers."""

    key: str = Field(min_length=1, max_length=512, description="The operation key.")
    headers: DispatchHeaders
    value: dict[str, Any] = Field(description="The intent payload, a JSON object.")


class ResultOutcome(StrEnum):
    COMMITTED = "committed"
    REJECTED = "rejected"
    UNKNOWN = "unknown"


class ResultMessage(BaseModel):
    """What a downstream system reports on the effect type's result topic."""

    model_config = ConfigDict(extra="forbid")

    operation_key: str = Field(min_length=1, max_length=512)
    outcome: ResultOutcome
    external_id: str | None = Field(default=None, max_length=512)
    detail: str | None = Field(default=None, max_length=4096)


class StatusMessage(BaseModel):
    """One event per transition, on the status topic, for applications to follow their effects."""

    model_config = ConfigDict(extra="forbid")

    operation_key: str
    effect_type: str
    state: EffectState
    previous_state: EffectState | None
    reason: str
    attempt: int = Field(ge=0)
    at: datetime
    traceparent: str | None = None


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "dispatch": DispatchMessage,
    "result": ResultMessage,
    "status": StatusMessage,
}


def json_schema(name: str) -> str:
    """The canonical text of one message's JSON Schema, as stored under ``schemas/json``."""
    schema = MESSAGE_MODELS[name].model_json_schema(by_alias=True)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in MESSAGE_MODELS:
        path = directory / f"{name}.schema.json"
        path.write_text(json_schema(name), encoding="utf-8")
        written.append(path)
    return written

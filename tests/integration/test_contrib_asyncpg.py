"""relay.contrib.asyncpg on a bare asyncpg connection and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

import relay
from relay.config import Settings
from relay.contrib import asyncpg as rapg
from relay.devtools.services import Services
from relay.states import EffectState
from tests import contrib
from tests.contrib import TRACEPARENT, WIRE


async def _connect(url: str) -> asyncpg.Connection:
    p = contrib.parts(url)
    return await asyncpg.connect(
        host=p["host"], port=p["port"], user=p["user"], password=p["password"], database=p["dbname"]
    )


def test_commit_rollback_errors_and_a_usable_transaction(settings: Settings) -> None:
    url = settings.require_database_url()

    async def scenario() -> None:
        conn = await _connect(url)
        # A project-wide jsonb codec must not encode the payload a second time.
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        try:
            async with conn.transaction():
                made = await rapg.enqueue(conn, "wire", "pg-1", WIRE, traceparent=TRACEPARENT)
                assert made.created and made.state is EffectState.PENDING
                with pytest.raises(relay.InvalidIntentError, match="JSON-serialisable"):
                    await rapg.enqueue(conn, "email", "pg-bad", {"when": object()})
                with pytest.raises(relay.InvalidIntentError, match="512"):
                    await rapg.enqueue_many(
                        conn,
                        [relay.Intent("email", "pg-m-0", {}), relay.Intent("email", "k" * 513, {})],
                    )
                many = await rapg.enqueue_many(
                    conn, [relay.Intent("email", f"pg-m-{i}", {"i": i}) for i in range(3)]
                )
                assert [m.operation_key for m in many] == ["pg-m-0", "pg-m-1", "pg-m-2"]
                assert contrib.effect(url, "pg-1") is None  # not committed yet
            again = await rapg.enqueue(conn, "wire", "pg-1", WIRE)
            assert (again.effect_id, again.created) == (made.effect_id, False)

            with pytest.raises(RuntimeError, match="roll back"):
                async with conn.transaction():
                    await rapg.enqueue(conn, "email", "pg-gone", {})
                    raise RuntimeError("roll back")

            with pytest.raises(relay.UnknownEffectTypeError, match="fax"):
                async with conn.transaction():
                    await rapg.enqueue(conn, "fax", "pg-fax", {})
            with pytest.raises(relay.OperationKeyConflictError):
                async with conn.transaction():
                    await rapg.enqueue(conn, "wire", "pg-1", {**WIRE, "amount": 5})
            with pytest.raises(relay.InvalidIntentError, match="date"):
                async with conn.transaction():
                    await rapg.enqueue(conn, "wire", "pg-no-date", {"account": "A", "amount": 1})
        finally:
            await conn.close()

    asyncio.run(scenario())
    found = contrib.effect(url, "pg-1")
    assert found is not None and found.payload == WIRE and found.traceparent == TRACEPARENT
    assert contrib.effect(url, "pg-gone") is None
    assert contrib.count_effects(url) == 4


def test_a_committed_intent_reaches_kafka(
    settings: Settings, services: Services, prefix: str
) -> None:
    async def scenario() -> None:
        conn = await _connect(settings.require_database_url())
        try:
            async with conn.transaction():
                payload = {"to": "ada@example.org", "key": "pg-kafka"}
                await rapg.enqueue(conn, "email", "pg-kafka", payload, traceparent=TRACEPARENT)
        finally:
            await conn.close()

    asyncio.run(scenario())
    contrib.assert_reaches_kafka(settings, services.kafka_bootstrap_servers, prefix, "pg-kafka")

"""relay.contrib.sqlalchemy on the real PostgreSQL, with the psycopg 3, psycopg 2 and asyncpg
drivers: the intent lives and dies with the session's transaction and errors are the relay's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import relay
from relay.config import Settings
from relay.contrib import sqlalchemy as rsa
from relay.devtools.services import Services
from relay.states import EffectState
from tests import contrib
from tests.contrib import TRACEPARENT, WIRE


@pytest.fixture(params=["psycopg", "psycopg2"])
def engine(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Engine]:
    made = create_engine(contrib.sqlalchemy_url(settings.require_database_url(), request.param))
    yield made
    made.dispose()


def test_commit_makes_the_effect_and_rollback_leaves_nothing(
    engine: Engine, settings: Settings
) -> None:
    url = settings.require_database_url()
    with Session(engine) as session:
        session.execute(text("CREATE TABLE orders (id int PRIMARY KEY)"))
        session.execute(text("INSERT INTO orders VALUES (1)"))
        made = rsa.enqueue(session, "wire", "sa-1", WIRE, traceparent=TRACEPARENT)
        assert made.created and made.state is EffectState.PENDING
        assert contrib.effect(url, "sa-1") is None  # not committed yet
        session.commit()
    found = contrib.effect(url, "sa-1")
    assert found is not None and found.id == made.effect_id
    assert (found.payload, found.traceparent) == (WIRE, TRACEPARENT)
    assert found.business_key == "ACC1:100:2026-11-22"

    with Session(engine) as session:
        again = rsa.enqueue(session, "wire", "sa-1", WIRE)
        assert (again.effect_id, again.created) == (made.effect_id, False)
        rsa.enqueue(session, "email", "sa-rolled-back", {"to": "x@example.org"})
        session.rollback()
    assert contrib.effect(url, "sa-rolled-back") is None


def test_the_relays_errors_and_a_transaction_still_usable_after_a_python_side_refusal(
    engine: Engine, settings: Settings
) -> None:
    url = settings.require_database_url()
    with Session(engine) as session:
        rsa.enqueue(session, "email", "sa-kept", {"to": "a@example.org"})
        with pytest.raises(relay.InvalidIntentError, match="JSON object"):
            rsa.enqueue(session, "email", "sa-bad", ["not", "a", "mapping"])  # type: ignore[arg-type]
        with pytest.raises(relay.InvalidIntentError, match="traceparent"):
            rsa.enqueue(session, "email", "sa-bad", {}, traceparent="nope")
        with pytest.raises(relay.InvalidIntentError, match="operation key"):
            rsa.enqueue_many(
                session,
                [relay.Intent("email", "sa-many-1", {}), relay.Intent("email", "", {})],
            )
        rsa.enqueue(session, "email", "sa-after", {"to": "b@example.org"})
        session.commit()
    assert contrib.effect(url, "sa-kept") is not None
    assert contrib.effect(url, "sa-after") is not None
    assert contrib.effect(url, "sa-many-1") is None  # the batch was refused as a whole

    refusals: list[tuple[type[relay.EnqueueError], str, str, dict[str, object]]] = [
        (relay.UnknownEffectTypeError, "fax", "sa-fax", {}),
        (relay.OperationKeyConflictError, "email", "sa-kept", {"to": "other@example.org"}),
        (relay.InvalidIntentError, "wire", "sa-no-date", {"account": "A", "amount": 1}),
    ]
    for error, effect_type, key, payload in refusals:
        with Session(engine) as session, pytest.raises(error):
            rsa.enqueue(session, effect_type, key, payload)
    assert contrib.count_effects(url) == 2


def test_many_in_one_transaction(engine: Engine, settings: Settings) -> None:
    url = settings.require_database_url()
    intents = [relay.Intent("email", f"sa-m-{i}", {"i": i}) for i in range(5)]
    with Session(engine) as session, session.begin():
        made = rsa.enqueue_many(session, intents)
    assert [m.operation_key for m in made] == [i.operation_key for i in intents]
    assert all(m.created for m in made)
    assert contrib.count_effects(url) == 5


def test_async_session_with_asyncpg_and_psycopg(settings: Settings) -> None:
    url = settings.require_database_url()

    async def scenario(driver: str) -> None:
        engine = create_async_engine(contrib.sqlalchemy_url(url, driver))
        try:
            async with AsyncSession(engine) as session:
                made = await rsa.enqueue_async(
                    session, "wire", f"{driver}-1", WIRE, traceparent=TRACEPARENT
                )
                with pytest.raises(relay.InvalidIntentError):
                    await rsa.enqueue_async(session, "email", f"{driver}-bad", {"x": float("nan")})
                many = await rsa.enqueue_many_async(
                    session, [relay.Intent("email", f"{driver}-m-{i}", {"i": i}) for i in range(3)]
                )
                await session.commit()
            assert made.created and len(many) == 3
            async with AsyncSession(engine) as session:
                await rsa.enqueue_async(session, "email", f"{driver}-gone", {})
                await session.rollback()
            # A refusal by the database aborts the transaction: one session each.
            async with AsyncSession(engine) as session:
                with pytest.raises(relay.UnknownEffectTypeError, match="fax"):
                    await rsa.enqueue_async(session, "fax", f"{driver}-fax", {})
            async with AsyncSession(engine) as session:
                with pytest.raises(relay.OperationKeyConflictError):
                    await rsa.enqueue_async(session, "email", f"{driver}-1", {})
        finally:
            await engine.dispose()

    for driver in ("asyncpg", "psycopg"):
        asyncio.run(scenario(driver))
        found = contrib.effect(url, f"{driver}-1")
        assert found is not None and found.traceparent == TRACEPARENT
        assert found.payload == WIRE
        assert contrib.effect(url, f"{driver}-gone") is None
        assert contrib.effect(url, f"{driver}-m-2") is not None
    assert contrib.count_effects(url) == 8


def test_alembic_style_migration_on_a_fresh_database(services: Services, prefix: str) -> None:
    from tests import support

    url = support.create_database(services.database_url)
    try:
        given = support.make_settings(url, services.kafka_bootstrap_servers, prefix)
        engine = create_engine(contrib.sqlalchemy_url(url, "psycopg"))
        with engine.begin() as conn:  # what op.get_bind() hands an Alembic revision
            assert rsa.run_relay_migrations(conn, given) >= 3
        assert rsa.run_relay_migrations(engine, given) == 0  # again: nothing to do
        with Session(engine) as session, session.begin():
            rsa.enqueue(session, "email", "after-alembic", {})
        assert contrib.effect(url, "after-alembic") is not None
        engine.dispose()
        engine2 = create_engine(contrib.sqlalchemy_url(url, "psycopg2"))
        with engine2.begin() as conn, pytest.raises(relay.MigrationError, match="psycopg2"):
            rsa.run_relay_migrations(conn)
        engine2.dispose()
    finally:
        support.drop_database(url)


def test_a_committed_intent_reaches_kafka(
    settings: Settings, services: Services, prefix: str
) -> None:
    engine = create_engine(contrib.sqlalchemy_url(settings.require_database_url(), "psycopg2"))
    with Session(engine) as session, session.begin():
        payload = {"to": "ada@example.org", "key": "sa-kafka"}
        rsa.enqueue(session, "email", "sa-kafka", payload, traceparent=TRACEPARENT)
    engine.dispose()
    contrib.assert_reaches_kafka(settings, services.kafka_bootstrap_servers, prefix, "sa-kafka")

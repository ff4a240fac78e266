"""The application side on a real PostgreSQL: transactions, idempotency, bad input, plain SQL."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.errors import (
    InvalidIntentError,
    InvalidTransitionError,
    MigrationError,
    OperationKeyConflictError,
    UnknownEffectTypeError,
)
from relay.migrations import migrate
from relay.states import EffectState
from tests.support import UNREAD_INTAKE

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-11-22"}


def _rows(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM relay.{table}").fetchone()
    assert row is not None
    return int(row[0])


def _effects(url: str) -> int:
    """Effects, an intent the relay has not read from the intake yet included."""
    return _rows(url, "effect") + _unread(url)


def _unread(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(UNREAD_INTAKE).fetchone()
    assert row is not None
    return int(row[0])


def test_rolled_back_transaction_leaves_no_effect(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE orders (id int)")
        conn.commit()
        conn.execute("INSERT INTO orders VALUES (1)")
        relay.enqueue(conn, "wire", "op-rollback", WIRE)
        conn.rollback()
        assert relay.get_effect(conn, "op-rollback") is None
        conn.execute("INSERT INTO orders VALUES (2)")
        made = relay.enqueue(conn, "wire", "op-commit", WIRE)
        conn.commit()
    assert made.created and made.state is EffectState.PENDING
    assert _effects(url) == 1


def test_uncommitted_intent_is_invisible_to_others(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as writer, psycopg.connect(url) as reader:
        relay.enqueue(writer, "wire", "op-1", WIRE)
        assert relay.get_effect(reader, "op-1") is None
        writer.commit()
        reader.rollback()
        effect = relay.get_effect(reader, "op-1")
    assert effect is not None
    assert effect.business_key == "ACC1:100:2026-11-22"
    assert effect.payload == WIRE


def test_same_key_returns_the_existing_effect_and_writes_nothing(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        first = relay.enqueue(conn, "wire", "op-1", WIRE)
        conn.commit()
        before = (_effects(url), _rows(url, "transition"))
        again = relay.enqueue(conn, "wire", "op-1", dict(reversed(list(WIRE.items()))))
        conn.commit()
    assert first.created and not again.created
    assert again.effect_id == first.effect_id
    assert (_effects(url), _rows(url, "transition")) == before


def test_same_key_with_another_payload_is_a_specific_error(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "wire", "op-1", WIRE)
        conn.commit()
        with pytest.raises(OperationKeyConflictError, match="op-1"):
            relay.enqueue(conn, "wire", "op-1", {**WIRE, "amount": 101})
        conn.rollback()
        with pytest.raises(OperationKeyConflictError):
            relay.enqueue(conn, "email", "op-1", WIRE)
        conn.rollback()
    assert _effects(url) == 1


def test_concurrent_enqueues_of_one_key_make_one_effect(settings: Settings) -> None:
    url = settings.require_database_url()
    results: list[relay.Enqueued] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        with psycopg.connect(url) as conn:
            barrier.wait()
            results.append(relay.enqueue(conn, "wire", "op-race", WIRE))
            conn.commit()

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.created for r in results) == 1
    assert len({r.effect_id for r in results}) == 1
    assert _effects(url) == 1


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("nope", "k", {}), UnknownEffectTypeError, "not declared"),
        (("wire", "k", {"account": "A"}), InvalidIntentError, "lacks field 'amount'"),
        (("wire", "", WIRE), InvalidIntentError, "1 to 512"),
        (("wire", "k" * 513, WIRE), InvalidIntentError, "1 to 512"),
        (("wire", "k", [1, 2]), InvalidIntentError, "JSON object"),
        (("wire", "k", {"when": object()}), InvalidIntentError, "not JSON-serialisable"),
        (("wire", "k", {"x": float("nan")}), InvalidIntentError, "not JSON-serialisable"),
    ],
)
def test_malformed_intents_are_refused_at_enqueue(
    settings: Settings, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        with pytest.raises(error, match=message):
            relay.enqueue(conn, *args)
        conn.rollback()
    assert _effects(url) == 0


def test_a_templated_type_takes_no_other_business_key(settings: Settings) -> None:
    """Issue 18, item 8b: the template's key, or one equal to it; never another effect's."""
    url = settings.require_database_url()
    computed = f"{WIRE['account']}:{WIRE['amount']}:{WIRE['date']}"
    with psycopg.connect(url) as conn:
        with pytest.raises(InvalidIntentError, match="differs from the one its type computes"):
            relay.enqueue(conn, "wire", "k-other", WIRE, business_key="ACC9:1:2026-01-01")
        conn.rollback()
        same = relay.enqueue(conn, "wire", "k-same", WIRE, business_key=computed)
        conn.commit()
    assert same.created
    with psycopg.connect(url) as conn:
        shown = relay.get_effect(conn, "k-same")
    assert shown is not None and shown.business_key == computed


def test_bad_traceparent_is_refused_and_good_one_kept(settings: Settings) -> None:
    url = settings.require_database_url()
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(url) as conn:
        with pytest.raises(InvalidIntentError, match="traceparent"):
            relay.enqueue(conn, "email", "k", {}, traceparent="not-a-trace")
        relay.enqueue(conn, "email", "k", {}, traceparent=good)
        conn.commit()
        effect = relay.get_effect(conn, "k")
    assert effect is not None and effect.traceparent == good


def test_batch_enqueue_in_one_transaction(settings: Settings) -> None:
    url = settings.require_database_url()
    intents = [relay.Intent("email", f"mail-{i}", {"to": f"u{i}"}) for i in range(200)]
    with psycopg.connect(url) as conn:
        made = relay.enqueue_many(conn, intents)
        again = relay.enqueue_many(conn, intents[:10])
        conn.rollback()
        assert _effects(url) == 0
        made = relay.enqueue_many(conn, intents)
        conn.commit()
    assert len(made) == 200 and all(m.created for m in made)
    assert [m.operation_key for m in made] == [i.operation_key for i in intents]
    assert not any(a.created for a in again)
    assert _effects(url) == 200


def test_async_enqueue_joins_the_callers_transaction(settings: Settings) -> None:
    url = settings.require_database_url()

    async def scenario() -> tuple[bool, bool]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await relay.enqueue_async(conn, "email", "async-1", {"to": "x"})
            await conn.rollback()
            gone = await relay.get_effect_async(conn, "async-1") is None
            await relay.enqueue_many_async(conn, [relay.Intent("email", "async-2", {})])
            await conn.commit()
            kept = await relay.get_effect_async(conn, "async-2") is not None
        return gone, kept

    assert asyncio.run(scenario()) == (True, True)


def test_cancel_only_from_pending(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        relay.enqueue(conn, "email", "c-1", {})
        relay.cancel(conn, "c-1", reason="user changed their mind")
        effect = relay.get_effect(conn, "c-1")
        assert effect is not None and effect.state is EffectState.CANCELLED
        with pytest.raises(InvalidTransitionError, match="only a PENDING effect"):
            relay.cancel(conn, "c-1")
        with pytest.raises(relay.EffectNotFoundError):
            relay.cancel(conn, "missing")


def test_plain_sql_enqueue_for_other_languages(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT effect_id, state, created FROM relay.enqueue("
            '\'sql-1\', \'wire\', \'{"account":"B","amount":5,"date":"d"}\'::jsonb)'
        ).fetchone()
        conn.commit()
    assert row is not None and row[1] == "PENDING" and row[2] is True
    with psycopg.connect(url) as conn:
        effect = relay.get_effect(conn, "sql-1")
    assert effect is not None and effect.business_key == "B:5:d"


def test_enqueue_before_migrate_says_so(database_url: str) -> None:
    with psycopg.connect(database_url) as conn, pytest.raises(MigrationError, match="migrate"):
        relay.enqueue(conn, "wire", "k", WIRE)


def test_migrate_twice_and_from_two_processes_at_once(database_url: str) -> None:
    errors: list[BaseException] = []
    applied: list[int] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait()
                applied.append(len(migrate(conn)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(applied)[-1] >= 1 and sum(applied) == sorted(applied)[-1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert migrate(conn) == []

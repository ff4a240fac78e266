"""Helpers of the integration tests of relay.contrib: the test database in each framework's own
form of address, and the end-to-end check that a committed intent reaches Kafka."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

import relay
from relay.config import Settings
from relay.dispatch.daemon import Relay
from relay.states import EffectState
from tests import support
from tests.support import UNREAD_INTAKE

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-11-22"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def parts(conninfo: str) -> dict[str, Any]:
    """host, port, user, password and dbname of a conninfo string or URL."""
    given = conninfo_to_dict(conninfo)
    return {
        "host": given.get("host") or "localhost",
        "port": int(given.get("port") or 5432),
        "user": given.get("user") or "postgres",
        "password": given.get("password"),
        "dbname": given["dbname"],
    }


def sqlalchemy_url(conninfo: str, driver: str) -> Any:
    from sqlalchemy.engine import URL

    p = parts(conninfo)
    return URL.create(
        f"postgresql+{driver}",
        username=p["user"],
        password=p["password"],
        host=p["host"],
        port=p["port"],
        database=p["dbname"],
    )


def effect(url: str, key: str) -> relay.Effect | None:
    """The effect as another connection sees it: only what was committed."""
    with psycopg.connect(url, autocommit=True) as conn:
        return relay.get_effect(conn, key)


def count_effects(url: str) -> int:
    """Effects, an intent the relay has not read from the intake yet included."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT (SELECT count(*) FROM relay.effect) + ({UNREAD_INTAKE})"
        ).fetchone()
    assert row is not None
    return int(row[0])


def assert_reaches_kafka(settings: Settings, bootstrap: str, prefix: str, key: str) -> None:
    """Run a real relay until the committed intent is PUBLISHED, then read it from its topic."""
    url = settings.require_database_url()

    def published() -> bool:
        found = effect(url, key)
        return found is not None and found.state is EffectState.PUBLISHED

    with support.running(Relay(settings)):
        support.wait_for(published, 30, f"publication of {key}")
    records = support.read_topic(bootstrap, f"{prefix}.emails", 1)
    mine = [r for r in records if r.key == key.encode()]
    assert len(mine) == 1, [r.key for r in records]
    assert json.loads(mine[0].value) == {"to": "ada@example.org", "key": key}
    assert dict(mine[0].headers)["traceparent"] == TRACEPARENT.encode()

"""relay/sql/schema.sql is the schema the migrations reach: the migrations applied to one fresh
database and schema.sql to another give the same schema ``relay`` (pg_dump's description of it,
every privilege, and the rows the one-row tables start with)."""

from __future__ import annotations

import difflib
import os
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from relay.devtools.services import Services
from relay.devtools.services.postgres import PG_BIN
from relay.migrations import available, migrate
from tests import support

# Effective privileges on every table, view, sequence and function of the schema (a NULL ACL is
# the default one: compared as what it grants, not as how it is stored).
PRIVILEGES = """
SELECT c.relname, a.grantee::regrole::text, a.privilege_type
FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault(
    CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a
WHERE c.relnamespace = 'relay'::regnamespace AND c.relkind IN ('r', 'v', 'S')
UNION ALL
SELECT p.oid::regprocedure::text, a.grantee::regrole::text, a.privilege_type
FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
WHERE p.pronamespace = 'relay'::regnamespace
ORDER BY 1, 2, 3
"""


def schema_sql() -> str:
    return (resources.files("relay.sql") / "schema.sql").read_text(encoding="utf-8")


def pg_dump() -> Path:
    return Path(os.environ.get("RELAY_PG_BIN") or PG_BIN) / "pg_dump"


def described(url: str) -> list[str]:
    """pg_dump's schema-only description of schema relay, without its comments, blank lines and
    the random key of ``\\restrict``. Kept in order: the order of a table's columns matters."""
    dump = subprocess.run(
        [str(pg_dump()), "--schema-only", "--schema=relay", f"--dbname={url}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [
        line
        for line in dump.splitlines()
        if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    ]


def contents(url: str) -> dict[str, object]:
    """Privileges, and the rows of every table but the migrations' own bookkeeping."""
    with psycopg.connect(url) as conn:
        found: dict[str, object] = {"privileges": conn.execute(PRIVILEGES).fetchall()}
        tables = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'relay'::regnamespace"
            " AND relkind = 'r' AND relname <> 'schema_migration' ORDER BY relname"
        ).fetchall()
        for (table,) in tables:
            every_row = sql.SQL("SELECT t::text FROM {} t ORDER BY 1")
            rows = conn.execute(every_row.format(sql.Identifier("relay", table))).fetchall()
            found[table] = [row[0] for row in rows]
    return found


@pytest.fixture
def schema_url(services: Services) -> Iterator[str]:
    url = support.create_database(services.database_url)
    yield url
    support.drop_database(url)


def test_migrations_reach_schema_sql(database_url: str, schema_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert [m.version for m in migrate(conn)] == [m.version for m in available()]
    with psycopg.connect(schema_url, autocommit=True) as conn:
        conn.execute(schema_sql().encode())

    migrated, reference = described(database_url), described(schema_url)
    assert any(line.startswith("CREATE FUNCTION relay.enqueue(") for line in migrated)
    diff = "\n".join(
        difflib.unified_diff(migrated, reference, "migrations", "schema.sql", lineterm="")
    )
    assert migrated == reference, f"schema.sql differs from the migrations:\n{diff}"
    assert contents(database_url) == contents(schema_url)


def test_schema_sql_holds_no_query() -> None:
    """relay.sql loads every *.sql file of the package: schema.sql must add no named query."""
    assert "-- name:" not in schema_sql()

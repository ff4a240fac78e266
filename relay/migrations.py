"""Versioned schema migrations, applied by ``relay migrate``.

Files are ``schemas/migrations/NNNN_name.sql``. All pending files are applied in one transaction
under an advisory lock, so running migrate twice, or from two processes at once, is safe. Each
applied file's checksum is recorded: an edited, already-applied migration is reported, not re-run.
Locks are taken with a timeout and the whole try is retried: a long read elsewhere must not make
every enqueue and claim queue behind the migration's lock request.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg.errors
from psycopg import sql

from relay.config import Settings
from relay.errors import ConfigError, MigrationError
from relay.sql import query

log = logging.getLogger(__name__)
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# An arbitrary constant: the key of the advisory lock that serialises migrations.
_LOCK_KEY = 0x72656C6179
ENUM_LABEL_MAX = 63
"""Bytes in an enum label (NAMEDATALEN - 1): a longer type name cannot enter the intake's enum."""
LOCK_TIMEOUT_S = 5.0
"""How long one try of a migration waits for a table lock before it gives up and rolls back."""
LOCK_TRIES = 5
STATUS_EFFECT_TYPE = "relay.status"
"""The effect type of status events (declared by migration 0002); no declared type may take it."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def schemas_dir() -> Path:
    """``schemas/`` of a source checkout, or its copy packed into the wheel (``relay/_schemas``)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_schemas", package.parent / "schemas"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise MigrationError("cannot find the schemas/migrations directory next to the relay package")


def available() -> list[Migration]:
    found = []
    for path in sorted((schemas_dir() / "migrations").iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8"))
            )
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return found


def _applied(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    exists = conn.execute("SELECT to_regclass('relay.schema_migration') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM relay.schema_migration").fetchall()
    return {int(str(v)): str(c) for v, c in rows}


def migrate(
    conn: psycopg.Connection[tuple[object, ...]],
    *,
    target: int | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    tries: int = LOCK_TRIES,
) -> list[Migration]:
    """Apply every pending migration (up to ``target``); return the ones applied by this call.

    A migration that alters a table waits for every reader of it, and while it waits every
    writer queues behind it: each try gives up after ``lock_timeout_s`` (everything it did is
    rolled back, so the queue drains), and the next try comes after a pause.
    """
    for attempt in range(1, tries + 1):
        try:
            return _migrate_once(conn, target, lock_timeout_s)
        except psycopg.errors.LockNotAvailable:
            if attempt == tries:
                break
            time.sleep(min(2.0 ** (attempt - 1), 10.0))
    raise MigrationError(
        f"could not take the locks the migration needs within {lock_timeout_s:g}s, {tries} "
        "times: a long transaction holds the relay's tables (see pg_stat_activity); nothing "
        "was changed, run 'relay migrate' again when it has ended"
    )


def _migrate_once(
    conn: psycopg.Connection[tuple[object, ...]], target: int | None, lock_timeout_s: float
) -> list[Migration]:
    applied_now: list[Migration] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            "SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_s * 1000)}ms",)
        )
        conn.execute("CREATE SCHEMA IF NOT EXISTS relay")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS relay.schema_migration ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = _applied(conn)
        for migration in available():
            if target is not None and migration.version > target:
                break
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied; add a new migration instead of editing an old one"
                    )
                continue
            try:
                conn.execute(migration.sql.encode())
            except psycopg.errors.LockNotAvailable:
                raise
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            conn.execute(
                "INSERT INTO relay.schema_migration (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration)
    return applied_now


def check_current(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Refuse to run against a database that lacks migrations this code needs."""
    done = _applied(conn)
    missing = [m for m in available() if m.version not in done]
    if missing:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise MigrationError(f"the database lacks migrations {names}: run 'relay migrate' first")


def sync_effect_types(conn: psycopg.Connection[tuple[object, ...]], settings: Settings) -> int:
    """Write the declared effect types into ``relay.effect_type`` and the intake's enum
    (``relay.effect_type_name``), and the limits into ``relay.limits``, where enqueue validates
    intents.

    ``ALTER TYPE ... ADD VALUE`` may run in a transaction block since PostgreSQL 12, but the new
    value may not be used before that transaction commits ("unsafe use of new value"): nothing
    here uses it, and on a connection in autocommit mode (as ``relay migrate`` uses) this
    transaction commits before anyone can. Values are added only when missing, and only by the
    type's owner: the daemons run this too, as roles that may not alter the type.
    """
    changed = 0
    with conn.transaction():
        _sync_type_names(conn, [spec.name for spec in settings.effect_types.values()])
        for spec in settings.effect_types.values():
            cur = conn.execute(
                query("sync_effect_type"),
                {
                    "name": spec.name,
                    "topic": spec.topic,
                    "idempotent": spec.idempotent,
                    "business_key": spec.business_key,
                    "result_topic": spec.result_topic,
                    "outcome_timeout_s": spec.outcome_timeout_s,
                    "has_observer": spec.observer is not None,
                    "compensation": spec.compensation,
                    "max_attempts": spec.max_attempts,
                    "key_by_group": spec.key_by_group,
                },
            )
            changed += cur.rowcount
        conn.execute(query("sync_limits"), {"max_payload_bytes": settings.max_payload_bytes})
        row = conn.execute(query("has_group_limit")).fetchone()
        if row is not None and row[0]:
            conn.execute(
                query("sync_group_limit"),
                {"max_pending_per_group": settings.max_pending_per_group},
            )
    return changed


def _sync_type_names(conn: psycopg.Connection[tuple[object, ...]], names: list[str]) -> int:
    """Add the declared types the enum lacks; returns how many were added."""
    rows = conn.execute(query("missing_effect_type_names"), {"names": names}).fetchall()
    added = 0
    for name, may_add in rows:
        if len(str(name).encode()) > ENUM_LABEL_MAX:
            log.warning(
                "effect type %s is longer than %d bytes: it cannot be written to the intake",
                name,
                ENUM_LABEL_MAX,
            )
        elif not may_add:
            log.warning(
                "effect type %s is not in relay.effect_type_name and this login may not add "
                "it: run 'relay migrate' as the schema owner",
                name,
            )
        else:
            statement = sql.SQL(query("add_effect_type_name")).format(name=sql.Literal(name))
            conn.execute(statement)
            added += 1
    return added


def apply_status_events(conn: psycopg.Connection[tuple[object, ...]], settings: Settings) -> bool:
    """Switch status events on (or off) as ``status_events`` says: the transitions written from
    then on are published. Run by ``relay migrate``, ``relay run`` and ``relay reconcile``, so
    that the setting holds from the first effect on. True when this call changed the switch."""
    if STATUS_EFFECT_TYPE in settings.effect_types:
        raise ConfigError(f"effect type name {STATUS_EFFECT_TYPE!r} is reserved for status events")
    row = conn.execute(query("status_events_switch")).fetchone()
    if row is not None and bool(row[0]) == settings.status_events:
        return False
    conn.execute(query("set_status_events"), {"on": settings.status_events})
    return True

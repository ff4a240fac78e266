"""``manage.py relay_migrate``: the relay's schema and effect types in a Django database."""

from __future__ import annotations

from typing import Any

import psycopg
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from relay.contrib.django.conf import relay_settings
from relay.errors import RelayError
from relay.migrations import migrate, sync_effect_types


def _psycopg_connection(alias: str) -> tuple[psycopg.Connection[Any], bool]:
    """Django's own connection when its backend runs psycopg 3 (so the migration runs in the
    database and with the credentials Django uses), else a new one from the same settings."""
    connection = connections[alias]
    connection.ensure_connection()
    raw = connection.connection
    if isinstance(raw, psycopg.Connection):
        return raw, False
    params = connection.get_connection_params()
    keep = ("dbname", "database", "user", "password", "host", "port", "sslmode")
    conninfo = {k: v for k, v in params.items() if k in keep and v}
    if "database" in conninfo:
        conninfo["dbname"] = conninfo.pop("database")
    return psycopg.connect(**conninfo), True


class Command(BaseCommand):
    help = (
        "Create or upgrade the relay's schema in a Django database and sync the effect types "
        "declared in settings.RELAY or the relay's TOML file."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database", default="default", help="the database alias (default: 'default')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = str(options["database"])
        if alias not in connections:
            raise CommandError(f"no database alias {alias!r} in settings.DATABASES")
        if connections[alias].in_atomic_block:
            raise CommandError("relay_migrate cannot run inside transaction.atomic()")
        try:
            settings = relay_settings()
            conn, own = _psycopg_connection(alias)
            try:
                applied = migrate(conn)
                synced = sync_effect_types(conn, settings)
                if own:
                    conn.commit()
            finally:
                if own:
                    conn.close()
        except RelayError as exc:
            raise CommandError(str(exc)) from exc
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none (up to date)"
        self.stdout.write(f"relay migrations applied: {names}")
        self.stdout.write(f"effect types synced: {synced} of {len(settings.effect_types)}")

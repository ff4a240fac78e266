"""Connections the daemons and commands open to PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg

from relay.config import Settings
from relay.errors import ServiceUnavailableError
from relay.logs import redact


def connect(
    settings: Settings, *, purpose: str, autocommit: bool = True
) -> psycopg.Connection[Any]:
    """A connection named after its purpose in ``pg_stat_activity``."""
    url = settings.require_database_url()
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            application_name=f"relay-{purpose}",
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise ServiceUnavailableError(f"PostgreSQL unavailable: {redact(str(exc))}") from None

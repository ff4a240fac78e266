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
            # A database that vanishes without closing the socket (a partition, a frozen host)
            # must end in an error the daemon can wait out, not in a read that never returns.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=30_000,
        )
    except psycopg.OperationalError as exc:
        raise ServiceUnavailableError(f"PostgreSQL unavailable: {redact(str(exc))}") from None

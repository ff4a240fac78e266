"""Connections the daemons and commands open to PostgreSQL."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.array import ListBinaryDumper

from relay.config import Settings
from relay.errors import ServiceUnavailableError
from relay.logs import redact

log = logging.getLogger(__name__)


def connect(
    settings: Settings, *, purpose: str, autocommit: bool = True
) -> psycopg.Connection[Any]:
    """A connection named after its purpose in ``pg_stat_activity``."""
    url = settings.require_database_url()
    try:
        conn = psycopg.connect(
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
        # Lists as binary arrays: psycopg writes a text array element by element in Python
        # (escaping and quoting), 9.8 us an element of bytea and 1.9 of text, against about 1
        # in binary. The reconciler's statements for a batch of results take eleven arrays of
        # an element a record. The statements (relay/sql) cast every array parameter.
        conn.adapters.register_dumper(list, ListBinaryDumper)
        # Short statements over many rows whose estimates can look big: JIT compilation would
        # cost milliseconds every time and save nothing.
        conn.execute("SET jit = off")
        if not autocommit:
            conn.commit()
    except psycopg.OperationalError as exc:
        raise ServiceUnavailableError(f"PostgreSQL unavailable: {redact(str(exc))}") from None
    return conn


def _is_loopback(host: str) -> bool:
    if not host or host.startswith("/") or host.startswith("@") or host == "localhost":
        return True  # a Unix-domain socket never leaves the machine
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def unprotected_hosts(database_url: str) -> list[str]:
    """The non-loopback hosts ``database_url`` reaches without ``sslmode=verify-full``: libpq's
    default (``prefer``) falls back to plaintext, and ``require`` accepts any certificate."""
    params = conninfo_to_dict(database_url)
    sslmode = str(params.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer")
    if sslmode == "verify-full":
        return []
    hosts = str(params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or "")
    return [h for h in hosts.split(",") if not _is_loopback(h.strip())]


def warn_unless_verified_tls(settings: Settings, daemon: str) -> None:
    """One warning at start when the database is remote and its server is not verified."""
    if not settings.database_url:
        return
    hosts = unprotected_hosts(settings.database_url)
    if hosts:
        log.warning(
            "%s: PostgreSQL at %s is reached without sslmode=verify-full: the connection may be "
            "plaintext or go to an impostor (see docs/security.md)",
            daemon,
            ", ".join(hosts),
        )

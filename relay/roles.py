"""The role split (``relay roles``): what each kind of process may do in the relay schema.

Least privilege: an application role can only call ``relay.enqueue`` / ``relay.cancel`` (SECURITY
DEFINER functions with a pinned ``search_path``) and read effects, so it can neither write a
row straight into the outbox nor forge a downstream result. The daemons and the operators get
exactly the table rights their statements need; the operator purges through SECURITY DEFINER
functions and may delete no row itself. The viewer (``relay console``'s login for viewers) may only
read what the console shows.

The script creates a role only when it is missing, so the schema owner applies the grants to
roles an administrator made beforehand without holding CREATEROLE (which, on PostgreSQL 15 and
older, lets a role make itself a member of any non-superuser role: see docs/security.md).
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from relay.errors import ConfigError, NotPermittedError
from relay.sql import query

KINDS = ("application", "relay", "reconciler", "operator", "viewer")
_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def role_names(prefix: str) -> dict[str, str]:
    """The role of each kind, e.g. ``relay_application`` for the prefix ``relay_``."""
    if not _PREFIX.match(prefix):
        raise ConfigError(
            f"role prefix {prefix!r} must be lower-case letters, digits and '_' (max 41)"
        )
    return {kind: f"{prefix}{kind}" for kind in KINDS}


def grants(prefix: str) -> sql.Composed:
    """The script that creates the roles (if missing) and grants them their rights."""
    names = role_names(prefix)
    return sql.SQL(query("role_grants")).format(
        **{kind: sql.Identifier(name) for kind, name in names.items()},
        **{f"{kind}_name": sql.Literal(name) for kind, name in names.items()},
    )


def missing(conn: psycopg.Connection[tuple[object, ...]], prefix: str) -> list[str]:
    """The roles of the split that do not exist yet (creating them needs CREATEROLE)."""
    names = list(role_names(prefix).values())
    return [str(row[0]) for row in conn.execute(query("missing_roles"), {"names": names})]


def apply(conn: psycopg.Connection[tuple[object, ...]], prefix: str) -> dict[str, str]:
    """Run the script in one transaction; returns the role of each kind.

    Raises :class:`NotPermittedError` when a role is missing and this login may not create it.
    """
    absent = missing(conn, prefix)
    try:
        with conn.transaction():
            conn.execute(grants(prefix))
    except psycopg.errors.InsufficientPrivilege as exc:
        if absent and "create role" in str(exc):
            raise NotPermittedError(
                f"permission denied to create role {', '.join(absent)}: creating a role needs "
                "CREATEROLE; have an administrator create it (CREATE ROLE name NOLOGIN), then "
                "run 'relay roles --apply' again as the schema owner (docs/security.md)"
            ) from None
        raise
    return role_names(prefix)

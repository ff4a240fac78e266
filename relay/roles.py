"""The role split (``relay roles``): what each kind of process may do in the relay schema.

Least privilege: an application role can only call ``relay.enqueue`` / ``relay.cancel`` (SECURITY
DEFINER functions with a pinned ``search_path``) and read effects, so it can neither write a
row straight into the outbox nor forge a downstream result. The daemons and the operators get
exactly the table rights their statements need.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from relay.errors import ConfigError
from relay.sql import query

KINDS = ("application", "relay", "reconciler", "operator")
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
        **{kind: sql.Identifier(name) for kind, name in names.items()}
    )


def apply(conn: psycopg.Connection[tuple[object, ...]], prefix: str) -> dict[str, str]:
    """Run the script in one transaction; returns the role of each kind."""
    with conn.transaction():
        conn.execute(grants(prefix))
    return role_names(prefix)

"""relay/sql: every query by name."""

from __future__ import annotations

from relay.sql import names, query


def test_every_query_is_named_and_loadable() -> None:
    for name in ("claim_batch", "mark_outcomes", "expire_leases", "enqueue"):
        assert name in names()
        assert query(name).strip()

"""relay/migrations.py: the migration files."""

from __future__ import annotations

from relay.migrations import available


def test_migrations_are_numbered() -> None:
    versions = [m.version for m in available()]
    assert versions == sorted(versions)
    assert versions[0] == 1

"""Named SQL queries, kept in the ``*.sql`` files of this package: every statement in one place."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import LiteralString

_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


@cache
def _load() -> dict[str, str]:
    """Every ``*.sql`` file of this package, split at ``-- name:`` headers; names are unique."""
    queries: dict[str, str] = {}
    files = sorted(
        (f for f in resources.files(__package__).iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    for file in files:
        parts = _HEADER.split(file.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice (again in {file.name})")
            queries[name] = body.strip().rstrip(";")
    return queries


def query(name: str) -> LiteralString:
    """The text of one named query. The file is part of the package, so the text is trusted."""
    return _load()[name]


def names() -> list[str]:
    return sorted(_load())

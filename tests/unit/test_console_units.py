"""The console's pure parts: password hashes, the users file, the same-origin rule, the outlook
of an UNKNOWN effect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.console.auth import check_password, hash_password, load_users, same_origin
from relay.console.explain import outlook
from relay.console.render import esc, fmt
from relay.errors import ConfigError
from tests.support import GivenSettings


def test_password_hashes_check_and_a_plain_password_is_refused(tmp_path: Path) -> None:
    stored = hash_password("a long enough secret")
    assert check_password("a long enough secret", stored)
    assert not check_password("a long enough secreT", stored)
    assert not check_password("x", "scrypt$not$a$hash")
    users = tmp_path / "users"
    users.write_text(f"# comment\nalice:operator:{stored}\n", encoding="utf-8")
    assert load_users(users)["alice"].right == "operator"
    users.write_text("alice:operator:hunter2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1"):
        load_users(users)


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"sec-fetch-site": "same-origin"}, True),
        ({"sec-fetch-site": "same-site", "origin": "http://h:1"}, False),
        ({"sec-fetch-site": "cross-site"}, False),
        ({"origin": "http://h:1"}, True),
        ({"origin": "http://evil:1"}, False),
        ({"origin": "null"}, False),
        ({}, False),
    ],
)
def test_same_origin(headers: dict[str, str], ok: bool) -> None:
    assert same_origin(headers, "h:1") is ok


def test_escaping_writes_out_markup_and_controls() -> None:
    assert fmt("<td>{}</td>", "<b>\u202e\n") == "<td>&lt;b&gt;\\u202e\n</td>"
    assert esc(fmt("<i>{}</i>", "&")) == "<i>&amp;</i>"


def _schedule(now: datetime, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "state": "UNKNOWN",
        "now": now,
        "updated_at": now,
        "attempts": 1,
        "observe_at": None,
        "observe_tries": 0,
        "verify_at": None,
        "verify_tries": 0,
        "publication_known": True,
        "outcome_deadline": None,
        "has_observer": True,
        "outcome_timeout_s": 30.0,
        "max_attempts": 3,
        "result_topic": "results",
        "observations": 0,
    }
    row.update(changes)
    return row


def test_the_outlook_of_an_unknown_says_when_it_goes_stuck() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    settings = GivenSettings(observe_backoff_s=5, observe_backoff_max_s=300, observe_max_tries=5)
    # Tries 1..4 inconclusive wait 5, 10, 20, 40 s; the 5th answer makes it STUCK.
    seen = outlook(settings, _schedule(now))
    assert "5 more time(s)" in seen.stuck[0]
    assert f"{now + timedelta(seconds=75):%H:%M:%S}" in seen.stuck[0]
    # Two tries spent, asked next in 60 s: then 20 and 40 s more.
    later = _schedule(now, observe_tries=2, observe_at=now + timedelta(seconds=60))
    stuck = outlook(settings, later).stuck[0]
    assert "3 more time(s)" in stuck
    assert f"{now + timedelta(seconds=120):%H:%M:%S}" in stuck
    none = outlook(settings, _schedule(now, has_observer=False))
    assert "declares no observer" in none.next[0]
    unpublished = outlook(settings, _schedule(now, publication_known=False, verify_tries=19))
    assert "A relay looks for the record in Kafka" in unpublished.next[0]
    assert "1 more time(s)" in unpublished.stuck[0]

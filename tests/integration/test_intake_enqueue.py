"""Enqueue through the intake (docs/design/intake.md slice 2) on the real PostgreSQL: what the
relay does with rows it reads, the ordering groups' lock and owners, cancel and the counts of
intents not read yet. The relay's read is ``support.read_intake`` (what ``relay run`` calls)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import relay
from relay.business_keys import templates_apart
from relay.config import Settings
from relay.errors import InvalidIntentError, NotPermittedError, UnknownEffectTypeError
from relay.inspection import stats
from relay.reconciler.purge import purge, would_purge
from relay.roles import apply
from tests import support

Conn = psycopg.Connection[Any]


@pytest.fixture
def url(settings: Settings) -> str:
    return settings.require_database_url()


@pytest.fixture
def logins(url: str, prefix: str) -> Iterator[dict[str, str]]:
    """Two application logins (a, b) and a relay login, each in its role."""
    role_prefix = f"{prefix.lower()}_"
    made: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        names = apply(conn, role_prefix)
        for login, role in (
            ("a", names["application"]),
            ("b", names["application"]),
            ("relay", names["relay"]),
        ):
            name = f"{role_prefix}{login}_login"
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(name), sql.Identifier(role)
                )
            )
            made.append(name)
    try:
        yield {
            login: make_conninfo(url, user=name)
            for login, name in zip(("a", "b", "relay"), made, strict=True)
        }
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for name in [*made, *names.values()]:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _stats(conn: Conn) -> list[tuple[str, str, int]]:
    return [(r["effect_type"], r["state"], int(r["effects"])) for r in stats(conn)]


def _state(url: str, key: str) -> tuple[int, str, str | None]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT id, state, reason FROM relay.effect WHERE operation_key = %s", (key,)
        ).fetchone()
    assert row is not None, key
    return int(row[0]), str(row[1]), row[2]


def test_an_intent_is_one_intake_row_until_the_relay_reads_it(url: str) -> None:
    with psycopg.connect(url) as conn:
        made = relay.enqueue(conn, "email", "e-1", {"to": "x"})
        again = relay.enqueue(conn, "email", "e-1", {"to": "x"})  # the duplicate's slow path
        conn.commit()
        assert made.created and not again.created and again.effect_id == made.effect_id
        intake = conn.execute("SELECT count(*) FROM relay.intake").fetchone()
        effects = conn.execute("SELECT count(*) FROM relay.effect").fetchone()
        assert (intake, effects) == ((1,), (0,))
        shown = relay.get_effect(conn, "e-1")
        assert shown is not None and shown.state is relay.EffectState.PENDING
        assert shown.id == made.effect_id and shown.payload == {"to": "x"}
    # The relay stopped: the backlog still shows, in `relay stats` and in the metrics' source.
    assert support.count_states(url) == {"PENDING": 1}
    with psycopg.connect(url) as conn:
        assert _stats(conn) == [("email", "PENDING", 1)]
    assert support.read_intake(url) == 1
    assert _state(url, "e-1") == (made.effect_id, "PENDING", None)
    with psycopg.connect(url) as conn:
        assert _stats(conn) == [("email", "PENDING", 1)]
    assert support.read_intake(url) == 0  # read once


def test_a_row_written_by_hand_that_fails_a_check_is_rejected_when_read_and_stops_nothing(
    url: str, logins: dict[str, str]
) -> None:
    deep: Any = {}
    for _ in range(150):
        deep = {"d": deep}
    rows = [
        ("ok-1", '{"to": "x"}'),
        ("bad-array", "[1, 2]"),
        ("bad-deep", json.dumps(deep)),
        ("bad#compensation", '{"to": "y"}'),
        ("ok-2", '{"to": "z"}'),
    ]
    with psycopg.connect(logins["a"]) as app:
        for key, payload in rows:
            app.execute(
                "INSERT INTO relay.intake (operation_key, effect_type, payload)"
                " VALUES (%s, 'email', %s::jsonb)",
                (key, payload),
            )
        app.commit()
    assert support.read_intake(url) == 5
    assert _state(url, "ok-1")[1:] == ("PENDING", None)
    assert _state(url, "ok-2")[1:] == ("PENDING", None)
    for key, why in (
        ("bad-array", "payload must be a JSON object"),
        ("bad-deep", "payload nests deeper than 100 levels"),
        ("bad#compensation", "reserved for the relay's own compensations"),
    ):
        _, state, reason = _state(url, key)
        assert state == "REJECTED" and reason is not None and why in reason, (key, reason)
    with psycopg.connect(url) as conn:
        story = conn.execute(
            "SELECT t.from_state, t.to_state FROM relay.transition t JOIN relay.effect e"
            " ON e.id = t.effect_id WHERE e.operation_key = 'bad-deep' ORDER BY t.id"
        ).fetchall()
    assert story == [(None, "PENDING"), ("PENDING", "REJECTED")]


def test_a_key_that_names_another_effect_is_set_aside_never_a_second_effect(url: str) -> None:
    with psycopg.connect(url) as conn:
        # An effect from before the intake, under a key the intake does not hold.
        conn.execute(
            "INSERT INTO relay.effect (operation_key, effect_type, topic, payload)"
            " SELECT 'old-1', 'email', topic, '{\"to\": \"old\"}' FROM relay.effect_type"
            " WHERE name = 'email'"
        )
        conn.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('old-1', 'email', '{\"to\": \"new\"}')"
        )
        conn.commit()
    assert support.read_intake(url) == 1
    with psycopg.connect(url) as conn:
        effects = conn.execute(
            "SELECT payload->>'to' FROM relay.effect WHERE operation_key = 'old-1'"
        ).fetchall()
        refused = conn.execute("SELECT operation_key, reason FROM relay.intake_refused").fetchall()
        # Through the Python API the key is found at enqueue: the first intent is returned.
        again = relay.enqueue(conn, "email", "old-1", {"to": "old"})
    assert effects == [("old",)]
    assert (
        len(refused) == 1 and refused[0][0] == "old-1" and "already names effect" in refused[0][1]
    )
    assert not again.created


def test_a_refused_intent_is_purged_past_retention_and_its_key_stays_refused(
    url: str, settings: Settings
) -> None:
    """``relay purge`` removes an intent set aside when read (record and intake row), as
    retention says, and nothing of the effect whose key it named; the key is refused again."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO relay.effect (operation_key, effect_type, topic, payload)"
            " SELECT 'old-2', 'email', topic, '{\"to\": \"old\"}' FROM relay.effect_type"
            " WHERE name = 'email'"
        )
        conn.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('old-2', 'email', '{\"to\": \"new\"}')"
        )
        conn.commit()
    assert support.read_intake(url) == 1
    day = 86_400.0
    with psycopg.connect(url, autocommit=True) as conn:
        assert would_purge(conn, day).refused == 0
        assert purge(conn, settings, day) == (0, 0, 0)  # refused just now: kept
        assert would_purge(conn, 0.0).refused == 1
        removed = purge(conn, settings, 0.0)
        left = conn.execute(
            "SELECT (SELECT count(*) FROM relay.intake_refused),"
            " (SELECT count(*) FROM relay.intake WHERE operation_key = 'old-2'),"
            " (SELECT payload->>'to' FROM relay.effect WHERE operation_key = 'old-2')"
        ).fetchone()
        # The same key written again is set aside again, and the old effect stays the key's.
        conn.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('old-2', 'email', '{\"to\": \"newer\"}')"
        )
    assert removed.refused == 1
    assert left == (0, 0, "old")
    assert support.read_intake(url) == 1
    with psycopg.connect(url) as conn:
        again = conn.execute(
            "SELECT count(*) FROM relay.intake_refused WHERE operation_key = 'old-2'"
        ).fetchone()
        effects = conn.execute(
            "SELECT payload->>'to' FROM relay.effect WHERE operation_key = 'old-2'"
        ).fetchall()
    assert again == (1,) and effects == [("old",)]


def test_an_undeclared_type_is_refused_by_the_enum_with_the_relays_error(url: str) -> None:
    with psycopg.connect(url) as conn, pytest.raises(UnknownEffectTypeError, match="'nope'"):
        relay.enqueue(conn, "nope", "k-1", {"a": 1})


def test_a_group_is_locked_before_the_id_is_drawn_and_belongs_to_its_login(
    url: str, logins: dict[str, str]
) -> None:
    with psycopg.connect(logins["a"]) as first, psycopg.connect(logins["a"]) as second:
        one = relay.enqueue(first, "email", "g-1", {"to": "1"}, ordering_group="G")
        entered = threading.Event()
        got: list[int] = []

        def later() -> None:
            entered.set()
            got.append(
                relay.enqueue(second, "email", "g-2", {"to": "2"}, ordering_group="G").effect_id
            )
            second.commit()

        waiter = threading.Thread(target=later)
        waiter.start()
        entered.wait()
        # The second enqueue waits on the group's row, so it has not drawn an id yet: an
        # ungrouped intent enqueued now draws the next id, before it.
        with psycopg.connect(logins["a"]) as third:
            between = relay.enqueue(third, "email", "x-1", {"to": "x"}).effect_id
            third.commit()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # still waiting for the group
        first.commit()
        waiter.join(30)
        assert not waiter.is_alive()
    assert one.effect_id < between < got[0]  # ids in the group's commit order
    # Another login cannot enter the group, nor wait on it, even while its owner holds it.
    with psycopg.connect(logins["a"]) as owner, psycopg.connect(logins["b"]) as other:
        relay.enqueue(owner, "email", "g-3", {"to": "3"}, ordering_group="G")
        other.execute("SET statement_timeout = '5s'")
        with pytest.raises(NotPermittedError, match="belongs to login"):
            relay.enqueue(other, "email", "b-1", {"to": "b"}, ordering_group="G")
        other.rollback()
        # Its own groups are its own.
        relay.enqueue(other, "email", "b-2", {"to": "b"}, ordering_group="H")
        other.commit()
        owner.commit()
    with psycopg.connect(logins["b"]) as other, pytest.raises(psycopg.errors.InsufficientPrivilege):
        other.execute("SELECT * FROM relay.ordering_group WHERE name = 'G' FOR UPDATE")


def test_an_intent_cancelled_before_it_is_read_is_never_published(
    url: str, logins: dict[str, str]
) -> None:
    with psycopg.connect(logins["a"]) as app:
        relay.enqueue(app, "email", "c-1", {"to": "c"})
        relay.enqueue(app, "email", "c-2", {"to": "c"})
        app.commit()
    with psycopg.connect(logins["b"]) as other, pytest.raises(NotPermittedError):
        relay.cancel(other, "c-1", reason="not mine", actor="b")
    with psycopg.connect(logins["a"]) as app:
        relay.cancel(app, "c-1", reason="changed my mind", actor="a")
        app.commit()
    assert support.read_intake(url) == 1  # c-2: c-1's effect row exists, the reader skips it
    assert _state(url, "c-1")[1] == "CANCELLED"
    assert _state(url, "c-2")[1] == "PENDING"


def test_a_business_key_is_the_types_own_when_it_has_a_template(
    url: str, logins: dict[str, str]
) -> None:
    """A type with a template computes its business key: a row written by hand that lacks a field
    of it is rejected when read (it stops no read), and an explicit key other than the computed one
    is refused (issue 18, item 8b: an application must not pick another effect's key)."""
    wire = {"account": "A", "amount": 5, "date": "2026-12-04"}
    computed = "A:5:2026-12-04"
    rows = [
        ("w-lacks", json.dumps({"account": "A"}), None),
        ("w-other-key", json.dumps({**wire, "amount": 6}), computed),
        ("w-own-key", json.dumps(wire), computed),
        ("w-plain", json.dumps({**wire, "amount": 7}), None),
    ]
    with psycopg.connect(logins["a"]) as app:
        for key, payload, business_key in rows:
            app.execute(
                "INSERT INTO relay.intake (operation_key, effect_type, payload, business_key)"
                " VALUES (%s, 'wire', %s::jsonb, %s)",
                (key, payload, business_key),
            )
        app.commit()
        # Through the SQL function, the same explicit key is refused at enqueue.
        with pytest.raises(psycopg.Error) as raised:
            app.execute(
                "SELECT * FROM relay.enqueue(%s, 'wire', %s::jsonb, %s)",
                ("w-sql-other", json.dumps({**wire, "amount": 8}), computed),
            )
        assert raised.value.sqlstate == "RL002", raised.value
        assert "business key" in str(raised.value) and "template" in str(raised.value)
        app.rollback()
    assert support.read_intake(url) == 4
    assert _state(url, "w-own-key")[1:] == ("PENDING", None)
    assert _state(url, "w-plain")[1:] == ("PENDING", None)
    for key, why in (
        ("w-lacks", "lacks field 'amount'"),
        ("w-other-key", "differs from the one type 'wire' computes"),
    ):
        _, state, reason = _state(url, key)
        assert state == "REJECTED" and reason is not None and why in reason, (key, reason)
    with psycopg.connect(url) as conn:
        keys = conn.execute(
            "SELECT operation_key, business_key FROM relay.effect"
            " WHERE state = 'PENDING' ORDER BY id"
        ).fetchall()
    assert keys == [("w-own-key", computed), ("w-plain", "A:7:2026-12-04")]


def test_an_explicit_key_is_never_one_another_types_template_makes(
    url: str, logins: dict[str, str]
) -> None:
    """Issue 18, item 8b: `email` has no template, so it takes the caller's key, but not one that
    `wire`'s template '{account}:{amount}:{date}' makes: an application must not give its intent
    the key an observer of another application's wire would search the downstream by."""
    wire_key = "A:5:2026-12-04"  # what a wire {"account": "A", "amount": 5, ...} is keyed by
    with psycopg.connect(logins["a"]) as app:
        for enqueue in (
            lambda: relay.enqueue(app, "email", "m-py", {"to": "x"}, business_key=wire_key),
            lambda: app.execute(
                "SELECT * FROM relay.enqueue('m-sql', 'email', '{}'::jsonb, %s)", (wire_key,)
            ),
            lambda: relay.enqueue(
                app, "email", "m-grouped", {}, business_key=wire_key, ordering_group="g"
            ),
        ):
            with pytest.raises((InvalidIntentError, psycopg.Error)) as raised:
                enqueue()
            assert getattr(raised.value, "sqlstate", "RL002") == "RL002", raised.value
            assert "template of effect type 'wire'" in str(raised.value), raised.value
            app.rollback()
        # Keys the template cannot make are the caller's: one field short, a bare "%".
        for key, business_key in (("m-short", "A:5"), ("m-percent", "A%:1:2"), ("m-1", "x")):
            made = relay.enqueue(app, "email", key, {}, business_key=business_key)
            assert made.created, key
        app.commit()
        # A row written into the intake by hand is read and REJECTED, naming the type.
        app.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload, business_key)"
            " VALUES ('m-hand', 'email', '{}'::jsonb, %s)",
            (wire_key,),
        )
        app.commit()
    assert support.read_intake(url) == 4
    _, state, reason = _state(url, "m-hand")
    assert state == "REJECTED" and reason is not None, reason
    assert "template of effect type 'wire'" in reason, reason
    with psycopg.connect(url) as conn:
        kept = conn.execute(
            "SELECT operation_key, business_key FROM relay.effect"
            " WHERE state = 'PENDING' ORDER BY id"
        ).fetchall()
    assert kept == [("m-short", "A:5"), ("m-percent", "A%:1:2"), ("m-1", "x")]


def test_a_templates_pattern_holds_every_key_it_makes_and_none_of_a_template_apart(
    url: str,
) -> None:
    """The check behind the refusal above, against relay.business_key itself: each of 400 keys
    made from random values (the templates' own characters, '%', hex digits, other text) matches
    its template's pattern, and no pattern of a template that relay.business_keys calls apart."""
    templates = ["{a}:{b}:{c}", "wire:{a}", "ship:{a}", "{a}@x1", "{a}:{b}", "1F{a}%{b}"]
    alphabet = ":%@1Fxwire-AB9é{}"
    rng = random.Random(8)
    made = [
        (t, json.dumps({f: "".join(rng.choices(alphabet, k=rng.randint(0, 6))) for f in "abc"}))
        for t in templates
        for _ in range(400 // len(templates))
    ]
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT m.t, o.t, relay.business_key(m.t, m.p::jsonb, 'k')"
            "  ~ relay.business_key_pattern(o.t)"
            " FROM unnest(%s::text[], %s::text[]) AS m(t, p), unnest(%s::text[]) AS o(t)",
            ([t for t, _ in made], [p for _, p in made], templates),
        ).fetchall()
    assert len(rows) == len(made) * len(templates)
    for template, other, matches in rows:
        if other == template:
            assert matches, (template, other)
        elif templates_apart(template, other):
            assert not matches, (template, other)


def _read_after_a_tick(url: str) -> int:
    """A read as the relay makes it at its heartbeat (a tick although nothing new came in)."""
    from relay.dispatch.intake import promote
    from relay.dispatch.ticker import Ticker

    with psycopg.connect(url, autocommit=True) as conn:
        Ticker(heartbeat_s=0.001).run_once(conn)
        return promote(conn, limit=5000).rows


def test_a_cancel_left_open_holds_back_its_own_intent_only(
    url: str, logins: dict[str, str]
) -> None:
    """Issue 18's rule on the intake: an application that cancels its own intent and keeps its
    transaction open holds back that intent (and the later ones of its group) only; a login
    refused the cancel of another's intent holds nothing, even with its transaction left
    aborted. Before, either stopped every read of the intake until it ended."""
    with psycopg.connect(logins["a"]) as app:
        for key in ("mine", "a-other"):
            relay.enqueue(app, "email", key, {"to": key})
        for key in ("g-1", "h-1"):
            relay.enqueue(app, "email", key, {"to": key}, ordering_group=key[0])
        app.commit()
    committing = psycopg.connect(logins["a"])
    rolling_back = psycopg.connect(logins["a"])
    intruder = psycopg.connect(logins["b"])
    for conn in (committing, rolling_back, intruder):
        conn.execute("SET lock_timeout = '5s'")  # one cancel waiting on another fails the test
        conn.commit()
    try:
        relay.cancel(committing, "mine", reason="not needed", actor="a")
        relay.cancel(committing, "g-1", reason="not needed", actor="a")
        relay.cancel(rolling_back, "h-1", reason="changed my mind", actor="a")
        with pytest.raises(NotPermittedError):
            relay.cancel(intruder, "a-other", reason="not mine", actor="b")  # left aborted
        with psycopg.connect(logins["a"]) as app:
            for key in ("g-2", "h-2"):  # behind the held heads of their groups
                relay.enqueue(app, "email", key, {"to": key}, ordering_group=key[0])
            app.commit()
        with psycopg.connect(logins["b"]) as other:
            relay.enqueue(other, "email", "theirs", {"to": "b"})
            other.commit()
        # The read goes on: everything but the three cancels in progress and what waits behind.
        assert support.read_intake(url) == 2
        assert _state(url, "theirs")[1] == "PENDING"
        assert _state(url, "a-other")[1] == "PENDING"
        with psycopg.connect(url) as conn:
            held = conn.execute(
                "SELECT operation_key FROM relay.intake_unread ORDER BY id"
            ).fetchall()
            assert [k for (k,) in held] == ["mine", "g-1", "h-1", "g-2", "h-2"]
            written = conn.execute(
                "SELECT count(*) FROM relay.effect WHERE operation_key IN "
                "('mine', 'g-1', 'h-1', 'g-2', 'h-2')"
            ).fetchone()
            assert written == (0,)
        assert _read_after_a_tick(url) == 0  # still held: read again, passed by again
        committing.commit()
        rolling_back.rollback()
    finally:
        for conn in (committing, rolling_back, intruder):
            conn.close()
    # Free now: the cancelled ones stay CANCELLED, the others are read, each group in order.
    assert _read_after_a_tick(url) == 3
    assert _state(url, "mine")[1] == "CANCELLED"
    assert _state(url, "g-1")[1] == "CANCELLED"
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT operation_key, state, behind_head FROM relay.effect"
            " WHERE ordering_group IN ('g', 'h') ORDER BY id"
        ).fetchall()
        unread = conn.execute("SELECT count(*) FROM relay.intake_unread").fetchone()
    assert rows == [
        ("g-1", "CANCELLED", False),
        ("h-1", "PENDING", False),
        ("g-2", "PENDING", False),
        ("h-2", "PENDING", True),
    ]
    assert unread == (0,)

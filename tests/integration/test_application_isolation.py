"""One application must not stop, reorder or confirm another's effects (issue 18), on the real
PostgreSQL and Kafka.

Several applications writing to one outbox database is a normal deployment. These tests play the
careless or hostile one, through the SQL function any language can call, and check that the
others' effects carry on.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.errors import InvalidIntentError, NotPermittedError
from relay.roles import apply, role_names
from relay.sql import query
from tests import support
from tests.downstream import harness as h

ENQUEUE = "SELECT effect_id, state, created FROM relay.enqueue(%s, %s, %s::jsonb, %s, NULL, %s)"


def _nested_text(levels: int) -> str:
    """A JSON object nested ``levels`` deep, as text: a Python dict that deep cannot be
    serialised by json.dumps, and a hostile application writes text anyway."""
    return '{"d":' * (levels - 1) + '{"leaf":1}' + "}" * (levels - 1)


def _sql_enqueue(
    url: str,
    key: str,
    payload: str,
    *,
    business_key: str | None = None,
    available_at: str | dt.datetime | None = None,
) -> tuple[Any, ...] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(ENQUEUE, (key, "email", payload, business_key, available_at))
        found = row.fetchone()
        conn.commit()
        return found


@pytest.mark.parametrize(
    ("case", "payload", "extra"),
    [
        ("nesting 3000", _nested_text(3000), {}),
        ("nesting 101", _nested_text(101), {}),
        ("business key of 600 characters", '{"a": 1}', {"business_key": "b" * 600}),
        ("empty business key", '{"a": 1}', {"business_key": ""}),
        ("available_at infinity", '{"a": 1}', {"available_at": "infinity"}),
        ("available_at -infinity", '{"a": 1}', {"available_at": "-infinity"}),
    ],
)
def test_the_sql_function_refuses_what_the_python_api_refuses(
    settings: Settings, case: str, payload: str, extra: dict[str, Any]
) -> None:
    url = settings.require_database_url()
    with pytest.raises(psycopg.Error) as raised:
        _sql_enqueue(url, f"k-{case}", payload, **extra)
    assert raised.value.sqlstate == "RL002", raised.value
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)


def test_the_limits_are_the_same_on_both_paths(settings: Settings) -> None:
    """100 levels pass both paths, 101 neither; a 512-character business key passes, 513 not."""
    url = settings.require_database_url()
    assert _sql_enqueue(url, "sql-100", _nested_text(100)) is not None
    with psycopg.connect(url) as conn:
        deep = json.loads(_nested_text(100))
        assert relay.enqueue(conn, "email", "py-100", deep).created
        with pytest.raises(InvalidIntentError):
            relay.enqueue(conn, "email", "py-101", {"d": deep})
        assert relay.enqueue(conn, "email", "py-bk", {"a": 1}, business_key="b" * 512).created
        with pytest.raises(InvalidIntentError, match="business key"):
            relay.enqueue(conn, "email", "py-bk-long", {"a": 1}, business_key="b" * 513)
        conn.commit()
    assert _sql_enqueue(url, "sql-bk", '{"a": 1}', business_key="b" * 512) is not None


def test_a_time_in_the_past_does_not_jump_the_backlog(settings: Settings) -> None:
    """An available_at in the past means due now: it cannot move ahead of effects waiting."""
    url = settings.require_database_url()
    _sql_enqueue(url, "waiting", '{"a": 1}')
    _sql_enqueue(url, "year-1", '{"a": 2}', available_at="0001-01-01 00:00:00+00")
    with psycopg.connect(url) as conn:
        relay.enqueue(
            conn,
            "email",
            "python-2000",
            {"a": 3},
            available_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        )
        conn.commit()
        support.read_intake(url)
        rows = conn.execute(
            "SELECT operation_key, available_at >= created_at FROM relay.effect ORDER BY id"
        ).fetchall()
    assert rows == [("waiting", True), ("year-1", True), ("python-2000", True)]


def test_an_undecodable_payload_stops_no_one(
    database_url: str,
    services: Services,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A row written before the SQL limits (here: planted by the superuser) whose payload nests
    3,000 deep: results for it and for other effects in the same batch are applied, it can be
    shown and resolved, and the reconciler goes on."""
    h.isolate_from_environment(monkeypatch)
    settings = h.reconciler_settings(database_url, services.kafka_bootstrap_servers, prefix)
    url = settings.require_database_url()
    keys = ["deep-commit", "victim", "deep-unknown"]
    with psycopg.connect(url) as conn:
        for i, key in enumerate(keys):
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": 100 + i})
        conn.commit()
        support.read_intake(url)
        conn.execute(
            "UPDATE relay.effect SET payload = %s::jsonb WHERE operation_key LIKE 'deep-%%'",
            (_nested_text(3000),),
        )
        conn.commit()
    topic = f"{prefix}.wire-results"
    with support.running(Relay(settings)), h.running_reconciler(settings):
        support.wait_for(
            lambda: set(h.states(url, keys).values()) == {"PUBLISHED"}, 60, "publication"
        )
        h.produce(
            services.kafka_bootstrap_servers,
            topic,
            [
                h.result("deep-commit", external_id="d-1"),
                h.result("victim", external_id="v-1"),
                h.result("deep-unknown", "unknown"),
            ],
        )
        support.wait_for(
            lambda: h.states(url, keys[:2]) == {"deep-commit": "CONFIRMED", "victim": "CONFIRMED"},
            60,
            "both results applied",
        )
        # No observer is declared for wires: UNKNOWN goes STUCK for a person, undecoded.
        support.wait_for(lambda: h.state(url, "deep-unknown") == "STUCK", 60, "STUCK")
    assert h.verdicts(url) == {"applied": 3}
    config = support.write_config(tmp_path / "relay.toml", settings)
    shown = support.run_cli(config, "show", "deep-unknown")
    assert shown.returncode == 0, shown.stderr
    assert "STUCK" in shown.stdout and "cannot be decoded" in shown.stdout
    resolved = support.run_cli(
        config, "resolve", "deep-unknown", "--reject", "--reason", "bank says no such wire"
    )
    assert resolved.returncode == 0, resolved.stderr
    assert h.state(url, "deep-unknown") == "REJECTED"


def test_long_keys_get_distinct_compensation_keys(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 item 8a: two 512-character keys sharing 499 characters, each compensated."""
    h.isolate_from_environment(monkeypatch)
    settings = h.reconciler_settings(database_url, services.kafka_bootstrap_servers, prefix)
    url = settings.require_database_url()
    parents = ["p" * 499 + "a" * 13, "p" * 499 + "b" * 13, "short"]
    with psycopg.connect(url) as conn:
        ids = [
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": i}).effect_id
            for i, key in enumerate(parents)
        ]
        conn.commit()
        support.read_intake(url)
        keys = []
        for parent_id in ids:
            row = conn.execute(
                "SELECT operation_key, created FROM relay.enqueue_compensation("
                "%s, 0, 'wire-reversal', %s::jsonb, 'test', 'test')",
                (parent_id, json.dumps({**h.WIRE, "compensates": parent_id})),
            ).fetchone()
            assert row is not None and row[1] is True
            keys.append(row[0])
        conn.commit()
    assert len(set(keys)) == 3
    assert keys[2] == "short#compensation"
    assert all(len(k) <= 512 and k.endswith("#compensation") for k in keys)


@pytest.fixture
def two_apps(settings: Settings, prefix: str) -> Iterator[dict[str, str]]:
    """Two application logins and an operator login (cluster-wide roles, dropped after)."""
    url = settings.require_database_url()
    names = role_names(f"{prefix.lower()}_")
    logins = {"app_a": names["application"], "app_b": names["application"]}
    logins["operator"] = names["operator"]
    with psycopg.connect(url, autocommit=True) as conn:
        apply(conn, f"{prefix.lower()}_")
        for login, role in logins.items():
            conn.execute(f'CREATE ROLE "{prefix.lower()}_login_{login}" LOGIN IN ROLE "{role}"')
    try:
        yield {
            login: make_conninfo(url, user=f"{prefix.lower()}_login_{login}") for login in logins
        }
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for name in [f"{prefix.lower()}_login_{login}" for login in logins] + list(
                names.values()
            ):
                conn.execute(f'DROP OWNED BY "{name}"')
                conn.execute(f'DROP ROLE "{name}"')


def _cancel_actor(url: str, key: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT t.actor FROM relay.transition t JOIN relay.effect e ON e.id = t.effect_id"
            " WHERE e.operation_key = %s AND t.to_state = 'CANCELLED'",
            (key,),
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_an_application_cancels_only_its_own_effects(
    settings: Settings, two_apps: dict[str, str], prefix: str
) -> None:
    """Issue 18 item 3: not another application's effect, not the relay's compensation; the
    login is recorded whatever actor the caller names."""
    url = settings.require_database_url()
    with psycopg.connect(two_apps["app_a"], autocommit=True) as a:
        relay.enqueue(a, "email", "a-1", {"to": "a"})
        relay.enqueue(a, "email", "a-2", {"to": "a"})
        parent = relay.enqueue(a, "email", "a-parent", {"to": "a"})
    support.read_intake(url)
    with psycopg.connect(url, autocommit=True) as owner:
        owner.execute(
            "SELECT * FROM relay.enqueue_compensation(%s, 0, 'email', '{}', 'test', 'test')",
            (parent.effect_id,),
        )
    with psycopg.connect(two_apps["app_b"], autocommit=True) as b:
        relay.enqueue(b, "email", "b-1", {"to": "b"})
        with pytest.raises(NotPermittedError, match="only its own effects"):
            relay.cancel(b, "a-1", actor="operator:alice")
        relay.cancel(b, "b-1", actor="operator:alice")
    with psycopg.connect(two_apps["app_a"], autocommit=True) as a:
        with pytest.raises(NotPermittedError, match="made by the relay"):
            relay.cancel(a, "a-parent#compensation")
        relay.cancel(a, "a-1")
    with psycopg.connect(two_apps["operator"], autocommit=True) as op:
        relay.cancel(op, "a-2", actor="operator:alice")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT operation_key, state FROM relay.effect").fetchall()
    states = {str(key): str(state) for key, state in rows}
    assert states == {
        "a-1": "CANCELLED",
        "a-2": "CANCELLED",
        "a-parent": "PENDING",
        "a-parent#compensation": "PENDING",
        "b-1": "CANCELLED",
    }
    login = prefix.lower()
    assert _cancel_actor(url, "b-1") == f"operator:alice [login {login}_login_app_b]"
    assert _cancel_actor(url, "a-1").endswith(f"[login {login}_login_app_a]")
    assert _cancel_actor(url, "a-2") == f"operator:alice [login {login}_login_operator]"


def test_evidence_names_the_login_that_wrote_it(
    settings: Settings, two_apps: dict[str, str]
) -> None:
    """Issue 18 item 8d: an operator cannot record evidence under a made-up login."""
    with psycopg.connect(two_apps["operator"], autocommit=True) as op:
        op.execute(
            "INSERT INTO relay.evidence (kind, verdict, actor, db_role)"
            " VALUES ('operator', 'applied', 'operator:alice', 'somebody_else')"
        )
        row = op.execute("SELECT db_role FROM relay.evidence").fetchone()
        login = op.execute("SELECT session_user").fetchone()
    assert row is not None and login is not None and row[0] == login[0]


def test_a_result_counts_only_on_its_types_result_topic(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 item 4: a result on the result topic of type `ship` confirmed a `wire`, and a
    "rejected" there turned a fire-and-forget effect REJECTED. Now both are quarantined as
    misrouted and counted; the right topic still applies."""
    h.isolate_from_environment(monkeypatch)
    types = h.wire_types(prefix)
    types["ship"] = {
        "topic": f"{prefix}.ships",
        "idempotent": True,
        "result_topic": f"{prefix}.ship-results",
    }
    settings = h.reconciler_settings(
        database_url, services.kafka_bootstrap_servers, prefix, effect_types=types
    )
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "wire", "w-1", h.WIRE)
        relay.enqueue(conn, "email", "e-1", {"to": "a@example.org"})
        conn.commit()
    bootstrap = services.kafka_bootstrap_servers
    with support.running(Relay(settings)), h.running_reconciler(settings):
        support.wait_for(
            lambda: h.states(url, ["w-1", "e-1"]) == {"w-1": "PUBLISHED", "e-1": "PUBLISHED"},
            60,
            "publication",
        )
        h.produce(
            bootstrap,
            f"{prefix}.ship-results",
            [h.result("w-1", external_id="forged"), h.result("e-1", "rejected")],
        )
        support.wait_for(lambda: h.verdicts(url).get("misrouted") == 2, 60, "two misrouted")
        assert h.states(url, ["w-1", "e-1"]) == {"w-1": "PUBLISHED", "e-1": "PUBLISHED"}
        h.produce(bootstrap, f"{prefix}.wire-results", [h.result("w-1", external_id="b-1")])
        support.wait_for(lambda: h.state(url, "w-1") == "CONFIRMED", 60, "the real result")
    assert h.verdicts(url) == {"misrouted": 2, "applied": 1}


def _claim_scan(url: str, replica: str) -> tuple[int, list[int]]:
    """One claim as the relay runs it (its session settings, its statement), inside a transaction
    that is rolled back: the rows its scans of relay.effect visited, and the ids it claimed."""
    with psycopg.connect(url) as conn:
        conn.execute(query("claimer_session"))
        conn.commit()  # the session's settings, kept past the rollbacks below
        params = {
            "owner": replica,
            "epoch": 1,
            "limit": 50,
            "max_bytes": 1_000_000,
            "lease_s": 60.0,
        }
        claimed = [int(r[0]) for r in conn.execute(query("claim_batch"), params)]
        conn.rollback()
        plan = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + query("claim_batch"), params
        ).fetchone()
        assert plan is not None
        conn.rollback()

    visited = 0

    def walk(node: dict[str, Any]) -> None:
        nonlocal visited
        # The claim's scans of effects (the probes of each candidate's group aside).
        scans_effects = node.get("Relation Name") == "effect" and "Scan" in node["Node Type"]
        if scans_effects and node.get("Index Name") != "effect_group_idx":
            visited += int(node["Actual Rows"]) * int(node["Actual Loops"])
            visited += int(node.get("Rows Removed by Filter", 0))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0][0]["Plan"])
    return visited, claimed


def test_effects_behind_a_head_that_never_settles_cost_a_claim_nothing(
    settings: Settings,
) -> None:
    """Issue 18, item 7: an application plants thousands of effects behind a head that is never
    due; a claim's scan visits only what it may claim (before: every planted effect, each checked
    against its group, at every claim). When the head settles, exactly the next effect of the
    group becomes claimable, and so on."""
    url = settings.require_database_url()
    planted = 3000
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT relay.enqueue('head', 'email', '{\"n\": 0}'::jsonb, NULL, NULL, "
            "now() + interval '50 years', 'victim')"
        )
        conn.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload, ordering_group) "
            "SELECT 'behind-' || g, 'email', jsonb_build_object('n', g), 'victim' "
            "FROM generate_series(1, %s) g",
            (planted,),
        )
        for i in range(5):
            conn.execute("SELECT relay.enqueue(%s, 'email', '{\"n\": 1}'::jsonb)", (f"free-{i}",))
        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('claimer', 1)")
        conn.commit()
    assert support.read_intake(url) == planted + 6

    visited, claimed = _claim_scan(url, "claimer")
    with psycopg.connect(url) as conn:
        free = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM relay.effect WHERE operation_key LIKE 'free-%%' ORDER BY id"
            )
        ]
    assert claimed == free
    assert visited <= len(free) + 5, f"the claim visited {visited} effects for {len(free)}"

    # The head comes due and settles: only the next one goes, each time.
    def claimable() -> list[str]:
        with psycopg.connect(url) as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    "SELECT operation_key FROM relay.effect WHERE ordering_group = 'victim' "
                    "AND state = 'PENDING' AND NOT behind_head ORDER BY id"
                )
            ]

    assert claimable() == ["head"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE relay.effect SET available_at = now() WHERE operation_key = 'head'")
    _, claimed = _claim_scan(url, "claimer")
    with psycopg.connect(url, autocommit=True) as conn:
        head = conn.execute("SELECT id FROM relay.effect WHERE operation_key = 'head'").fetchone()
        assert head is not None and int(head[0]) in claimed
        conn.execute("UPDATE relay.effect SET state = 'PUBLISHED' WHERE operation_key = 'head'")
    assert claimable() == ["behind-1"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE relay.effect SET state = 'CANCELLED' WHERE operation_key = 'behind-2'")
        conn.execute("UPDATE relay.effect SET state = 'PUBLISHED' WHERE operation_key = 'behind-1'")
    assert claimable() == ["behind-3"], "a cancelled effect is skipped, the next one goes"


def test_a_group_holds_at_most_max_pending_per_group_intents(settings: Settings) -> None:
    """Issue 18, item 7: an operator bounds how many intents one group may hold not yet
    published; the next is refused with GroupFullError and nothing written, other groups go on,
    and the group takes more once its head is published."""
    url = settings.require_database_url()
    support.prepare_database(settings.model_copy(update={"max_pending_per_group": 3}))
    with psycopg.connect(url) as conn:
        for i in range(3):
            relay.enqueue(conn, "email", f"full-{i}", {"n": i}, ordering_group="full")
        conn.commit()
        with pytest.raises(relay.GroupFullError, match="max_pending_per_group") as refused:
            relay.enqueue(conn, "email", "full-3", {"n": 3}, ordering_group="full")
        assert "'full'" in str(refused.value)
        conn.rollback()
        relay.enqueue(conn, "email", "other-0", {"n": 0}, ordering_group="other")
        conn.commit()
    # Read by the relay: the count goes on, now over effect rows.
    assert support.read_intake(url) == 4
    with psycopg.connect(url) as conn:
        with pytest.raises(relay.GroupFullError):
            relay.enqueue(conn, "email", "full-3", {"n": 3}, ordering_group="full")
        conn.rollback()
        assert relay.get_effect(conn, "full-3") is None
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE relay.effect SET state = 'PUBLISHED' WHERE operation_key = 'full-0'")
    with psycopg.connect(url) as conn:
        done = relay.enqueue(conn, "email", "full-3", {"n": 3}, ordering_group="full")
        conn.commit()
        assert done.created
        # A duplicate of a held intent is answered, not refused, even when the group is full.
        again = relay.enqueue(conn, "email", "full-1", {"n": 1}, ordering_group="full")
        assert not again.created


def test_a_groups_purged_intents_no_longer_count_against_its_cap(settings: Settings) -> None:
    """A group's intents purged past retention keep their keys in the intake for the dedupe
    window, but they were published: they count no more against max_pending_per_group. Before,
    a group whose effects were all purged counted its emptied rows as not yet published and
    refused every new intent until the dedupe window ended."""
    from relay.errors import OperationKeyConflictError
    from relay.reconciler.purge import purge

    url = settings.require_database_url()
    capped = settings.model_copy(update={"max_pending_per_group": 3, "status_events": False})
    support.prepare_database(capped)
    with psycopg.connect(url) as conn:
        for i in range(3):
            relay.enqueue(conn, "email", f"kept-{i}", {"n": i}, ordering_group="kept")
        conn.commit()
    assert support.read_intake(url) == 3
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE relay.effect SET state = 'PUBLISHED' WHERE ordering_group = 'kept'")
        removed, *_ = purge(conn, capped, retention_s=0.0)
        assert removed == 3
        assert conn.execute(
            "SELECT count(*) FROM relay.intake WHERE ordering_group = 'kept'"
        ).fetchone() == (3,)
    with psycopg.connect(url) as conn:
        done = relay.enqueue(conn, "email", "kept-3", {"n": 3}, ordering_group="kept")
        conn.commit()
        assert done.created
        with pytest.raises(OperationKeyConflictError, match="purged"):
            relay.enqueue(conn, "email", "kept-0", {"n": 0}, ordering_group="kept")


def test_a_head_that_is_not_due_is_named_as_the_reason_its_group_waits(
    settings: Settings,
) -> None:
    """Issue 18, item 2: a head scheduled far ahead holds its group back; `relay list` names it
    with its due time beside the effects behind it, and `relay unblock` says what the group
    waits on (before: "not parked", and nothing in the list)."""
    from relay.inspection import list_effects
    from relay.reconciler.unblock import unblock

    url = settings.require_database_url()
    far = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "email", "far-head", {"n": 0}, available_at=far, ordering_group="later")
        relay.enqueue(conn, "email", "later-1", {"n": 1}, ordering_group="later")
        relay.enqueue(conn, "email", "later-2", {"n": 2}, ordering_group="later")
        conn.commit()
    assert support.read_intake(url) == 3
    with psycopg.connect(url) as conn:
        listed = {r["operation_key"]: r for r in list_effects(conn, group="later")}
        assert listed["later-1"]["reason"] == (
            "waits behind far-head (PENDING, due 2100-01-01T00:00:00Z) in group later"
        )
        assert listed["later-2"]["reason"] == "waits behind later-1 (PENDING) in group later"
        assert listed["far-head"]["reason"] is None
        with pytest.raises(relay.EffectNotFoundError) as told:
            unblock(conn, "later", skip=None, reason="why", actor="operator:test")
    text = str(told.value)
    assert "2 effect(s) wait behind its head 'far-head'" in text
    assert "2100-01-01" in text and "relay cancel far-head" in text

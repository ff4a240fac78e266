"""The role split on the real PostgreSQL: the application role cannot write any table, and the
relay and reconciler roles do their whole job with the rights they are given."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.errors import ConfigError
from relay.roles import apply, role_names
from tests import support
from tests.downstream import harness as h

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-11-22"}


@pytest.fixture
def logins(rsettings: Settings, prefix: str) -> Iterator[dict[str, str]]:
    """A login of each kind (roles are cluster-wide: named after this test, dropped after)."""
    url = rsettings.require_database_url()
    role_prefix = f"{prefix.lower()}_"
    with psycopg.connect(url, autocommit=True) as conn:
        names = apply(conn, role_prefix)
        for role in names.values():
            conn.execute(f'CREATE ROLE "{role}_login" LOGIN IN ROLE "{role}"')
    try:
        yield {kind: make_conninfo(url, user=f"{role}_login") for kind, role in names.items()}
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for role in names.values():
                for name in (f"{role}_login", role):
                    conn.execute(f'DROP OWNED BY "{name}"')
                    conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
def rsettings(database_url: str, services: Services, prefix: str) -> Settings:
    return h.reconciler_settings(database_url, services.kafka_bootstrap_servers, prefix)


def test_the_application_role_only_enqueues_cancels_and_reads(logins: dict[str, str]) -> None:
    with psycopg.connect(logins["application"], autocommit=True) as app:
        made = relay.enqueue(app, "wire", "app-1", WIRE)
        relay.enqueue(app, "wire", "app-2", {**WIRE, "amount": 2})
        relay.cancel(app, "app-2")
        effect = relay.get_effect(app, "app-1")
        assert made.created and effect is not None and effect.state.value == "PENDING"
        refused = [
            "INSERT INTO relay.effect (operation_key, effect_type, topic, payload)"
            " VALUES ('forged', 'wire', 'anywhere', '{}')",
            "UPDATE relay.effect SET state = 'CONFIRMED', external_id = 'made-up'",
            "DELETE FROM relay.effect",
            "INSERT INTO relay.transition (effect_id, to_state, reason, actor, attempt)"
            f" VALUES ({made.effect_id}, 'CONFIRMED', 'forged', 'app', 1)",
            "INSERT INTO relay.evidence (kind, verdict, actor) VALUES ('result', 'applied', 'x')",
            "INSERT INTO relay.attempt (effect_id, attempt, replica_id, replica_epoch)"
            f" VALUES ({made.effect_id}, 9, 'x', 1)",
            "UPDATE relay.effect_type SET topic = 'elsewhere'",
            "UPDATE relay.reconciler_config SET status_events = false",
            "UPDATE relay.doorbell SET armed_until = now() + interval '1 day'",
            "UPDATE relay.status_publisher SET inflight = '{}'",
            f"SELECT * FROM relay.enqueue_compensation({made.effect_id}, 0, 'wire', '{{}}',"
            " 'forged', 'app')",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(statement)


def test_the_relay_and_reconciler_roles_do_their_whole_job(
    rsettings: Settings, logins: dict[str, str], services: Services, prefix: str
) -> None:
    as_relay = rsettings.model_copy(update={"database_url": logins["relay"]})
    as_reconciler = rsettings.model_copy(update={"database_url": logins["reconciler"]})
    url = rsettings.require_database_url()
    with psycopg.connect(logins["application"], autocommit=True) as app:
        relay.enqueue(app, "wire", "job-1", WIRE)
    with support.running(Relay(as_relay)), h.running_reconciler(as_reconciler):
        support.wait_for(lambda: h.state(url, "job-1") == "PUBLISHED", 60, "publication")
        h.produce(
            services.kafka_bootstrap_servers,
            f"{prefix}.wire-results",
            [h.result("job-1", external_id="bank-1")],
        )
        support.wait_for(lambda: h.state(url, "job-1") == "CONFIRMED", 60, "confirmation")
        support.wait_for(lambda: support.status_backlog(url) == 0, 60, "status events sent")
    forged = "INSERT INTO relay.evidence (kind, verdict, actor) VALUES ('x', 'y', 'z')"
    with (
        psycopg.connect(logins["relay"], autocommit=True) as daemon,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        daemon.execute(forged)
    records = support.read_topic(services.kafka_bootstrap_servers, rsettings.status_topic, 4)
    assert [json.loads(r.value)["state"] for r in records] == [
        "PENDING",
        "DISPATCHING",
        "PUBLISHED",
        "CONFIRMED",
    ]


def test_role_prefixes_are_checked(rsettings: Settings) -> None:
    assert role_names("app_")["application"] == "app_application"
    for bad in ("Relay", "x; DROP", "a" * 50, ""):
        with pytest.raises(ConfigError):
            role_names(bad)


# --- Every documented command under exactly its role (issue 18, item 6) ----------------------


@pytest.fixture
def owner_setup(services: Services, prefix: str) -> Iterator[dict[str, str]]:
    """A fresh database whose relay schema belongs to a plain login (no superuser, no
    CREATEROLE), the four roles created beforehand by an administrator (without any grant), and
    a login of each kind. Returns the URL of each login, ``owner`` included."""
    server = services.database_url
    url = support.create_database(server)
    role_prefix = f"{prefix.lower()}_"
    names = role_names(role_prefix)
    owner = f"{role_prefix}owner"
    dbname = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{owner}" LOGIN NOCREATEROLE NOSUPERUSER')
        conn.execute(f'GRANT CREATE ON DATABASE "{dbname}" TO "{owner}"')
        for role in names.values():
            conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
            conn.execute(f'CREATE ROLE "{role}_login" LOGIN IN ROLE "{role}"')
    try:
        logins = {kind: make_conninfo(url, user=f"{role}_login") for kind, role in names.items()}
        yield {**logins, "owner": make_conninfo(url, user=owner), "prefix": role_prefix}
    finally:
        support.drop_database(url)
        with psycopg.connect(server, autocommit=True) as conn:
            for name in [*(f"{r}_login" for r in names.values()), *names.values(), owner]:
                conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def _settings_as(url: str, services: Services, prefix: str) -> Settings:
    """The reconciler tests' settings (short timers), plus a type whose result never comes in
    time (1 s, and no observer: it ends STUCK), against ``url``; the database is not touched."""
    types = h.wire_types(prefix)
    types["slow"] = {
        "topic": f"{prefix}.slow",
        "idempotent": True,
        "result_topic": f"{prefix}.wire-results",
        "outcome_timeout_s": 1,
    }
    return support.make_settings(
        url,
        services.kafka_bootstrap_servers,
        prefix,
        effect_types=types,
        reconcile_group_id=f"{prefix}-reconciler",
        reconcile_interval_s=0.2,
        observe_backoff_s=0.2,
        observe_backoff_max_s=1.0,
        observe_max_tries=3,
        status_topic=f"{prefix}.status",
        poll_interval_s=0.2,
    )


def _ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, f"{what}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def test_roles_apply_needs_no_createrole_when_the_roles_exist(
    owner_setup: dict[str, str], services: Services, prefix: str, tmp_path: Path
) -> None:
    as_owner = support.write_config(
        tmp_path / "owner.toml", _settings_as(owner_setup["owner"], services, prefix)
    )
    _ok(support.run_cli(as_owner, "migrate"), "migrate as the owner")
    applied = support.run_cli(as_owner, "roles", "--apply", "--prefix", owner_setup["prefix"])
    _ok(applied, "roles --apply as an owner without CREATEROLE")
    assert f"{owner_setup['prefix']}operator" in applied.stdout
    # Applying again changes nothing and still needs nothing more.
    _ok(support.run_cli(as_owner, "roles", "--apply", "--prefix", owner_setup["prefix"]), "again")


def test_a_missing_role_still_needs_createrole(
    owner_setup: dict[str, str], services: Services, prefix: str, tmp_path: Path
) -> None:
    as_owner = support.write_config(
        tmp_path / "owner.toml", _settings_as(owner_setup["owner"], services, prefix)
    )
    _ok(support.run_cli(as_owner, "migrate"), "migrate as the owner")
    refused = support.run_cli(as_owner, "roles", "--apply", "--prefix", f"{prefix.lower()}_x_")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: permission denied"), refused.stderr
    assert "CREATEROLE" in refused.stderr


def test_every_documented_command_runs_under_exactly_its_role(
    owner_setup: dict[str, str], services: Services, prefix: str, tmp_path: Path
) -> None:
    """migrate (owner); run (relay); reconcile (reconciler); purge, resolve, cancel, unblock,
    list, show, stats (operator): each succeeds and does its job under its own login."""
    bootstrap = services.kafka_bootstrap_servers
    as_kind = {
        kind: _settings_as(owner_setup[kind], services, prefix)
        for kind in ("owner", "relay", "reconciler", "operator")
    }
    topics = {s.topic for s in as_kind["owner"].effect_types.values()}
    topics |= {s.result_topic for s in as_kind["owner"].effect_types.values() if s.result_topic}
    h.create_topics(bootstrap, sorted(topics | {as_kind["owner"].status_topic}))
    owner_cfg = support.write_config(tmp_path / "owner.toml", as_kind["owner"])
    operator_cfg = support.write_config(tmp_path / "operator.toml", as_kind["operator"])

    def operator(*args: str) -> str:
        return _ok(support.run_cli(operator_cfg, *args), f"relay {' '.join(args)} as operator")

    assert "applied" in _ok(support.run_cli(owner_cfg, "migrate"), "migrate as the owner")
    _ok(support.run_cli(owner_cfg, "roles", "--apply", "--prefix", owner_setup["prefix"]), "roles")
    url = owner_setup["owner"]  # reading the books as the owner

    with psycopg.connect(owner_setup["application"], autocommit=True) as app:
        relay.enqueue(app, "wire", "done-1", WIRE)
        relay.enqueue(app, "wire", "gone-1", {**WIRE, "amount": 2})
        relay.enqueue(app, "wire", "rej-1", {**WIRE, "amount": 3}, ordering_group="g1")
        relay.enqueue(app, "wire", "late-1", {**WIRE, "amount": 4}, ordering_group="g1")
        relay.enqueue(app, "slow", "slow-1", {"n": 1})
    # cancel: before any relay runs, so gone-1 is still PENDING.
    assert "cancelled: gone-1" in operator("cancel", "gone-1", "--reason", "not wanted")

    with (
        support.running(Relay(as_kind["relay"])),
        h.running_reconciler(as_kind["reconciler"]),
    ):
        published = ("done-1", "rej-1")
        support.wait_for(
            lambda: h.states(url, published) == dict.fromkeys(published, "PUBLISHED"),
            60,
            "publication",
        )
        h.produce(
            bootstrap,
            f"{prefix}.wire-results",
            [h.result("done-1", external_id="bank-1"), h.result("rej-1", outcome="rejected")],
        )
        support.wait_for(lambda: h.state(url, "done-1") == "CONFIRMED", 60, "confirmation")
        support.wait_for(lambda: h.state(url, "rej-1") == "REJECTED", 60, "rejection")
        # No result within 1 s: UNKNOWN, and STUCK at once (no observer): a person decides.
        support.wait_for(lambda: h.state(url, "slow-1") == "STUCK", 60, "slow-1 STUCK")

        listed = operator("list", "--state", "PARKED")
        assert "late-1" in listed
        assert "CONFIRMED" in operator("show", "done-1")
        assert "wire" in operator("stats")
        resolved = operator("resolve", "slow-1", "--reject", "--reason", "never ran")
        assert "slow-1: REJECTED" in resolved
        unblocked = operator("unblock", "g1", "--reason", "bad account")
        assert "released from rej-1" in unblocked
        support.wait_for(lambda: h.state(url, "late-1") == "PUBLISHED", 60, "late-1 published")
        support.wait_for(lambda: support.status_backlog(url) == 0, 60, "status events sent")

    removed = operator("purge", "--older-than", "0s")
    assert "removed" in removed
    left = {key: h.state(url, key) for key in ("done-1", "gone-1", "slow-1", "rej-1", "late-1")}
    # Finished effects are gone (None), with their attempts, transitions and evidence; the one
    # awaiting its result stays.
    assert left == {
        "done-1": None,
        "gone-1": None,
        "slow-1": None,
        "rej-1": None,
        "late-1": "PUBLISHED",
    }, removed
    with psycopg.connect(url) as conn:
        kept = conn.execute(
            "SELECT (SELECT count(*) FROM relay.attempt), (SELECT count(*) FROM relay.evidence),"
            " (SELECT count(*) FROM relay.purged_key)"
        ).fetchone()
    assert kept is not None and kept[2] == 4


def test_evidence_is_append_only_for_every_role_but_the_owner(
    owner_setup: dict[str, str], services: Services, prefix: str, tmp_path: Path
) -> None:
    as_owner = support.write_config(
        tmp_path / "owner.toml", _settings_as(owner_setup["owner"], services, prefix)
    )
    _ok(support.run_cli(as_owner, "migrate"), "migrate")
    _ok(support.run_cli(as_owner, "roles", "--apply", "--prefix", owner_setup["prefix"]), "roles")
    with psycopg.connect(owner_setup["owner"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO relay.evidence (kind, verdict, actor) VALUES ('result', 'orphaned', 'z')"
        )
    allowed: list[str] = []
    for kind in ("application", "relay", "reconciler", "operator"):
        statements = ["DELETE FROM relay.evidence"]
        if kind != "reconciler":  # it records the verdict of a result it applies
            statements.append("UPDATE relay.evidence SET actor = 'someone else'")
        with psycopg.connect(owner_setup[kind], autocommit=True) as conn:
            for statement in statements:
                try:
                    conn.execute(statement)
                    allowed.append(f"{kind}: {statement}")
                except psycopg.errors.InsufficientPrivilege:
                    pass
    assert allowed == [], "evidence is not append-only"
    # The purge's functions: the operator's (and the owner's) only.
    for kind in ("application", "relay", "reconciler"):
        for function in ("purge_batch", "purge_refused_intake"):
            with (
                psycopg.connect(owner_setup[kind], autocommit=True) as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                conn.execute(f"SELECT * FROM relay.{function}(0, 10)")
    with psycopg.connect(owner_setup["operator"], autocommit=True) as conn:
        assert conn.execute("SELECT * FROM relay.purge_batch(0, 10)").fetchall() == []
        assert conn.execute("SELECT * FROM relay.purge_refused_intake(0, 10)").fetchall() == []


def test_the_operator_role_may_write_the_console_audit(logins: dict[str, str]) -> None:
    """`relay console` runs as an operator login and audits every decision; nobody rewrites it."""
    row = (
        "INSERT INTO relay.console_audit (actor, auth, access, action, outcome)"
        " VALUES ('alice', 'login', 'operator', 'resolve', 'applied')"
    )
    with psycopg.connect(logins["operator"], autocommit=True) as op:
        op.execute(row)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            op.execute("DELETE FROM relay.console_audit")
    with (
        psycopg.connect(logins["application"], autocommit=True) as app,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        app.execute(row)


def test_the_viewer_role_reads_what_the_console_shows_and_writes_nothing(
    logins: dict[str, str], rsettings: Settings
) -> None:
    """The console's viewers log in as <prefix>viewer: every query of their pages runs, and no
    write of any kind does, not even through the console's own decision code."""
    from relay.console import queries
    from relay.console.auth import Identity
    from relay.console.decisions import Seen, apply

    with psycopg.connect(logins["application"], autocommit=True) as app:
        made = relay.enqueue(app, "wire", "viewer-1", WIRE)
    support.read_intake(rsettings.require_database_url())
    with psycopg.connect(logins["viewer"], autocommit=True) as viewer:
        data = queries.overview(viewer)
        assert [r["state"] for r in data["stats"]] == ["PENDING"]
        rows, _ = queries.page(viewer, "console_effects", queries.Filters(), 10)
        assert [r["operation_key"] for r in rows] == ["viewer-1"]
        queries.page(viewer, "console_parked_groups", queries.Filters(), 10)
        found = queries.story(viewer, "viewer-1")
        assert found is not None and found["schedule"]["state"] == "PENDING"
        queries.audit_page(viewer, None, None, 10)
        refused = [
            "UPDATE relay.effect SET state = 'CANCELLED'",
            "DELETE FROM relay.effect",
            "INSERT INTO relay.evidence (kind, verdict, actor) VALUES ('operator', 'x', 'v')",
            "INSERT INTO relay.transition (effect_id, to_state, reason, actor, attempt)"
            f" VALUES ({made.effect_id}, 'CANCELLED', 'forged', 'v', 0)",
            "INSERT INTO relay.console_audit (actor, auth, access, action, outcome)"
            " VALUES ('v', 'login', 'operator', 'confirm', 'applied')",
            "SELECT relay.cancel('viewer-1', 'forged', 'v')",
            "SELECT * FROM relay.intake",
            "SELECT * FROM relay.replica",
            "SELECT * FROM relay.purge_batch(0, 10)",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                viewer.execute(statement)
        # A forged decision that got past the console's own checks still changes nothing: the
        # viewer's login may not, and its refusal is audited through the operator's login.
        with psycopg.connect(logins["operator"], autocommit=True) as operator:
            effect = viewer.execute(
                "SELECT updated_at FROM relay.effect WHERE operation_key = 'viewer-1'"
            ).fetchone()
            assert effect is not None
            outcome = apply(
                viewer,
                rsettings,
                Identity("victor", "viewer", "login", "n"),
                "127.0.0.1",
                "viewer-1",
                "cancel",
                Seen("PENDING", effect[0].isoformat(), 0),
                "forged",
                audit_conn=operator,
            )
            assert not outcome.applied
            assert "may not do this" in outcome.message
            audit = operator.execute(
                "SELECT actor, outcome, db_role FROM relay.console_audit"
                " WHERE operation_key = 'viewer-1'"
            ).fetchall()
    assert audit == [("victor", "refused", f"{role_names(_prefix_of(logins))['operator']}_login")]
    with psycopg.connect(logins["operator"]) as conn:
        state = conn.execute(
            "SELECT state FROM relay.effect WHERE operation_key = 'viewer-1'"
        ).fetchone()
    assert state == ("PENDING",)


def _prefix_of(logins: dict[str, str]) -> str:
    user = str(conninfo_to_dict(logins["viewer"])["user"])
    assert user.endswith("viewer_login")
    return user[: -len("viewer_login")]

"""The role split on the real PostgreSQL: the application role cannot write any table, and the
relay and reconciler roles do their whole job with the rights they are given."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

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

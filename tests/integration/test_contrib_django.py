"""relay.contrib.django with Django's postgresql backend (psycopg 3) on the real PostgreSQL."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import relay
from relay.devtools.services import Services
from relay.states import EffectState
from tests import contrib, support
from tests.contrib import TRACEPARENT, WIRE


@pytest.fixture(scope="module")
def django_db(services: Services) -> Iterator[tuple[str, str, str]]:
    """A fresh, unmigrated database, Django set up on it, then ``manage.py relay_migrate``;
    yields the database URL, the topic prefix and what the command printed."""
    import django
    from django.core.management import call_command
    from django.db import connections

    url = support.create_database(services.database_url)
    prefix = support.unique("dj")
    saved = {k: os.environ.get(k) for k in ("CONTRIB_DJANGO_DATABASE", "CONTRIB_DJANGO_PREFIX")}
    os.environ["CONTRIB_DJANGO_DATABASE"] = url
    os.environ["CONTRIB_DJANGO_PREFIX"] = prefix
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.integration.django_settings"
    django.setup()
    out = io.StringIO()
    call_command("relay_migrate", stdout=out)
    try:
        yield url, prefix, out.getvalue()
    finally:
        connections.close_all()
        support.drop_database(url)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_relay_migrate_creates_the_schema_and_the_types_from_settings(
    django_db: tuple[str, str, str],
) -> None:
    from django.core.management import call_command

    url, prefix, printed = django_db
    assert "relay migrations applied: 0001_" in printed
    assert "effect types synced: 2 of 2" in printed
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT name, topic FROM relay.effect_type ORDER BY name").fetchall()
    assert rows == [("email", f"{prefix}.emails"), ("wire", f"{prefix}.wires")]
    again = io.StringIO()
    call_command("relay_migrate", stdout=again)
    assert "none (up to date)" in again.getvalue()


def test_effect_types_from_the_toml_file(django_db: tuple[str, str, str], tmp_path: Path) -> None:
    from django.test import override_settings

    from relay.contrib.django.conf import relay_settings

    toml = tmp_path / "relay.toml"
    toml.write_text('[effect_types.sms]\ntopic = "app.sms"\nidempotent = true\n', encoding="utf-8")
    with override_settings(RELAY={"CONFIG": str(toml)}):
        assert sorted(relay_settings().effect_types) == ["sms"]
    absent = override_settings(RELAY={"CONFIG": str(tmp_path / "absent.toml")})
    with absent, pytest.raises(relay.ConfigError, match="does not exist"):
        relay_settings()


def test_commit_rollback_and_errors_inside_atomic(django_db: tuple[str, str, str]) -> None:
    from django.db import transaction

    from relay.contrib import django as rdj

    url = django_db[0]
    with transaction.atomic():
        made = rdj.enqueue("wire", "dj-1", WIRE, traceparent=TRACEPARENT)
        assert made.created and made.state is EffectState.PENDING
        with pytest.raises(relay.InvalidIntentError, match="JSON object"):
            rdj.enqueue("email", "dj-bad", "not a mapping")  # type: ignore[arg-type]
        with pytest.raises(relay.InvalidIntentError, match="traceparent"):
            rdj.enqueue_many(
                [relay.Intent("email", "dj-m-0", {}), relay.Intent("email", "x", {}, None, "00-")]
            )
        many = rdj.enqueue_many([relay.Intent("email", f"dj-m-{i}", {"i": i}) for i in range(3)])
        assert [m.created for m in many] == [True, True, True]
        # A refusal by the database inside a nested atomic() leaves the outer one usable.
        with pytest.raises(relay.UnknownEffectTypeError, match="fax"), transaction.atomic():
            rdj.enqueue("fax", "dj-fax", {})
        rdj.enqueue("email", "dj-after", {})
        assert contrib.effect(url, "dj-1") is None  # not committed yet
    found = contrib.effect(url, "dj-1")
    assert found is not None and found.payload == WIRE and found.traceparent == TRACEPARENT
    assert contrib.effect(url, "dj-after") is not None
    assert contrib.effect(url, "dj-fax") is None

    with pytest.raises(RuntimeError), transaction.atomic():
        rdj.enqueue("email", "dj-gone", {})
        raise RuntimeError("roll back")
    assert contrib.effect(url, "dj-gone") is None

    with pytest.raises(relay.OperationKeyConflictError), transaction.atomic():
        rdj.enqueue("wire", "dj-1", {**WIRE, "amount": 1})
    with pytest.raises(relay.InvalidIntentError, match="date"), transaction.atomic():
        rdj.enqueue("wire", "dj-no-date", {"account": "A", "amount": 1})
    assert contrib.count_effects(url) == 5


def test_a_committed_intent_reaches_kafka(
    django_db: tuple[str, str, str], services: Services
) -> None:
    from django.db import transaction

    from relay.contrib import django as rdj

    url, prefix, _ = django_db
    with transaction.atomic():
        payload = {"to": "ada@example.org", "key": "dj-kafka"}
        rdj.enqueue("email", "dj-kafka", payload, traceparent=TRACEPARENT)
    settings = support.make_settings(url, services.kafka_bootstrap_servers, prefix)
    contrib.assert_reaches_kafka(settings, services.kafka_bootstrap_servers, prefix, "dj-kafka")

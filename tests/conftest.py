"""Fixtures: one real PostgreSQL and one real Kafka broker per test session, a fresh database and
unique topic names per test. RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS point the suite at
existing servers instead."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from relay.config import Settings
from tests import support

if TYPE_CHECKING:
    from relay.devtools.services import Services


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    from relay.devtools.services import local_services

    with local_services() as running:
        yield running


@pytest.fixture
def database_url(services: Services) -> Iterator[str]:
    url = support.create_database(services.database_url)
    yield url
    support.drop_database(url)


@pytest.fixture
def prefix() -> str:
    return support.unique("t")


@pytest.fixture
def settings(database_url: str, services: Services, prefix: str) -> Settings:
    """Settings for this test, with the schema migrated and the effect types synced."""
    made = support.make_settings(database_url, services.kafka_bootstrap_servers, prefix)
    support.prepare_database(made)
    return made

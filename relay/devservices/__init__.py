"""Throwaway local PostgreSQL and Kafka servers for the demo, the tests and the benchmarks.

``RELAY_DATABASE_URL`` and ``RELAY_KAFKA_BOOTSTRAP_SERVERS`` point at existing servers instead:
each one set means that server is used as it is and not started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from relay.devservices.common import DevServicesError
from relay.devservices.kafka import LocalKafka
from relay.devservices.postgres import LocalPostgres

__all__ = ["DevServicesError", "LocalKafka", "LocalPostgres", "Services", "local_services"]


@dataclass(frozen=True)
class Services:
    database_url: str
    kafka_bootstrap_servers: str


@contextmanager
def local_services(*, fsync: bool = False) -> Iterator[Services]:
    """Both servers, started side by side (the broker takes seconds), stopped on exit."""
    database_url = os.environ.get("RELAY_DATABASE_URL") or None
    bootstrap = os.environ.get("RELAY_KAFKA_BOOTSTRAP_SERVERS") or None
    with ExitStack() as stack:
        postgres = None if database_url else LocalPostgres(fsync=fsync)
        kafka = None if bootstrap else LocalKafka()
        if postgres is not None:
            stack.callback(postgres.stop)
        if kafka is not None:
            stack.callback(kafka.stop)
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(server.start) for server in (postgres, kafka) if server]
            for future in futures:
                future.result()
        yield Services(
            database_url=database_url or (postgres.url if postgres else ""),
            kafka_bootstrap_servers=bootstrap or (kafka.bootstrap_servers if kafka else ""),
        )

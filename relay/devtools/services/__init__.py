"""Throwaway local PostgreSQL and Kafka servers for the demo, the tests and the benchmarks.

Real servers rather than fakes: the relay's guarantees hinge on how PostgreSQL and the Kafka broker
really behave (transactions, acks, timeouts). ``RELAY_DATABASE_URL`` and
``RELAY_KAFKA_BOOTSTRAP_SERVERS`` point at existing servers instead: each one set means that server
is used as it is and not started.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class DevServicesError(RuntimeError):
    """A local server could not be started; the message says what is missing or what failed.

    Local to the dev services on purpose: they are tooling, not part of the relay's error API.
    """


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the kernel calls free now (bind to port 0).

    The sockets are held until all are picked so one call never repeats a port, and ports handed
    out earlier in this process are skipped so servers started side by side never share one.
    """
    with _ports_lock:
        sockets: list[socket.socket] = []
        ports: list[int] = []
        try:
            while len(ports) < count:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
                if port not in _ports_given:
                    ports.append(port)
        finally:
            for sock in sockets:
                sock.close()
        _ports_given.update(ports)
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One free loopback port (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a server log, for error messages that explain a failed start."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


_live_lock = threading.Lock()
_live: dict[int, Callable[[], None]] = {}
_atexit_registered = False


def track(owner: object, stop: Callable[[], None]) -> None:
    """Remember a running server so it is stopped at interpreter exit if its owner forgot."""
    global _atexit_registered
    with _live_lock:
        _live[id(owner)] = stop
        if not _atexit_registered:
            atexit.register(_stop_leftovers)
            _atexit_registered = True


def untrack(owner: object) -> None:
    with _live_lock:
        _live.pop(id(owner), None)


def _stop_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live.values())
        _live.clear()
    for stop in reversed(leftovers):
        try:
            stop()
        except Exception:  # at exit, stopping the others matters more than one error
            log.exception("stopping a leftover local server failed")


# The servers import the helpers above from this package, so they come after them.
from relay.devtools.services.kafka import KafkaCluster, LocalKafka  # noqa: E402
from relay.devtools.services.postgres import LocalPostgres  # noqa: E402

__all__ = [
    "DevServicesError",
    "KafkaCluster",
    "LocalKafka",
    "LocalPostgres",
    "Services",
    "local_services",
]


@dataclass(frozen=True)
class Services:
    """Where the servers are: a libpq URL and a Kafka bootstrap list."""

    database_url: str
    kafka_bootstrap_servers: str
    # The broker this process started, if any (the demo freezes it to show an UNKNOWN publish).
    local_kafka: LocalKafka | None = field(default=None, compare=False, repr=False)


@contextmanager
def local_services(*, fsync: bool = False) -> Iterator[Services]:
    """PostgreSQL and Kafka, started side by side (the broker takes seconds), stopped on exit.

    ``fsync`` defaults to off: throwaway data need no durability and tests run faster; the demo
    turns it on for realistic timings. A server named by ``RELAY_DATABASE_URL`` or
    ``RELAY_KAFKA_BOOTSTRAP_SERVERS`` is used instead of starting one. Whatever fails, every server
    that was started is stopped before this returns or raises.
    """
    database_url = os.environ.get("RELAY_DATABASE_URL") or None
    bootstrap = os.environ.get("RELAY_KAFKA_BOOTSTRAP_SERVERS") or None
    postgres = None if database_url else LocalPostgres(fsync=fsync)
    kafka = None if bootstrap else LocalKafka()
    with ExitStack() as stack:
        starts: list[Callable[[], None]] = []
        if postgres is not None:
            stack.callback(postgres.stop)
            starts.append(postgres.start)
        if kafka is not None:
            stack.callback(kafka.stop)
            starts.append(kafka.start)
        if starts:
            # Leaving the pool waits for both starts, so a failed one never strands the other.
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="devservices") as pool:
                futures = [pool.submit(start) for start in starts]
                for future in futures:
                    future.result()
        yield Services(
            database_url=database_url or (postgres.url if postgres else ""),
            kafka_bootstrap_servers=bootstrap or (kafka.bootstrap_servers if kafka else ""),
            local_kafka=kafka,
        )

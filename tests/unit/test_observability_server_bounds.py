"""The endpoints' server under idle and abusive clients: a bounded number of threads, idle
connections closed, loopback unless configured (issue 11, item 5)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from relay.config import Settings
from relay.observability.server import ObservabilityServer
from tests import support


@pytest.fixture
def server() -> Iterator[ObservabilityServer]:
    made = ObservabilityServer(
        "127.0.0.1", 0, [], {"always": lambda: None}, max_connections=4, read_timeout_s=0.5
    ).start()
    try:
        yield made
    finally:
        made.stop()


def _server_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def test_idle_connections_do_not_grow_the_threads() -> None:
    server = ObservabilityServer(
        "127.0.0.1", 0, [], {}, max_connections=4, read_timeout_s=60
    ).start()
    before = _server_threads()
    idle = [socket.create_connection(server.address) for _ in range(200)]
    try:
        support.wait_for(lambda: server.refused == 196, 30, "connections past the cap refused")
        # Four slots: four threads hold the idle connections, not two hundred.
        assert _server_threads() - before == 4
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_an_idle_connection_is_closed_and_the_server_answers_again(
    server: ObservabilityServer,
) -> None:
    idle = [socket.create_connection(server.address) for _ in range(4)]
    try:
        for sock in idle:
            sock.settimeout(10)
            # The server closes a connection that sends nothing: the read ends with EOF.
            assert sock.recv(1) == b""
        status, body = support.http_get(f"http://127.0.0.1:{server.address[1]}/readyz")
        assert (status, body) == (200, "ready\nalways: ok\n")
    finally:
        for sock in idle:
            sock.close()


def test_endpoints_listen_on_loopback_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_METRICS_HOST", raising=False)
    assert Settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("RELAY_METRICS_HOST", "0.0.0.0")
    assert Settings().metrics_host == "0.0.0.0"

"""The endpoints' server under idle and abusive clients: a bounded number of threads, idle
connections closed, loopback unless configured (issue 11, item 5); slow and oversized requests
cannot hold the endpoints shut or grow the process, and what was refused is counted (issue 18,
item 5). Real servers on loopback, real sockets."""

from __future__ import annotations

import contextlib
import gc
import select
import socket
import threading
import time
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


def _get(address: tuple[str, int], path: str, timeout: float = 10.0) -> tuple[int, str]:
    """Status and body of a one-shot GET on a fresh connection; status 0 when the server closed
    or reset the connection without an answer."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body.decode()
    except (IndexError, ValueError):
        return 0, ""


class _Tricklers:
    """``count`` connections that each send one byte of a never-ending request every
    ``interval`` seconds, and connect again when the server closes them: a slow-client flood
    that keeps its pressure up."""

    def __init__(self, address: tuple[str, int], count: int, interval: float) -> None:
        self._address = address
        self._interval = interval
        self._socks: list[socket.socket | None] = [None] * count
        self._stop = threading.Event()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="tricklers", daemon=True)

    def __enter__(self) -> _Tricklers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self._socks:
            if sock is not None:
                sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, sock in enumerate(self._socks):
                if sock is None or not self._trickle(sock):
                    if sock is not None:
                        sock.close()
                        self.reconnects += 1
                    self._socks[i] = self._connect()
            self._stop.wait(self._interval)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(self._address, timeout=2)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            return sock
        except OSError:
            return None

    @staticmethod
    def _trickle(sock: socket.socket) -> bool:
        """One more byte; False when the server has closed the connection."""
        try:
            if select.select([sock], [], [], 0)[0] and not sock.recv(65536):
                return False
            sock.sendall(b"a")
            return True
        except OSError:
            return False


def test_probes_answer_while_slow_clients_flood_the_slots() -> None:
    """40 connections trickling a byte a second (more than the 32 slots, reconnecting when
    closed): /healthz from a fresh client still answers, quickly, again and again for 10 s."""
    server = ObservabilityServer("127.0.0.1", 0, [], {}).start()
    try:
        with _Tricklers(server.address, 40, 1.0):
            time.sleep(1.5)  # every slot taken, and the rest of the flood knocking
            end = time.monotonic() + 10
            answers: list[tuple[int, float]] = []
            while time.monotonic() < end:
                started = time.monotonic()
                status, _ = _get(server.address, "/healthz", timeout=10)
                answers.append((status, round(time.monotonic() - started, 2)))
                time.sleep(0.5)
        assert len(answers) >= 5
        assert all(status == 200 for status, _ in answers), answers
        assert all(took < 4 for _, took in answers), answers
    finally:
        server.stop()


def _vm_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _send_huge(address: tuple[str, int], request: bytes) -> int:
    """Send ``request`` and return the answer's status (0: closed or reset without one)."""
    try:
        sock = socket.create_connection(address, timeout=20)
    except OSError:
        return 0
    with sock:
        # The server may stop reading and close (what we want) and still have answered.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def test_huge_headers_are_refused_without_growing_the_process() -> None:
    """99 headers of 65 kB each (within the standard library's own line and count limits: 100
    with the blank line), on a few connections at once: refused, and the RSS barely moves."""
    server = ObservabilityServer("127.0.0.1", 0, [], {}).start()
    huge = (
        b"GET /healthz HTTP/1.0\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 65_000) for i in range(99))
        + b"\r\n"
    )
    try:
        gc.collect()
        before = _vm_rss_kib()
        peak = before
        statuses: list[int] = []

        def send() -> None:
            statuses.append(_send_huge(server.address, huge))

        senders = [threading.Thread(target=send) for _ in range(6)]
        for sender in senders:
            sender.start()
        while any(sender.is_alive() for sender in senders):
            peak = max(peak, _vm_rss_kib())
            time.sleep(0.01)
        time.sleep(0.2)  # the server's threads finish their connections
        peak = max(peak, _vm_rss_kib())
        grown_mib = (peak - before) / 1024
        assert grown_mib < 20, f"RSS grew by {grown_mib:.1f} MiB; answers {statuses}"
        assert statuses and all(status in (0, 431) for status in statuses), statuses
        # The server still answers afterwards.
        assert _get(server.address, "/healthz")[0] == 200
    finally:
        server.stop()


def test_a_trickling_request_is_closed_at_the_total_deadline() -> None:
    """One byte every 0.5 s, well within the per-read timeout (5 s): the connection is still
    closed, because the whole request must arrive within the total deadline (5 s)."""
    server = ObservabilityServer("127.0.0.1", 0, [], {}).start()
    sock = socket.create_connection(server.address, timeout=2)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        closed_after: float | None = None
        while time.monotonic() - started < 12:
            if not _Tricklers._trickle(sock):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.5)
        assert closed_after is not None, "a trickling request held its connection for 12 s"
        assert closed_after >= 2, f"closed after {closed_after:.1f}s, before any deadline"
    finally:
        sock.close()
        server.stop()


def _refused_counts(address: tuple[str, int]) -> dict[str, float]:
    status, body = _get(address, "/metrics")
    assert status == 200
    counts: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("relay_http_connections_refused_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    assert counts, "no relay_http_connections_refused_total in /metrics:\n" + body
    return counts


def test_refused_connections_are_counted_in_the_metrics() -> None:
    """Connections that lost or never got a slot, requests too large and requests too slow are
    each counted, and exported by the server's own /metrics."""
    server = ObservabilityServer(
        "127.0.0.1", 0, [], {}, max_connections=4, read_timeout_s=60
    ).start()
    idle = [socket.create_connection(server.address) for _ in range(10)]
    try:
        support.wait_for(lambda: server.refused >= 6, 10, "connections past the cap refused")
        big = b"GET /healthz HTTP/1.0\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
        assert _send_huge(server.address, big) in (0, 431)
        counts = _refused_counts(server.address)
        # The scrape itself may take the slot of an idle connection: 6 or more.
        assert counts.get("full", 0) + counts.get("evicted", 0) >= 6, counts
        assert counts.get("too_large") == 1, counts
        # The idle connections still held reach the total deadline (5 s) and are counted too.
        support.wait_for(
            lambda: _refused_counts(server.address).get("deadline", 0) >= 1,
            12,
            "a connection closed at the deadline counted",
        )
    finally:
        for sock in idle:
            sock.close()
        server.stop()

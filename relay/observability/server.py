"""The HTTP endpoints every daemon serves: ``/metrics``, ``/healthz`` and ``/readyz``.

A small threaded server of the standard library in a daemon thread: it must keep answering while
the daemon's own loop is busy or waiting out an outage, and it must never touch the daemon's
connections. Each daemon hands in its own readiness checks, so the relay and the reconciler share
this code and differ only in what "ready" means for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from relay.errors import describe
from relay.redaction import escape_controls, redact

log = logging.getLogger(__name__)

# A readiness check returns normally when its dependency is usable, raises when it is not.
Check = Callable[[], None]
MAX_CONNECTIONS = 32
"""Connections served at once; more are closed at accept. Scrapers and probes need a handful."""
READ_TIMEOUT_S = 5.0
"""How long a connection may take to send its request (and to take the answer) before it is
closed: an idle or trickling client must not hold a thread."""


@dataclass(frozen=True)
class Readiness:
    """The outcome of each check. Why a check failed goes to the daemon's log, never to the
    HTTP answer: internal error text (host names, server versions, a mistyped URL) stays in."""

    ready: bool
    results: dict[str, str | None]  # check name -> None when ok, else why not (redacted)

    def text(self) -> str:
        lines = [
            f"{name}: {'ok' if why is None else 'FAILED'}" for name, why in self.results.items()
        ]
        return ("ready" if self.ready else "not ready") + "\n" + "\n".join(lines) + "\n"


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, but at most ``max_connections`` of them: past the cap a new
    connection is closed at once instead of growing the process by a thread."""

    daemon_threads = True
    # A burst of connections waits in the kernel's queue for accept (and the cap) rather than
    # being dropped and retried by the clients seconds later.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or hung up is not the daemon's error: no traceback."""
        log.debug("observability: a client connection failed", exc_info=True)


class _Union(Collector):
    """Several registries/collectors served as one scrape."""

    def __init__(self, parts: Iterable[Any]) -> None:
        self._parts = list(parts)

    def collect(self) -> Iterator[Any]:
        for part in self._parts:
            yield from part.collect()


class ObservabilityServer:
    """Serves the given collectors and readiness checks on ``host:port`` until ``stop()``."""

    def __init__(
        self,
        host: str,
        port: int,
        collectors: Iterable[Any],
        checks: Mapping[str, Check],
        *,
        ready_cache_s: float = 2.0,
        liveness: Mapping[str, Check] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Union(collectors))
        self._checks = dict(checks)
        self._liveness = dict(liveness or {})
        self._ready_cache_s = ready_cache_s
        self._ready_lock = threading.Lock()
        self._ready: Readiness | None = None
        self._ready_at = float("-inf")
        self._httpd = _BoundedServer(
            (host, port), _handler_for(self, read_timeout_s), max_connections
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def refused(self) -> int:
        """Connections closed at accept because every slot was taken."""
        return self._httpd.refused

    def start(self) -> ObservabilityServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="observability-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def readiness(self) -> Readiness:
        """Run every check, at most once per ``ready_cache_s``: probes of several kinds (kubelet,
        load balancer, a person with curl) share one round of connections."""
        with self._ready_lock:
            if self._ready is not None and time.monotonic() - self._ready_at < self._ready_cache_s:
                return self._ready
            results = _run_checks("readiness", self._checks)
            self._ready = Readiness(all(v is None for v in results.values()), results)
            self._ready_at = time.monotonic()
            return self._ready

    def liveness(self) -> Readiness:
        """The daemon's own in-process checks (a worker thread died): cheap, never cached, and
        never about PostgreSQL or Kafka, or an outage would restart every replica for nothing."""
        results = _run_checks("liveness", self._liveness)
        return Readiness(all(v is None for v in results.values()), results)


def _run_checks(kind: str, checks: Mapping[str, Check]) -> dict[str, str | None]:
    """Each check's failure, redacted and on one line (None: passed); failures are logged."""
    results: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with why
            why = escape_controls(redact(describe(exc)).strip())[:500] or type(exc).__name__
            results[name] = why
            log.warning("%s check %s failed: %s", kind, name, why)
    return results


def _handler_for(server: ObservabilityServer, timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # StreamRequestHandler sets this on the socket: a read (or write) that waits longer
        # raises, and the connection, with its thread, ends.
        timeout = timeout_s

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                try:
                    body = encoder(server.registry)
                except Exception:
                    log.exception("metrics: a collector failed")
                    self._send(500, b"a collector failed; see the daemon's log\n")
                    return
                self._send(200, body, content_type)
            elif path == "/healthz":
                # Answering proves the process is alive, unless one of its own threads died;
                # liveness must not depend on PostgreSQL or Kafka (see liveness()).
                alive = server.liveness()
                if alive.ready:
                    self._send(200, b"ok\n")
                else:
                    dead = [f"{n}: FAILED" for n, why in alive.results.items() if why]
                    self._send(503, ("unhealthy\n" + "\n".join(dead) + "\n").encode())
            elif path == "/readyz":
                ready = server.readiness()
                self._send(200 if ready.ready else 503, ready.text().encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(
            self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes every few seconds would drown the daemon's log: say nothing."""

    return Handler

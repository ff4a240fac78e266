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

from relay.logs import redact
from relay.outcomes import describe

log = logging.getLogger(__name__)

# A readiness check returns normally when its dependency is usable, raises when it is not.
Check = Callable[[], None]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    results: dict[str, str | None]  # check name -> None when ok, else why not (redacted)

    def text(self) -> str:
        lines = [
            f"{name}: {'ok' if why is None else 'FAILED: ' + why}"
            for name, why in self.results.items()
        ]
        return ("ready" if self.ready else "not ready") + "\n" + "\n".join(lines) + "\n"


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
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Union(collectors))
        self._checks = dict(checks)
        self._liveness = dict(liveness or {})
        self._ready_cache_s = ready_cache_s
        self._ready_lock = threading.Lock()
        self._ready: Readiness | None = None
        self._ready_at = float("-inf")
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

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
            results: dict[str, str | None] = {}
            for name, check in self._checks.items():
                try:
                    check()
                    results[name] = None
                except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with why
                    results[name] = redact(describe(exc)).splitlines()[0][:500]
            self._ready = Readiness(all(v is None for v in results.values()), results)
            self._ready_at = time.monotonic()
            return self._ready

    def liveness(self) -> Readiness:
        """The daemon's own in-process checks (a worker thread died): cheap, never cached, and
        never about PostgreSQL or Kafka, or an outage would restart every replica for nothing."""
        results: dict[str, str | None] = {}
        for name, check in self._liveness.items():
            try:
                check()
                results[name] = None
            except Exception as exc:  # noqa: BLE001 - any failure means "not alive", with why
                results[name] = redact(describe(exc)).splitlines()[0][:500]
        return Readiness(all(v is None for v in results.values()), results)


def _handler_for(server: ObservabilityServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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
                    dead = [f"{n}: FAILED: {why}" for n, why in alive.results.items() if why]
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

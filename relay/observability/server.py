"""The HTTP endpoints every daemon serves: ``/metrics``, ``/healthz`` and ``/readyz``.

A small threaded server of the standard library in a daemon thread: it must keep answering while
the daemon's own loop is busy or waiting out an outage, and it must never touch the daemon's
connections. Each daemon hands in its own readiness checks, so the relay and the reconciler share
this code and differ only in what "ready" means for them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from relay.errors import describe
from relay.redaction import escape_controls, redact

log = logging.getLogger(__name__)

# A readiness check returns normally when its dependency is usable, raises when it is not.
Check = Callable[[], None]
MAX_CONNECTIONS = 32
"""Connections served at once. Past the cap, a new connection takes the slot of the oldest one
that is still sending its request (so a flood of slow clients cannot keep a probe out); when
every slot is answering a complete request, the new connection is closed at accept."""
READ_TIMEOUT_S = 5.0
"""How long one read (or the write of the answer) may wait before the connection is closed."""
REQUEST_DEADLINE_S = 5.0
"""How long a connection may take, from accept, to send its whole request line and headers: a
client trickling a byte at a time loses its slot then, however often each byte arrives."""
MAX_REQUEST_BYTES = 8 * 1024
"""The request line and the headers together; past it the answer is 431 and the connection is
closed (the endpoints need a few hundred bytes; the standard library alone allows ~6.5 MB)."""
REFUSAL_REASONS = ("full", "evicted", "deadline", "too_large")
"""Why a connection was closed without an answer to its request (``too_large``: a 431)."""


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


class _Refused(Exception):
    """A request that broke a limit (or a client that hung up) before its headers ended."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason  # one of REFUSAL_REASONS, or None: the client went away


class _Connection:
    """A connection holding a slot: reading its request until ``handling``, unless evicted."""

    __slots__ = ("accepted_at", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepted_at = time.monotonic()
        self.state = "reading"  # -> "handling" (headers complete) or "evicted" (slot taken)


class _RequestReader(io.RawIOBase):
    """The socket as the handler reads it: each read waits at most until the request's total
    deadline (and at most ``read_timeout_s``), and at most ``limit`` bytes are read in all.
    Breaking either raises :class:`_Refused`; so does the end of the stream, since every
    complete request ends with its blank line before the client's end of stream."""

    def __init__(
        self, sock: socket.socket, deadline: float, read_timeout_s: float, limit: int
    ) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._read_timeout_s = read_timeout_s
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise _Refused("too_large")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("deadline")
        self._sock.settimeout(min(remaining, self._read_timeout_s))
        try:
            read = self._sock.recv_into(memoryview(buffer).cast("B")[: self._left])
        except TimeoutError:
            raise _Refused("deadline") from None
        except OSError:
            raise _Refused(None) from None
        if read == 0:
            raise _Refused(None)
        self._left -= read
        return read


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, but at most ``max_connections`` of them. Past the cap a new
    connection evicts the oldest connection still sending its request; when every slot is
    answering one, the new connection is closed at once instead of growing the process by a
    thread. A connection sends its request (at most ``max_request_bytes``) within
    ``deadline_s`` of its accept or is closed: a slow client holds a slot that long at most."""

    daemon_threads = True
    # A burst of connections waits in the kernel's queue for accept (and the cap) rather than
    # being dropped and retried by the clients seconds later.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        deadline_s: float = REQUEST_DEADLINE_S,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, _Connection] = {}  # in the order of accept
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        self.read_timeout_s = read_timeout_s
        self.deadline_s = deadline_s
        self.max_request_bytes = max_request_bytes
        super().__init__(address, handler)

    @property
    def refused(self) -> int:
        return self.refusals["full"] + self.refusals["evicted"]

    def count(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False) and not self._evict_oldest():
            self.count("full")
            self.shutdown_request(request)
            return
        with self._lock:
            self._connections[request] = _Connection(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def _evict_oldest(self) -> bool:
        """Close the oldest connection still sending its request, and take its slot."""
        with self._lock:
            oldest = next((c for c in self._connections.values() if c.state == "reading"), None)
            if oldest is None:
                return False
            oldest.state = "evicted"
            self.refusals["evicted"] += 1
            # Under the lock: shutdown_request cannot close the socket meanwhile. Its thread's
            # read returns at once (end of stream), the thread ends and frees the slot.
            with contextlib.suppress(OSError):
                oldest.sock.shutdown(socket.SHUT_RDWR)
        return self._slots.acquire(timeout=1.0)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def _forget(self, request: Any) -> None:
        with self._lock:
            self._connections.pop(request, None)
        self._slots.release()

    def connection(self, request: Any) -> _Connection:
        with self._lock:
            return self._connections.get(request) or _Connection(request)

    def start_handling(self, request: Any) -> bool:
        """The request's headers are complete: from now on its slot is not taken from it.
        False if it was evicted in the meantime (nothing must be answered then)."""
        with self._lock:
            conn = self._connections.get(request)
            if conn is None or conn.state != "reading":
                return False
            conn.state = "handling"
            return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or hung up is not the daemon's error: no traceback."""
        log.debug("observability: a client connection failed", exc_info=True)


class _RefusalsCollector(Collector):
    """The server's own counter of the connections it closed without an answer."""

    def __init__(self, httpd: _BoundedServer) -> None:
        self._httpd = httpd

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "relay_http_connections_refused",
            "Connections to /metrics, /healthz and /readyz closed without their answer, by why: "
            "full (every slot answering), evicted (a newer connection took the slot of this one, "
            "still sending its request), deadline (request not sent in time), too_large (431).",
            labels=["reason"],
        )
        for reason, count in sorted(self._httpd.refusals.items()):
            family.add_metric([reason], count)
        yield family


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
        request_deadline_s: float = REQUEST_DEADLINE_S,
        max_request_bytes: int = MAX_REQUEST_BYTES,
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
            (host, port),
            _handler_for(self),
            max_connections,
            read_timeout_s=read_timeout_s,
            deadline_s=request_deadline_s,
            max_request_bytes=max_request_bytes,
        )
        self.registry.register(_RefusalsCollector(self._httpd))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def refused(self) -> int:
        """Connections closed for want of a slot: at accept (every slot answering) or while
        still sending their request (a newer connection took the slot). Exported, with the
        requests closed at the deadline or as too large, as ``relay_http_connections_refused``."""
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


def _handler_for(server: ObservabilityServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # One request per connection (HTTP/1.0 answers): the request's deadline and byte cap
        # are the connection's.
        protocol_version = "HTTP/1.0"

        def setup(self) -> None:
            super().setup()
            httpd = cast(_BoundedServer, self.server)
            # The socket's timeout bounds each write of the answer; reads go through the
            # reader, which bounds the whole request.
            self.connection.settimeout(httpd.read_timeout_s)
            self.rfile.close()
            self.rfile = io.BufferedReader(
                _RequestReader(
                    self.connection,
                    httpd.connection(self.request).accepted_at + httpd.deadline_s,
                    httpd.read_timeout_s,
                    httpd.max_request_bytes,
                )
            )

        def handle_one_request(self) -> None:
            httpd = cast(_BoundedServer, self.server)
            try:
                super().handle_one_request()
            except _Refused as refused:
                self.close_connection = True
                if refused.reason is None or not httpd.start_handling(self.request):
                    return  # the client went away, or was evicted (and counted) meanwhile
                httpd.count(refused.reason)
                if refused.reason == "too_large":
                    self.connection.settimeout(httpd.read_timeout_s)
                    body = b"request line and headers too large\n"
                    self.wfile.write(
                        b"HTTP/1.0 431 Request Header Fields Too Large\r\n"
                        b"Content-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                    )

        def parse_request(self) -> bool:
            httpd = cast(_BoundedServer, self.server)
            # For an error answer written by the parser (the reader sets its own timeouts).
            self.connection.settimeout(httpd.read_timeout_s)
            if not super().parse_request():
                return False
            self.connection.settimeout(httpd.read_timeout_s)
            return httpd.start_handling(self.request)

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

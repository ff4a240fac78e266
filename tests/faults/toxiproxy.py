"""Toxiproxy (github.com/Shopify/toxiproxy), a real TCP proxy, on loopback: the fault suite puts
it between the relay and PostgreSQL or Kafka and adds "toxics" (latency, a black hole, resets,
connections cut after some bytes) through its HTTP API. The server is built from the Go module
proxy by ``scripts/install-toxiproxy.sh`` and cached."""

from __future__ import annotations

import functools
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from relay.devtools.services import free_port
from tests.deploy import run_script

Stream = Literal["upstream", "downstream"]


@functools.cache
def toxiproxy_binary() -> str:
    """The pinned toxiproxy-server (built once by scripts/install-toxiproxy.sh, then cached)."""
    done = run_script("install-toxiproxy.sh", timeout=900)
    assert done.returncode == 0, f"scripts/install-toxiproxy.sh failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


class Toxiproxy:
    """One toxiproxy-server process with its API on a free loopback port."""

    def __init__(self, log_path: Path) -> None:
        self.api_port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> Toxiproxy:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [toxiproxy_binary(), "-host", "127.0.0.1", "-port", str(self.api_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/version")
                return self
            except OSError:
                assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "toxiproxy-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                raise AssertionError(
                    f"toxiproxy {method} {path}: {exc.code} {exc.read()!r}"
                ) from None
        return json.loads(text) if text.strip() else None

    def proxy(self, name: str, upstream_port: int, listen_port: int | None = None) -> Proxy:
        """A proxy from ``listen_port`` (default: a free one) to ``upstream_port``, on loopback."""
        port = listen_port or free_port()
        self._call(
            "POST",
            "/proxies",
            {
                "name": name,
                "listen": f"127.0.0.1:{port}",
                "upstream": f"127.0.0.1:{upstream_port}",
                "enabled": True,
            },
        )
        return Proxy(self, name, port)


class Proxy:
    def __init__(self, server: Toxiproxy, name: str, port: int) -> None:
        self.server = server
        self.name = name
        self.port = port

    def add(
        self, toxic: str, stream: Stream = "downstream", toxicity: float = 1.0, **attributes: int
    ) -> str:
        """Add a toxic (``latency``, ``timeout``, ``reset_peer``, ``limit_data``, ...); returns
        its name."""
        name = f"{toxic}_{stream}"
        self.server._call(
            "POST",
            f"/proxies/{self.name}/toxics",
            {
                "name": name,
                "type": toxic,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": attributes,
            },
        )
        return name

    def remove(self, name: str) -> None:
        self.server._call("DELETE", f"/proxies/{self.name}/toxics/{name}")

    def clear(self) -> None:
        """No toxic left, the proxy enabled: the network healed."""
        for toxic in self.server._call("GET", f"/proxies/{self.name}/toxics") or []:
            self.remove(str(toxic["name"]))
        self.server._call("POST", f"/proxies/{self.name}", {"enabled": True})

    @contextmanager
    def toxic(
        self, toxic: str, stream: Stream = "downstream", toxicity: float = 1.0, **attributes: int
    ) -> Iterator[None]:
        name = self.add(toxic, stream, toxicity, **attributes)
        try:
            yield
        finally:
            self.remove(name)

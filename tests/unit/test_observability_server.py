"""relay/observability/server.py: liveness and readiness."""

from __future__ import annotations

from relay.observability import ObservabilityServer
from tests import support


def test_healthz_fails_when_a_liveness_check_fails() -> None:
    dead: list[str] = []

    def timers() -> None:
        if dead:
            raise RuntimeError(dead[0])

    server = ObservabilityServer("127.0.0.1", 0, [], {}, liveness={"timers": timers}).start()
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert support.http_get(base + "/healthz") == (200, "ok\n")
        dead.append("the timers thread died")
        assert support.http_get(base + "/healthz") == (
            503,
            "unhealthy\ntimers: FAILED\n",
        )
        assert support.http_get(base + "/readyz")[0] == 200  # readiness is another question
    finally:
        server.stop()

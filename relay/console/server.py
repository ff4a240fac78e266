"""The console served by uvicorn: built from the settings, run until stopped."""

from __future__ import annotations

from typing import Any

import uvicorn
from psycopg_pool import ConnectionPool

from relay.config import Settings
from relay.console.app import build_app, open_pool
from relay.console.auth import Guard


class ConsoleServer:
    """The console's HTTP server and its database pool. Building it checks the identity
    settings first (ConfigError: proxy mode without proxy addresses, login mode without users)."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None):
        guard = Guard(settings)
        self.host = host or settings.console_host
        self.port = settings.console_port if port is None else port
        self.pool: ConnectionPool[Any] = open_pool(settings)
        config = uvicorn.Config(
            build_app(settings, guard, self.pool),
            host=self.host,
            port=self.port,
            # The peer address is the one that connected: X-Forwarded-For must not replace it,
            # or anyone could pass for a trusted proxy.
            proxy_headers=False,
            server_header=False,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve until stop() (or SIGTERM / Ctrl-C in the main thread)."""
        try:
            self.server.run()
        finally:
            self.pool.close()

    def stop(self) -> None:
        self.server.should_exit = True

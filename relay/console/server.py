"""The console served by uvicorn: built from the settings, run until stopped."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn
from psycopg_pool import ConnectionPool

from relay.config import Settings
from relay.console.app import build_app, open_pool
from relay.console.auth import Guard

log = logging.getLogger(__name__)


class ConsoleServer:
    """The console's HTTP server and its database pool. Building it checks the identity
    settings first (ConfigError: proxy mode without proxy addresses, login mode without users)."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None):
        guard = Guard(settings)
        self.host = host or settings.console_host
        self.port = settings.console_port if port is None else port
        self.pool: ConnectionPool[Any] = open_pool(settings)
        self.viewer_pool: ConnectionPool[Any] | None = None
        if settings.console_viewer_database_url:
            self.viewer_pool = open_pool(
                settings, settings.console_viewer_database_url, "relay-console-viewer"
            )
        else:
            log.warning(
                "console: console_viewer_database_url is not set: viewers read with "
                "database_url's login and so share the operator's database rights (the console "
                "still refuses them every decision); give them a <prefix>viewer login of "
                "`relay roles` (docs/console.md)"
            )
        config = uvicorn.Config(
            build_app(settings, guard, self.pool, self.viewer_pool),
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
            if self.viewer_pool is not None:
                self.viewer_pool.close()

    def stop(self) -> None:
        self.server.should_exit = True

"""A throwaway PostgreSQL 15 cluster made with the installed server binaries.

``initdb`` refuses to run as root, and sessions and CI run as root: the cluster then belongs to the
``postgres`` system user and every server command runs through ``runuser``.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from relay.devservices.common import DevServicesError, free_port, on_exit, tail

log = logging.getLogger(__name__)
PG_BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)


def _pg_bin() -> Path:
    override = os.environ.get("RELAY_PG_BIN")
    for candidate in ([override] if override else []) + list(PG_BIN_DIRS):
        if (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    raise DevServicesError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in "
        f"{', '.join(PG_BIN_DIRS)}; install postgresql-15 or set RELAY_PG_BIN"
    )


class LocalPostgres:
    """One cluster in a temporary directory, on a free loopback port, with trust auth."""

    def __init__(self, *, fsync: bool = False, port: int | None = None) -> None:
        self.fsync = fsync
        self.port = port or free_port()
        self.root: Path | None = None
        self._running = False
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    def start(self) -> None:
        pg_bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        if self._as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise DevServicesError("running as root needs a 'postgres' system user") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
        result = self._run(
            str(pg_bin / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--no-instructions",
        )
        if result.returncode != 0:
            raise DevServicesError(f"initdb failed: {result.stderr.strip() or result.stdout}")
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                f"-c fsync={'on' if self.fsync else 'off'}",
                "-c max_connections=200",
                "-c shared_buffers=256MB",
            ]
        )
        logfile = self.root / "postgres.log"
        result = self._run(
            str(pg_bin / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-l",
            str(logfile),
            "-w",
            "-t",
            "60",
            "start",
        )
        if result.returncode != 0:
            raise DevServicesError(f"PostgreSQL did not start:\n{tail(logfile)}")
        self._running = True
        on_exit(self.stop)
        log.info("PostgreSQL ready on port %d", self.port)

    def stop(self) -> None:
        if self.root is None:
            return
        if self._running:
            self._run(
                str(_pg_bin() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"
            )
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

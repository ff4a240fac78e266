"""A throwaway PostgreSQL 15 cluster made with the installed server binaries.

``initdb`` refuses to run as root, and dev containers and CI often run as root: the cluster then
belongs to the ``postgres`` system user and every server command runs through ``runuser``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from relay.devtools.services import DevServicesError, free_port, tail, track, untrack

log = logging.getLogger(__name__)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_USER = "postgres"


def pg_bin_dir() -> Path:
    """The server binaries: ``RELAY_PG_BIN`` if set, else the Debian/Ubuntu PostgreSQL 15 path."""
    path = Path(os.environ.get("RELAY_PG_BIN") or PG_BIN)
    missing = [tool for tool in ("initdb", "pg_ctl") if not (path / tool).is_file()]
    if missing:
        raise DevServicesError(
            f"PostgreSQL server binaries {', '.join(missing)} not found in {path}: install "
            "postgresql-15 (apt-get install postgresql-15) or set RELAY_PG_BIN to their directory"
        )
    return path


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def render_conf(settings: Mapping[str, str | int | bool]) -> str:
    """``postgresql.conf`` lines; strings are quoted, booleans become on/off."""
    lines = []
    for name, value in settings.items():
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = _quote(value)
        lines.append(f"{name} = {text}\n")
    return "".join(lines)


class LocalPostgres:
    """One cluster in a temporary directory, on a free loopback port, with trust auth.

    ``fsync`` defaults to off (throwaway data; faster tests). ``settings`` adds or overrides
    ``postgresql.conf`` parameters.
    """

    def __init__(
        self,
        *,
        fsync: bool = False,
        port: int | None = None,
        settings: Mapping[str, str | int | bool] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.fsync = fsync
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.extra_settings = dict(settings or {})
        self.start_timeout_s = start_timeout_s
        self.root: Path | None = None
        self._running = False
        self._as_server_user = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        if self.root is None:
            raise DevServicesError("PostgreSQL is not started")
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        if self.root is None:
            raise DevServicesError("PostgreSQL is not started")
        return self.root / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs (first line of ``postmaster.pid``)."""
        if self.root is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def settings(self) -> dict[str, str | int | bool]:
        """What this cluster runs with besides initdb's defaults."""
        assert self.root is not None
        return {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),
            "max_connections": 200,
            # PREPARE TRANSACTION is off by default (0); the intake's tests need it (a prepared
            # transaction stays in every snapshot until COMMIT PREPARED: docs/design/intake.md).
            "max_prepared_transactions": 10,
            "fsync": self.fsync,
            **self.extra_settings,
        }

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_server_user:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise DevServicesError("running as root needs 'runuser' (util-linux) on PATH")
            cmd = [runuser, "-u", SERVER_USER, "--", *cmd]
        # cwd: the server user may not be allowed into the caller's directory (e.g. /root).
        return subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=self.root
        )

    def start(self) -> None:
        """initdb, then ``pg_ctl start -w``: returns once the server accepts connections."""
        if self.root is not None:
            raise DevServicesError("PostgreSQL is already started")
        bin_dir = pg_bin_dir()
        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        track(self, self.stop)
        try:
            self._init(bin_dir)
            self._start(bin_dir)
        except BaseException:
            self.stop()
            raise
        log.info(
            "PostgreSQL ready on port %d in %.1fs (%s)",
            self.port,
            time.monotonic() - started,
            self.root,
        )

    def _init(self, bin_dir: Path) -> None:
        assert self.root is not None
        if self._as_server_user:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise DevServicesError(
                    f"running as root needs a '{SERVER_USER}' system user (initdb refuses root)"
                ) from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
        args = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        if not self.fsync:
            args.append("--no-sync")
        result = self._run(*args, timeout=120)
        if result.returncode != 0:
            raise DevServicesError(f"initdb failed:\n{(result.stderr or result.stdout).strip()}")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# relay.devtools.services\n" + render_conf(self.settings()))

    def _start(self, bin_dir: Path) -> None:
        # The port goes on the command line, not in postgresql.conf, so that a port someone took
        # between free_port() and the bind can be swapped for another one.
        for attempt in range(3):
            result = self._run(
                str(bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-o",
                f"-p {self.port}",
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(self.start_timeout_s)),
                timeout=self.start_timeout_s + 10,
            )
            if result.returncode == 0:
                self._running = True
                return
            log_tail = tail(self.log_path)
            if self._fixed_port or attempt == 2 or "could not bind" not in log_tail:
                raise DevServicesError(
                    f"PostgreSQL did not start on port {self.port}: "
                    f"{(result.stderr or result.stdout).strip()}\n{log_tail}"
                )
            log.info("port %d was taken meanwhile; retrying on another one", self.port)
            self.port = free_port()

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, the server comes back on the same
        port with the same data; returns once it accepts connections again."""
        if self.root is None or not self._running:
            raise DevServicesError("PostgreSQL is not started")
        result = self._run(
            str(pg_bin_dir() / "pg_ctl"),
            "restart",
            "-D",
            str(self.data_dir),
            "-m",
            "fast",
            "-o",
            f"-p {self.port}",
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(self.start_timeout_s)),
            timeout=self.start_timeout_s + 40,
        )
        if result.returncode != 0:
            raise DevServicesError(
                f"PostgreSQL did not restart: {(result.stderr or result.stdout).strip()}\n"
                f"{tail(self.log_path)}"
            )

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (SIGKILL if that fails), then delete the cluster. Idempotent."""
        if self.root is None:
            return
        try:
            if self._running or self.pid is not None:
                self._stop_server()
        finally:
            self._running = False
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            untrack(self)

    def _stop_server(self) -> None:
        pid = self.pid
        try:
            result = self._run(
                str(pg_bin_dir() / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                timeout=40,
            )
            stopped = result.returncode == 0
            if not stopped:
                log.warning("pg_ctl stop failed: %s", (result.stderr or result.stdout).strip())
        except (subprocess.TimeoutExpired, DevServicesError) as exc:
            log.warning("pg_ctl stop failed: %s", exc)
            stopped = False
        if not stopped and pid is not None:
            # The postmaster's children exit on their own once it is gone.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes: it holds no port and no files.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"

"""``python -m relay.devtools.services up|down|env``: local PostgreSQL and Kafka for a shell.

``up`` starts both, prints ``export`` lines and stays in the foreground until SIGINT/SIGTERM, then
stops both. It records where the servers are in a state file, so that from another shell
``eval "$(python -m relay.devtools.services env)"`` picks them up and ``down`` stops them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from relay.devtools.services import DevServicesError, Services, local_services
from relay.devtools.services.kafka import cache_root


def state_file() -> Path:
    return cache_root() / "devservices.json"


def export_lines(services: Services) -> str:
    return (
        f"export RELAY_DATABASE_URL={services.database_url}\n"
        f"export RELAY_KAFKA_BOOTSTRAP_SERVERS={services.kafka_bootstrap_servers}\n"
    )


def _running_state() -> dict[str, object] | None:
    """The state recorded by a live ``up``, or None (a stale file is ignored). An ``up`` killed
    before it removed its file leaves a pid that another process may have by now: on Linux the
    pid counts only while its command line is still this module's, so that ``down`` never
    signals a stranger."""
    try:
        state = dict(json.loads(state_file().read_text()))
        pid = int(state["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        if b"relay.devtools.services" not in cmdline.read_bytes():
            return None
    except FileNotFoundError:
        if Path("/proc/self/cmdline").exists():
            return None  # the process ended meanwhile
    except OSError:
        return None
    return state


def up(fsync: bool) -> int:
    running = _running_state()
    if running is not None:
        print(f"already running (pid {running['pid']}); use 'down' first", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before starting: a signal during startup stops the servers once they are up.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        with local_services(fsync=fsync) as services:
            path = state_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "database_url": services.database_url,
                        "kafka_bootstrap_servers": services.kafka_bootstrap_servers,
                    }
                )
            )
            try:
                print(export_lines(services), end="")
                print(
                    f"# ready in {time.monotonic() - started:.1f}s; Ctrl-C or "
                    "'python -m relay.devtools.services down' stops both",
                    flush=True,
                )
                while not stop.wait(0.5):
                    pass
            finally:
                path.unlink(missing_ok=True)
    except DevServicesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("# stopped", flush=True)
    return 0


def env() -> int:
    state = _running_state()
    if state is None:
        print("no local services running: start them with 'up'", file=sys.stderr)
        return 1
    services = Services(
        database_url=str(state["database_url"]),
        kafka_bootstrap_servers=str(state["kafka_bootstrap_servers"]),
    )
    print(export_lines(services), end="")
    return 0


def down(timeout_s: float = 60.0) -> int:
    state = _running_state()
    if state is None:
        print("no local services running", file=sys.stderr)
        return 0
    pid = int(str(state["pid"]))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.2)
    print(f"'up' (pid {pid}) did not stop within {timeout_s:.0f}s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.devtools.services", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start both and wait for Ctrl-C")
    start.add_argument(
        "--fsync", action="store_true", help="keep PostgreSQL's fsync on (off by default)"
    )
    commands.add_parser("env", help="print export lines for the servers 'up' started")
    commands.add_parser("down", help="stop the servers 'up' started")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="# %(message)s", stream=sys.stderr)
    # The Kafka client reports every refused connection while the broker boots: not news here.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    if args.command == "up":
        return up(args.fsync)
    if args.command == "env":
        return env()
    return down()


if __name__ == "__main__":
    sys.exit(main())

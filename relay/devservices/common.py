"""Small helpers shared by the local servers."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path


class DevServicesError(RuntimeError):
    """A local server could not be started; the message says what is missing or what failed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cache_dir() -> Path:
    base = os.environ.get("RELAY_DEV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "relay-dev"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_tool(name: str, hint: str) -> str:
    found = shutil.which(name)
    if not found:
        raise DevServicesError(f"'{name}' is not on PATH: {hint}")
    return found


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_cleanups: list[Callable[[], None]] = []


def on_exit(cleanup: Callable[[], None]) -> None:
    """Stop a server at interpreter exit too, if the owner forgot or crashed."""
    if not _cleanups:
        atexit.register(lambda: [fn() for fn in reversed(_cleanups)])
    _cleanups.append(cleanup)

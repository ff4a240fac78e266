"""The console's browser tests: Playwright driving Debian's Chromium (installed by
scripts/install-browser.sh when missing), against a console served in this process on the real
PostgreSQL, with Kafka for the relay that makes the effects."""

from __future__ import annotations

import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from relay.config import Settings
from relay.console.auth import hash_password
from relay.console.server import ConsoleServer
from tests import support

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
PASSWORD = "correct horse battery staple"
# One hash for every test: scrypt is slow on purpose.
HASH = hash_password(PASSWORD)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "install-browser.sh")], check=True)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        yield launched
        launched.close()


class Watched:
    """A page whose console is listened to: CSP violations and script errors are kept."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.violations: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.violations.append(f"page error: {exc}"))
        page.on("dialog", self._dialog)

    def _console(self, msg: ConsoleMessage) -> None:
        if "Content Security Policy" in msg.text or "Refused to" in msg.text:
            self.violations.append(msg.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def console_settings(base: Settings, workdir: Path, **overrides: Any) -> Settings:
    users = workdir / "console-users"
    users.write_text(f"alice:operator:{HASH}\nvictor:viewer:{HASH}\n", encoding="utf-8")
    values = base.model_dump()
    values.update(
        console_users_file=str(users),
        console_port=support.free_port(),
        console_secret="a-test-secret-of-the-console",
        **overrides,
    )
    return support.GivenSettings(**values)


class Running:
    def __init__(self, server: ConsoleServer) -> None:
        self.server = server
        self.url = server.address.rstrip("/")


def start_console(settings: Settings) -> Iterator[Running]:
    server = ConsoleServer(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = Running(server)
    support.wait_for(lambda: _up(running.url), 30, "the console to listen")
    try:
        yield running
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "the console did not stop"


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False

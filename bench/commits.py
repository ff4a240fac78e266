"""(a) What the outbox costs the application: commits per second of 8 writer processes with
``relay.enqueue`` against the same writers inserting the same payload into a plain table.

Each measurement gets a fresh database, so no run pays for the rows of the one before.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.common import (
    PLAIN_TABLE,
    DaemonProcess,
    drop_db,
    fresh_db,
    prepare,
    settings_for,
    writers,
)
from bench.report import Figure, Target

STOPPED_TARGET = Target("ratio", ">=", 0.85)
PUBLISHING_TARGET = Target("ratio", ">=", 0.5)


@dataclass(frozen=True)
class CommitSizes:
    seconds: float = 5.0
    processes: int = 8
    payload_bytes: int = 256
    batches: tuple[int, ...] = (1, 100)
    status_events: tuple[bool, ...] = (True, False)


def _measure(
    server_url: str,
    bootstrap: str,
    sizes: CommitSizes,
    *,
    mode: str,
    per_txn: int,
    status_events: bool = False,
    relay_running: bool = False,
    log_dir: Path,
) -> float:
    prefix = uuid.uuid4().hex[:8]
    url = fresh_db(server_url)
    try:
        settings = settings_for(url, bootstrap, prefix, status_events=status_events)
        prepare(settings)
        if mode == "plain":
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(PLAIN_TABLE)
        daemon = (
            DaemonProcess("run", settings, log_dir / f"commits-{prefix}.log")
            if (relay_running)
            else None
        )
        try:
            if daemon is not None:
                time.sleep(2.0)  # started, registered, idle with its doorbell armed
                daemon.check_alive()
            return writers(
                url,
                mode,
                processes=sizes.processes,
                per_txn=per_txn,
                size=sizes.payload_bytes,
                seconds=sizes.seconds,
            )
        finally:
            if daemon is not None:
                daemon.stop()
    finally:
        drop_db(server_url, url)


def run(server_url: str, bootstrap: str, sizes: CommitSizes, log_dir: Path) -> list[Figure]:
    figures: list[Figure] = []
    for per_txn in sizes.batches:
        shape = f"{sizes.processes} writers, {per_txn} intent{'s' if per_txn > 1 else ''}/txn"
        plain = _measure(
            server_url, bootstrap, sizes, mode="plain", per_txn=per_txn, log_dir=log_dir
        )
        print(f"  (a) plain insert, {shape}: {plain:,.0f} rows/s", flush=True)
        for status in sizes.status_events:
            for relay_running in (False, True):
                rate = _measure(
                    server_url,
                    bootstrap,
                    sizes,
                    mode="enqueue",
                    per_txn=per_txn,
                    status_events=status,
                    relay_running=relay_running,
                    log_dir=log_dir,
                )
                relay_state = "relay publishing" if relay_running else "relay stopped"
                name = (
                    f"relay.enqueue commits, {shape}, {relay_state}, "
                    f"status events {'on' if status else 'off'}"
                )
                targets: tuple[Target, ...] = ()
                if status:
                    targets = (PUBLISHING_TARGET if relay_running else STOPPED_TARGET,)
                figures.append(
                    Figure(
                        "a",
                        name,
                        rate,
                        "intents/s",
                        ceiling=plain,
                        ceiling_name="plain insert, same payload",
                        targets=targets,
                    )
                )
                print(f"  (a) {name}: {rate:,.0f}/s ({rate / plain:.2f}x plain)", flush=True)
    return figures

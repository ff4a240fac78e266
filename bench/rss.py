"""(e) Peak resident memory (VmHWM) of each daemon, a ``relay run`` and a ``relay reconcile``
process, with a small and a large backlog: memory must not grow with the backlog. And the CPU an
idle ``relay run`` takes (an empty outbox), in its own process and in its database backends.

A large backlog is not drained within the run's budget: each daemon works for a bounded window
on it, and its peak over that window is what is reported (the same window for both sizes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    DaemonProcess,
    backend_cpu_s,
    cpu_by_role,
    delete_topics,
    drop_db,
    fill_backlog,
    process_cpu_s,
)
from bench.reconcile import results_backlog, wire_settings
from bench.report import Figure, Target

FLAT_TARGET = Target("ratio", "<=", 1.2)


@dataclass(frozen=True)
class RssSizes:
    small: int = 10_000
    large: int = 1_000_000
    window_s: float = 15.0


def _peak(daemon: DaemonProcess, window_s: float) -> int:
    """The process's VmHWM at the end of the window (sampled throughout, in case it dies)."""
    peak = 0
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        daemon.check_alive()
        peak = max(peak, daemon.vm_hwm_kib() or 0)
        time.sleep(0.2)
    return max(peak, daemon.vm_hwm_kib() or 0)


def measure(
    server_url: str, bootstrap: str, n: int, window_s: float, log_dir: Path
) -> tuple[int, int, float]:
    """(relay KiB, reconciler KiB, seconds to make the backlog) with a backlog of ``n``."""
    settings, prefix = wire_settings(server_url, bootstrap, status_events=False)
    url = settings.require_database_url()
    try:
        made = fill_backlog(url, "wire", n, 256, "w-")
        relay_daemon = DaemonProcess("run", settings, log_dir / f"rss-relay-{prefix}.log")
        try:
            relay_kib = _peak(relay_daemon, window_s)
        finally:
            relay_daemon.stop()
        started = time.monotonic()
        results_backlog(settings, bootstrap, n, fill=False)
        made += time.monotonic() - started
        reconciler = DaemonProcess("reconcile", settings, log_dir / f"rss-reconciler-{prefix}.log")
        try:
            reconciler_kib = _peak(reconciler, window_s)
        finally:
            reconciler.stop()
        return relay_kib, reconciler_kib, made
    finally:
        delete_topics(bootstrap, prefix)
        drop_db(server_url, url)


def idle_cpu(
    server_url: str, bootstrap: str, window_s: float, log_dir: Path
) -> tuple[float | None, float | None]:
    """Percent of one core taken by an idle ``relay run`` over ``window_s`` after it started: its
    own process, and its PostgreSQL backends (None for a server elsewhere)."""
    settings, prefix = wire_settings(server_url, bootstrap, status_events=True)
    url = settings.require_database_url()
    try:
        daemon = DaemonProcess("run", settings, log_dir / f"idle-relay-{prefix}.log")
        try:
            time.sleep(3.0)  # past its start-up: imports, connections, the first quiet polls
            daemon.check_alive()
            before, backends = process_cpu_s(daemon.proc.pid), backend_cpu_s(url)
            started = time.monotonic()
            time.sleep(window_s)
            after, backends_after = process_cpu_s(daemon.proc.pid), backend_cpu_s(url)
            span = time.monotonic() - started
        finally:
            daemon.stop()
        own = None if before is None or after is None else 100 * (after - before) / span
        roles = cpu_by_role(backends, backends_after)
        server = None if roles is None else 100 * sum(roles.values()) / span
        return own, server
    finally:
        delete_topics(bootstrap, prefix)
        drop_db(server_url, url)


def run(server_url: str, bootstrap: str, sizes: RssSizes, log_dir: Path) -> list[Figure]:
    small = measure(server_url, bootstrap, sizes.small, sizes.window_s, log_dir)
    print(f"  (e) backlog {sizes.small:,}: relay {small[0]:,} KiB, reconciler {small[1]:,} KiB")
    large = measure(server_url, bootstrap, sizes.large, sizes.window_s, log_dir)
    print(
        f"  (e) backlog {sizes.large:,}: relay {large[0]:,} KiB, reconciler {large[1]:,} KiB "
        f"(backlog made in {large[2]:.0f} s)",
        flush=True,
    )
    note = f"peak over a {sizes.window_s:g} s window of work on each backlog"
    figures = []
    for index, daemon in enumerate(("relay run", "relay reconcile")):
        figures.append(
            Figure(
                "e",
                f"peak RSS of `{daemon}`, backlog {sizes.large:,}",
                large[index] / 1024,
                "MiB",
                ceiling=small[index] / 1024,
                ceiling_name=f"backlog {sizes.small:,}",
                targets=(FLAT_TARGET,),
                note=note,
            )
        )
    own, server = idle_cpu(server_url, bootstrap, sizes.window_s, log_dir)
    shown = "-" if own is None else f"{own:.1f} %"
    print(f"  (e) idle relay: {shown} of a core", flush=True)
    figures.append(
        Figure(
            "e",
            "CPU of an idle `relay run` (empty outbox, status events on), % of one core",
            own,
            "%",
            note=(
                f"over {sizes.window_s:g} s after its start-up"
                + ("" if server is None else f"; its PostgreSQL backends {server:.1f} %")
            ),
        )
    )
    return figures

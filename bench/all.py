"""Every figure of issue 10 beside its ceiling, from one run, in one command.

    python -m bench.all [--quick] [--out bench/results] [--parts abcde] [size knobs]

(a) application commits (8 writers; 1 and 100 intents per transaction; relay stopped and
publishing; status events on and off) against the same rows inserted into a plain table;
(b) the drain of a backlog (256 B and 4 KiB; compression), one and two relays, against a bare
transactional producer and the bare claim-and-mark cycle in PostgreSQL;
(c) enqueue-to-consumer latency, open loop, at 300/s and at 10/50/80 % of the drain rate, and at
300/s for 60 s with writing transactions held open in the relay's database and another one;
(d) the reconciler from a backlog of results against a bare read_committed consumer;
(e) peak RSS of each daemon with a small and a large backlog.

Writes results.md, results.json, throughput.png and latency.png into --out. Starts PostgreSQL
and Kafka (relay.devtools.services) unless RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS name
running ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import commits, drain, latency, reconcile, rss
from bench.common import server_fsync
from bench.report import Figure, write_plots, write_results
from relay.devtools.services import local_services

PARTS = "abcde"


@dataclass(frozen=True)
class Plan:
    commits: commits.CommitSizes
    drain: drain.DrainSizes
    latency: latency.LatencySizes
    reconcile: reconcile.ReconcileSizes
    rss: rss.RssSizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a ~2 minute smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    parser.add_argument("--parts", default=PARTS, help="which parts to run, e.g. 'ab' (a-e)")
    parser.add_argument("--fsync", action="store_true", help="fsync on in a PostgreSQL we start")
    parser.add_argument("--commit-seconds", type=float, help="(a) seconds per writer run [5]")
    parser.add_argument("--writers", type=int, help="(a) writer processes [8]")
    parser.add_argument("--drain-effects", type=int, help="(b) backlog to drain [100000]")
    parser.add_argument("--latency-seconds", type=float, help="(c) seconds of load per rate [10]")
    parser.add_argument(
        "--held-seconds",
        type=float,
        help="(c) seconds of the 300/s load with writing transactions held open [60; 0: skip]",
    )
    parser.add_argument(
        "--drain-rate",
        type=float,
        help="(c) drain rate the loads are fractions of, when (b) is not run [5000]",
    )
    parser.add_argument("--reconcile-results", type=int, help="(d) backlog of results [100000]")
    parser.add_argument("--rss-small", type=int, help="(e) small backlog [10000]")
    parser.add_argument("--rss-large", type=int, help="(e) large backlog [1000000]")
    parser.add_argument("--rss-window", type=float, help="(e) seconds each daemon works [15]")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        parser.error(f"--parts takes letters of {PARTS!r}, got {args.parts!r}")
    return args


def plan_for(args: argparse.Namespace) -> Plan:
    """The sizes of each part: the full run's, or --quick's; each knob overrides either."""
    quick = bool(args.quick)

    def pick(given: Any, full: Any, small: Any) -> Any:
        return given if given is not None else (small if quick else full)

    return Plan(
        commits=commits.CommitSizes(
            seconds=pick(args.commit_seconds, 5.0, 1.5),
            processes=pick(args.writers, 8, 8),
            status_events=(True,) if quick else (True, False),
        ),
        drain=drain.DrainSizes(
            effects=pick(args.drain_effects, 100_000, 4_000),
            payloads=(256,) if quick else (256, 4096),
            codecs=("none", "zstd") if quick else drain.CODECS,
        ),
        latency=latency.LatencySizes(
            seconds=pick(args.latency_seconds, 10.0, 2.0),
            drain_fractions=(0.5,) if quick else (0.1, 0.5, 0.8),
            held_seconds=pick(args.held_seconds, 60.0, 5.0),
        ),
        reconcile=reconcile.ReconcileSizes(
            results=pick(args.reconcile_results, 100_000, 3_000),
            status_events=(True,) if quick else (True, False),
        ),
        rss=rss.RssSizes(
            small=pick(args.rss_small, 10_000, 2_000),
            large=pick(args.rss_large, 1_000_000, 20_000),
            window_s=pick(args.rss_window, 15.0, 3.0),
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    plan = plan_for(args)
    out: Path = args.out
    log_dir = out / "logs"
    started = time.monotonic()
    figures: list[Figure] = []
    notes: list[str] = []
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    with local_services(fsync=args.fsync) as services:
        url, bootstrap = services.database_url, services.kafka_bootstrap_servers
        meta["fsync"] = server_fsync(url)
        print(f"services ready; PostgreSQL fsync={meta['fsync']}", flush=True)
        drain_rate: float | None = args.drain_rate
        if "a" in args.parts:
            figures += commits.run(url, bootstrap, plan.commits, log_dir)
        if "b" in args.parts:
            found, more, measured = drain.run(url, bootstrap, plan.drain, log_dir)
            figures += found
            notes += more
            drain_rate = drain_rate or measured
        if "c" in args.parts:
            if drain_rate is None:
                drain_rate = 5000.0
                notes.append("(c) loads are fractions of an assumed drain rate of 5,000/s")
            figures += latency.run(url, bootstrap, plan.latency, drain_rate, log_dir)
            notes.append(
                "(c) the latency's ceiling is a floor: the relay's producer alone (its "
                "configuration, records and headers, one transaction at a time) on the same "
                "schedule, no database; its ratio is the relay's latency over the floor's"
            )
        if "d" in args.parts:
            figures += reconcile.run(url, bootstrap, plan.reconcile, log_dir)
        if "e" in args.parts:
            figures += rss.run(url, bootstrap, plan.rss, log_dir)
            notes.append(
                f"(e) each daemon worked {plan.rss.window_s:g} s on each backlog: a backlog of "
                f"{plan.rss.large:,} is not drained in that window; the peak over it is reported"
            )
    notes.append(
        "(b)-(e) run with status events off; (d) also reports them on. The effects of (d) are "
        "published by the relay before the reconciler starts; in (e) the reconciler reads results "
        "of the effects the relay published in its window, and of the rest (quarantined: no effect)"
    )
    meta["sizes"] = {
        "commits": vars(plan.commits),
        "drain": vars(plan.drain),
        "latency": vars(plan.latency),
        "reconcile": vars(plan.reconcile),
        "rss": vars(plan.rss),
    }
    meta["seconds"] = round(time.monotonic() - started, 1)
    md, js = write_results(out, figures, meta, notes)
    plots = write_plots(out, figures)
    print()
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md}, {js}" + "".join(f", {p}" for p in plots))
    if not plots:
        print("no plots: matplotlib is missing (pip install -e '.[bench]')")
    print(f"total {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()

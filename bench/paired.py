"""Paired drains: the same drain by a base revision and by this checkout, in turns, on one
PostgreSQL and one broker.

    python -m bench.paired --base main [--pairs 3] [--effects 20000] [--status-events] [--purge]

On a shared 2-core machine a drain's rate and PostgreSQL's CPU per effect move by 20 % and more
between runs of one code; two drains run back to back move much less. A change is judged by its
ratio to the base within each pair: the base's tree (``git archive`` of ``--base``) runs its own
``bench.drain.relay_drain``, with its own relay and migrations, in a database of its own, and
this checkout runs its own, alternating which goes first. Both are measured by this checkout's
``bench/`` (copied over the base's, so that a change to the measurement is not read as a change
of the code; ``--base-bench`` keeps the base's own). Prints each pair and the medians.
Starts PostgreSQL and Kafka (relay.devtools.services) unless RELAY_DATABASE_URL /
RELAY_KAFKA_BOOTSTRAP_SERVERS name running ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.report import ratio

ROOT = Path(__file__).resolve().parents[1]
MARK = "PAIRED "

# Run in each tree (its own bench, relay and migrations): one drain, its figures as one line.
_CHILD = """
import json, sys
from pathlib import Path
import bench.drain as D
a = json.loads(sys.argv[1])
# Passed only when asked: a base's own bench (--base-bench) may predate the arguments.
more = {k: True for k in ("purge", "status_events") if a[k]}
r = D.relay_drain(a["url"], a["bootstrap"], D.DrainSizes(effects=a["effects"]),
                  payload_bytes=a["payload_bytes"], replicas=a["replicas"], codec="none",
                  log_dir=Path(a["log_dir"]), groups=a["groups"], **more)
print("PAIRED " + json.dumps({"rate": r.status_rate if a["status_events"] else r.rate,
                              "pg_us": getattr(r, "pg_us", None),
                              "relay_us": getattr(r, "proc_us", None),
                              "purge_us": getattr(r, "purge_us", None),
                              "forget_us": getattr(r, "forget_us", None),
                              "pg_roles": getattr(r, "pg_roles", None),
                              "seen": r.seen, "duplicates": r.duplicates, "note": r.note}),
      flush=True)
"""


@dataclass(frozen=True)
class Drain:
    """One drain's figures: effects/s (until every status event is out, with them on), the
    local PostgreSQL's CPU per effect (None for a server elsewhere) and the relay process's
    (None from a base whose drain did not measure it); with ``--purge``, PostgreSQL's CPU per
    intent of the purge at retention and of the one that forgets the keys."""

    rate: float | None
    pg_us: float | None
    relay_us: float | None = None
    purge_us: float | None = None
    forget_us: float | None = None
    # The relay's backends' share of pg_us by role (None from a base whose drain did not split it).
    pg_roles: Mapping[str, float] | None = None

    def role_us(self, role: str) -> float | None:
        return None if self.pg_roles is None else self.pg_roles.get(role, 0.0)

    def __str__(self) -> str:
        def us(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} us"

        rate = "-" if self.rate is None else f"{self.rate:,.0f}/s"
        text = f"{rate}, PostgreSQL {us(self.pg_us)}, relay {us(self.relay_us)} an effect"
        if self.pg_roles:
            text += (
                " (PostgreSQL for the "
                + ", ".join(f"{role} {us(self.pg_roles[role])}" for role in sorted(self.pg_roles))
                + ")"
            )
        if self.purge_us is not None or self.forget_us is not None:
            text += f"; purge {us(self.purge_us)}, forget {us(self.forget_us)}"
        return text


@dataclass(frozen=True)
class Pair:
    base: Drain
    head: Drain

    def __iter__(self) -> Iterator[Drain]:
        return iter((self.base, self.head))


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summary(pairs: Sequence[Pair]) -> list[str]:
    """Markdown lines: one row per pair (each side, and head against base), then the medians."""

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    names = ["rate/s", "PG us", "relay us"]
    figures: list[tuple[Callable[[Drain], float | None], int]] = [
        (lambda d: d.rate, 0),
        (lambda d: d.pg_us, 1),
        (lambda d: d.relay_us, 1),
    ]
    if any(d.pg_roles is not None for p in pairs for d in p):
        names += ["claimer PG us", "marker PG us"]
        figures += [(lambda d: d.role_us("claimer"), 1), (lambda d: d.role_us("marker"), 1)]
    if any(d.purge_us is not None or d.forget_us is not None for p in pairs for d in p):
        names += ["purge PG us", "forget PG us"]
        figures += [(lambda d: d.purge_us, 1), (lambda d: d.forget_us, 1)]
    titles = "".join(f" base {n} | head {n} | head/base |" for n in names)
    lines = ["| pair |" + titles, "| --- |" + " ---: |" * (3 * len(names))]
    rows: list[tuple[str, list[str]]] = []
    for i, p in enumerate(pairs, 1):
        cells = []
        for get, digits in figures:
            base, head = get(p.base), get(p.head)
            cells += [num(base, digits), num(head, digits), num(ratio(head, base), 2)]
        rows.append((str(i), cells))
    cells = []
    for get, digits in figures:
        cells += [
            num(median([get(p.base) for p in pairs]), digits),
            num(median([get(p.head) for p in pairs]), digits),
            num(median([ratio(get(p.head), get(p.base)) for p in pairs]), 2),
        ]
    rows.append(("median", cells))
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return lines


def export_tree(rev: str, into: Path, repo: Path = ROOT) -> str:
    """The files of ``rev`` (a commit of ``repo``) under ``into``; its full hash."""
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", sha], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    if not (into / "bench" / "drain.py").is_file():
        raise SystemExit(f"{rev} ({sha[:10]}) has no bench/drain.py: too old to pair with")
    return sha


def drain_in(tree: Path, args: dict[str, Any]) -> Drain:
    """One drain by the code of ``tree``, in a subprocess run from it (its daemons too)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            found = json.loads(line[len(MARK) :])
            if found["duplicates"]:
                print(f"  ({tree.name}: {found['duplicates']} duplicates)", flush=True)
            return Drain(
                found["rate"],
                found["pg_us"],
                found.get("relay_us"),
                found.get("purge_us"),
                found.get("forget_us"),
                found.get("pg_roles"),
            )
    tail = (done.stderr or done.stdout)[-2000:]
    raise SystemExit(f"the drain in {tree} failed (exit {done.returncode}):\n{tail}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, help="the revision to pair with (e.g. main)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of drains [3]")
    parser.add_argument("--effects", type=int, default=20_000, help="backlog per drain [20000]")
    parser.add_argument("--payload-bytes", type=int, default=256, help="payload size [256]")
    parser.add_argument("--replicas", type=int, default=1, help="relay processes [1]")
    parser.add_argument("--groups", type=int, default=0, help="ordering groups (0: none) [0]")
    parser.add_argument(
        "--status-events", action="store_true", help="status events on (timed until all are out)"
    )
    parser.add_argument(
        "--purge",
        action="store_true",
        help="after each drain, measure `relay purge` at retention 0, then forgetting the keys",
    )
    parser.add_argument(
        "--base-bench",
        action="store_true",
        help="measure the base with its own bench/ (default: this checkout's, on both sides)",
    )
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.effects < 1:
        parser.error("--pairs and --effects must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from relay.devtools.services import local_services

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relay-paired-") as tmp:
        base_tree = Path(tmp) / "base"
        sha = export_tree(args.base, base_tree)
        if not args.base_bench:
            shutil.rmtree(base_tree / "bench")
            shutil.copytree(
                ROOT / "bench",
                base_tree / "bench",
                ignore=shutil.ignore_patterns("results", "__pycache__"),
            )
        print(f"base {args.base} ({sha[:10]}) against this checkout ({ROOT})", flush=True)
        with local_services() as services:
            shared = {
                "url": services.database_url,
                "bootstrap": services.kafka_bootstrap_servers,
                "effects": args.effects,
                "payload_bytes": args.payload_bytes,
                "replicas": args.replicas,
                "groups": args.groups,
                "status_events": args.status_events,
                "purge": args.purge,
                "log_dir": str(Path(tmp) / "logs"),
            }
            pairs: list[Pair] = []
            for i in range(args.pairs):
                # Alternate which goes first, so that a drift in the machine's speed is shared.
                order = ("base", "head") if i % 2 == 0 else ("head", "base")
                found = {
                    side: drain_in(base_tree if side == "base" else ROOT, shared) for side in order
                }
                pairs.append(Pair(found["base"], found["head"]))
                print(f"  pair {i + 1}: base {found['base']}; head {found['head']}", flush=True)
    print("\n".join(["", *summary(pairs)]))


if __name__ == "__main__":
    main()

"""How long a batch left without an outcome takes to be settled, with receipts and without.

A relay claims one batch of ``--effects`` intents and dies, either before sending it ("never
sent") or after committing it but before recording the outcomes ("committed"). A relay with the
same replica id then starts; the figure is the time from its start until every intent is
PUBLISHED, and the rows it wrote on the way. With receipts (the default), one read of the dead
incarnation's receipts after fencing settles the batch; without them (``receipts_topic`` empty,
the baseline of the same run), its intents become UNKNOWN and each is looked for in Kafka.

    python -m bench.recovery [--effects 5000] [--rounds 2]

Starts PostgreSQL and Kafka (relay.devtools.services) unless RELAY_DATABASE_URL /
RELAY_KAFKA_BOOTSTRAP_SERVERS name running ones.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import psycopg

from bench.common import create_topic, drop_db, fill_backlog, fresh_db, prepare, settings_for
from bench.report import ratio
from relay.config import Settings
from relay.devtools.services import local_services
from relay.dispatch.daemon import Relay
from relay.dispatch.publisher import PublishResult
from relay.dispatch.stage import Claimed


class _NeverSends(Relay):
    """Claims a batch and drops it unsent, as a crash before the send would."""

    def _publish_and_mark(self, claimed: Claimed) -> None:
        self.dropped = getattr(self, "dropped", 0) + len(claimed.effects)


class _LosesOutcomes(Relay):
    """Commits its batch and loses the outcomes, as a crash after the commit would."""

    def _submit_outcomes(self, results: Sequence[PublishResult], claimed_at: float) -> None:
        self.lost = getattr(self, "lost", 0) + len(results)


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def _published(url: str) -> int:
    return _count(
        url,
        "SELECT (SELECT count(*) FROM relay.effect WHERE state = 'PUBLISHED') "
        "+ (SELECT coalesce(sum(n), 0) FROM relay.published_batch)",
    )


def _run(daemon: Relay, until: Callable[[], bool], timeout_s: float) -> float:
    """Run the daemon in a thread until ``until()`` holds; the seconds that took."""
    thread = threading.Thread(target=daemon.run, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while not until():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"not done within {timeout_s:.0f}s")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        daemon.stop()
        thread.join(120)


def one(
    server_url: str, bootstrap: str, effects: int, crash: str, receipts: bool
) -> dict[str, float]:
    """One crash and recovery; the recovery's seconds and the rows written per effect."""
    url = fresh_db(server_url)
    prefix = f"rec{uuid.uuid4().hex[:8]}"
    try:
        settings: Settings = settings_for(
            url,
            bootstrap,
            prefix,
            batch_size=effects,
            receipts_topic=f"{prefix}.receipts" if receipts else None,
        )
        prepare(settings)
        create_topic(bootstrap, f"{prefix}.bench")
        if receipts:
            create_topic(bootstrap, f"{prefix}.receipts", partitions=1)
        fill_backlog(url, "bench", effects, 256, prefix)
        dead: Relay = _NeverSends(settings) if crash == "never sent" else _LosesOutcomes(settings)
        counter = "dropped" if crash == "never sent" else "lost"
        _run(dead, lambda: getattr(dead, counter, 0) >= effects, 300)
        before = {
            t: _count(url, f"SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = '{t}'")
            for t in ("effect", "attempt", "transition")
        }
        seconds = _run(Relay(settings), lambda: _published(url) >= effects, 600)
        time.sleep(0.5)  # the statistics collector is told at each transaction's end
        rows = sum(
            _count(url, f"SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = '{t}'") - n
            for t, n in before.items()
        )
        unknown = _count(url, "SELECT count(*) FROM relay.transition WHERE to_state = 'UNKNOWN'")
        return {"seconds": seconds, "rows": rows / effects, "unknown": unknown}
    finally:
        drop_db(server_url, url)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--effects", type=int, default=5000, help="intents in the dead batch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(
        "| round | crash | without receipts s | with receipts s | ratio | rows/effect "
        "(without, with) | UNKNOWN (without, with) |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    with local_services() as services:
        server, bootstrap = services.database_url, services.kafka_bootstrap_servers
        for round_ in range(1, args.rounds + 1):
            for crash in ("never sent", "committed"):
                base = one(server, bootstrap, args.effects, crash, receipts=False)
                new = one(server, bootstrap, args.effects, crash, receipts=True)
                speedup = ratio(base["seconds"], new["seconds"])
                print(
                    f"| {round_} | {crash} | {base['seconds']:.2f} | {new['seconds']:.2f} | "
                    f"{speedup or 0:.1f}x | {base['rows']:.2f}, {new['rows']:.2f} | "
                    f"{base['unknown']:.0f}, {new['unknown']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""The batch size's trade: one relay drains the same backlog with each ``batch_size``, beside a
bare transactional producer sending the same records in transactions of that size.

    python -m bench.batch_sizes [--sizes 500,2000,5000,10000] [--effects 60000] [--rounds 2]

Prints, per size: the relay's rate and its ratio to the bare producer's and to the first size's
(same round), the relay's CPU and PostgreSQL's per effect, and the relay's peak RSS. Starts
PostgreSQL and Kafka (relay.devtools.services) unless RELAY_DATABASE_URL /
RELAY_KAFKA_BOOTSTRAP_SERVERS name running ones.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.drain import DrainSizes, bare_producer_drain, relay_drain
from bench.report import ratio
from relay.config import Settings
from relay.devtools.services import local_services


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="500,2000,5000,10000", help="batch sizes, comma-separated"
    )
    parser.add_argument("--effects", type=int, default=60_000, help="backlog per drain")
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="every size once per round")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    source = str(Settings.model_fields["cloudevents_source"].default)
    drain = DrainSizes(effects=args.effects)
    print(
        "| round | batch_size | relay/s | relay/bare | relay/first | relay us | PG us | RSS MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with local_services() as services, tempfile.TemporaryDirectory() as logs:
        url, bootstrap = services.database_url, services.kafka_bootstrap_servers
        for round_ in range(1, args.rounds + 1):
            first: float | None = None
            for size in sizes:
                bare = bare_producer_drain(
                    bootstrap,
                    drain,
                    payload_bytes=args.payload_bytes,
                    codec="none",
                    batch=size,
                    source=source,
                )
                relay = relay_drain(
                    url,
                    bootstrap,
                    drain,
                    payload_bytes=args.payload_bytes,
                    replicas=1,
                    codec="none",
                    log_dir=Path(logs),
                    batch_size=size,
                )
                if first is None:
                    first = relay.rate
                to_bare, to_first = ratio(relay.rate, bare.rate), ratio(relay.rate, first)
                rss = None if relay.peak_kib is None else relay.peak_kib / 1024
                print(
                    f"| {round_} | {size:,} | {_num(relay.rate)} | {_num(to_bare, 2)} | "
                    f"{_num(to_first, 2)} | {_num(relay.proc_us, 1)} | {_num(relay.pg_us, 1)} | "
                    f"{_num(rss)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Would lanes (issue 19, item 3) let replicas drain faster here? One relay and two drain the same
backlog in turns while a sampler polls the lock on the intake's reader row: the share of the
time a read holds it is what parallel reads by lane could give back.

    python -m bench.reader_share [--effects 60000] [--rounds 2]

Starts a throwaway PostgreSQL and Kafka unless RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS
name servers. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.drain import DrainSizes, relay_drain
from relay.devtools.services import local_services


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--effects", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--payload-bytes", type=int, default=256)
    args = parser.parse_args()
    sizes = DrainSizes(effects=args.effects)
    with local_services() as services, tempfile.TemporaryDirectory() as logs:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        for round_no in range(args.rounds):
            order = (1, 2) if round_no % 2 == 0 else (2, 1)
            for replicas in order:
                drained = relay_drain(
                    services.database_url,
                    services.kafka_bootstrap_servers,
                    sizes,
                    payload_bytes=args.payload_bytes,
                    replicas=replicas,
                    codec="none",
                    log_dir=Path(logs),
                    sample_reader=True,
                )
                busy = drained.reader_busy
                print(
                    f"round {round_no + 1}, {replicas} relay(s): "
                    f"{drained.rate or 0:,.0f} effects/s, reader row held "
                    f"{'-' if busy is None else f'{busy:.0%}'} of the drain, "
                    f"PostgreSQL {drained.pg_us or 0:.1f} us an effect "
                    f"(claimer {(drained.pg_roles or {}).get('claimer', 0):.1f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()

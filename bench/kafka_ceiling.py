"""The kafka-python ceiling: a bare transactional producer sending the records the relay sends
(key ~30 bytes, value ~100 bytes, the CloudEvents headers of ``relay.headers``), in transactions
of 500 and 5,000 records, with the relay's producer settings.

    python -m bench.kafka_ceiling [--records 20000]

Prints records/s (from the first send to the last commit's return) and the CPU of the Python
process per record (user + system, every thread of it: the sender thread does the encoding and
the checksums). Each run is a fresh process: with and without the ``crc32c`` package (without it
is simulated by hiding the module from the child, nothing is uninstalled), and with one extra
record per transaction to a compacted "position" topic (what issue 19's lanes write inside each
Kafka transaction). Uses RELAY_KAFKA_BOOTSTRAP_SERVERS or starts a throwaway broker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

from kafka.admin import KafkaAdminClient, NewTopic


@dataclass(frozen=True)
class Ceiling:
    per_txn: int
    crc32c: bool
    position: bool
    records: int
    seconds: float
    cpu_s: float
    crc32c_c_loaded: bool

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def cpu_us_per_record(self) -> float:
        return self.cpu_s * 1e6 / self.records

    @property
    def name(self) -> str:
        crc = "crc32c (C)" if self.crc32c_c_loaded else "no crc32c (pure Python)"
        extra = " + 1 position record/txn" if self.position else ""
        return f"{self.per_txn:>5}/txn, {crc}{extra}"


def create_topics(bootstrap: str, topics: dict[str, dict[str, str]], partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics(
            [
                NewTopic(t, 1 if configs else partitions, 1, topic_configs=configs)
                for t, configs in topics.items()
            ]
        )
    finally:
        admin.close()


def measure(bootstrap: str, *, n: int, per_txn: int, use_crc32c: bool, position: bool) -> Ceiling:
    prefix = f"ceil{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.bench"
    position_topic = f"{prefix}.positions" if position else None
    topics: dict[str, dict[str, str]] = {topic: {}}
    if position_topic is not None:
        topics[position_topic] = {"cleanup.policy": "compact"}
    create_topics(bootstrap, topics)
    # A fresh interpreter: ``crc32c`` can only be hidden before kafka-python is imported.
    spec = [bootstrap, topic, position_topic, n, per_txn, use_crc32c]
    done = subprocess.run(
        [sys.executable, "-m", "bench.kafka_ceiling_child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the producer process failed:\n{done.stderr[-3000:]}")
    seconds, cpu, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.delete_topics(list(topics))
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the figures
        print(f"  (could not delete topics {prefix}.*: {exc})", file=sys.stderr)
    finally:
        admin.close()
    return Ceiling(per_txn, use_crc32c, position, n, float(seconds), float(cpu), bool(loaded))


def run(bootstrap: str, records: int) -> list[Ceiling]:
    """Each shape once after a warm-up run; the 500/txn baseline is measured first and last
    (drift)."""
    measure(bootstrap, n=min(records, 5000), per_txn=500, use_crc32c=True, position=False)
    shapes = [
        (500, True, False),
        (5000, True, False),
        (500, True, True),
        (5000, True, True),
        (500, False, False),
        (5000, False, False),
        (500, True, False),
    ]
    results: list[Ceiling] = []
    for per_txn, crc, position in shapes:
        n = records if crc else max(per_txn * 2, records // 4)  # pure Python checksums are slow
        result = measure(bootstrap, n=n, per_txn=per_txn, use_crc32c=crc, position=position)
        results.append(result)
        base = results[0]
        print(
            f"{result.rate:>9,.0f} records/s  {result.rate / base.rate:.2f}x  "
            f"{result.cpu_us_per_record:6.1f} us CPU/record  {result.name}  "
            f"({result.records:,} records)",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    from relay.devtools.services import LocalKafka

    bootstrap = os.environ.get("RELAY_KAFKA_BOOTSTRAP_SERVERS")
    local = None
    if not bootstrap:
        local = LocalKafka()
        local.start()
        bootstrap = local.bootstrap_servers
    try:
        run(bootstrap, args.records)
    finally:
        if local is not None:
            local.stop()


if __name__ == "__main__":
    main()

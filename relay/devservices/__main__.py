"""``python -m relay.devservices``: start local PostgreSQL and Kafka and wait for Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
import time

from relay.devservices import DevServicesError, local_services


def main() -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    try:
        with local_services(fsync=True) as services:
            print(f"export RELAY_DATABASE_URL={services.database_url}")
            print(f"export RELAY_KAFKA_BOOTSTRAP_SERVERS={services.kafka_bootstrap_servers}")
            print(f"# ready in {time.monotonic() - started:.1f}s; Ctrl-C stops both", flush=True)
            stop.wait()
    except DevServicesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

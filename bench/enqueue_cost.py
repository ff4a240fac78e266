"""Where an enqueue's cost goes: pgbench, 8 clients, one statement per transaction, against a
plain table and against each step towards ``relay.enqueue``, in one run on one server.

    python -m bench.enqueue_cost [--seconds 10] [--clients 8]

No Python client in the loop (pgbench is C), so the figures are the server's own cost of each
row, index and check. Uses RELAY_DATABASE_URL or starts a throwaway PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import psycopg

from bench.common import drop_db, fresh_db, prepare, settings_for
from relay.devtools.services.postgres import pg_bin_dir

PAYLOAD = '{"account": "ACC1", "amount": 100, "date": "2026-11-22", "body": "' + "x" * 180 + '"}'
KEY = "k-:client_id-:n"

VARIANTS: dict[str, str] = {
    "plain insert (bigint identity key, text, jsonb)": (
        f"INSERT INTO bench_plain (k, payload) VALUES ('{KEY}', '{PAYLOAD}');"
    ),
    "plain insert with a unique text key": (
        f"INSERT INTO bench_plain_unique (k, payload) VALUES ('{KEY}', '{PAYLOAD}');"
    ),
    "bare INSERT into relay.effect (its indexes and defaults)": (
        "INSERT INTO relay.effect (operation_key, effect_type, topic, payload) "
        f"VALUES ('{KEY}', 'bench', 'bench', '{PAYLOAD}');"
    ),
    "SELECT relay.enqueue(...)": (f"SELECT * FROM relay.enqueue('{KEY}', 'bench', '{PAYLOAD}');"),
    "SELECT relay.enqueue(...) with an ordering group (one of 10,000)": (
        f"SELECT * FROM relay.enqueue('{KEY}', 'bench', '{PAYLOAD}', NULL, NULL, NULL, "
        "'g-' || (:n % 10000));"
    ),
}

SETUP = """
CREATE TABLE bench_plain (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k text NOT NULL, payload jsonb NOT NULL);
CREATE TABLE bench_plain_unique (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k text NOT NULL UNIQUE,
    payload jsonb NOT NULL);
"""


def pgbench(url: str, script: str, *, clients: int, seconds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "script.sql"
        path.write_text("\\set n random(1, 9000000000000)\n" + script + "\n")
        done = subprocess.run(
            [
                str(pg_bin_dir() / "pgbench"),
                "-n",
                "-c",
                str(clients),
                "-j",
                str(min(clients, 2)),
                "-T",
                str(seconds),
                "-f",
                str(path),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if found is None:
        raise RuntimeError(f"pgbench said: {done.stdout}\n{done.stderr}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    server = os.environ.get("RELAY_DATABASE_URL")
    local = None
    if server is None:
        from relay.devtools.services.postgres import LocalPostgres

        local = LocalPostgres()
        local.start()
        server = local.url
    try:
        run(server, args.clients, args.seconds)
    finally:
        if local is not None:
            local.stop()


def run(server: str, clients: int, seconds: int) -> dict[str, float]:
    rates: dict[str, float] = {}
    for name, script in VARIANTS.items():
        url = fresh_db(server)  # each variant on an empty database
        try:
            settings = settings_for(url, "127.0.0.1:9", "bench", database_url=url)
            prepare(settings)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(SETUP)
            rates[name] = pgbench(url, script, clients=clients, seconds=seconds)
        finally:
            drop_db(server, url)
        plain = next(iter(rates.values()))
        print(f"{rates[name]:>9,.0f} tps  {rates[name] / plain:.2f}x  {name}", flush=True)
    return rates


if __name__ == "__main__":
    main()

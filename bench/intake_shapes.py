"""Issue 19 grounded on this machine: what candidate intake shapes cost the application's commit,
what reading them between stored snapshots ("ticks", PgQ's method) costs PostgreSQL, and what a
bare kafka-python transactional producer costs per record.

    python -m bench.intake_shapes [--seconds 10] [--clients 8] [--rows 200000] [--records 20000]
        [--shapes a,b,bl,bg] [--commits-only]

1. Commits: pgbench (C, so no Python client in the loop), 8 clients, one row per transaction, as
   a non-owner LOGIN role that has only the rights each shape needs, ``--seconds`` per shape
   split into two rounds run in opposite orders (drift and the other helpers' load fall on every
   shape alike). Ratios are to (a), the plain insert, measured in the same run.
2. Drain: ``--rows`` intake rows loaded by pgbench in transactions of 5 rows while a ticker
   stores ``pg_current_snapshot()`` every 5 ms and one writing transaction stays open across the
   whole load; then batches of ~500 and ~5,000 rows "visible in tick b, not in tick a" are read
   in one statement each (the tick pair and the rows), with and without one bookkeeping row per
   batch. PostgreSQL CPU is the reader backend's utime+stime from /proc (local server only).
3. The kafka-python ceiling (:mod:`bench.kafka_ceiling`).

Starts a throwaway PostgreSQL and Kafka (relay.devtools.services.local_services) unless
RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS name servers. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from bench import kafka_ceiling
from bench.common import drop_db, fresh_db, prepare, server_fsync, settings_for
from relay.devtools.services import local_services
from relay.devtools.services.postgres import pg_bin_dir
from relay.dispatch import ticker as relay_ticker

# The payload of bench/enqueue_cost.py: 256 bytes of JSON, the same for every shape.
PAYLOAD = '{"account": "ACC1", "amount": 100, "date": "2026-11-22", "body": "' + "x" * 180 + '"}'
KEY = "k-:client_id-:n"
TICK_LOCK = 1380273219  # the ticker's advisory lock (relay.enqueue's groups use 1380273218)

# -- the shapes ------------------------------------------------------------------------------------

SETUP = """
-- Migration 0010 made the real intake and ticks; the bench keeps its own shapes of §1 (the same
-- columns as the real intake), so that its figures stay comparable with the design's.
CREATE SCHEMA shapes;  -- beside the real intake and ticks, which later migrations build on
CREATE TABLE public.bench_plain (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k text NOT NULL, payload jsonb NOT NULL);

-- (b) the candidate: the effect type is an enum kept by `relay migrate` (no lookup per row).
CREATE TYPE shapes.intake_type AS ENUM ('bench', 'other');
CREATE TABLE shapes.intake (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_key  text NOT NULL UNIQUE,
    effect_type    shapes.intake_type NOT NULL,
    payload        jsonb NOT NULL,
    business_key   text,
    traceparent    text,
    available_at   timestamptz,
    ordering_group text,
    enqueued_by    text NOT NULL DEFAULT session_user,
    txid           xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX intake_txid_idx ON shapes.intake (txid);

-- (b') the same without the primary key on id (a BRIN on id for purges and lookups instead).
CREATE TABLE shapes.intake_lean (LIKE shapes.intake INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE shapes.intake_lean ADD UNIQUE (operation_key);
CREATE INDEX intake_lean_txid_idx ON shapes.intake_lean (txid);
CREATE INDEX intake_lean_id_brin ON shapes.intake_lean USING brin (id);

-- (b0) only the unique key: what the reader's index and the PK cost on top of it.
CREATE TABLE shapes.intake_bare (LIKE shapes.intake INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE shapes.intake_bare ADD UNIQUE (operation_key);

-- (c) the type as text with a foreign key to relay.effect_type.
CREATE TABLE shapes.intake_fk (LIKE shapes.intake INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE shapes.intake_fk ALTER COLUMN effect_type TYPE text,
    ADD PRIMARY KEY (id), ADD UNIQUE (operation_key),
    ADD FOREIGN KEY (effect_type) REFERENCES relay.effect_type (name);
CREATE INDEX intake_fk_txid_idx ON shapes.intake_fk (txid);

-- (bl) issue 19's lanes (design §5): the read index on (lane, txid), the lane an expression.
CREATE TABLE shapes.intake_lane (LIKE shapes.intake INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE shapes.intake_lane ADD PRIMARY KEY (id), ADD UNIQUE (operation_key);
CREATE INDEX intake_lane_read_idx ON shapes.intake_lane
    ((abs(hashtext(coalesce(ordering_group, operation_key))) % 8), txid);

-- (bg) the same lane as a stored generated column (the design's fallback).
CREATE TABLE shapes.intake_lane_col (LIKE shapes.intake INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE shapes.intake_lane_col ADD PRIMARY KEY (id), ADD UNIQUE (operation_key),
    ADD COLUMN lane integer GENERATED ALWAYS AS
        (abs(hashtext(coalesce(ordering_group, operation_key))) % 8) STORED;
CREATE INDEX intake_lane_col_read_idx ON shapes.intake_lane_col (lane, txid);

-- (f) a grouped enqueue through a function: the group's lock is taken before the id is drawn.
CREATE FUNCTION shapes.intake_grouped(p_key text, p_type shapes.intake_type, p_payload jsonb,
                                     p_group text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_advisory_xact_lock(1380273218, hashtext(p_group));
    INSERT INTO shapes.intake (operation_key, effect_type, payload, ordering_group, enqueued_by)
    VALUES (p_key, p_type, p_payload, p_group, session_user)
    ON CONFLICT DO NOTHING RETURNING id;
$$;

-- The ticks and the per-batch bookkeeping of the drain measurement.
CREATE TABLE shapes.tick (
    id   bigint PRIMARY KEY,
    snap pg_snapshot NOT NULL,
    at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE shapes.lane_batch (
    lane       integer NOT NULL,
    batch      bigint NOT NULL,
    tick_from  bigint NOT NULL,
    tick_to    bigint NOT NULL,
    after_id   bigint NOT NULL,
    last_id    bigint NOT NULL,
    rows       integer NOT NULL,
    producer   text NOT NULL,
    epoch      bigint NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    committed_at timestamptz,
    PRIMARY KEY (lane, batch)
);
"""

GRANTS = """
GRANT USAGE ON SCHEMA relay, shapes TO {role};
GRANT INSERT ON public.bench_plain TO {role};
GRANT INSERT (operation_key, effect_type, payload, business_key, traceparent, available_at,
              ordering_group)
    ON shapes.intake, shapes.intake_lean, shapes.intake_bare, shapes.intake_fk, shapes.intake_lane,
       shapes.intake_lane_col
    TO {role};
GRANT EXECUTE ON FUNCTION relay.enqueue(text, text, jsonb, text, text, timestamptz, text)
    TO {role};
GRANT EXECUTE ON FUNCTION shapes.intake_grouped(text, shapes.intake_type, jsonb, text) TO {role};
"""

_ONE = f"('{KEY}', 'bench', '{PAYLOAD}')"
SHAPES: dict[str, str] = {
    "a": f"INSERT INTO public.bench_plain (k, payload) VALUES ('{KEY}', '{PAYLOAD}');",
    "b": (
        "INSERT INTO shapes.intake (operation_key, effect_type, payload) "
        f"VALUES {_ONE} ON CONFLICT DO NOTHING;"
    ),
    "b'": (
        "INSERT INTO shapes.intake_lean (operation_key, effect_type, payload) "
        f"VALUES {_ONE} ON CONFLICT DO NOTHING;"
    ),
    "b0": (
        "INSERT INTO shapes.intake_bare (operation_key, effect_type, payload) "
        f"VALUES {_ONE} ON CONFLICT DO NOTHING;"
    ),
    "bl": (
        "INSERT INTO shapes.intake_lane (operation_key, effect_type, payload) "
        f"VALUES {_ONE} ON CONFLICT DO NOTHING;"
    ),
    "bg": (
        "INSERT INTO shapes.intake_lane_col (operation_key, effect_type, payload) "
        f"VALUES {_ONE} ON CONFLICT DO NOTHING;"
    ),
    "c": (
        "INSERT INTO shapes.intake_fk (operation_key, effect_type, payload) "
        f"VALUES {_ONE} ON CONFLICT DO NOTHING;"
    ),
    "d": f"SELECT * FROM relay.enqueue('{KEY}', 'bench', '{PAYLOAD}');",
    "e": (
        # A grouped enqueue without a function: the client locks the group, then inserts, both
        # in one message (``\\;``: one implicit transaction, one round trip, as a pipeline would).
        "SELECT pg_advisory_xact_lock(1380273218, hashtext('g-' || (:n % 10000))) \\;\n"
        "INSERT INTO shapes.intake (operation_key, effect_type, payload, ordering_group) "
        f"VALUES ('{KEY}', 'bench', '{PAYLOAD}', 'g-' || (:n % 10000)) "
        "ON CONFLICT DO NOTHING;"
    ),
    "f": (f"SELECT shapes.intake_grouped('{KEY}', 'bench', '{PAYLOAD}', 'g-' || (:n % 10000));"),
}
# Bare ``ON CONFLICT DO NOTHING``: naming the arbiter (``ON CONFLICT (operation_key)``) needs
# SELECT on operation_key, which an INSERT-only role lacks ("permission denied for table").
NAMES = {
    "a": "plain insert (identity PK, text key, jsonb): the ceiling",
    "b": "shapes.intake, enum type, PK+unique key+txid index, ON CONFLICT DO NOTHING",
    "b'": "shapes.intake without the PK on id (BRIN on id)",
    "b0": "shapes.intake with the unique key only (no PK, no txid index)",
    "bl": "as (b), the read index on (lane expression, txid) (issue 19's lanes)",
    "bg": "as (b), a stored generated lane column, index (lane, txid)",
    "c": "shapes.intake with text type + FK to relay.effect_type",
    "d": "SELECT relay.enqueue(...) (today's path)",
    "e": "grouped: client locks the group, then the (b) INSERT, one round trip",
    "f": "grouped: SECURITY DEFINER SQL function (lock + (b) INSERT)",
}


def pgbench(
    url: str, script: str, *, clients: int, seconds: int = 0, transactions: int = 0
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "script.sql"
        path.write_text("\\set n random(1, 9000000000000)\n" + script + "\n")
        length = ["-T", str(seconds)] if seconds else ["-t", str(transactions)]
        done = subprocess.run(
            [
                str(pg_bin_dir() / "pgbench"),
                "-n",
                "-c",
                str(clients),
                "-j",
                "2",
                *length,
                "-f",
                str(path),
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench said: {done.stdout}\n{done.stderr}")
    return float(found.group(1))


def commit_rates(
    owner_url: str, app_url: str, clients: int, seconds: int, shapes: list[str] | None = None
) -> dict[str, float]:
    """Two rounds of ``seconds / 2`` per shape, the second in the opposite order; the mean tps.
    Ratios are to (a), always measured."""
    half = max(1, seconds // 2)
    order = ["a", *[s for s in shapes if s != "a"]] if shapes else list(SHAPES)
    totals = dict.fromkeys(order, 0.0)
    for round_order in (order, order[::-1]):
        for shape in round_order:
            totals[shape] += pgbench(app_url, SHAPES[shape], clients=clients, seconds=half)
            try:
                with psycopg.connect(owner_url, autocommit=True) as conn:
                    conn.execute("CHECKPOINT")  # no shape pays for the one before's dirt
            except psycopg.Error:
                pass  # not a superuser on a server we did not start
    rates = {shape: total / 2 for shape, total in totals.items()}
    for shape, rate in rates.items():
        print(f"{rate:>9,.0f} tps  {rate / rates['a']:.2f}x  ({shape}) {NAMES[shape]}", flush=True)
    return rates


# -- the drain ------------------------------------------------------------------------------------

# One statement: the tick pair and the rows visible in tick b and not in tick a. Like PgQ's batch
# SQL: an index range [xmax(a), xmax(b)) for transactions that began after tick a, plus the exact
# xids that tick a saw in progress and tick b sees committed (a long transaction is one probe,
# however long it stayed open). Within the pair, rows are ordered by id; ``after_id`` continues a
# split pair (the pair's set of rows is fixed, so an id cursor inside it cannot skip anything).
BATCH_SQL = """
WITH t AS MATERIALIZED (
    SELECT a.snap AS sa, b.snap AS sb FROM shapes.tick a, shapes.tick b
    WHERE a.id = %(a)s AND b.id = %(b)s
), candidates AS (
    SELECT i.* FROM shapes.intake i
    WHERE i.txid >= (SELECT pg_snapshot_xmax(sa) FROM t)
      AND i.txid < (SELECT pg_snapshot_xmax(sb) FROM t)
    UNION ALL
    SELECT i.* FROM shapes.intake i
    WHERE i.txid = ANY (ARRAY(
        SELECT x FROM t, pg_snapshot_xip(t.sa) AS x WHERE pg_visible_in_snapshot(x, t.sb)))
)
SELECT c.id, c.operation_key, c.effect_type::text, c.payload::text, c.business_key,
       c.traceparent, c.available_at, c.ordering_group, c.txid::text
FROM candidates c, t
WHERE pg_visible_in_snapshot(c.txid, t.sb) AND NOT pg_visible_in_snapshot(c.txid, t.sa)
  AND c.id > %(after_id)s
ORDER BY c.id
LIMIT %(limit)s
"""

TICK_SQL = """
INSERT INTO shapes.tick (id, snap)
SELECT coalesce(max(id), 0) + 1, pg_current_snapshot() FROM shapes.tick
RETURNING id
"""

LOAD_SCRIPT = (
    "INSERT INTO shapes.intake (operation_key, effect_type, payload) VALUES "
    + ", ".join(f"('d-:client_id-:n-{j}', 'bench', '{PAYLOAD}')" for j in range(5))
    + " ON CONFLICT DO NOTHING;"
)


class Ticker:
    """A tick every ``period_s``: the lock in its own statement first, so the snapshot (taken
    at the start of the INSERT, READ COMMITTED) is taken after the previous tick committed."""

    def __init__(self, url: str, period_s: float) -> None:
        self.url = url
        self.period_s = period_s
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tick(self, conn: psycopg.Connection[TupleRow]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (TICK_LOCK,))
            conn.execute(TICK_SQL)
        self.ticks += 1

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                self.tick(conn)
                time.sleep(self.period_s)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a local process, in seconds; None if it is not on this machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Batch:
    a: int
    b: int
    rows: int


def plan_batches(conn: psycopg.Connection[TupleRow], target: int) -> list[Batch]:
    """Consecutive tick pairs merged until each batch holds at least ``target`` rows (a batch
    between any two ticks is as valid as one between neighbours)."""
    ticks = [int(r[0]) for r in conn.execute("SELECT id FROM shapes.tick ORDER BY id")]
    counts = []
    for a, b in itertools.pairwise(ticks):
        rows = conn.execute(
            f"SELECT count(*) FROM ({BATCH_SQL}) s",
            {"a": a, "b": b, "after_id": 0, "limit": 10**9},
        ).fetchone()
        counts.append((a, b, int(rows[0]) if rows else 0))
    batches: list[Batch] = []
    start, acc = None, 0
    for a, b, n in counts:
        start = a if start is None else start
        acc += n
        if acc >= target:
            batches.append(Batch(start, b, acc))
            start, acc = None, 0
    if start is not None and acc:
        batches.append(Batch(start, counts[-1][1], acc))
    return batches


def read_batches(
    conn: psycopg.Connection[TupleRow],
    batches: list[Batch],
    *,
    limit: int,
    bookkeeping: bool,
) -> tuple[int, set[int]]:
    """Read every batch (split when a pair holds more than ``limit``); with ``bookkeeping``,
    one row per batch is written with the read (the claim) and updated after (the commit)."""
    seen: set[int] = set()
    rows_read = 0
    number = 0
    for batch in batches:
        after = 0
        while True:
            number += 1
            rows = conn.execute(
                BATCH_SQL, {"a": batch.a, "b": batch.b, "after_id": after, "limit": limit}
            ).fetchall()
            if rows:
                last = int(str(rows[-1][0]))
                if bookkeeping:
                    conn.execute(
                        "INSERT INTO shapes.lane_batch (lane, batch, tick_from, tick_to, "
                        "after_id, last_id, rows, producer, epoch) "
                        "VALUES (0, %s, %s, %s, %s, %s, %s, 'relay-lane-0', 1)",
                        (number, batch.a, batch.b, after, last, len(rows)),
                    )
                conn.commit()
                if bookkeeping:
                    conn.execute(
                        "UPDATE shapes.lane_batch SET committed_at = now() "
                        "WHERE lane = 0 AND batch = %s AND epoch = 1",
                        (number,),
                    )
                conn.commit()
                rows_read += len(rows)
                seen.update(int(str(r[0])) for r in rows)
                after = last
            else:
                conn.commit()
            if len(rows) < limit:
                break
    return rows_read, seen


def drain(owner_url: str, app_url: str, rows: int) -> dict[str, float]:
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("TRUNCATE shapes.intake, shapes.tick, shapes.lane_batch")
    clients = 8
    per_client = max(1, rows // (5 * clients))
    long_key = f"long-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(app_url) as long_writer:
        started = time.monotonic()
        with Ticker(owner_url, 0.005):
            time.sleep(0.05)
            # A writing transaction open across the whole load, committed at its end.
            long_writer.execute(
                "INSERT INTO shapes.intake (operation_key, effect_type, payload) "
                "VALUES (%s, 'bench', '{}')",
                (long_key,),
            )
            pgbench(app_url, LOAD_SCRIPT, clients=clients, transactions=per_client)
            long_writer.commit()
            time.sleep(0.05)
        loaded = time.monotonic() - started
    with psycopg.connect(owner_url, autocommit=True) as conn:
        Ticker(owner_url, 0).tick(conn)  # the last tick sees everything
        conn.execute("VACUUM ANALYZE shapes.intake")
        total = int(str(conn.execute("SELECT count(*) FROM shapes.intake").fetchone()[0]))  # type: ignore[index]
        monotonic = conn.execute(
            "SELECT bool_and(pg_snapshot_xmax(b.snap) >= pg_snapshot_xmax(a.snap) "
            "AND pg_snapshot_xmin(b.snap) >= pg_snapshot_xmin(a.snap)), count(*) + 1, "
            "max(cardinality(ARRAY(SELECT pg_snapshot_xip(b.snap)))) "
            "FROM shapes.tick a JOIN shapes.tick b ON b.id = a.id + 1"
        ).fetchone()
        assert monotonic is not None
        long_id = conn.execute(
            "SELECT id, txid::text FROM shapes.intake WHERE operation_key = %s", (long_key,)
        ).fetchone()
    print(
        f"  loaded {total:,} rows in {loaded:.1f} s ({clients} pgbench clients, 5 rows/txn, "
        f"one transaction open throughout); {monotonic[1]} ticks, never backwards: "
        f"{monotonic[0]}; up to {monotonic[2]} xids in progress per tick",
        flush=True,
    )
    figures: dict[str, float] = {}
    with psycopg.connect(owner_url) as planner:
        plans = {target: plan_batches(planner, target) for target in (500, 5000)}
    with psycopg.connect(owner_url) as reader:
        row = reader.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(str(row[0]))
        reader.commit()
        read_batches(reader, plans[5000], limit=5000, bookkeeping=False)  # warm the cache
        for bookkeeping in (False, True):
            for target in (500, 5000):
                batches = plans[target]
                before = proc_cpu_s(pid)
                t0 = time.monotonic()
                read, seen = read_batches(reader, batches, limit=target, bookkeeping=bookkeeping)
                wall = time.monotonic() - t0
                after = proc_cpu_s(pid)
                cpu_us = None if before is None or after is None else (after - before) * 1e6 / read
                name = f"batches of ~{target:,}" + (" + 1 bookkeeping row" if bookkeeping else "")
                complete = len(seen) == read == total
                long_seen = long_id is not None and int(str(long_id[0])) in seen
                cpu_text = "n/a (server not local)" if cpu_us is None else f"{cpu_us:5.2f} us"
                print(
                    f"  {cpu_text} PostgreSQL CPU/row, {read / wall:>9,.0f} rows/s wall  "
                    f"{name}: {len(batches)} tick pairs, {read:,} rows, every row once: "
                    f"{complete}, the long transaction's row read: {long_seen}",
                    flush=True,
                )
                if cpu_us is not None:
                    figures[name] = cpu_us
                with reader.transaction():
                    reader.execute("TRUNCATE shapes.lane_batch")
    return figures


def ticker_cost(url: str, seconds: float = 5.0) -> None:
    """The real ticker (relay/dispatch/ticker.py, on a freshly migrated database) asked every
    5 ms for ``seconds`` while nothing is written and while one writer inserts a row every
    5 ms: its backend's CPU per call, and how many calls stored a tick."""
    with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(url, autocommit=True) as w:
        pid = int(str(conn.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]
        ticker = relay_ticker.Ticker()
        for label, writing in (("idle", False), ("one row per 5 ms", True)):
            calls = stored = n = 0
            before, deadline = proc_cpu_s(pid), time.monotonic() + seconds
            while time.monotonic() < deadline:
                if writing:
                    n += 1
                    w.execute(
                        "INSERT INTO relay.intake (operation_key, effect_type, payload)"
                        " VALUES (%s, 'bench', '{}')",
                        (f"tick-{label}-{n}",),
                    )
                stored += ticker.run_once(conn).stored
                calls += 1
                time.sleep(relay_ticker.TICK_EVERY_S)
            after = proc_cpu_s(pid)
            cpu = (
                "n/a"
                if before is None or after is None
                else f"{(after - before) * 1e6 / calls:.0f} us"
            )
            print(
                f"  ticker, {label}: {calls:,} calls, {stored:,} ticks stored, "
                f"{cpu} PostgreSQL CPU/call",
                flush=True,
            )


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per commit shape (2 rounds)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--fsync", action="store_true", help="fsync on in a PostgreSQL we start")
    parser.add_argument("--skip-kafka", action="store_true")
    parser.add_argument(
        "--shapes",
        default="",
        help="comma-separated commit shapes to measure (a is always measured); default: all",
    )
    parser.add_argument(
        "--commits-only", action="store_true", help="part 1 only: no drain, ticker or Kafka"
    )
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    started = time.monotonic()
    with local_services(fsync=args.fsync) as services:
        server = services.database_url
        print(
            f"services ready; PostgreSQL fsync={server_fsync(server)}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            flush=True,
        )
        url = fresh_db(server)
        role = f"bench_app_{uuid.uuid4().hex[:6]}"
        try:
            prepare(settings_for(url, "127.0.0.1:9", "bench", database_url=url))
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(SETUP)
                conn.execute(f'CREATE ROLE "{role}" LOGIN')
                conn.execute(GRANTS.format(role=f'"{role}"'))
            app_url = make_conninfo(url, user=role)
            print(f"\n1. application commits, {args.clients} pgbench clients, as {role}")
            commit_rates(url, app_url, args.clients, args.seconds, shapes)
            if not args.commits_only:
                print(f"\n2. drain of {args.rows:,} intake rows between ticks")
                drain(url, app_url, args.rows)
        finally:
            drop_db(server, url)
        if args.commits_only:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')
            return
        url = fresh_db(server)
        try:
            prepare(settings_for(url, "127.0.0.1:9", "bench", database_url=url))
            print("\n2b. the ticker (relay/dispatch/ticker.py) at up to 200 calls/s")
            ticker_cost(url)
        finally:
            drop_db(server, url)
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        if not args.skip_kafka:
            print(f"\n3. kafka-python transactional producer, {args.records:,} records")
            kafka_ceiling.run(services.kafka_bootstrap_servers, args.records)
    print(
        f"\n(done in {time.monotonic() - started:.0f} s; load average now "
        f"{os.getloadavg()[0]:.1f}: other processes share these CPUs)"
    )


if __name__ == "__main__":
    main()

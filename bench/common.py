"""Helpers shared by the benchmarks: throwaway databases and topics, backlogs, writer processes,
daemons as subprocesses, and a read_committed consumer that counts what really arrived.

Everything relay-facing goes through public pieces (``relay.enqueue`` in Python and SQL, the
settings, ``Relay``/``Reconciler``, the ``relay run``/``relay reconcile`` commands), so that the
benchmarks survive changes to the relay's tables.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import psycopg
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

import relay
from relay.config import Settings, load_settings
from relay.dispatch.daemon import Relay
from relay.headers import dispatch_headers
from relay.migrations import migrate, sync_effect_types
from relay.reconciler.daemon import Reconciler, register_status_type

# -- databases, settings, topics ------------------------------------------------------------------


def fresh_db(server_url: str) -> str:
    """A new empty database on the server of ``server_url``; its URL."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def drop_db(server_url: str, url: str) -> None:
    """Drop a database made by :func:`fresh_db` (the shared server's disk is not ours to fill)."""
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_for(url: str, bootstrap: str, prefix: str, **overrides: Any) -> Settings:
    """Settings of a benchmark run: its own database, replica, group and topics by ``prefix``."""
    values: dict[str, Any] = {
        "database_url": url,
        "kafka_bootstrap_servers": bootstrap,
        "replica_id": f"bench-{prefix}",
        "metrics_port": 0,
        "reconcile_group_id": f"bench-{prefix}",
        "status_topic": f"{prefix}.status",
        "effect_types": {"bench": {"topic": f"{prefix}.bench", "idempotent": True}},
    }
    values.update(overrides)
    return load_settings(None, **values)


def prepare(settings: Settings) -> None:
    """Migrate the database, declare the effect types and set status events as configured."""
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        migrate(conn)
        sync_effect_types(conn, settings)
        register_status_type(conn, settings)


def server_fsync(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW fsync").fetchone()
    return str(row[0]) if row else "?"


def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def delete_topics(bootstrap: str, prefix: str) -> None:
    """Remove every topic a run made (all named ``<prefix>.*``): large payloads add up."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        mine = [t for t in admin.list_topics() if t.startswith(f"{prefix}.")]
        if mine:
            admin.delete_topics(mine)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the figures
        print(f"  (could not delete topics {prefix}.*: {exc})", file=sys.stderr)
    finally:
        admin.close()


# -- payloads and backlogs ------------------------------------------------------------------------

_OVERHEAD = len('{"n": , "body": ""}')


def pad_for(size: int, n: int = 0) -> int:
    """Characters of ``body`` that make the payload's JSON text about ``size`` bytes long."""
    return max(1, size - _OVERHEAD - len(str(n)))


def payload(n: int, size: int) -> dict[str, Any]:
    """A payload whose JSON text (as PostgreSQL prints jsonb) is ``size`` bytes long."""
    return {"n": n, "body": "x" * pad_for(size, n)}


def bench_headers(i: int, created: datetime, source: str) -> list[tuple[str, bytes]]:
    """The headers the relay sends with the record of the "bench" type's effect ``i + 1`` (what a
    bare producer sends beside it, as its ceiling or floor)."""
    return dispatch_headers(
        effect_id=i + 1,
        effect_type="bench",
        attempt=1,
        created_at=created,
        source=source,
        business_key=None,
        traceparent=None,
    )


def payload_text(n: int, size: int) -> bytes:
    """The bytes the relay sends for :func:`payload`: jsonb's text form, keys shortest first."""
    return json.dumps(payload(n, size)).encode()


_SAMPLE = "SELECT effect_id FROM relay.enqueue(%(key)s, %(effect_type)s, %(payload)s::jsonb)"

_COLUMNS = """
SELECT c.table_name, c.column_name
FROM information_schema.columns c
JOIN information_schema.tables t USING (table_schema, table_name)
WHERE c.table_schema = 'relay' AND t.table_type = 'BASE TABLE'
  AND c.is_identity = 'NO' AND c.is_generated = 'NEVER'
  AND c.table_name IN (SELECT table_name FROM information_schema.columns
                       WHERE table_schema = 'relay' AND column_name = 'effect_id'
                       UNION SELECT 'effect')
ORDER BY c.table_name, c.ordinal_position
"""


def fill_backlog(url: str, effect_type: str, n: int, size: int, key_prefix: str) -> float:
    """``n`` intents (keys ``<key_prefix><i>``, i from 0), fast: one is written by the SQL
    ``relay.enqueue``, and the rows it wrote (the effect, and every row of another table that
    points at it by ``effect_id``) are copied set-based for the others, with their own key and
    payload. Whatever the relay's tables become, the backlog is what enqueue writes.
    Returns the seconds it took."""
    started = time.monotonic()
    with psycopg.connect(url) as conn:
        row = conn.execute(
            _SAMPLE,
            {
                "key": f"{key_prefix}0",
                "effect_type": effect_type,
                "payload": json.dumps(payload(0, size)),
            },
        ).fetchone()
        assert row is not None
        sample = int(row[0])
        columns: dict[str, list[str]] = {}
        for table, column in conn.execute(_COLUMNS).fetchall():
            columns.setdefault(str(table), []).append(f'"{column}"')
        effect_cols = columns.pop("effect")  # every table that points at an effect, by effect_id
        in_intake = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM relay.intake WHERE id = %s)"
            " AND NOT EXISTS (SELECT 1 FROM relay.effect WHERE id = %s)",
            (sample, sample),
        ).fetchone()
        if in_intake is not None and in_intake[0]:
            # Enqueue wrote the intake (issue 19): the backlog is intake rows, read by the relay.
            intake_cols = [
                f'"{c}"'
                for (c,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                    " 'relay' AND table_name = 'intake' AND is_identity = 'NO'"
                    # Each copy's own transaction and time, as a real enqueue would have.
                    " AND column_name NOT IN ('txid', 'enqueued_at')"
                    " ORDER BY ordinal_position"
                ).fetchall()
            ]
            effect_cols = intake_cols
            columns = {}
            source = "intake"
        else:
            source = "effect"
        chunk = 100_000
        for first in range(1, n, chunk):
            last = min(n, first + chunk) - 1
            made = {
                "operation_key": "%(prefix)s || g::text",
                "payload": "jsonb_build_object('n', g, 'body', repeat('x', greatest(1, "
                "%(size)s - %(overhead)s - length(g::text))))",
            }
            select = ", ".join(made.get(c.strip('"'), f"e.{c}") for c in effect_cols)
            params = {
                "prefix": key_prefix,
                "size": size,
                "overhead": _OVERHEAD,
                "sample": sample,
                "first": first,
                "last": last,
            }
            conn.execute(
                f"INSERT INTO relay.{source} ({', '.join(effect_cols)}) SELECT {select} "
                f"FROM relay.{source} e, generate_series(%(first)s::bigint, %(last)s::bigint) g "
                "WHERE e.id = %(sample)s",
                params,
            )
            for table, cols in columns.items():
                select = ", ".join("n.id" if c == '"effect_id"' else f"t.{c}" for c in cols)
                conn.execute(
                    f"INSERT INTO relay.{table} ({', '.join(cols)}) SELECT {select} "
                    f"FROM relay.{table} t, generate_series(%(first)s::bigint, %(last)s::bigint) g "
                    "JOIN relay.effect n ON n.operation_key = %(prefix)s || g::text "
                    "WHERE t.effect_id = %(sample)s",
                    params,
                )
            conn.commit()
    return time.monotonic() - started


# -- daemons ---------------------------------------------------------------------------------


def start_thread(daemon: Relay | Reconciler) -> threading.Thread:
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return thread


def daemon_env(settings: Settings) -> dict[str, str]:
    """The environment of a daemon subprocess: its settings as ``RELAY_*`` variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    for name, value in settings.model_dump(mode="json", exclude_defaults=True).items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"RELAY_{name.upper()}"] = text
    return env


class DaemonProcess:
    """``relay run`` or ``relay reconcile`` in its own process (its own GIL, its own RSS)."""

    def __init__(self, command: str, settings: Settings, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.command = command
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from relay.cli import main; main()", command],
            env=daemon_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def vm_hwm_kib(self) -> int | None:
        """Peak resident set size so far (VmHWM), read while the process lives."""
        return read_vm_hwm(self.proc.pid)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"relay {self.command} exited early with {self.proc.returncode}; "
                f"see {self._log.name}"
            )


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) of a live process; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """The CPU time of some processes, sampled every ``every_s`` in a thread, so that the CPU a
    drain cost can be read between the first and the last record a reader saw (a daemon's
    start-up, its imports and connections, falls outside that window)."""

    def __init__(self, pids: list[int], every_s: float = 0.02) -> None:
        self.samples: list[tuple[float, float]] = []
        self._pids = pids
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            found = [process_cpu_s(pid) for pid in self._pids]
            if all(cpu is not None for cpu in found):
                self.samples.append((time.time(), sum(c for c in found if c is not None)))
            self._stop.wait(self._every_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> float | None:
        """CPU seconds from the last sample at or before ``start`` to the first at or after
        ``end`` (a window a little wider than asked: at most one interval each side)."""
        before = [cpu for at, cpu in self.samples if at <= start]
        after = [cpu for at, cpu in self.samples if at >= end]
        if not before or not after:
            return None
        return after[0] - before[-1]


def read_vm_hwm(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def postgres_cpu_s() -> float | None:
    """CPU seconds (user + system) the local PostgreSQL server has used: every live
    ``postgres`` process, plus what the postmaster reaped from backends that have exited. None
    when no such process runs here (a server elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text(encoding="ascii")
        except OSError:
            continue
        name, rest = raw.split("(", 1)[1].rsplit(")", 1)
        if name == "postgres":
            stats[int(entry.name)] = rest.split()
    if not stats:
        return None
    total = 0
    for fields in stats.values():
        # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        total += int(fields[11]) + int(fields[12])
        if int(fields[1]) not in stats:  # the postmaster: its reaped children's time too
            total += int(fields[13]) + int(fields[14])
    return total / tick


def backend_cpu_s(url: str) -> dict[tuple[int, str], tuple[str, float]] | None:
    """CPU seconds so far of each live backend of ``url``'s database that the relay opened, by
    (pid, start time): (its role, seconds). The role is the connection's purpose (relay/db.py
    names each ``relay-<purpose>-<replica>``): "claimer", "marker", "relay", "status",
    "doorbell", "reconciler". Read from ``/proc/<pid>/schedstat`` (nanoseconds; ``stat``
    counts 10 ms ticks, 0.5 us an effect of a drain of 20,000). None when the server is not
    local: no such ``postgres`` process here. A backend gone between the query and the read
    is left out."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, backend_start::text, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'relay-%%' "
            "UNION ALL SELECT pg_backend_pid(), '', ''"
        ).fetchall()
    found: dict[tuple[int, str], tuple[str, float]] = {}
    local = False
    for pid, started, app in rows:
        try:
            name = Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
            nanos = int(Path(f"/proc/{pid}/schedstat").read_text(encoding="ascii").split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if name != "postgres":
            continue
        if not app:  # this query's own backend: the server is local
            local = True
            continue
        role = str(app).removeprefix("relay-").split("-", 1)[0]
        found[(int(pid), str(started))] = (role, nanos / 1e9)
    return found if local else None


def cpu_by_role(
    before: dict[tuple[int, str], tuple[str, float]] | None,
    after: dict[tuple[int, str], tuple[str, float]] | None,
) -> dict[str, float] | None:
    """CPU seconds by role between two :func:`backend_cpu_s` snapshots (a backend opened in
    between counts from zero; one that ended in between is not counted)."""
    if before is None or after is None:
        return None
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + seconds - start
    return roles


# -- the read_committed consumer that counts -------------------------------------------------------


class KeyCounter:
    """A read_committed consumer in a thread: distinct keys seen and when each first arrived.

    Counting distinct keys at the consumer is what "published" means to a reader, whatever the
    relay's tables say; duplicates are counted apart.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.first_seen: dict[bytes, float] = {}
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            group_id=None,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=5,
            max_poll_records=5000,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(60)

    def _run(self) -> None:
        consumer = self._consumer
        consumer.subscribe([self.topic])
        self._ready.set()
        try:
            while not self._stop.is_set():
                batches = consumer.poll(timeout_ms=100)
                now = time.time()
                with self._lock:
                    for records in batches.values():
                        for record in records:
                            if record.key in self.first_seen:
                                self.duplicates += 1
                            else:
                                self.first_seen[record.key] = now
                    if batches:
                        if self.first_at is None:
                            self.first_at = now
                        self.last_at = now
        finally:
            consumer.close()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.first_seen)

    def wait_for(self, n: int, timeout_s: float, alive: DaemonProcess | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.count < n:
            if time.monotonic() > deadline:
                return False
            if alive is not None:
                alive.check_alive()
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def bare_consumer_rate(
    bootstrap: str, topic: str, n: int, *, from_first_record: bool = True
) -> float:
    """Records/s of a bare read_committed consumer (own group) reading ``n`` JSON records and
    decoding each; timed from its first record, or from its creation (group join included)."""
    created = time.monotonic()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap.split(","),
        group_id=f"bench-bare-{uuid.uuid4().hex[:6]}",
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    seen = 0
    first: float | None = None
    while seen < n:
        for records in consumer.poll(timeout_ms=500).values():
            if first is None:
                first = time.monotonic()
            for record in records:
                json.loads(record.value)
                seen += 1
    consumer.commit()
    consumer.close()
    started = first if from_first_record and first is not None else created
    return n / (time.monotonic() - started)


# -- the application's writers ---------------------------------------------------------------------


def _writer(
    url: str, mode: str, per_txn: int, size: int, seconds: float, worker: int, out: Any
) -> None:
    done = 0
    body = payload(0, size)
    text = json.dumps(body)
    tag = uuid.uuid4().hex[:6]
    with psycopg.connect(url) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            keys = [f"{mode}-{worker}-{tag}-{done + i}" for i in range(per_txn)]
            if mode == "plain":
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO bench_plain (k, payload) VALUES (%s, %s::jsonb)",
                        [(k, text) for k in keys],
                    )
            elif per_txn == 1:
                relay.enqueue(conn, "bench", keys[0], body)
            else:
                relay.enqueue_many(conn, [relay.Intent("bench", k, body) for k in keys])
            if mode == "notify":
                conn.execute("SELECT pg_notify('bench', '')")
            conn.commit()
            done += per_txn
    out.put(done)


PLAIN_TABLE = (
    "CREATE TABLE IF NOT EXISTS bench_plain "
    "(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k text NOT NULL, payload jsonb NOT NULL)"
)


def writers(
    url: str, mode: str, *, processes: int, per_txn: int, size: int, seconds: float
) -> float:
    """Rows per second committed by ``processes`` writers, each in a loop of transactions of
    ``per_txn`` rows: ``mode`` "plain" inserts into ``bench_plain``, "enqueue" calls relay.enqueue
    (enqueue_many for several), "notify" enqueues and sends a NOTIFY per transaction."""
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, mode, per_txn, size, seconds, i, queue))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    total = sum(int(queue.get()) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))  # type: ignore[no-any-return]

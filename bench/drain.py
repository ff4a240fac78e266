"""(b) The drain of a backlog: relay processes against a bare transactional kafka-python producer
sending the same records, and against the bare claim-and-mark cycle in PostgreSQL.

Every rate is measured while a read_committed consumer counts distinct keys, so the relay and the
bare producer share the same extra load, and "drained" means "a reader got every key".
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from kafka import KafkaProducer

from bench.common import (
    CpuSampler,
    DaemonProcess,
    KeyCounter,
    backend_cpu_s,
    bench_headers,
    cpu_by_role,
    create_topic,
    delete_topics,
    drop_db,
    fill_backlog,
    fresh_db,
    payload_text,
    postgres_cpu_s,
    prepare,
    settings_for,
)
from bench.report import Figure, Target
from relay.config import Settings
from relay.dispatch.appender import Appender
from relay.dispatch.publisher import key_partition

CODECS = ("none", "lz4", "zstd")
BARE_TARGET = Target("ratio", ">=", 0.8)
TWO_TARGET = Target("ratio", ">", 1.0)
PG_CPU_TARGET = Target("value", "<=", 10.0)


def relay_compression_configurable() -> bool:
    return "kafka_compression_type" in Settings.model_fields


@dataclass(frozen=True)
class DrainSizes:
    effects: int = 100_000
    payloads: tuple[int, ...] = (256, 4096)
    codecs: tuple[str, ...] = CODECS
    timeout_s: float = 300.0
    partitions: int = 3


@dataclass
class Drained:
    rate: float | None  # n / (last record seen - first record seen) at a read_committed consumer
    seen: int
    duplicates: int
    seconds: float  # wall time of the whole drain, start-up included
    note: str = ""
    # With status events on: n / (first record seen -> every status event published, the last
    # record's or the transitions log's), whichever way they travel.
    status_rate: float | None = None
    # The local PostgreSQL server's CPU per effect while the relay drained (every process:
    # backends, autovacuum, WAL); None for the bare producer or a server elsewhere.
    pg_us: float | None = None
    # The publishing processes' CPU per effect (every thread: the relays, or the bare producer),
    # from the first record a reader saw to the last.
    proc_us: float | None = None
    # With ``purge``: the local PostgreSQL's CPU per intent of `relay purge` at retention 0 (the
    # content goes, the keys stay), then of the purge that forgets the keys (dedupe window 0).
    purge_us: float | None = None
    forget_us: float | None = None
    # The relay's own backends' share of pg_us, by role ("claimer": the reads and claims,
    # "marker": the outcomes, "relay", "status", "doorbell"), us per effect; None as pg_us.
    pg_roles: dict[str, float] | None = None
    # The relays' largest peak resident set size (VmHWM) at the end of the drain, KiB.
    peak_kib: int | None = None
    # With ``sample_reader``: the share of samples, from the first record seen to the last, in
    # which a transaction held the intake's reader row (one reads at a time, whatever replica).
    reader_busy: float | None = None


class ReaderSampler:
    """Polls the lock on ``relay.intake_reader`` with pgrowlocks, which reads it without taking
    it: how much of the time one replica's read keeps the others from reading (issue 19's lanes
    would read in parallel). A poll costs the server about 0.1 ms: it adds to ``pg_us``."""

    def __init__(self, url: str, every_s: float = 0.002) -> None:
        self._url = url
        self._every_s = every_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, bool]] = []
        self.error: Exception | None = None
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgrowlocks")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                while not self._stop.is_set():
                    row = conn.execute(
                        "SELECT count(*) FROM pgrowlocks('relay.intake_reader')"
                    ).fetchone()
                    self.samples.append((time.time(), bool(row and row[0])))
                    time.sleep(self._every_s)
        except Exception as exc:  # noqa: BLE001 - reported by busy_between, never a partial share
            self.error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def busy_between(self, start: float, end: float) -> float | None:
        if self.error is not None:
            raise RuntimeError(f"the reader row's sampler failed: {self.error}")
        inside = [held for at, held in self.samples if start <= at <= end]
        return sum(inside) / len(inside) if inside else None


def purge_cost(settings: Settings, n: int, timeout_s: float = 30.0) -> tuple[float, float] | None:
    """PostgreSQL CPU per intent of the two purges after a drain of ``n``, through
    ``relay.reconciler.purge.purge`` (what `relay purge` runs): first at retention 0 with a long
    dedupe window, then with a dedupe window of a microsecond. None for a server elsewhere."""
    from relay.reconciler.purge import purge

    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # every outcome recorded (the relay records after
            # Kafka): in published batches, or as effect rows (ordering groups)
            row = conn.execute(
                "SELECT (SELECT coalesce(sum(n), 0) FROM relay.published_batch)"
                " + (SELECT count(*) FROM relay.effect WHERE state = 'PUBLISHED')"
            ).fetchone()
            if row is not None and int(row[0]) >= n:
                break
            time.sleep(0.1)
        conn.execute("CHECKPOINT")
        before = postgres_cpu_s()
        purge(conn, settings.model_copy(update={"dedupe_window_s": 86400.0}), 0.0)
        middle = postgres_cpu_s()
        purge(conn, settings.model_copy(update={"dedupe_window_s": 0.000001}), 0.0)
        after = postgres_cpu_s()
    if before is None or middle is None or after is None:
        return None
    return (middle - before) * 1e6 / n, (after - middle) * 1e6 / n


def _status_published(url: str, timeout_s: float) -> float | None:
    """When the transitions log had no status event left to publish (None: not within the
    timeout). Events that ride in the records' transactions never wait there."""
    deadline = time.time() + timeout_s
    with psycopg.connect(url, autocommit=True) as conn:
        while time.time() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM relay.transition WHERE status_pending"
            ).fetchone()
            if row is not None and row[0] == 0:
                return time.time()
            time.sleep(0.05)
    return None


def relay_drain(
    server_url: str,
    bootstrap: str,
    sizes: DrainSizes,
    *,
    payload_bytes: int,
    replicas: int,
    codec: str,
    log_dir: Path,
    groups: int = 0,
    status_events: bool = False,
    purge: bool = False,
    batch_size: int | None = None,
    sample_reader: bool = False,
) -> Drained:
    """``replicas`` ``relay run`` processes drain a backlog of ``sizes.effects`` intents; with
    ``groups``, effect i belongs to ordering group ``i % groups`` (a group's effects spread over
    the backlog, as an aggregate's events are). The drain ends when every record is read; with
    ``status_events``, status events are on (three more records per effect); with ``purge``,
    the purges that follow are measured too (:func:`purge_cost`); ``batch_size`` sets the
    relays' setting (else its default)."""
    prefix = uuid.uuid4().hex[:8]
    url = fresh_db(server_url)
    n = sizes.effects
    overrides: dict[str, Any] = {"status_events": status_events}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if codec != "none":
        overrides["kafka_compression_type"] = codec
    try:
        settings = settings_for(url, bootstrap, prefix, **overrides)
        prepare(settings)
        fill_backlog(url, "bench", n, payload_bytes, "d-")
        with psycopg.connect(url, autocommit=True) as conn:
            if groups:
                # Wherever enqueue left the backlog: effect rows, or intake rows not read yet
                # (then each group is registered to the login that enqueued it, as enqueue does).
                for table in ("effect", "intake"):
                    conn.execute(
                        f"UPDATE relay.{table} SET ordering_group = 'g-' || "
                        "(substr(operation_key, 3)::bigint %% %(groups)s)",
                        {"groups": groups},
                    )
                conn.execute(
                    "INSERT INTO relay.ordering_group (name, owner) "
                    "SELECT DISTINCT ordering_group, enqueued_by FROM relay.intake "
                    "WHERE ordering_group IS NOT NULL ON CONFLICT DO NOTHING"
                )
            # Both shapes drained from the same state: vacuumed, with statistics.
            conn.execute("VACUUM ANALYZE relay.effect")
            conn.execute("VACUUM ANALYZE relay.intake")
        topic = settings.effect_types["bench"].topic
        create_topic(bootstrap, topic, sizes.partitions)
        counter = KeyCounter(bootstrap, topic)
        daemons = [
            DaemonProcess(
                "run",
                settings.model_copy(update={"replica_id": f"bench-{prefix}-{i}"}),
                log_dir / f"drain-{prefix}-{i}.log",
            )
            for i in range(replicas)
        ]
        started = time.time()
        backends_before = backend_cpu_s(url)  # first: its connection is not the drain's
        cpu_before = postgres_cpu_s()
        relay_cpu = CpuSampler([d.proc.pid for d in daemons])
        reader: ReaderSampler | None = None
        try:
            if sample_reader:
                reader = ReaderSampler(url)
            done = counter.wait_for(n, sizes.timeout_s, alive=daemons[0])
            status_at = _status_published(url, sizes.timeout_s) if status_events else None
            cpu_after = postgres_cpu_s()
            by_role = cpu_by_role(backends_before, backend_cpu_s(url))
            time.sleep(0.05)  # one more sample after the last record
            peaks = [kib for kib in (d.vm_hwm_kib() for d in daemons) if kib is not None]
        finally:
            relay_cpu.close()
            if reader is not None:
                reader.close()
            for daemon in daemons:
                daemon.stop()
            counter.close()
        elapsed = time.time() - started
        pg_us = (
            None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) * 1e6 / n
        )
        if not done or counter.first_at is None or counter.last_at is None:
            return Drained(
                None, counter.count, counter.duplicates, elapsed, f"timed out at {counter.count}"
            )
        span = max(1e-6, counter.last_at - counter.first_at)
        status_rate = None
        last_at = counter.last_at
        if status_at is not None:
            last_at = max(status_at, counter.last_at)
            status_rate = n / max(1e-6, last_at - counter.first_at)
        relay_s = relay_cpu.between(counter.first_at, last_at)
        purged = purge_cost(settings, n) if purge else None
        return Drained(
            n / span,
            counter.count,
            counter.duplicates,
            elapsed,
            pg_us=pg_us,
            status_rate=status_rate,
            proc_us=None if relay_s is None else relay_s * 1e6 / n,
            purge_us=None if purged is None else purged[0],
            forget_us=None if purged is None else purged[1],
            pg_roles=None
            if by_role is None
            else {role: seconds * 1e6 / n for role, seconds in sorted(by_role.items())},
            peak_kib=max(peaks, default=None),
            reader_busy=None
            if reader is None
            else reader.busy_between(counter.first_at, counter.last_at),
        )
    finally:
        delete_topics(bootstrap, prefix)
        drop_db(server_url, url)


def _bare_producer(
    bootstrap: str,
    topic: str,
    n: int,
    size: int,
    batch: int,
    codec: str,
    source: str,
    out: Any,
    appended: bool = False,
) -> None:
    """In its own process: the records the relay would send, in transactions of ``batch``;
    ``appended``: through the relay's appender (each record's partition computed as the relay
    computes it), else through ``send``."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        transactional_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        linger_ms=5,
        batch_size=256 * 1024,
        retry_backoff_ms=10,
        compression_type=None if codec == "none" else codec,
    )
    producer.init_transactions()
    ordered = sorted(producer.partitions_for(topic))
    values = [payload_text(i, size) for i in range(n)]
    created = datetime.now(UTC)
    started = time.monotonic()
    cpu_started = time.process_time()  # every thread of this process: the sender's too
    for first in range(0, n, batch):
        producer.begin_transaction()
        if appended:
            appender = Appender(producer)
            for i in range(first, min(n, first + batch)):
                key = f"d-{i}".encode()
                headers = bench_headers(i, created, source)
                appender.add(topic, key_partition(key, ordered), key, values[i], headers)
            refused = [x for x in appender.flush() if isinstance(x, Exception)]
            if refused:
                raise refused[0]
        else:
            for i in range(first, min(n, first + batch)):
                headers = bench_headers(i, created, source)
                producer.send(topic, key=f"d-{i}".encode(), value=values[i], headers=headers)
        producer.commit_transaction()
    out.put((time.monotonic() - started, time.process_time() - cpu_started))
    producer.close()


def bare_producer_drain(
    bootstrap: str,
    sizes: DrainSizes,
    *,
    payload_bytes: int,
    codec: str,
    batch: int,
    source: str,
    appended: bool = False,
) -> Drained:
    prefix = uuid.uuid4().hex[:8]
    topic = f"{prefix}.bare"
    n = sizes.effects
    try:
        create_topic(bootstrap, topic, sizes.partitions)
        counter = KeyCounter(bootstrap, topic)
        ctx = mp.get_context("spawn")
        queue: Any = ctx.Queue()
        proc = ctx.Process(
            target=_bare_producer,
            args=(bootstrap, topic, n, payload_bytes, batch, codec, source, queue, appended),
        )
        proc.start()
        try:
            seconds, cpu_s = queue.get(timeout=sizes.timeout_s)
            done = counter.wait_for(n, 60.0)
        finally:
            proc.join(30)
            counter.close()
        if not done or counter.first_at is None or counter.last_at is None:
            return Drained(
                None, counter.count, counter.duplicates, float(seconds), "consumer short"
            )
        # Timed as the relay is: from the first record a reader sees to the last.
        span = max(1e-6, counter.last_at - counter.first_at)
        return Drained(
            n / span, counter.count, counter.duplicates, float(seconds), proc_us=cpu_s * 1e6 / n
        )
    finally:
        delete_topics(bootstrap, prefix)


_OUTBOX = """
CREATE TABLE bench_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_key text NOT NULL UNIQUE,
    topic text NOT NULL,
    payload jsonb NOT NULL,
    state text NOT NULL DEFAULT 'PENDING',
    attempts integer NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    owner text,
    lease_until timestamptz,
    published_partition integer,
    published_offset bigint,
    published_at timestamptz
);
CREATE INDEX bench_outbox_pending ON bench_outbox (available_at, id) WHERE state = 'PENDING';
"""
_CLAIM = """
WITH c AS (
    SELECT id FROM bench_outbox WHERE state = 'PENDING' AND available_at <= now()
    ORDER BY available_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
UPDATE bench_outbox o SET state = 'DISPATCHING', attempts = o.attempts + 1, owner = 'bench',
    lease_until = now() + interval '90 seconds', updated_at = now()
FROM c WHERE o.id = c.id
RETURNING o.id, o.operation_key, o.topic, o.payload::text
"""
_MARK = """
UPDATE bench_outbox o SET state = 'PUBLISHED', owner = NULL, lease_until = NULL,
    updated_at = now(), published_at = now(), published_partition = m.p, published_offset = m.o
FROM unnest(%(ids)s::bigint[], %(parts)s::int[], %(offsets)s::bigint[]) AS m(id, p, o)
WHERE o.id = m.id AND o.state = 'DISPATCHING' AND o.owner = 'bench'
"""


def claim_and_mark(server_url: str, sizes: DrainSizes, *, payload_bytes: int, batch: int) -> float:
    """The database half of the relay alone: claim a batch (SKIP LOCKED), mark it published,
    on a table shaped like the outbox, one transaction each, no Kafka."""
    url = fresh_db(server_url)
    n = sizes.effects
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_OUTBOX)
            conn.execute(
                "INSERT INTO bench_outbox (operation_key, topic, payload) "
                "SELECT 'd-' || g, 'bench', jsonb_build_object('n', g, 'body', "
                "repeat('x', greatest(1, %(size)s - 20 - length(g::text)))) "
                "FROM generate_series(0, %(n)s - 1) g",
                {"size": payload_bytes, "n": n},
            )
            conn.execute("VACUUM ANALYZE bench_outbox")
        done = 0
        with psycopg.connect(url) as conn:
            started = time.monotonic()
            while done < n:
                rows = conn.execute(_CLAIM, {"limit": batch}).fetchall()
                conn.commit()
                if not rows:
                    break
                ids = [int(r[0]) for r in rows]
                conn.execute(
                    _MARK,
                    {"ids": ids, "parts": [0] * len(ids), "offsets": list(range(len(ids)))},
                )
                conn.commit()
                done += len(ids)
            elapsed = time.monotonic() - started
        return done / elapsed
    finally:
        drop_db(server_url, url)


def run(
    server_url: str, bootstrap: str, sizes: DrainSizes, log_dir: Path
) -> tuple[list[Figure], list[str], float | None]:
    """The figures, notes, and the one-relay drain rate of the first payload (for the latency
    loads)."""
    figures: list[Figure] = []
    notes: list[str] = []
    fields = Settings.model_fields
    batch, source = int(fields["batch_size"].default), str(fields["cloudevents_source"].default)
    configurable = relay_compression_configurable()
    if not configurable:
        print("  (b) relay: compression not configurable yet", flush=True)
        notes.append(
            "relay: compression not configurable yet (no `kafka_compression_type` setting); the "
            "relay is measured uncompressed, the bare producer with each codec"
        )
    n = sizes.effects
    drain_rate: float | None = None
    for size in sizes.payloads:
        bare: dict[str, Drained] = {}
        for codec in sizes.codecs:
            bare[codec] = bare_producer_drain(
                bootstrap, sizes, payload_bytes=size, codec=codec, batch=batch, source=source
            )
            print(
                f"  (b) bare producer, {size} B, {codec}: {bare[codec].rate or 0:,.0f}/s, "
                f"{_us(bare[codec].proc_us)} CPU/effect",
                flush=True,
            )
        # The relay appends its records past send() (relay/dispatch/appender.py): the same bare
        # producer through that path is its second ceiling.
        past_send = bare_producer_drain(
            bootstrap,
            sizes,
            payload_bytes=size,
            codec="none",
            batch=batch,
            source=source,
            appended=True,
        )
        print(
            f"  (b) bare producer through the relay's appender, {size} B, none: "
            f"{past_send.rate or 0:,.0f}/s, {_us(past_send.proc_us)} CPU/effect",
            flush=True,
        )
        db = claim_and_mark(server_url, sizes, payload_bytes=size, batch=batch)
        print(f"  (b) bare claim-and-mark in PostgreSQL, {size} B: {db:,.0f}/s", flush=True)
        relay_codecs = sizes.codecs if configurable else ("none",)
        one: dict[str, Drained] = {}
        for codec in relay_codecs:
            one[codec] = relay_drain(
                server_url,
                bootstrap,
                sizes,
                payload_bytes=size,
                replicas=1,
                codec=codec,
                log_dir=log_dir,
                # The purges that follow, once: after the first payload's uncompressed drain.
                purge=codec == "none" and drain_rate is None,
            )
            print(
                f"  (b) one relay, {size} B, {codec}: {one[codec].rate or 0:,.0f}/s, "
                f"PostgreSQL {_us(one[codec].pg_us)} CPU/effect, "
                f"relay {_us(one[codec].proc_us)} CPU/effect",
                flush=True,
            )
        two = relay_drain(
            server_url,
            bootstrap,
            sizes,
            payload_bytes=size,
            replicas=2,
            codec="none",
            log_dir=log_dir,
        )
        print(
            f"  (b) two relays, {size} B: {two.rate or 0:,.0f}/s, "
            f"PostgreSQL {_us(two.pg_us)} CPU/effect",
            flush=True,
        )
        if drain_rate is None:
            drain_rate = one["none"].rate
            drained = one["none"]
            print(
                f"  (b) relay purge after it: {_us(drained.purge_us)} at retention, "
                f"{_us(drained.forget_us)} when the keys are forgotten (PostgreSQL CPU/intent)",
                flush=True,
            )
            for what, value in (
                ("at retention (content emptied, keys kept)", drained.purge_us),
                ("when the keys are forgotten (dedupe window over)", drained.forget_us),
            ):
                figures.append(
                    Figure(
                        "b",
                        f"`relay purge` of those {n:,} intents {what}: PostgreSQL CPU per intent",
                        value,
                        "us",
                        ceiling=drained.pg_us,
                        ceiling_name="the drain's PostgreSQL CPU per effect",
                    )
                )
            loud = relay_drain(
                server_url,
                bootstrap,
                sizes,
                payload_bytes=size,
                replicas=1,
                codec="none",
                log_dir=log_dir,
                status_events=True,
            )
            print(
                f"  (b) one relay, {size} B, status events on: {loud.rate or 0:,.0f}/s "
                f"({loud.status_rate or 0:,.0f}/s until every status event is out), "
                f"PostgreSQL {_us(loud.pg_us)} CPU/effect",
                flush=True,
            )
            figures.append(
                Figure(
                    "b",
                    f"drain of {n:,} effects, one relay, {size} B, status events on (three "
                    "status records per effect), until every status event is out",
                    loud.status_rate,
                    "effects/s",
                    ceiling=one["none"].rate,
                    ceiling_name="one relay, status events off",
                    note="; ".join(
                        x
                        for x in (f"PostgreSQL {_us(loud.pg_us)} CPU/effect", _drain_note(loud))
                        if x
                    ),
                    extra={"duplicates": loud.duplicates, "seen": loud.seen},
                )
            )
            groups = max(1, n // 10)
            grouped = relay_drain(
                server_url,
                bootstrap,
                sizes,
                payload_bytes=size,
                replicas=1,
                codec="none",
                log_dir=log_dir,
                groups=groups,
            )
            print(
                f"  (b) one relay, {size} B, {groups:,} ordering groups of 10: "
                f"{grouped.rate or 0:,.0f}/s, PostgreSQL {_us(grouped.pg_us)} CPU/effect",
                flush=True,
            )
            figures.append(
                Figure(
                    "b",
                    f"drain of {n:,} effects in {groups:,} ordering groups of 10, one relay, "
                    f"{size} B",
                    grouped.rate,
                    "effects/s",
                    ceiling=one["none"].rate,
                    ceiling_name="one relay, no groups",
                    note=_drain_note(grouped),
                    extra={"duplicates": grouped.duplicates, "seen": grouped.seen},
                )
            )
        for codec, drained in one.items():
            figures.append(
                Figure(
                    "b",
                    f"drain of {n:,} effects, one relay, {size} B, compression {codec}",
                    drained.rate,
                    "effects/s",
                    ceiling=bare[codec].rate if codec in bare else None,
                    ceiling_name=f"bare transactional producer, {codec}",
                    targets=(BARE_TARGET,),
                    note=_drain_note(drained),
                    extra={"duplicates": drained.duplicates, "seen": drained.seen},
                )
            )
        figures.append(
            Figure(
                "b",
                f"drain of {n:,} effects, one relay, {size} B, compression none, against the "
                "bare producer on the relay's path past send()",
                one["none"].rate,
                "effects/s",
                ceiling=past_send.rate,
                ceiling_name="bare transactional producer through relay/dispatch/appender.py",
            )
        )
        figures.append(
            Figure(
                "b",
                f"drain of {n:,} effects, two relays, {size} B, compression none",
                two.rate,
                "effects/s",
                ceiling=one["none"].rate,
                ceiling_name="one relay",
                targets=(TWO_TARGET,),
                note=_drain_note(two),
                extra={"duplicates": two.duplicates, "seen": two.seen},
            )
        )
        figures.append(
            Figure(
                "b",
                f"PostgreSQL CPU per effect, drain by one relay, {size} B (all server processes)",
                one["none"].pg_us,
                "us/effect",
                targets=(PG_CPU_TARGET,),
                note=_roles_note(one["none"])
                if one["none"].pg_us is not None
                else "server not local",
            )
        )
        figures.append(
            Figure(
                "b",
                f"drain, one relay, {size} B, against the database half alone",
                one["none"].rate,
                "effects/s",
                ceiling=db,
                ceiling_name="bare claim-and-mark in PostgreSQL",
            )
        )
        if not configurable:
            for codec in sizes.codecs:
                if codec == "none":
                    continue
                figures.append(
                    Figure(
                        "b",
                        f"bare transactional producer, {size} B, {codec}",
                        bare[codec].rate,
                        "records/s",
                        ceiling=bare["none"].rate,
                        ceiling_name="bare producer, uncompressed",
                        note="relay: compression not configurable yet",
                    )
                )
    return figures, notes, drain_rate


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} us"


def _roles_note(drained: Drained) -> str:
    """The relay's own backends' share of the server's CPU per effect, by role; the rest is
    the server's other processes (WAL writer, autovacuum) and anything else it ran."""
    if not drained.pg_roles:
        return ""
    shares = [f"{role} {us:.1f}" for role, us in sorted(drained.pg_roles.items()) if us > 0]
    return "the relay's backends, us/effect: " + ", ".join(shares)


def _drain_note(drained: Drained) -> str:
    parts = []
    if drained.note:
        parts.append(drained.note)
    if drained.duplicates:
        parts.append(f"{drained.duplicates} duplicates at the consumer")
    return "; ".join(parts)

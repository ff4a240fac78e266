"""(c) Enqueue-to-consumer latency under an open-loop load: intents are due at fixed times
whatever the previous ones cost (several writer processes share the schedule, so a slow commit
does not hold the next one back); latency runs from the enqueue's commit to the moment a
read_committed consumer receives the record.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from kafka import KafkaProducer

import relay
from bench.common import (
    DaemonProcess,
    KeyCounter,
    bench_headers,
    create_topic,
    delete_topics,
    drop_db,
    fresh_db,
    payload,
    payload_text,
    prepare,
    settings_for,
)
from bench.report import Figure, Target, latency_summary
from relay.kafka_client import producer_config

LATE_MS = 10.0  # a send this far behind its schedule is counted as late
FLOOR_NAME = "floor: the relay's producer alone"


@dataclass(frozen=True)
class LatencySizes:
    seconds: float = 10.0
    fixed_rates: tuple[float, ...] = (300.0,)
    drain_fractions: tuple[float, ...] = (0.1, 0.5, 0.8)
    payload_bytes: int = 256
    per_writer_per_s: float = 100.0  # more writers than needed: a slow commit delays none
    # At 300/s again, with writing transactions held open for this long (0: not run).
    held_seconds: float = 60.0


def _load(
    url: str,
    worker: int,
    writers: int,
    total: int,
    rate: float,
    size: int,
    gate: Any,
    go: Any,
    out: Any,
) -> None:
    """Slots worker, worker + writers, ...: slot i is due at t0 + i / rate (wall clock), t0 being
    given through ``gate`` once every writer is connected."""
    sent: list[tuple[str, float, float]] = []
    body = payload(0, size)
    with psycopg.connect(url) as conn:
        gate.put(worker)
        t0 = float(go.get())
        for i in range(worker, total, writers):
            due = t0 + i / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            late_ms = (time.time() - due) * 1000
            key = f"L-{i}"
            relay.enqueue(conn, "bench", key, body)
            conn.commit()
            sent.append((key, time.time(), late_ms))
    out.put(sent)


def _bare_open_loop(
    config: dict[str, Any],
    topic: str,
    total: int,
    rate: float,
    size: int,
    source: str,
    gate: Any,
    go: Any,
    out: Any,
) -> None:
    """In its own process: the relay's producer and records on the same schedule as the writers,
    one transaction at a time as the relay's publisher sends them. Whatever fell due while a
    transaction was in flight goes out in the next one. No database: the floor that Kafka
    transactions and kafka-python set under the relay's latency on this machine."""
    producer = KafkaProducer(**config)
    producer.init_transactions()
    producer.partitions_for(topic)
    value = payload_text(0, size)
    created = datetime.now(UTC)
    producer.begin_transaction()  # a warm-up, as the relay publishes one before its load
    producer.send(topic, key=b"warm-up", value=value)
    producer.commit_transaction()
    gate.put(0)
    t0 = float(go.get())
    sent: list[tuple[str, float, float]] = []
    done = 0
    while done < total:
        now = time.time()
        due = min(total, math.floor((now - t0) * rate) + 1)  # slot i is due at t0 + i / rate
        if due <= done:
            time.sleep(max(0.0, t0 + done / rate - now))
            continue
        producer.begin_transaction()
        for i in range(done, due):
            late_ms = (time.time() - (t0 + i / rate)) * 1000
            headers = bench_headers(i, created, source)
            producer.send(topic, key=f"L-{i}".encode(), value=value, headers=headers)
            sent.append((f"L-{i}", t0 + i / rate, late_ms))
        producer.commit_transaction()
        done = due
    out.put(sent)
    producer.close()


def measure_floor(
    server_url: str, bootstrap: str, sizes: LatencySizes, rate: float
) -> dict[str, float]:
    """Latency from each record's due time to the same read_committed consumer, for
    :func:`_bare_open_loop` at ``rate``: the ceiling the relay's figure is read against."""
    prefix = uuid.uuid4().hex[:8]
    settings = settings_for(server_url, bootstrap, prefix, status_events=False)
    topic = f"{prefix}.floor"
    total = max(1, int(rate * sizes.seconds))
    try:
        create_topic(bootstrap, topic)
        counter = KeyCounter(bootstrap, topic)
        ctx = mp.get_context("spawn")
        gate: Any = ctx.Queue()
        go: Any = ctx.Queue()
        results: Any = ctx.Queue()
        config = producer_config(settings, f"bench-floor-{prefix}")
        proc = ctx.Process(
            target=_bare_open_loop,
            args=(
                config,
                topic,
                total,
                rate,
                sizes.payload_bytes,
                settings.cloudevents_source,
                gate,
                go,
                results,
            ),
        )
        proc.start()
        try:
            _wait_while_alive(gate, proc, 120)
            time.sleep(1.0)  # idle first, as the relay is before its load
            go.put(time.time() + 0.2)
            sent: list[tuple[str, float, float]] = _wait_while_alive(
                results, proc, sizes.seconds + 120
            )
            counter.wait_for(total, 60)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
            counter.close()
        return _summary(sent, counter.first_seen, rate, writers=0)
    finally:
        delete_topics(bootstrap, prefix)


def _wait_while_alive(source: Any, proc: Any, timeout_s: float) -> Any:
    """The next item of ``source``, or an error as soon as ``proc`` has ended without one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return source.get(timeout=0.5)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the floor's producer ended (exit {proc.exitcode})") from None
    raise RuntimeError(f"the floor's producer sent nothing back within {timeout_s:.0f} s")


def _summary(
    sent: list[tuple[str, float, float]], seen: dict[bytes, float], rate: float, *, writers: int
) -> dict[str, float]:
    ms = [(seen[k.encode()] - at) * 1000 for k, at, _ in sent if k.encode() in seen]
    if not ms:
        raise RuntimeError(f"no record of the load at {rate:.0f}/s reached the consumer")
    summary = latency_summary(ms)
    summary["offered_per_s"] = rate
    summary["achieved_per_s"] = len(sent) / max(
        1e-6, max(a for _, a, _ in sent) - min(a for _, a, _ in sent)
    )
    summary["late_sends"] = float(sum(1 for _, _, late in sent if late > LATE_MS))
    summary["missing"] = float(len(sent) - len(ms))
    summary["writers"] = float(writers)
    return summary


class HeldOpen:
    """Writing transactions left open across a load: a write in another database of the same
    cluster (begun first: the oldest) and an intent not committed in the relay's database. Both
    hold back the cluster's snapshot horizon (``pg_snapshot_xmin``) for as long as they stay
    open, which a reader that reads up to the horizon cannot pass."""

    def __init__(self, server_url: str, url: str) -> None:
        self._server_url = server_url
        self.elsewhere = fresh_db(server_url)
        self._conns: list[psycopg.Connection[Any]] = []
        try:
            write = self._open(self.elsewhere)
            write.execute("CREATE TABLE scratch (n int)")
            write.execute("INSERT INTO scratch VALUES (1)")
            self.oldest = self._xid(write)
            intent = self._open(url)
            relay.enqueue(intent, "bench", "held-open", payload(0, 256))
            self._xid(intent)
        except BaseException:
            self.close()
            raise

    def _open(self, url: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(url)
        self._conns.append(conn)
        return conn

    @staticmethod
    def _xid(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT pg_current_xact_id()").fetchone()
        assert row is not None
        return int(str(row[0]))

    def held(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether both are still open and the horizon stands at or before the older one."""
        row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()
        still_open = all(
            c.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS for c in self._conns
        )
        return still_open and row is not None and int(str(row[0])) <= self.oldest

    def commit(self) -> None:
        for conn in self._conns:
            conn.commit()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        drop_db(self._server_url, self.elsewhere)


def measure(
    server_url: str,
    bootstrap: str,
    sizes: LatencySizes,
    rate: float,
    log_dir: Path,
    seconds: float | None = None,
    hold: bool = False,
) -> dict[str, float]:
    """The relay's latency at ``rate`` for ``seconds`` (``sizes.seconds`` by default); with
    ``hold``, :class:`HeldOpen` transactions open from before the load to after its last record
    arrived (then committed: the held intent must arrive too)."""
    prefix = uuid.uuid4().hex[:8]
    url = fresh_db(server_url)
    held: HeldOpen | None = None
    try:
        settings = settings_for(url, bootstrap, prefix, status_events=False)
        prepare(settings)
        topic = settings.effect_types["bench"].topic
        create_topic(bootstrap, topic)
        counter = KeyCounter(bootstrap, topic)
        daemon = DaemonProcess("run", settings, log_dir / f"latency-{prefix}.log")
        try:
            with psycopg.connect(url) as conn:
                relay.enqueue(conn, "bench", "warm-up", {"n": 0})
                conn.commit()
            if not counter.wait_for(1, 60, alive=daemon):
                raise RuntimeError("the relay did not publish the warm-up intent within 60 s")
            time.sleep(1.0)  # idle again, as a relay between bursts
            if hold:
                held = HeldOpen(server_url, url)
            total = max(1, int(rate * (seconds or sizes.seconds)))
            writers = max(1, min(8, math.ceil(rate / sizes.per_writer_per_s)))
            ctx = mp.get_context("spawn")
            gate: Any = ctx.Queue()
            go: Any = ctx.Queue()
            results: Any = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_load,
                    args=(url, w, writers, total, rate, sizes.payload_bytes, gate, go, results),
                )
                for w in range(writers)
            ]
            for p in procs:
                p.start()
            for _ in procs:
                gate.get(timeout=120)
            t0 = time.time() + 0.2  # every writer is connected: the schedule starts
            for _ in procs:
                go.put(t0)
            sent: list[tuple[str, float, float]] = []
            for _ in procs:
                sent.extend(results.get(timeout=(seconds or sizes.seconds) + 120))
            for p in procs:
                p.join()
            counter.wait_for(total + 1, 60, alive=daemon)
            if held is not None:
                with psycopg.connect(url, autocommit=True) as conn:
                    if not held.held(conn):
                        raise RuntimeError(
                            "the transactions held open were not open to the end, or did not "
                            "hold back the snapshot horizon: this run measured nothing held"
                        )
                held.commit()
                if not counter.wait_for(total + 2, 60, alive=daemon):
                    raise RuntimeError("the intent held open was not published once committed")
        finally:
            daemon.stop()
            counter.close()
        return _summary(sent, counter.first_seen, rate, writers=writers)
    finally:
        if held is not None:
            held.close()
        delete_topics(bootstrap, prefix)
        drop_db(server_url, url)


def run(
    server_url: str,
    bootstrap: str,
    sizes: LatencySizes,
    drain_rate: float | None,
    log_dir: Path,
) -> list[Figure]:
    loads: list[tuple[str, float]] = [(f"{r:.0f}/s", r) for r in sizes.fixed_rates]
    if drain_rate:
        loads += [
            (f"{f:.0%} of the drain rate ({f * drain_rate:,.0f}/s)", f * drain_rate)
            for f in sizes.drain_fractions
        ]
    figures: list[Figure] = []
    for label, rate in loads:
        s = measure(server_url, bootstrap, sizes, rate, log_dir)
        floor = None
        if rate in sizes.fixed_rates:
            try:
                floor = measure_floor(server_url, bootstrap, sizes, rate)
            except Exception as exc:  # noqa: BLE001 - the relay's figure stands without its floor
                print(f"  (c) {label}: no floor ({exc})", flush=True)
        print(
            f"  (c) {label}: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, "
            f"p99.9 {s['p99.9']:.1f} ms ({int(s['count'])} intents, "
            f"{int(s['late_sends'])} sent late)",
            flush=True,
        )
        if floor is not None:
            print(
                f"  (c) {label}, floor (the relay's producer and records, no database): "
                f"p50 {floor['p50']:.1f} ms, p99 {floor['p99']:.1f} ms",
                flush=True,
            )
        note = (
            f"p50 {s['p50']:.1f}, p99.9 {s['p99.9']:.1f}, max {s['max']:.0f} ms; "
            f"{int(s['count'])} intents, {int(s['late_sends'])} sent > {LATE_MS:.0f} ms late"
        )
        p99_targets: tuple[Target, ...] = ()
        if rate in sizes.fixed_rates and rate == 300.0:
            p99_targets = (Target("value", "<=", 20.0),)
        elif label.startswith("50%"):
            p99_targets = (Target("value", "<=", 50.0),)
        figures.append(
            Figure(
                "c",
                f"p99 enqueue-to-consumer at {label}",
                s["p99"],
                "ms",
                ceiling=floor["p99"] if floor else None,
                ceiling_name=FLOOR_NAME if floor else "",
                targets=p99_targets,
                note=note,
                extra={**s, "floor": floor} if floor else s,
            )
        )
        p50_targets = (Target("value", "<=", 10.0),) if p99_targets else ()
        figures.append(
            Figure(
                "c",
                f"p50 enqueue-to-consumer at {label}",
                s["p50"],
                "ms",
                ceiling=floor["p50"] if floor else None,
                ceiling_name=FLOOR_NAME if floor else "",
                targets=p50_targets,
            )
        )
    if sizes.held_seconds > 0 and 300.0 in sizes.fixed_rates:
        figures += _held_open(server_url, bootstrap, sizes, log_dir)
    return figures


def _held_open(server_url: str, bootstrap: str, sizes: LatencySizes, log_dir: Path) -> list[Figure]:
    """300/s for ``sizes.held_seconds`` with writing transactions held open elsewhere, against
    the same load for as long with nothing held, just before it."""
    held_s = sizes.held_seconds
    base = measure(server_url, bootstrap, sizes, 300.0, log_dir, seconds=held_s)
    s = measure(server_url, bootstrap, sizes, 300.0, log_dir, seconds=held_s, hold=True)
    label = f"300/s, writing transactions held open {held_s:g} s elsewhere"
    print(
        f"  (c) 300/s for {held_s:g} s, nothing held: p50 {base['p50']:.1f} ms, "
        f"p99 {base['p99']:.1f} ms, max {base['max']:.0f} ms ({int(base['count'])} intents)",
        flush=True,
    )
    print(
        f"  (c) {label}: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.0f} ms "
        f"({int(s['count'])} intents; both open to the end, the horizon behind them)",
        flush=True,
    )
    ceiling_name = f"the same load for {held_s:g} s with nothing held, just before"
    note = (
        f"p50 {s['p50']:.1f}, max {s['max']:.0f} ms; {int(s['count'])} intents; a write in "
        "another database and an uncommitted intent open from before the load to after it, "
        "the horizon behind them (checked)"
    )
    return [
        Figure(
            "c",
            f"p99 enqueue-to-consumer at {label}",
            s["p99"],
            "ms",
            ceiling=base["p99"],
            ceiling_name=ceiling_name,
            # "Delays nothing else": a reader held at the horizon would add the whole hold.
            targets=(Target("ratio", "<=", 2.0),),
            note=note,
            extra={**s, "nothing_held": base},
        ),
        Figure(
            "c",
            f"p50 enqueue-to-consumer at {label}",
            s["p50"],
            "ms",
            ceiling=base["p50"],
            ceiling_name=ceiling_name,
        ),
    ]

"""A downstream test service: a bank that executes wires from Kafka and keeps its own books.

A real separate process (``python -m tests.downstream.service ...``). It consumes the dispatch
topic (wires) and the compensation topic (reversals), read_committed, writes each execution to its
books (a sqlite file), publishes a result message on the result topic, and serves its books over
HTTP for the reconciler's observer: ``GET /wires/<business key>`` answers 404 when no wire has that
key, else ``{"count": wires, "reversed": reversals, "net": wires - reversals}``.

Fault modes are read from a JSON file at every record and every request, so a test can change
them while the service runs::

    {"keys": {"<operation key>": ["lose_result" | "drop_first" | "execute_twice", ...]},
     "http": "normal" | "slow" | "nonsense" | "error" | "down" | "redirect" | "trickle",
     "slow_s": 3.0}

- lose_result: execute, but never publish the result;
- drop_first: the first attempt never arrives (ignored; a later attempt is executed);
- execute_twice: book two wires for one request (and report both);
- http slow / nonsense / error / down: the read API answers late, with garbage, with HTTP 500,
  or hangs up without an answer. Stopping the process is "the books are down".
- http redirect: 302 to a path that answers 404 (a login page or a gateway would do the same);
- http trickle: the right answer, its body one byte at a time over slow_s seconds.

A normal request is idempotent by operation key: a repeated request reports the booked wire
again instead of booking another.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from relay.kafka_client import rejoin_if_stranded

SCHEMA = """
CREATE TABLE IF NOT EXISTS books (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,              -- wire | reversal
    operation_key TEXT NOT NULL,
    business_key TEXT,
    attempt INTEGER,
    external_id TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS received (
    operation_key TEXT NOT NULL, attempt INTEGER, topic TEXT, what TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (  -- each result send: where it landed, or why it failed
    operation_key TEXT NOT NULL, external_id TEXT, partition INTEGER, "offset" INTEGER,
    error TEXT, at REAL NOT NULL
);
"""


class Books:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def note(self, key: str, attempt: int | None, topic: str, what: str) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO received VALUES (?, ?, ?, ?, ?)",
                (key, attempt, topic, what, time.time()),
            )

    def sent(
        self, key: str, external_id: str, where: tuple[int, int] | None, error: str | None
    ) -> None:
        partition, offset = where if where is not None else (None, None)
        with self.lock:
            self.db.execute(
                "INSERT INTO sent VALUES (?, ?, ?, ?, ?, ?)",
                (key, external_id, partition, offset, error, time.time()),
            )

    def booked(self, key: str) -> list[str]:
        with self.lock:
            rows = self.db.execute(
                "SELECT external_id FROM books WHERE operation_key = ? ORDER BY id", (key,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def book(self, kind: str, key: str, business_key: str | None, attempt: int | None) -> str:
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO books (kind, operation_key, business_key, attempt, external_id, at)"
                " VALUES (?, ?, ?, ?, '', ?)",
                (kind, key, business_key, attempt, time.time()),
            )
            external_id = f"{kind}-{cur.lastrowid}"
            self.db.execute(
                "UPDATE books SET external_id = ? WHERE id = ?", (external_id, cur.lastrowid)
            )
        return external_id

    def counts(self, business_key: str) -> tuple[int, int]:
        with self.lock:
            rows = dict(
                self.db.execute(
                    "SELECT kind, count(*) FROM books WHERE business_key = ? GROUP BY kind",
                    (business_key,),
                ).fetchall()
            )
        return int(rows.get("wire", 0)), int(rows.get("reversal", 0))


def read_faults(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text() or "{}"))
    except ValueError:
        return {}


def make_handler(books: Books, faults: Path | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            conf = read_faults(faults)
            mode = conf.get("http", "normal")
            if mode == "down":
                self.close_connection = True
                self.connection.close()
                return
            if mode == "slow":
                time.sleep(float(conf.get("slow_s", 3.0)))
            if mode == "error":
                self._send(500, b'{"error": "books unavailable"}')
                return
            if self.path.startswith("/moved/"):
                self._send(404, b'{"error": "no such page"}')
                return
            if mode == "redirect":
                self.send_response(302)
                self.send_header("Location", "/moved" + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == "nonsense":
                self._send(200, b"<html>%%% not json %%%</html>")
                return
            if not self.path.startswith("/wires/"):
                self._send(404, b'{"error": "no such resource"}')
                return
            business_key = urllib.parse.unquote(self.path.removeprefix("/wires/"))
            wires, reversals = books.counts(business_key)
            if wires == 0:
                self._send(404, b'{"count": 0}')
                return
            body = {"count": wires, "reversed": reversals, "net": wires - reversals}
            if mode == "trickle":
                self._trickle(json.dumps(body).encode(), float(conf.get("slow_s", 3.0)))
                return
            self._send(200, json.dumps(body).encode())

        def _trickle(self, body: bytes, seconds: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(seconds / len(body))

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    books = Books(Path(args.books))
    faults = Path(args.faults) if args.faults else None
    http = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(books, faults))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    producer = KafkaProducer(
        bootstrap_servers=args.bootstrap.split(","), acks="all", enable_idempotence=True
    )
    topics = [args.dispatch_topic] + ([args.reversal_topic] if args.reversal_topic else [])
    consumer = join(args, topics)
    # "ready" only once the group has given this consumer its partitions: a test that waits for
    # a booking then waits for the relay, never for a group join it cannot see. kafka-python has
    # been seen to stop in the middle of a rebalance (the leader's assignment, then nothing for
    # 60 s): a consumer without partitions after 20 s is replaced, three times at most.
    join_by, tries = time.monotonic() + 20, 1
    announced = False
    try:
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=200)
            rejoin_if_stranded(consumer)
            if not announced and consumer.assignment():
                print(f"ready port={http.server_address[1]}", flush=True)
                announced = True
            elif not announced and time.monotonic() > join_by:
                if tries == 3:
                    print(f"not ready: no partition of {topics} assigned in 3 joins", flush=True)
                    return 1
                logging.warning("no partitions after 20 s: joining again with a new consumer")
                consumer.close(autocommit=False)
                consumer = join(args, topics)
                join_by, tries = time.monotonic() + 20, tries + 1
                continue
            results: list[Result] = []
            for records in batch.values():
                for record in records:
                    results.extend(handle(record, books, args, faults))
            # Stopped with results undelivered: the records are read again at the next start.
            if batch and deliver(producer, books, args.result_topic, results, stop):
                consumer.commit()
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=5)
        http.shutdown()
    return 0


Result = tuple[str, str]  # operation key, external id


def join(args: argparse.Namespace, topics: list[str]) -> KafkaConsumer:
    """A consumer of the group, subscribed once its topics' partitions are known (a topic just
    created may not be in the metadata yet): the group leader assigns from what it knows."""
    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap.split(","),
        group_id=args.group,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        metadata_max_age_ms=5000,
    )
    known_by = time.monotonic() + 20
    while not all(consumer.partitions_for_topic(t) for t in topics):
        if time.monotonic() > known_by:
            break  # joined anyway: the group rebalances when the topics appear
        time.sleep(0.1)
    consumer.subscribe(topics)
    return consumer


def deliver(
    producer: KafkaProducer,
    books: Books,
    topic: str,
    results: list[Result],
    stop: threading.Event,
) -> bool:
    """Every result acknowledged before the records that caused it are committed: one whose send
    failed (a broker killed under it) is sent again, never dropped with its record. Each send is
    noted in the books, so that a test can tell a late result from a lost one."""
    todo = results
    while todo and not stop.is_set():
        sends: list[tuple[Result, Any]] = []
        for key, external_id in todo:
            result = {"operation_key": key, "outcome": "committed", "external_id": external_id}
            try:
                future = producer.send(topic, key=key.encode(), value=json.dumps(result).encode())
            except KafkaError as exc:  # no metadata within max_block_ms: try again
                books.sent(key, external_id, None, f"not sent: {exc!r}")
                continue
            sends.append(((key, external_id), future))
        while not all(f.is_done for _, f in sends) and not stop.is_set():
            # Still unacknowledged after 30 s: keep waiting (delivery_timeout_ms bounds it).
            with contextlib.suppress(KafkaError):
                producer.flush(timeout=30)
        sent = {item for item, f in sends if f.is_done and f.succeeded()}
        for item, f in sends:
            if f.is_done:
                where = (f.value.partition, f.value.offset) if f.succeeded() else None
                books.sent(*item, where, None if f.succeeded() else repr(f.exception))
        todo = [item for item in todo if item not in sent]
        if todo:
            print(f"bank: {len(todo)} result(s) not delivered, sent again", file=sys.stderr)
            time.sleep(0.5)
    return not todo


def handle(
    record: Any,
    books: Books,
    args: argparse.Namespace,
    faults: Path | None,
) -> list[Result]:
    """Execute (or recognise) one request; returns the results to publish for it."""
    key = record.key.decode()
    headers = {k: v.decode() for k, v in record.headers}
    attempt = int(headers.get("relay_attempt", "0"))
    business_key = headers.get("relay_business_key")
    modes = set(read_faults(faults).get("keys", {}).get(key, []))
    kind = "reversal" if record.topic == args.reversal_topic else "wire"
    if kind == "reversal":
        # A reversal undoes one wire with the same business key (the payload carries its fields).
        payload = json.loads(record.value)
        business_key = f"{payload['account']}:{payload['amount']}:{payload['date']}"
    if "drop_first" in modes and attempt == 1:
        books.note(key, attempt, record.topic, "dropped")
        return []
    done = books.booked(key)
    if done and "execute_twice" not in modes:
        books.note(key, attempt, record.topic, "repeated request")
        ids = done[:1]
    else:
        ids = [books.book(kind, key, business_key, attempt)]
        if "execute_twice" in modes:
            ids.append(books.book(kind, key, business_key, attempt))
        books.note(key, attempt, record.topic, "executed")
    if "lose_result" in modes:
        books.note(key, attempt, record.topic, "result lost")
        return []
    return [(key, external_id) for external_id in ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--dispatch-topic", required=True)
    parser.add_argument("--reversal-topic")
    parser.add_argument("--result-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--books", required=True)
    parser.add_argument("--faults")
    parser.add_argument("--port", type=int, default=0)
    # kafka-python's own account of the group join and the fetches, for a test that failed.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    return serve(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())

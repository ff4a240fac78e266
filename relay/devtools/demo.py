"""``relay demo``: the whole path on real servers, for a first look.

Starts a throwaway PostgreSQL and Kafka broker unless RELAY_DATABASE_URL /
RELAY_KAFKA_BOOTSTRAP_SERVERS name existing ones, runs the relay, the reconciler and a small
stand-in bank in this process, writes intents the way an application would (one transaction
rolled back, to show it leaves nothing), and prints the effects' states as they move until every
one has ended: emails are done when Kafka has them, wires when the bank has answered.

The terminal tells the story, act by act, each ending with what happened and why it matters;
the daemons' own log lines go to a file the demo names (only WARNING and up, each kind once,
reach the terminal). It ends with every effect's path through its states and what to try next.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import click
import psycopg
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from relay import outbox
from relay.config import EffectTypeSpec, Settings
from relay.devtools.services import LocalKafka, local_services
from relay.dispatch.daemon import Relay
from relay.errors import ServiceUnavailableError
from relay.kafka_client import kafka_security
from relay.messages import ResultMessage, ResultOutcome
from relay.migrations import migrate, sync_effect_types
from relay.reconciler.daemon import Reconciler
from relay.reconciler.observers import Observation, ObservedEffect
from relay.redaction import display_dsn
from relay.sql import query
from relay.story import load_story, story_lines

WIRE_TIMEOUT_S = 5.0
# How long the demo bank takes to search its books when the observer asks: a real downstream
# takes a while too, and it keeps act 3's UNKNOWN on screen long enough to be seen.
BOOKS_SEARCH_S = 1.0
DEMO_TYPES: dict[str, dict[str, Any]] = {
    "demo.email": {"topic": "demo.emails", "idempotent": True},
    "demo.wire": {
        "topic": "demo.wires",
        "business_key": "{account}:{amount}:{date}",
        "result_topic": "demo.wire-results",
        "outcome_timeout_s": WIRE_TIMEOUT_S,
        "observer": {"python": "relay.devtools.demo:observe_wire", "timeout_s": 2.0},
    },
}
BANK_GROUP = "relay-demo-bank"
# The demo bank's books, operation key -> its own reference. Module-level so that the observer,
# which the reconciler imports by name, reads the same books the bank writes.
BOOKS: dict[str, str] = {}


def observe_wire(effect: ObservedEffect) -> Observation:
    """The demo wire's observer: ask the bank's books instead of sending the wire again."""
    time.sleep(BOOKS_SEARCH_S)
    reference = BOOKS.get(effect.operation_key)
    if reference is None:
        return Observation("absent", detail="not in the bank's books")
    return Observation("present", count=1, detail=f"in the bank's books as {reference}")


class DemoBank:
    """A stand-in downstream: books each wire from the dispatch topic once per operation key and
    reports a committed result; offsets are committed after the results are sent, so a record
    read again is answered again (the reconciler recognises the repeat) but never booked twice."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.wires = settings.effect_types["demo.wire"]
        self.lose_results: set[str] = set()
        self.ready = threading.Event()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        consumer = KafkaConsumer(
            self.wires.topic,
            group_id=BANK_GROUP,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            **kafka_security(self.settings),
        )
        producer = KafkaProducer(acks="all", **kafka_security(self.settings))
        try:
            while not self._stop.is_set():
                try:
                    batch = consumer.poll(timeout_ms=200)
                    if consumer.assignment():
                        self.ready.set()
                    for records in batch.values():
                        for record in records:
                            self._book(producer, record.key.decode())
                    if batch:
                        producer.flush(timeout=10)
                        consumer.commit()
                except KafkaError:  # the broker is away (act 2): what was not committed comes again
                    self._stop.wait(1.0)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=5)

    def _book(self, producer: Any, key: str) -> None:
        reference = BOOKS.setdefault(key, f"bank-{len(BOOKS) + 1}")
        if key in self.lose_results:
            return
        result = ResultMessage(
            operation_key=key, outcome=ResultOutcome.COMMITTED, external_id=reference
        )
        value = result.model_dump_json(exclude_none=True).encode()
        producer.send(self.wires.result_topic, key=key.encode(), value=value)


def _demo_settings(settings: Settings, database_url: str, bootstrap: str) -> Settings:
    types = dict(settings.effect_types)
    for name, spec in DEMO_TYPES.items():
        types[name] = EffectTypeSpec.model_validate({"name": name, **spec})
    return settings.model_copy(
        update={
            "database_url": database_url,
            "kafka_bootstrap_servers": bootstrap,
            "effect_types": types,
            "publish_timeout_s": min(settings.publish_timeout_s, 3.0),
            # Records above 256 KiB are refused by the relay before sending (as the brokers'
            # limit would): the demo's one oversized intent passes enqueue's payload limit and
            # shows a definitive refusal at publication.
            "max_message_bytes": min(settings.max_message_bytes, 262_144),
            "max_request_size": min(settings.max_request_size, 262_144),
            "outage_backoff_max_s": min(settings.outage_backoff_max_s, 2.0),
            # Neither daemon serves metrics here: no port to collide with a running relay.
            "metrics_port": 0,
            "reconcile_metrics_port": 0,
        }
    )


def _create_topics(settings: Settings) -> None:
    """The demo's topics exist before the bank and the reconciler subscribe to them."""
    wire = settings.effect_types["demo.wire"]
    admin = KafkaAdminClient(**kafka_security(settings))
    try:
        for topic in (wire.topic, wire.result_topic):
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        admin.close()


def _in_thread(
    stack: ExitStack, name: str, run: Callable[[], None], stop: Callable[[], None]
) -> threading.Thread:
    """Run a daemon in a thread that is stopped and joined when the demo ends."""
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    stack.callback(thread.join, 30)
    stack.callback(stop)
    return thread


class _OncePerKind(logging.Filter):
    """The terminal's filter: WARNING and up from the relay's own loggers, each kind of line once
    (the same message template from the same logger), the rest counted; the log file has all."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.startswith("kafka"):
            return False  # kafka-python narrates every lost connection; the file has it
        kind = (record.name, str(record.msg))
        if kind in self.seen:
            self.held += 1
            return False
        self.seen.add(kind)
        return True


@contextlib.contextmanager
def _daemon_logs(path: Path) -> Iterator[_OncePerKind]:
    """Send every log line to ``path``; leave the terminal WARNING and up, each kind once."""
    root = logging.getLogger()
    terminal = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
    once = _OncePerKind()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(terminal[0].formatter if terminal else logging.Formatter())
    for handler in terminal:
        handler.addFilter(once)
    root.addHandler(to_file)
    kafka = logging.getLogger("kafka")
    kafka_level = kafka.level
    # kafka-python's connection errors go to the file, never its DEBUG (its whole configuration).
    kafka.setLevel(max(logging.WARNING, kafka.getEffectiveLevel()))
    try:
        yield once
    finally:
        kafka.setLevel(kafka_level)
        root.removeHandler(to_file)
        to_file.close()
        for handler in terminal:
            handler.removeFilter(once)


def _act_end(*lines: str) -> None:
    """What happened in an act, and why it matters."""
    click.echo("")
    for line in lines:
        click.echo(f"  > {line}")


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it on loopback, else a port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise ServiceUnavailableError("no free port for the console")


def _start_console(stack: ExitStack, cfg: Settings, workdir: Path) -> None:
    """``relay console`` on loopback for the demo's lifetime, with a throwaway operator login
    (a users file in the demo's temporary directory, a random password printed once)."""
    try:
        from relay.console.auth import hash_password
        from relay.console.server import ConsoleServer
    except ImportError as exc:
        click.echo(
            f"(the console needs its extra: pip install -e '.[console]'; {exc.name} is missing)"
        )
        return
    password = secrets.token_urlsafe(12)
    users = workdir / "console-users"
    users.write_text(f"demo:operator:{hash_password(password)}\n", encoding="utf-8")
    users.chmod(0o600)
    console_cfg = cfg.model_copy(
        update={
            "console_users_file": str(users),
            "console_host": "127.0.0.1",
            "console_port": _free_port(cfg.console_port),
            # The demo's one login reads and decides; there is no viewer to keep apart.
            "console_viewer_database_url": cfg.database_url,
        }
    )
    server = ConsoleServer(console_cfg)
    _in_thread(stack, "console", server.run, server.stop)
    click.echo(
        f"the operator console: {server.address} (sign in as demo, password {password}; "
        "up while the demo runs)"
    )


def run_demo(
    settings: Settings, *, effects: int, keep_running: bool, console: bool = False
) -> None:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = Path(tempfile.gettempdir()) / f"relay-demo-{stamp}.log"
    click.echo(f"the daemons' logs: {log_path} (WARNING and up here too, each kind once)")
    with _daemon_logs(log_path) as once, ExitStack() as stack:
        click.echo("starting services (a throwaway PostgreSQL and Kafka unless configured) ...")
        started = time.monotonic()
        services = stack.enter_context(local_services(fsync=True))
        url = services.database_url
        click.echo(
            f"  PostgreSQL {display_dsn(url)}\n  Kafka      {services.kafka_bootstrap_servers}"
            f"\n  ready in {time.monotonic() - started:.1f}s"
        )
        cfg = _demo_settings(settings, url, services.kafka_bootstrap_servers)
        with psycopg.connect(url, autocommit=True) as conn:
            applied = migrate(conn)
            sync_effect_types(conn, cfg)
        click.echo(f"schema migrated ({len(applied)} new migrations); effect types synced")
        _create_topics(cfg)
        if console:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-demo-")))
            _start_console(stack, cfg, workdir)

        relay, reconciler, bank = Relay(cfg), Reconciler(cfg), DemoBank(cfg)
        threads = [
            _in_thread(stack, "relay", relay.run, relay.stop),
            _in_thread(stack, "reconciler", reconciler.run, reconciler.stop),
            _in_thread(stack, "demo-bank", bank.run, bank.stop),
        ]
        if not (reconciler.ready.wait(60) and bank.ready.wait(60)):
            raise ServiceUnavailableError("the reconciler or the demo bank did not start in 60s")
        click.echo(
            f"relay and reconciler running (replica {cfg.replica_id}); a demo bank books the "
            f"wires from {bank.wires.topic} and answers on {bank.wires.result_topic}\n"
        )

        run_id = uuid.uuid4().hex[:6]
        click.echo(
            "act 1: an application commits intents; the relay publishes them; emails are done"
            "\nonce published, wires once the bank's result has CONFIRMED them"
        )
        keys = _write_intents(url, run_id, effects, cfg.max_request_size)
        _watch(url, keys)
        click.echo("")
        _show_one(url, keys[1] if effects > 1 else keys[0])
        _act_end(
            "The rolled-back transaction left nothing: an intent exists only if the application's",
            "  transaction commits. Every other intent was published once, in one Kafka",
            "  transaction; each wire became CONFIRMED only when the bank's result said so.",
            f"One e-mail ({keys[-1]}) was REJECTED: its record is larger than the brokers",
            "  accept, so the relay refused it before sending (a definite 'no', reason kept in",
            "  'relay show'); it held up nothing else. REJECTED is certain; UNKNOWN is not.",
        )
        all_keys = list(keys)
        if services.local_kafka is not None and cfg.kafka_transactions:
            click.echo(
                "\nact 2: the broker freezes while a batch is in flight (SIGSTOP): the publish "
                "ends UNKNOWN,\nnot failed and not retried; when Kafka answers again the relay "
                "fences the old producer,\nreads the partitions back (read_committed) and decides"
            )
            frozen = _freeze_mid_publish(url, services.local_kafka, run_id)
            all_keys += frozen
            click.echo("")
            _show_one(url, frozen[0])
            _act_end(
                "The broker stopped answering mid-transaction: nobody could say whether the five",
                "  records were in the log, so they became UNKNOWN, not failed and not retried.",
                "Once Kafka answered, the relay fenced the producer that made the attempt (it can",
                "  commit nothing any more) and read the partitions back: absent, so a new",
                "  attempt was made. That check is what keeps a timeout from becoming a",
                "  duplicate e-mail or a lost one.",
            )
        else:
            click.echo(
                "\n(act 2, a frozen broker, needs the demo's own Kafka with transactions: skipped)"
            )
        click.echo(
            f"\nact 3: the bank books a wire but its result is lost: after {WIRE_TIMEOUT_S:g}s "
            "without a result\nthe reconciler makes it UNKNOWN and asks the bank's books (the "
            "type's observer)\ninstead of sending the wire again"
        )
        lost = f"demo-{run_id}-result-lost"
        bank.lose_results.add(lost)
        with psycopg.connect(url) as conn:
            wire = {"account": "ACC999", "amount": 999, "date": "2026-11-22"}
            outbox.enqueue(conn, "demo.wire", lost, wire)
            conn.commit()
        all_keys.append(lost)
        _watch(url, [lost], until=lambda p: p.states.get("CONFIRMED") == 1)
        click.echo("")
        _show_one(url, lost)
        _act_end(
            f"The wire was published and booked, but no result came within {WIRE_TIMEOUT_S:g}s:",
            "  the reconciler made it UNKNOWN (the money may or may not have moved) and asked",
            "  the type's observer, the bank's books, by business key. Found there: CONFIRMED.",
            "Sending it again would have wired the money twice; with no observer it would have",
            "  gone STUCK for a person ('relay resolve'). docs/unknown.md has every case.",
        )
        _summary(url, all_keys)
        if once.held:
            click.echo(f"\n({once.held} more warnings like those above are in {log_path})")
        click.echo(
            "\nwhat next: 'bash scripts/demo.sh --keep-running --console' (the operator console), "
            "then 'relay show KEY' and "
            "'relay enqueue demo.wire KEY JSON';\n  docs/getting-started.md on your own "
            f"servers; docs/unknown.md for UNKNOWN; the daemons' logs: {log_path}"
        )
        if keep_running:
            click.echo(
                "\nrelay, reconciler and demo bank still running"
                + (" (and the console)" if console else "")
                + "; enqueue more with 'relay enqueue demo.wire KEY JSON'. Ctrl-C stops."
            )
            with contextlib.suppress(KeyboardInterrupt):
                while all(thread.is_alive() for thread in threads):
                    time.sleep(1)
        click.echo("\nstopping the relay, the reconciler, the bank and the services ...")


def _write_intents(url: str, run_id: str, effects: int, max_request_size: int) -> list[str]:
    keys: list[str] = []
    with psycopg.connect(url) as conn:
        # An application's transaction that rolls back: its intent never exists.
        outbox.enqueue(conn, "demo.email", f"demo-{run_id}-rolled-back", {"to": "nobody"})
        conn.rollback()
        click.echo("a transaction that rolled back left no effect behind")
        for i in range(effects):
            key = f"demo-{run_id}-{i:04d}"
            if i % 2:
                payload = {"account": f"ACC{i:03d}", "amount": 100 + i, "date": "2026-11-22"}
                outbox.enqueue(conn, "demo.wire", key, payload)
            else:
                outbox.enqueue(conn, "demo.email", key, {"to": f"user{i}@example.com"})
            keys.append(key)
        # One record too large for Kafka: refused definitively, and it holds up nothing else.
        big = f"demo-{run_id}-too-large"
        outbox.enqueue(conn, "demo.email", big, {"blob": "x" * (max_request_size + 1)})
        keys.append(big)
        conn.commit()
    click.echo(f"committed {len(keys)} intents in one application transaction\n")
    return keys


def _freeze_mid_publish(url: str, broker: LocalKafka, run_id: str) -> list[str]:
    keys = [f"demo-{run_id}-frozen-{i}" for i in range(5)]
    # Freeze an idle relay: status events of act 1 still on their way would take the hit instead.
    deadline = time.monotonic() + 30.0
    while _in_flight(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    broker.pause()
    try:
        with psycopg.connect(url) as conn:
            for key in keys:
                outbox.enqueue(conn, "demo.email", key, {"to": f"{key}@example.com"})
            conn.commit()
        started = time.monotonic()
        _watch(url, keys, until=lambda p: p.states.get("UNKNOWN") == len(keys), started=started)
        click.echo(f"  t+{time.monotonic() - started:5.2f}s  ... the broker answers again")
    finally:
        broker.resume()
    _watch(url, keys, timeout_s=120.0, started=started)
    return keys


def _in_flight(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query("demo_in_flight")).fetchone()
    return int(row[0]) if row else 0


class Progress(NamedTuple):
    states: dict[str, int]
    awaiting: int  # PUBLISHED, and the type awaits a downstream result


def _progress(url: str, keys: list[str]) -> Progress:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(query("demo_progress"), {"keys": keys}).fetchall()
    return Progress({str(s): int(n) for s, n, _ in rows}, sum(int(a) for *_, a in rows))


def _settled(p: Progress) -> bool:
    busy = ("PENDING", "DISPATCHING", "UNKNOWN")
    return not p.awaiting and not any(p.states.get(s) for s in busy)


def _watch(
    url: str,
    keys: list[str],
    timeout_s: float = 60.0,
    until: Callable[[Progress], bool] = _settled,
    started: float | None = None,
) -> None:
    """Print the keys' state counts each time they change, until ``until`` holds; times count
    from ``started`` (default: now), so one act keeps one clock."""
    began = time.monotonic()
    started = began if started is None else started
    last: dict[str, int] = {}
    while time.monotonic() - began < timeout_s:
        progress = _progress(url, keys)
        if progress.states != last:
            line = "  ".join(f"{s}={n}" for s, n in sorted(progress.states.items()))
            click.echo(f"  t+{time.monotonic() - started:5.2f}s  {line}")
            last = progress.states
        if until(progress):
            return
        time.sleep(0.05)
    click.echo("  (some effects are still in flight after the demo's wait)")


def _show_one(url: str, key: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        story = load_story(conn, key)
    if story is not None:
        click.echo(f"the story of {key}, as 'relay show {key}' tells it (reasons shortened):")
        click.echo("\n".join(f"  {line}" for line in _once_each(story_lines(story))))


# A Kafka error wrapped in Kafka errors: "KafkaError: Cannot execute ...: KafkaError: Could not
# ...: [Error 7] RequestTimedOutError: ...". The innermost error says what happened.
_NESTED = re.compile(r"(?:KafkaError: [^\[]*?: )+(?=\[Error)")
_REASON = re.compile(r"^(?P<head>.*?(?:-> [a-z_]+(?: p\d+@\d+)?: | by [^:]+: ))(?P<reason>.+)$")


def _shorten(reason: str) -> str:
    return _NESTED.sub("... ", reason)


def _once_each(lines: list[str]) -> list[str]:
    """The story's lines with nested Kafka errors cut to their innermost one, and a long reason
    already shown replaced by a pointer ('relay show' prints them in full)."""
    shown: set[str] = set()
    out: list[str] = []
    for line in lines:
        m = _REASON.match(line)
        if m is None:
            out.append(_shorten(line))
            continue
        reason = _shorten(m["reason"])
        if len(reason) > 60 and reason in shown:
            reason = "(the reason above)"
        shown.add(reason)
        out.append(m["head"] + reason)
    return out


def _summary(url: str, keys: list[str]) -> None:
    """Each effect's path through its states, from its transitions; alike paths together."""
    paths: dict[tuple[str, tuple[str, ...]], list[tuple[str, float]]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for key in keys:
            story = load_story(conn, key)
            if story is None:
                continue
            steps = [t["to_state"] for t in story["transitions"]]
            unknown_s = 0.0
            times = [t["at"] for t in story["transitions"]] + [None]
            for step, at, after in zip(steps, times, times[1:], strict=False):
                if step == "UNKNOWN" and after is not None:
                    unknown_s += (after - at).total_seconds()
            kind = (str(story["effect"]["effect_type"]), tuple(steps))
            paths.setdefault(kind, []).append((key, unknown_s))
    click.echo("\nsummary: every effect of this run, by its path through the states")
    click.echo(f"  {'effects':>7}  {'type':<10}  {'UNKNOWN for':>11}  path (example key)")
    for (effect_type, path), found in sorted(paths.items(), key=lambda kv: -len(kv[1])):
        longest = max(seconds for _, seconds in found)
        held = f"{longest:.2f}s" if "UNKNOWN" in path else "-"
        click.echo(
            f"  {len(found):>7}  {effect_type:<10}  {held:>11}  {' -> '.join(path)}"
            f"  ({found[0][0]})"
        )

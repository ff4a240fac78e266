"""Helpers shared by the integration tests: fresh databases, configs, relay subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from kafka import KafkaConsumer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

import relay
from relay.config import Settings
from relay.dispatch.daemon import Relay
from relay.migrations import migrate, sync_effect_types


@contextmanager
def running(daemon: Relay) -> Iterator[Relay]:
    """A relay in a thread of this process; stopped (and joined) on exit."""
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        thread.join(90)
        assert not thread.is_alive(), "the relay did not stop"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A port p with p + 1 free as well (the reconciler's metrics default to the relay's + 1).
    Both are held while looking, so the pair is not half taken by the next free_port()."""
    import socket

    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def create_database(server_url: str, template: str | None = None) -> str:
    """A new database on the test server (empty, or a copy of ``template``); returns its URL."""
    name = unique("relay_test_")
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    return make_conninfo(server_url, dbname=name)


def drop_database(url: str) -> None:
    params = conninfo_to_dict(url)
    name = str(params["dbname"])
    server = make_conninfo(url, dbname="postgres")
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def effect_types(prefix: str) -> dict[str, dict[str, Any]]:
    """Effect types with topics unique to one test, so tests never read each other's records."""
    return {
        "wire": {
            "topic": f"{prefix}.wires",
            "business_key": "{account}:{amount}:{date}",
            "result_topic": f"{prefix}.wire-results",
        },
        "email": {"topic": f"{prefix}.emails", "idempotent": True},
    }


class GivenSettings(Settings):
    """Settings from the values given and the defaults only.

    ``Settings`` lets ``RELAY_*`` variables win over explicit values, so with the servers'
    ``export`` lines in the shell every test would silently use the shared database instead of
    its fresh one (and any other stray variable would change its settings). The session fixture
    has read the two service URLs from the environment already; nothing else comes from there.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def make_settings(database_url: str, bootstrap: str, prefix: str, **overrides: Any) -> Settings:
    """A test's settings: exactly these values (no RELAY_* variable, no RELAY_CONFIG file)."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "kafka_bootstrap_servers": bootstrap,
        "effect_types": effect_types(prefix),
        "replica_id": f"{prefix}-r1",
        "poll_interval_s": 0.5,
        "metrics_port": 0,
    }
    values.update(overrides)
    return GivenSettings(**values)


def prepare_database(settings: Settings) -> None:
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        migrate(conn)
        sync_effect_types(conn, settings)


def write_config(path: Path, settings: Settings) -> Path:
    """The TOML file a relay subprocess reads; written from validated settings."""
    lines: list[str] = []
    plain = settings.model_dump(exclude={"effect_types"}, exclude_none=True)
    if settings.receipts_topic is None:
        plain["receipts_topic"] = ""  # off; left out, the default would turn receipts on
    for key, value in plain.items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        lines.append(f"{key} = {json.dumps(value)}")
    for name, spec in settings.effect_types.items():
        lines.append(f"\n[effect_types.{json.dumps(name)}]")
        for key, value in spec.model_dump(exclude={"name"}, exclude_none=True).items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def status_stories(records: list[Any]) -> dict[str, list[tuple[str | None, str, str]]]:
    """Per operation key, each status event's (previous state, state, kind of ce_id: 'txn'
    for one that rode in its batch's transaction, 'log' for one from the transitions log)."""
    told: dict[str, list[tuple[str | None, str, str]]] = {}
    for r in records:
        value = json.loads(r.value)
        kind = "txn" if ".b" in dict(r.headers)["ce_id"].decode() else "log"
        told.setdefault(value["operation_key"], []).append(
            (value["previous_state"], value["state"], kind)
        )
    return told


def publish_with_commit(
    settings: Settings, keys: list[str], monkeypatch: Any, commit: Callable[[Any, float], None]
) -> None:
    """Enqueue e-mails with these keys and run a relay whose batches commit through ``commit``
    (the status events' publisher commits through the same function: its commits go as they
    are), until all are PUBLISHED and every status event is out."""
    from relay.dispatch import transactions
    from relay.dispatch.transactions import transactional_id

    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", k, {"to": k}) for k in keys])
    real = transactions.commit
    ours = transactional_id(settings.replica_id)

    def routed(producer: Any, timeout_s: float) -> None:
        (commit if producer.config["transactional_id"] == ours else real)(producer, timeout_s)

    monkeypatch.setattr(transactions, "commit", routed)
    with running(Relay(settings)):
        wait_for(lambda: count_states(url) == {"PUBLISHED": len(keys)}, 90, "publication")
        wait_for(lambda: status_backlog(url) == 0, 30, "status events sent")


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    """A topic made as a deployment makes it, before the relay needs it."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def relay_env(**extra: str) -> dict[str, str]:
    """The environment of a relay subprocess: without RELAY_* leaking in from the outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(extra)
    return env


def start_relay(
    config: Path, log_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``relay run`` as a real subprocess, logging to a file."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "--config", str(config), *args, "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else relay_env(),
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    explain: Callable[[], str] | None = None,
) -> None:
    """``explain``: what the failure message should also say (the state the wait never left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    detail = f"\n{explain()}" if explain is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def diagnose(database_url: str, limit: int = 5) -> str:
    """What a timed-out wait should say: states, and a few effects that did not finish."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT operation_key, state, attempts, verify_tries, owner, reason FROM relay.effect "
            "WHERE state NOT IN ('PUBLISHED', 'CONFIRMED') ORDER BY id LIMIT %s",
            (limit,),
        ).fetchall()
    return f"states {count_states(database_url)}; unfinished: {rows}"


UNREAD_INTAKE = "SELECT count(*) FROM relay.intake_unread"


def count_states(database_url: str) -> dict[str, int]:
    """Effects by state; an intent the relay has not read from the intake yet counts as PENDING,
    one claimed in a batch (no effect row until its outcome) as DISPATCHING, one in a published
    batch (no effect row) as PUBLISHED."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM relay.effect GROUP BY state "
            "UNION ALL SELECT 'DISPATCHING', count(*) FROM relay.batch_effect "
            "UNION ALL SELECT 'PUBLISHED', coalesce(sum(n), 0) FROM relay.published_batch"
        ).fetchall()
        unread = conn.execute(UNREAD_INTAKE).fetchone()
    states: dict[str, int] = {}
    for state, n in rows:
        if n:
            states[str(state)] = states.get(str(state), 0) + int(n)
    if unread and unread[0]:
        states["PENDING"] = states.get("PENDING", 0) + int(unread[0])
    return states


def read_intake(database_url: str) -> int:
    """What ``relay run`` does before claiming: a tick, then every batch of the intake written as
    effect rows (for tests that look at or change effect rows before any relay runs)."""
    from relay.dispatch.intake import promote
    from relay.dispatch.ticker import Ticker

    total = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        Ticker().run_once(conn)
        while True:
            done = promote(conn, limit=5000)
            total += done.rows
            if not done.more:
                return total


def status_backlog(database_url: str) -> int:
    """Transitions whose status event is not published yet."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM relay.transition WHERE status_pending").fetchone()
    return int(row[0]) if row else 0


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Every record of a topic, read_committed, from the beginning; stops at ``expected`` records
    or when the topic stays quiet after the timeout, so a test also sees extra records."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        group_id=None,
        consumer_timeout_ms=3000,
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500, max_records=5000)
            for part in batch.values():
                records.extend(part)
            if len(records) >= expected and not batch:
                break
    finally:
        consumer.close()
    return records


def iter_headers(record: Any) -> Iterator[tuple[str, bytes]]:
    yield from record.headers


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET, also for error statuses (a 503 from /healthz is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read().decode()


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One ``relay`` command as an operator runs it, with the test's config file."""
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=relay_env(),
        timeout=60,
    )

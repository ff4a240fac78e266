"""1,000 malformed or orphaned results mixed into a normal run, and a reconciler killed mid-run:
every record is recorded and counted once, every good result applied once."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from tests import support
from tests.downstream import harness as h

GOOD = 500
BAD = 1000


@pytest.fixture
def rsettings(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    return h.reconciler_settings(
        database_url, services.kafka_bootstrap_servers, prefix, reconcile_batch_size=50
    )


def _evidence(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM relay.evidence WHERE kind = 'result'").fetchone()
    return int(row[0]) if row else 0


def _reconcile(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "--config", str(config), "reconcile"],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=support.relay_env(),
    )


def test_bad_results_mixed_in_and_a_killed_reconciler_lose_nothing(
    rsettings: Settings, services: Services, prefix: str, tmp_path: Path
) -> None:
    url = rsettings.require_database_url()
    keys = [f"load-{i:04d}" for i in range(GOOD)]
    with psycopg.connect(url) as conn:
        relay.enqueue_many(
            conn, [relay.Intent("wire", k, {**h.WIRE, "amount": i}) for i, k in enumerate(keys)]
        )
        conn.commit()
    with support.running(Relay(rsettings)):
        support.wait_for(
            lambda: support.count_states(url) == {"PUBLISHED": GOOD}, 60, "publication"
        )
    rng = random.Random(5)
    good = [h.result(k, external_id=f"bank-{k}") for k in keys]
    bad: list[tuple[bytes | None, bytes | None]] = []
    for i in range(BAD):
        kind = i % 4
        if kind == 0:
            bad.append((b"x", b"{not json"))
        elif kind == 1:
            bad.append((b"x", json.dumps({"operation_key": "load-0001", "outcome": "?"}).encode()))
        elif kind == 2:
            bad.append((b"x", bytes(rng.randrange(256) for _ in range(40))))
        else:
            bad.append(h.result(f"nobody-{i}"))
    mixed = good + bad
    rng.shuffle(mixed)
    h.produce(services.kafka_bootstrap_servers, f"{prefix}.wire-results", mixed)

    config = support.write_config(tmp_path / "relay.toml", rsettings)
    log = tmp_path / "reconciler.log"
    first = _reconcile(config, log)
    try:
        support.wait_for(lambda: _evidence(url) >= 300, 60, "the first results", interval=0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed_at = _evidence(url)
    assert killed_at < GOOD + BAD, "the reconciler finished before it could be killed"
    started = time.monotonic()
    second = _reconcile(config, log)
    try:
        support.wait_for(lambda: _evidence(url) == GOOD + BAD, 90, "every record", interval=0.05)
        elapsed = time.monotonic() - started
    finally:
        support.stop_process(second)
    assert second.returncode == 0, log.read_text()[-3000:]
    print(
        f"\nkilled after {killed_at} records; the restarted reconciler stored the remaining "
        f"{GOOD + BAD - killed_at} in {elapsed:.1f}s (start-up and group join included)"
    )
    assert h.verdicts(url) == {"applied": GOOD, "malformed": 750, "orphaned": 250}
    assert support.count_states(url).get("CONFIRMED") == GOOD
    with psycopg.connect(url, autocommit=True) as conn:
        confirmations = conn.execute(
            "SELECT count(*), count(DISTINCT effect_id) FROM relay.transition"
            " WHERE to_state = 'CONFIRMED'"
        ).fetchone()
        wrong = conn.execute(
            "SELECT count(*) FROM relay.effect WHERE effect_type = 'wire'"
            " AND external_id <> 'bank-' || operation_key"
        ).fetchone()
    assert confirmations == (GOOD, GOOD)  # each good result applied exactly once
    assert wrong == (0,)
    # Nothing waited long enough to pass its deadline: no detour through UNKNOWN.
    assert all(t[1] != "UNKNOWN" for k in keys[:50] for t in h.transitions(url, k))

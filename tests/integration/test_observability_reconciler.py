"""The reconciler's metrics on the real database and broker: every path that moves an effect or
judges a result counts it (once, and only once it committed), and its consumer lag is true.

The counters are process-wide, so each test compares them before and after what it does.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

import relay
from relay import db
from relay.config import Settings
from relay.devtools.services import Services
from relay.observability.metrics import REGISTRY
from relay.reconciler import results as results_module
from relay.reconciler.consumer import ResultConsumer
from relay.reconciler.deadlines import apply_deferred, expire_deadlines
from relay.reconciler.observation import Observations
from relay.reconciler.observers import Observation, ObservedEffect
from tests import support
from tests.downstream import harness as h

ACTOR = "reconciler:test"

# What ``observe`` below answers, by operation key; "slow" never answers in time.
ANSWERS: dict[str, Observation | str] = {}


def observe(effect: ObservedEffect) -> Observation | str:
    """The wire type's observer in these tests (named by import path in the settings)."""
    answer = ANSWERS.get(effect.operation_key, "inconclusive")
    if answer == "slow":
        time.sleep(1.5)
        return "present"
    return answer


class Counts:
    """Snapshot of the reconciler's counters; ``delta()`` is what happened since."""

    FAMILIES = (
        ("relay_transitions_total", ("from_state", "to_state")),
        ("relay_results_total", ("outcome",)),
        ("relay_results_quarantined_total", ("reason",)),
        ("relay_observations_total", ("answer",)),
    )

    def __init__(self) -> None:
        self.before = self._read()

    @classmethod
    def _read(cls) -> dict[tuple[str, ...], float]:
        values: dict[tuple[str, ...], float] = {}
        for family in REGISTRY.collect():
            for sample in family.samples:
                for name, labels in cls.FAMILIES:
                    if sample.name == name:
                        key = (name.removeprefix("relay_").removesuffix("_total"),)
                        values[key + tuple(sample.labels[label] for label in labels)] = sample.value
        return values

    def delta(self) -> dict[tuple[str, ...], float]:
        now = self._read()
        return {
            key: value - self.before.get(key, 0.0)
            for key, value in now.items()
            if value != self.before.get(key, 0.0)
        }


@pytest.fixture
def rsettings(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    return h.reconciler_settings(
        database_url,
        services.kafka_bootstrap_servers,
        prefix,
        reconcile_batch_size=2,
        effect_types=h.wire_types(
            prefix, python_observer=f"{__name__}:observe", observer_timeout_s=0.2
        ),
    )


@pytest.fixture
def conn(rsettings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with db.connect(rsettings, purpose="test") as connection:
        yield connection


_amounts = iter(range(1000, 100_000))


def make_effect(
    url: str,
    key: str,
    state: str,
    *,
    effect_type: str = "wire",
    attempts: int = 1,
    external_id: str | None = None,
    deadline_passed: bool = False,
) -> None:
    """An effect in ``state``, as if the relay had published it ``attempts`` times."""
    payload = {**h.WIRE, "amount": next(_amounts)} if effect_type == "wire" else {"to": key}
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, effect_type, key, payload)
        conn.commit()
        support.read_intake(url)
        conn.execute(
            "UPDATE relay.effect SET state = %(state)s, attempts = %(attempts)s,"
            " external_id = %(external_id)s, published_partition = 0, published_offset = 0,"
            " published_at = now(), observe_at = NULL,"
            " outcome_deadline = CASE WHEN %(passed)s THEN now() - interval '1 second' END"
            " WHERE operation_key = %(key)s",
            {
                "state": state,
                "attempts": attempts,
                "external_id": external_id,
                "passed": deadline_passed,
                "key": key,
            },
        )
        conn.commit()


def test_results_count_outcomes_quarantine_and_moves_and_the_lag_is_exact(
    rsettings: Settings, services: Services, prefix: str, conn: psycopg.Connection[Any]
) -> None:
    url = rsettings.require_database_url()
    for key, state in (
        ("r-commit", "PUBLISHED"),
        ("r-reject", "PUBLISHED"),
        ("r-unknown", "PUBLISHED"),
        ("r-stuck", "STUCK"),
        ("r-twice", "PUBLISHED"),
        ("r-early", "DISPATCHING"),
    ):
        make_effect(url, key, state)
    make_effect(url, "r-new", "PENDING", attempts=0)
    make_effect(url, "r-done", "CONFIRMED", external_id="d-1")
    records = [
        h.result("r-commit", external_id="c-1"),
        h.result("r-reject", "rejected"),
        h.result("r-unknown", "unknown"),
        h.result("r-stuck"),
        h.result("r-new"),  # never attempted: orphaned
        h.result("nobody-has-this-key"),  # orphaned
        (b"junk", b"\xff not json"),  # malformed
        h.result("r-done", "rejected"),  # late
        h.result("r-twice", external_id="t-1"),
        h.result("r-twice", external_id="t-2"),  # conflicting: one compensation enqueued
        h.result("r-early"),  # deferred until the relay has recorded the publication
        h.result("r-commit", external_id="c-1"),  # repeated: nothing new
    ]
    h.produce(services.kafka_bootstrap_servers, f"{prefix}.wire-results", records)
    counts = Counts()
    results = ResultConsumer(rsettings, ACTOR)
    lags: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    try:
        while results.applied_records < len(records):
            assert time.monotonic() < deadline, f"consumed {results.applied_records} records"
            if results.poll_once(conn, timeout_s=0.5):
                lag = results.lag()
                assert set(lag) == {f"{prefix}.wire-results"}
                lags.append((results.applied_records, lag[f"{prefix}.wire-results"]))
    finally:
        results.close()
    # Batches of at most 2 (reconcile_batch_size): the lag is what the group has not yet read.
    assert len(lags) >= len(records) // 2
    assert lags[0][1] > 0
    assert all(lag == len(records) - consumed for consumed, lag in lags), lags
    assert lags[-1] == (len(records), 0)
    assert results.counts["deferred"] == 1

    # The relay records the publication of r-early; the timers apply the result that waited.
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("UPDATE relay.effect SET state = 'PUBLISHED' WHERE operation_key = 'r-early'")
    assert apply_deferred(conn, rsettings, results.actor) == 1

    assert counts.delta() == {
        ("results", "committed"): 4,  # r-commit, r-stuck, r-twice's first, r-early
        ("results", "rejected"): 1,
        ("results", "unknown"): 1,
        ("results_quarantined", "orphaned"): 2,
        ("results_quarantined", "malformed"): 1,
        ("results_quarantined", "late"): 1,
        ("results_quarantined", "conflicting"): 1,
        ("transitions", "PUBLISHED", "CONFIRMED"): 3,
        ("transitions", "PUBLISHED", "REJECTED"): 1,
        ("transitions", "PUBLISHED", "UNKNOWN"): 1,
        ("transitions", "STUCK", "CONFIRMED"): 1,
        ("transitions", "NONE", "PENDING"): 1,  # the compensation of r-twice
    }
    assert h.children(url, "r-twice") == [("r-twice#compensation", "wire-reversal", "PENDING")]


def _record(topic: str, offset: int, key: str, outcome: str = "committed") -> SimpleNamespace:
    """A result record as the consumer gets it, on ``topic`` (the wire type's result topic: a
    result elsewhere is misrouted)."""
    _, value = h.result(key, outcome)
    return SimpleNamespace(topic=topic, partition=0, offset=offset, key=key.encode(), value=value)


def test_a_batch_rolled_back_counts_nothing_and_a_failed_record_is_quarantined(
    rsettings: Settings, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = rsettings.require_database_url()
    make_effect(url, "b-fine", "PUBLISHED")
    make_effect(url, "b-boom", "PUBLISHED")
    results = ResultConsumer(rsettings, ACTOR)
    topic = rsettings.effect_types["wire"].result_topic
    assert topic is not None
    batch = [_record(topic, 0, "b-fine"), _record(topic, 1, "b-boom")]
    real_decide = results_module.decide
    failure: list[psycopg.Error] = []

    def decide(effect: Any, message: Any, **kwargs: Any) -> Any:
        if message.operation_key == "b-boom":
            raise failure[0]
        return real_decide(effect, message, **kwargs)

    monkeypatch.setattr(results_module, "decide", decide)
    counts = Counts()

    # The connection broke mid-batch: nothing of it is recorded; it is read again later.
    failure[:] = [psycopg.OperationalError("connection lost")]
    with pytest.raises(psycopg.OperationalError):
        results._apply_batch(conn, batch)
    assert counts.delta() == {}
    assert h.state(url, "b-fine") == "PUBLISHED"

    # One record cannot be applied: the batch is applied record by record; b-fine's first try
    # was rolled back and is counted once, the broken record is kept as failed evidence.
    failure[:] = [psycopg.errors.DataError("a value no one foresaw")]
    assert results._apply_batch(conn, batch) == ["applied", "failed"]
    assert counts.delta() == {
        ("results", "committed"): 1,
        ("transitions", "PUBLISHED", "CONFIRMED"): 1,
        ("results_quarantined", "failed"): 1,
    }

    # Delivered again (a rebalance, a lost offset commit): recognised, nothing counted twice.
    assert results._apply_batch(conn, batch) == ["redelivered", "redelivered"]
    assert counts.delta() == {
        ("results", "committed"): 1,
        ("transitions", "PUBLISHED", "CONFIRMED"): 1,
        ("results_quarantined", "failed"): 1,
    }


def test_deadlines_and_observations_count_every_move_and_answer(
    rsettings: Settings, conn: psycopg.Connection[Any]
) -> None:
    url = rsettings.require_database_url()
    make_effect(url, "o-late", "PUBLISHED", deadline_passed=True)
    make_effect(url, "o-present", "UNKNOWN")
    make_effect(url, "o-absent", "UNKNOWN")
    make_effect(url, "o-absent-spent", "UNKNOWN", attempts=3)  # max_attempts 3: STUCK
    make_effect(url, "o-twice", "UNKNOWN")
    make_effect(url, "o-unsure", "UNKNOWN")
    make_effect(url, "o-slow", "UNKNOWN")
    make_effect(url, "o-email", "UNKNOWN", effect_type="email")  # no observer: STUCK
    ANSWERS.clear()
    ANSWERS.update(
        {
            "o-present": "present",
            "o-absent": Observation("absent", count=0),
            "o-absent-spent": Observation("absent", count=0),
            "o-twice": Observation("duplicate", count=2),
            "o-unsure": "inconclusive",
            "o-slow": "slow",
            # o-late (once UNKNOWN) gets the default: inconclusive.
        }
    )
    counts = Counts()
    assert expire_deadlines(conn, ACTOR) == 1
    observations = Observations(rsettings, ACTOR)
    try:
        answers = observations.run_due(conn)
    finally:
        observations.close()
    assert sum(answers.values()) == 8
    assert h.state(url, "o-slow") == "UNKNOWN"
    assert counts.delta() == {
        ("transitions", "PUBLISHED", "UNKNOWN"): 1,
        ("observations", "present"): 1,
        ("observations", "absent"): 2,
        ("observations", "duplicate"): 1,
        ("observations", "inconclusive"): 2,  # o-unsure, o-late
        ("observations", "error"): 1,  # o-slow did not answer in time
        ("transitions", "UNKNOWN", "CONFIRMED"): 2,  # o-present, o-twice
        ("transitions", "UNKNOWN", "PENDING"): 1,  # o-absent, re-dispatched
        ("transitions", "UNKNOWN", "STUCK"): 2,  # o-absent-spent, o-email
        ("transitions", "NONE", "PENDING"): 1,  # o-twice's compensation
    }


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_the_daemon_serves_its_metrics_on_its_own_port(rsettings: Settings, prefix: str) -> None:
    url = rsettings.require_database_url()
    relay_port = support.free_port_pair()
    settings = rsettings.model_copy(
        update={"metrics_host": "127.0.0.1", "metrics_port": relay_port, "metrics_cache_s": 0.5}
    )
    make_effect(url, "d-late", "PUBLISHED", deadline_passed=True)
    counts = Counts()
    with h.running_reconciler(settings):
        port = relay_port + 1  # the reconciler's default: beside the relay's, never on it
        lag = f'relay_reconciler_consumer_lag_records{{topic="{prefix}.wire-results"}} 0.0'
        support.wait_for(lambda: lag in scrape(port), 30, "the consumer lag, scraped")
        body = scrape(port)
        assert 'relay_build_info{daemon="reconciler"' in body
        assert 'relay_observations_total{answer="error"}' in body
        assert 'relay_transitions_total{from_state="NONE",to_state="PENDING"}' in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as ready:
            assert ready.status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{relay_port}/healthz", timeout=2)
        support.wait_for(
            lambda: counts.delta().get(("transitions", "PUBLISHED", "UNKNOWN")) == 1,
            30,
            "the deadline to pass, counted",
        )
    assert h.state(url, "d-late") in ("UNKNOWN", "STUCK")


def test_a_loop_that_fails_every_round_is_not_ready(
    rsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 item 1: a consumer stuck on one batch showed /readyz 200 and a lag of 0. After
    reconcile_stall_rounds failed rounds in a row /readyz answers 503 and the gauge shows them;
    a round that succeeds makes it ready again."""
    port = support.free_port()
    settings = rsettings.model_copy(
        update={
            "metrics_host": "127.0.0.1",
            "reconcile_metrics_port": port,
            "outage_backoff_max_s": 0.2,
            "reconcile_stall_rounds": 3,
        }
    )
    broken = [True]
    real_poll = ResultConsumer.poll_once

    def poll_once(self: ResultConsumer, conn: Any, timeout_s: float) -> int:
        if broken[0]:
            raise RecursionError("a batch nobody can apply")
        return real_poll(self, conn, timeout_s)

    monkeypatch.setattr(ResultConsumer, "poll_once", poll_once)

    def ready() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            return int(refused.code)
        except OSError:
            return 0

    with h.running_reconciler(settings):
        support.wait_for(lambda: ready() == 503, 30, "/readyz to say not ready")
        failed = 'relay_reconciler_failed_rounds{loop="results"}'
        body = scrape(port)
        line = next(x for x in body.splitlines() if x.startswith(failed))
        assert float(line.split()[-1]) >= 3
        assert 'relay_reconciler_failed_rounds{loop="timers"} 0.0' in body
        broken[0] = False
        support.wait_for(lambda: ready() == 200, 30, "/readyz to say ready again")
        assert f"{failed} 0.0" in scrape(port)

"""The reconciler under faults found in review, on the real broker and database: compensations
that cannot be made, absurd duplicate counts, observers that redirect, trickle or hang, ambiguous
publishes without Kafka transactions, and errors nobody foresaw in the daemon's threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.dispatch.publisher import ClaimedEffect, PublishResult
from relay.dispatch.stage import Claimed
from relay.errors import CompensationLimitError
from relay.reconciler.compensation import MAX_COMPENSATIONS
from relay.reconciler.consumer import ResultConsumer
from relay.reconciler.daemon import Reconciler
from relay.reconciler.observation import Observations
from relay.reconciler.observers import HttpObserver, Observation, ObservedEffect
from relay.reconciler.resolve import Decision, resolve
from tests import support
from tests.downstream import harness as h
from tests.downstream import observers

PYTHON_OBSERVER = "tests.downstream.observers:observe"


@pytest.fixture
def rsettings(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """A wire type with the tests' Python observer, results due within 1 s."""
    h.isolate_from_environment(monkeypatch)
    return _settings(database_url, services, prefix, outcome_timeout_s=1.0)


def _settings(
    database_url: str, services: Services, prefix: str, *, outcome_timeout_s: float
) -> Settings:
    types = h.wire_types(
        prefix, python_observer=PYTHON_OBSERVER, outcome_timeout_s=outcome_timeout_s
    )
    return h.reconciler_settings(
        database_url, services.kafka_bootstrap_servers, prefix, effect_types=types
    )


@pytest.fixture
def bank(services: Services, prefix: str, tmp_path: Path) -> Iterator[h.Downstream]:
    downstream = h.Downstream(services.kafka_bootstrap_servers, prefix, tmp_path)
    yield downstream.start()
    downstream.stop()


def _wires(url: str, keys: list[str], start: int, *, taken: Sequence[str] = ()) -> None:
    """Enqueue wires; ``taken``: keys already used by an e-mail, so that a compensation of that
    name is refused (RL003, a database error). Applications cannot enqueue such keys any more;
    rows from before migration 0004, or a writer with rights on the table, still can."""
    with psycopg.connect(url) as conn:
        for i, key in enumerate(keys):
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": start + i})
        for key in taken:
            conn.execute(
                "INSERT INTO relay.effect (operation_key, effect_type, topic, payload)"
                ' SELECT %s, name, topic, \'{"to": "someone@example.org"}\''
                " FROM relay.effect_type WHERE name = 'email'",
                (key,),
            )
        conn.commit()
    support.read_intake(url)


def _unknown(url: str, keys: list[str], start: int) -> None:
    """Wires that are UNKNOWN after a known publication, due for observation now."""
    _wires(url, keys, start)
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE relay.effect SET state = 'UNKNOWN', attempts = 1, published_partition = 0,"
            " published_offset = 0, published_at = now(), observe_at = NULL"
            " WHERE operation_key = ANY(%s)",
            (keys,),
        )
        conn.commit()


def _published(url: str, keys: list[str], start: int) -> None:
    _wires(url, keys, start)
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE relay.effect SET state = 'PUBLISHED', attempts = 1, published_partition = 0,"
            " published_offset = 0, published_at = now() WHERE operation_key = ANY(%s)",
            (keys,),
        )
        conn.commit()


def _one(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _tries(url: str, key: str) -> int:
    return int(_one(url, "SELECT observe_tries FROM relay.effect WHERE operation_key = %s", key))


def _observed(url: str, key: str) -> list[tuple[str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT outcome, verdict FROM relay.evidence WHERE kind = 'observation'"
            " AND operation_key = %s ORDER BY id",
            (key,),
        ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


# -- 1. a compensation that cannot be created ---------------------------------------------------


def test_an_extra_execution_that_cannot_be_compensated_goes_stuck_and_results_go_on(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    """The compensation's key is taken (RL003, a database error) when a second commit arrives:
    the effect goes STUCK for a person, the rest of the batch is kept, the consumer goes on."""
    url = rsettings.require_database_url()
    # Results are due within 30 s: no deadline interferes.
    late = _settings(url, services, prefix, outcome_timeout_s=30.0)
    _wires(url, ["c-twice", "c-after", "c-last"], 100, taken=["c-twice#compensation"])
    topic = f"{prefix}.wire-results"
    with support.running(Relay(late)), h.running_reconciler(late):
        support.wait_for(
            lambda: set(h.states(url, ["c-twice", "c-after", "c-last"]).values()) == {"PUBLISHED"},
            30,
            "publication",
        )
        h.produce(
            services.kafka_bootstrap_servers,
            topic,
            [
                h.result("c-twice", external_id="x-1"),
                h.result("c-twice", external_id="x-2"),  # a second execution
                h.result("c-after", external_id="y-1"),
            ],
        )
        support.wait_for(
            lambda: (
                h.states(url, ["c-twice", "c-after"])
                == {"c-twice": "STUCK", "c-after": "CONFIRMED"}
            ),
            30,
            "STUCK and the rest applied",
        )
        # A third execution of the STUCK effect is kept as evidence and changes nothing; the
        # consumer still applies what comes after.
        h.produce(
            services.kafka_bootstrap_servers,
            topic,
            [h.result("c-twice", external_id="x-3"), h.result("c-last", external_id="z-1")],
        )
        support.wait_for(lambda: h.state(url, "c-last") == "CONFIRMED", 30, "the consumer goes on")
    moves = h.transitions(url, "c-twice")
    assert [m[:2] for m in moves[-2:]] == [("PUBLISHED", "CONFIRMED"), ("CONFIRMED", "STUCK")]
    why = moves[-1][3]
    assert "x-2" in why and "cannot be compensated" in why and "a person must undo it" in why
    assert "already names another intent" in why, why
    assert h.state(url, "c-twice") == "STUCK" and h.children(url, "c-twice") == []
    assert h.verdicts(url) == {"applied": 3, "conflicting": 2}
    # A person undoes it by hand and closes it.
    with psycopg.connect(url, autocommit=True) as conn:
        resolve(conn, late, "c-twice", Decision.CONFIRM, reason="reversed x-2 by hand", actor="eve")
    assert h.state(url, "c-twice") == "CONFIRMED"


def test_an_observed_duplicate_that_cannot_be_compensated_goes_stuck_and_timers_go_on(
    rsettings: Settings,
) -> None:
    url = rsettings.require_database_url()
    observers.ANSWERS.update(
        {"o-dup": Observation("duplicate", count=2, detail="twice"), "o-after": "present"}
    )
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        _wires(url, ["o-dup"], 200, taken=["o-dup#compensation"])
        support.wait_for(lambda: h.state(url, "o-dup") == "STUCK", 30, "STUCK")
        # The timers thread is still sweeping deadlines and asking observers.
        _wires(url, ["o-after"], 300)
        support.wait_for(lambda: h.state(url, "o-after") == "CONFIRMED", 30, "timers going on")
    moves = h.transitions(url, "o-dup")
    assert [m[:2] for m in moves[-2:]] == [("PUBLISHED", "UNKNOWN"), ("UNKNOWN", "STUCK")]
    assert "observed duplicate (twice), but not compensated" in moves[-1][3]
    assert "a person must undo it" in moves[-1][3]
    assert h.children(url, "o-dup") == []
    assert _observed(url, "o-dup") == [("duplicate", "applied")]


# -- 2. a cap on compensations ------------------------------------------------------------------


def test_compensations_from_one_answer_are_capped(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    url = rsettings.require_database_url()
    observers.ANSWERS.update(
        {
            "m-many": Observation("duplicate", count=50),
            "m-huge": Observation("duplicate", count=1_000_000_000_000),  # beyond an integer
            "m-three": Observation("duplicate", count=3),
        }
    )
    extra = [h.result("m-results", external_id=f"e-{i}") for i in range(MAX_COMPENSATIONS + 2)]
    with h.running_reconciler(rsettings):
        _unknown(url, ["m-many", "m-huge", "m-three"], 400)
        _published(url, ["m-results"], 500)
        h.produce(services.kafka_bootstrap_servers, f"{prefix}.wire-results", extra)
        support.wait_for(
            lambda: (
                h.states(url, ["m-many", "m-huge", "m-three", "m-results"])
                == {
                    "m-many": "STUCK",
                    "m-huge": "STUCK",
                    "m-three": "CONFIRMED",
                    "m-results": "STUCK",
                }
            ),
            30,
            "answers applied",
        )
    many = h.transitions(url, "m-many")[-1][3]
    assert "50 executions of 'm-many' reported" in many and "a person must undo it" in many
    assert "1000000000001 executions" not in many
    assert "1000000000000 executions" in h.transitions(url, "m-huge")[-1][3]
    assert h.children(url, "m-many") == [] and h.children(url, "m-huge") == []
    assert len(h.children(url, "m-three")) == 2
    assert (
        _one(
            url,
            "SELECT observed_count FROM relay.evidence WHERE operation_key = 'm-huge'",
        )
        == 2**31 - 1
    )  # the count as far as the column holds it; the detail keeps it whole
    # Results: one execution confirms, each further one is compensated up to the cap; the one
    # beyond it sends the effect to a person.
    assert len(h.children(url, "m-results")) == MAX_COMPENSATIONS
    assert f"{MAX_COMPENSATIONS + 2} executions" in h.transitions(url, "m-results")[-1][3]
    # Nor can an operator make them by accident.
    with (
        psycopg.connect(url, autocommit=True) as conn,
        pytest.raises(CompensationLimitError, match="50 executions"),
    ):
        resolve(conn, rsettings, "m-many", Decision.COMPENSATE, reason="x", actor="eve")


# -- 3. observers that redirect, trickle or hang ------------------------------------------------


def test_http_observer_follows_no_redirect_and_bounds_a_trickling_answer(
    rsettings: Settings, bank: h.Downstream
) -> None:
    observer = HttpObserver(bank.observer_url, timeout_s=1.0)
    missing = ObservedEffect("k", "wire", "ACC1:999:2026-11-22")
    assert observer.observe(missing).answer == "absent"
    bank.set_faults(http="redirect")
    seen = observer.observe(missing)
    assert seen.answer == "inconclusive" and "HTTP 302" in seen.detail, seen
    # A body sent a byte at a time over 3 s: socket timeouts (1 s each) never fire.
    url = rsettings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "wire", "t-1", {**h.WIRE, "amount": 7})
        conn.commit()
    with support.running(Relay(rsettings)):
        support.wait_for(
            lambda: len(bank.books()) == 1,
            30,
            "a booking",
            explain=lambda: f"{h.transitions(url, 't-1')}\n{bank.log()}",
        )
    bank.set_faults(http="trickle")
    started = time.monotonic()
    seen = observer.observe(ObservedEffect("t-1", "wire", "ACC1:7:2026-11-22"))
    took = time.monotonic() - started
    assert seen.answer == "inconclusive" and "within 1.0s" in seen.detail, seen
    assert took < 2.5, took
    bank.set_faults(http="normal")
    assert observer.observe(ObservedEffect("t-1", "wire", "ACC1:7:2026-11-22")).count == 1


def test_a_round_waits_once_for_slow_observers_and_spends_no_try_it_did_not_make(
    rsettings: Settings,
) -> None:
    url = rsettings.require_database_url()
    gate = threading.Event()
    observers.HOLD.update({"h-1": gate, "h-2": gate})
    observers.ANSWERS.update({k: "present" for k in ("h-1", "h-2", "h-3", "h-4")})
    observations = Observations(rsettings, "test", workers=2)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            _unknown(url, ["h-1", "h-2"], 600)
            # Two hung observers (timeout 1 s, so 2 s with the grace): the round waits that
            # long once, not once per call.
            started = time.monotonic()
            assert observations.run_due(conn) == {"inconclusive": 2}
            took = time.monotonic() - started
            assert took < 3.0, took
            assert [_tries(url, k) for k in ("h-1", "h-2")] == [1, 1]
            assert "did not answer" in _reason(url, "h-1")

            # Both workers are still held by the hung calls: nothing is claimed, so h-3 is
            # neither asked nor charged a try.
            _unknown(url, ["h-3"], 610)
            assert observations.run_due(conn) == {}
            assert _tries(url, "h-3") == 0 and _observed(url, "h-3") == []

            gate.set()
            support.wait_for(lambda: observations.free_workers() == 2, 10, "free workers")
            time.sleep(0.3)  # h-1 and h-2 are asked again after their backoff (0.2 s)
            assert observations.run_due(conn) == {"present": 3}
            assert h.states(url, ["h-1", "h-2", "h-3"]) == dict.fromkeys(
                ["h-1", "h-2", "h-3"], "CONFIRMED"
            )
            assert _observed(url, "h-3") == [("present", "applied")]

            # A call that never started by its deadline (the pool busy with something else) is
            # cancelled: no answer, no evidence, no try; the effect stays UNKNOWN.
            busy = threading.Event()
            blockers = [observations._pool.submit(busy.wait, 30) for _ in range(2)]
            _unknown(url, ["h-4"], 620)
            assert observations.run_due(conn) == {"not asked": 1}
            busy.set()
            for blocker in blockers:
                blocker.result(10)
            assert h.state(url, "h-4") == "UNKNOWN"
            assert _tries(url, "h-4") == 0 and _observed(url, "h-4") == []
    finally:
        gate.set()
        observations.close()


def _reason(url: str, key: str) -> str:
    return str(_one(url, "SELECT reason FROM relay.effect WHERE operation_key = %s", key))


# -- 4. ambiguous publishes without Kafka transactions ------------------------------------------


class LosesTrack(Relay):
    """A relay that fails around Kafka on the first attempt of chosen effects: the record of an
    ``unrecorded`` one is sent but its acknowledgement never recorded (a crash after the ack);
    an ``unsent`` one is never sent (a crash before it). Both stay DISPATCHING until the lease
    runs out, then the relay itself makes them UNKNOWN with no known publication."""

    def __init__(self, settings: Settings, unrecorded: set[str], unsent: set[str]) -> None:
        super().__init__(settings)
        self.unrecorded, self.unsent = unrecorded, unsent

    def _publish_and_mark(self, claimed: Claimed) -> None:
        kept: list[ClaimedEffect] = [
            e for e in claimed.effects if not (e.attempt == 1 and e.operation_key in self.unsent)
        ]
        if kept:
            super()._publish_and_mark(Claimed(kept, claimed.at))

    def _submit_outcomes(self, results: Any, claimed_at: float) -> None:
        kept: list[PublishResult] = [
            r
            for r in results
            if not (r.effect.attempt == 1 and r.effect.operation_key in self.unrecorded)
        ]
        if kept:
            super()._submit_outcomes(kept, claimed_at)


def test_without_kafka_transactions_unknown_publishes_are_observed(
    database_url: str,
    services: Services,
    prefix: str,
    bank: h.Downstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h.isolate_from_environment(monkeypatch)
    types = h.wire_types(prefix, observer_url=bank.observer_url, outcome_timeout_s=2.0)
    types["email"]["outcome_timeout_s"] = 1.0
    settings = h.reconciler_settings(
        database_url,
        services.kafka_bootstrap_servers,
        prefix,
        effect_types=types,
        kafka_transactions=False,
        publish_timeout_s=2.0,
        lease_s=5.0,
    )
    url = settings.require_database_url()
    bank.set_faults({"u-acked": ["lose_result"]})
    relay_ = LosesTrack(settings, unrecorded={"u-acked", "u-mail"}, unsent={"u-lost"})
    with support.running(relay_), h.running_reconciler(settings):
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "wire", "u-acked", {**h.WIRE, "amount": 701})
            relay.enqueue(conn, "wire", "u-lost", {**h.WIRE, "amount": 702})
            relay.enqueue(conn, "email", "u-mail", {"to": "a@example.org"})
            conn.commit()
        support.wait_for(
            lambda: (
                h.states(url, ["u-acked", "u-lost", "u-mail"])
                == {"u-acked": "CONFIRMED", "u-lost": "CONFIRMED", "u-mail": "STUCK"}
            ),
            60,
            "UNKNOWN publishes resolved",
        )
    # The wire went out, its acknowledgement was lost: observed present, one wire.
    acked = h.transitions(url, "u-acked")
    assert [m[:2] for m in acked[-2:]] == [("DISPATCHING", "UNKNOWN"), ("UNKNOWN", "CONFIRMED")]
    assert "observed present" in acked[-1][3]
    assert bank.net_wires("ACC1:701:2026-11-22") == 1
    # The wire never left: observed absent, re-dispatched, one wire (from the second attempt).
    lost = [m[:2] for m in h.transitions(url, "u-lost")]
    assert lost[2:5] == [
        ("DISPATCHING", "UNKNOWN"),
        ("UNKNOWN", "PENDING"),
        ("PENDING", "DISPATCHING"),
    ]
    assert bank.received("u-lost") == [(2, "executed")]
    # No observer for e-mails: a person decides, and the reason says why.
    assert "kafka_transactions = false" in h.transitions(url, "u-mail")[-1][3]


# -- the daemon's threads -----------------------------------------------------------------------


class Fatal(BaseException):
    """Beyond what any loop may catch: the thread dies."""


class FlakyResults(ResultConsumer):
    def __init__(self, settings: Settings, actor: str) -> None:
        super().__init__(settings, actor)
        self.failed = 0

    def poll_once(self, conn: psycopg.Connection[Any], timeout_s: float) -> int:
        if not self.failed:
            self.failed += 1
            raise RuntimeError("a bug in the result consumer")
        return super().poll_once(conn, timeout_s)


class Flaky(Reconciler):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.results = FlakyResults(settings, self.actor)
        self.sweeps = 0
        self.fatal = threading.Event()

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        self.sweeps += 1
        if self.fatal.is_set():
            raise Fatal()
        if self.sweeps <= 2:
            raise RuntimeError("a bug in a sweep")
        super().sweep(conn)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_unexpected_errors_do_not_stop_the_threads_and_a_dead_one_fails_healthz(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    url = rsettings.require_database_url()
    port = support.free_port()
    settings = rsettings.model_copy(update={"reconcile_metrics_port": port})
    healthz = f"http://127.0.0.1:{port}/healthz"
    daemon = Flaky(settings)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        assert daemon.ready.wait(60)
        _published(url, ["d-1"], 800)
        h.produce(services.kafka_bootstrap_servers, f"{prefix}.wire-results", [h.result("d-1")])
        support.wait_for(lambda: h.state(url, "d-1") == "CONFIRMED", 30, "the consumer going on")
        support.wait_for(lambda: daemon.sweeps >= 5, 30, "the timers going on")
        assert daemon.results.failed == 1  # type: ignore[attr-defined]
        assert support.http_get(healthz) == (200, "ok\n")
        daemon.fatal.set()
        support.wait_for(lambda: support.http_get(healthz)[0] == 503, 30, "/healthz to fail")
        assert "timers: FAILED" in support.http_get(healthz)[1]
        assert thread.is_alive()  # the consumer goes on; the process must be restarted
    finally:
        daemon.stop()
        thread.join(60)
    assert not thread.is_alive()


def test_a_result_behind_a_deferred_one_waits_for_it(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    """Results of one effect are applied in the order they arrived, also when the first came
    while the effect was still DISPATCHING and the next after the relay recorded the ack."""
    from relay.reconciler.deadlines import apply_deferred

    url = rsettings.require_database_url()
    _wires(url, ["d-1"], 1)
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE relay.effect SET state = 'DISPATCHING', attempts = 1 "
            "WHERE operation_key = 'd-1'"
        )
        conn.commit()
    topic = f"{prefix}.wire-results"
    results = ResultConsumer(rsettings, "reconciler:test")
    try:
        with psycopg.connect(url) as conn:

            def read(n: int) -> None:
                support.wait_for(
                    lambda: (
                        results.poll_once(conn, 0.2) >= 0
                        and _one(url, "SELECT count(*) FROM relay.evidence") == n
                    ),
                    30,
                    f"{n} results stored",
                )

            h.produce(services.kafka_bootstrap_servers, topic, [h.result("d-1", "rejected")])
            read(1)
            # The relay records the acknowledgement; a second answer arrives before the
            # deferred one is applied.
            conn.execute(
                "UPDATE relay.effect SET state = 'PUBLISHED', published_partition = 0, "
                "published_offset = 0 WHERE operation_key = 'd-1'"
            )
            conn.commit()
            h.produce(services.kafka_bootstrap_servers, topic, [h.result("d-1", external_id="x-1")])
            read(2)
            assert h.state(url, "d-1") == "PUBLISHED"
            assert apply_deferred(conn, rsettings, results.actor) == 2
    finally:
        results.close()
    # In arrival order: rejected, then a commit that contradicts it, which a person must settle.
    assert h.state(url, "d-1") == "STUCK"
    with psycopg.connect(url, autocommit=True) as conn:
        verdicts = conn.execute(
            "SELECT outcome, verdict FROM relay.evidence ORDER BY id"
        ).fetchall()
    assert verdicts == [("rejected", "applied"), ("committed", "conflicting")]
    reason = _one(url, "SELECT reason FROM relay.effect WHERE operation_key = 'd-1'")
    assert "committed as x-1 an effect recorded REJECTED" in reason

"""The four wire-transfer stories of issue 5, end to end: the relay, the reconciler and a real
downstream bank process (tests/downstream/service.py) on the real broker and database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.reconciler.observers import HttpObserver, ObservedEffect
from tests import support
from tests.downstream import harness as h


@pytest.fixture
def bank(services: Services, prefix: str, tmp_path: Path) -> Iterator[h.Downstream]:
    downstream = h.Downstream(services.kafka_bootstrap_servers, prefix, tmp_path)
    yield downstream.start()
    downstream.stop()


@pytest.fixture
def rsettings(
    database_url: str,
    services: Services,
    prefix: str,
    bank: h.Downstream,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    return h.reconciler_settings(
        database_url,
        services.kafka_bootstrap_servers,
        prefix,
        effect_types=h.wire_types(prefix, observer_url=bank.observer_url, outcome_timeout_s=2.0),
    )


def wire(amount: int) -> dict[str, object]:
    return {**h.WIRE, "amount": amount}


def bkey(amount: int) -> str:
    return f"ACC1:{amount}:2026-11-22"


def _enqueue(url: str, wires: dict[str, int]) -> None:
    with psycopg.connect(url) as conn:
        for key, amount in wires.items():
            relay.enqueue(conn, "wire", key, wire(amount))
        conn.commit()


def test_lost_result_missing_request_and_double_execution(
    rsettings: Settings, bank: h.Downstream
) -> None:
    url = rsettings.require_database_url()
    stories = {"lost-result": 1, "never-arrived": 2, "went-twice": 3}
    bank.set_faults(
        {
            "lost-result": ["lose_result"],
            "never-arrived": ["drop_first"],
            "went-twice": ["execute_twice", "lose_result"],
        }
    )
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        _enqueue(url, stories)
        support.wait_for(
            lambda: (
                set(h.states(url, list(stories)).values()) == {"CONFIRMED"}
                and h.state(url, "went-twice#compensation") == "CONFIRMED"
            ),
            60,
            "every story to end CONFIRMED",
        )
    # 1. The result is lost but the wire went out: UNKNOWN, observed present, one wire.
    moves = [t[:2] for t in h.transitions(url, "lost-result")]
    assert moves[-2:] == [("PUBLISHED", "UNKNOWN"), ("UNKNOWN", "CONFIRMED")]
    assert "observed present" in h.transitions(url, "lost-result")[-1][3]
    assert bank.net_wires(bkey(1)) == 1
    # 2. The request never arrived: UNKNOWN, observed absent, re-dispatched, one wire in the books.
    moves = [t[:2] for t in h.transitions(url, "never-arrived")]
    assert ("UNKNOWN", "PENDING") in moves and moves[-1] == ("PUBLISHED", "CONFIRMED")
    assert bank.received("never-arrived") == [(1, "dropped"), (2, "executed")]
    assert [b for b in bank.books() if b[1] == "never-arrived"] == [
        ("wire", "never-arrived", bkey(2), 2)
    ]
    # 3. The wire went out twice: duplicate, CONFIRMED and one compensation; one net wire.
    assert h.children(url, "went-twice") == [
        ("went-twice#compensation", "wire-reversal", "CONFIRMED")
    ]
    assert "observed duplicate" in h.transitions(url, "went-twice")[-1][3]
    kinds = [b[0] for b in bank.books() if b[2] == bkey(3)]
    assert sorted(kinds) == ["reversal", "wire", "wire"]
    assert bank.net_wires(bkey(3)) == 1
    assert h.observations(url) == [
        ("lost-result", "present"),
        ("never-arrived", "absent"),
        ("went-twice", "duplicate"),
    ]


def test_books_down_goes_stuck_then_an_operator_confirms(
    rsettings: Settings, bank: h.Downstream, tmp_path: Path
) -> None:
    url = rsettings.require_database_url()
    bank.set_faults({"books-down": ["lose_result"]})
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        _enqueue(url, {"books-down": 4})
        support.wait_for(lambda: len(bank.books()) == 1, 30, "the wire to go out")
        bank.stop()  # the books are down
        support.wait_for(lambda: h.state(url, "books-down") == "STUCK", 30, "STUCK")
        config = support.write_config(tmp_path / "relay.toml", rsettings)
        early = support.run_cli(config, "resolve", "lost-key", "--confirm", "--reason", "x")
        assert early.returncode == 2 and "no effect has operation key" in early.stderr
        done = support.run_cli(
            config, "resolve", "books-down", "--confirm", "--reason", "bank confirmed by phone",
            "--actor", "alice",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "books-down: CONFIRMED (by alice)" in done.stdout
        again = support.run_cli(config, "resolve", "books-down", "--reject", "--reason", "oops")
        assert again.returncode == 2 and "Traceback" not in again.stderr
        assert "only an UNKNOWN or STUCK effect can be resolved" in again.stderr
    moves = h.transitions(url, "books-down")
    assert [m[:2] for m in moves[-3:]] == [
        ("PUBLISHED", "UNKNOWN"),
        ("UNKNOWN", "STUCK"),
        ("STUCK", "CONFIRMED"),
    ]
    assert "inconclusive 3 times" in moves[-2][3]
    assert moves[-1][2] == "alice" and "bank confirmed by phone" in moves[-1][3]
    assert h.observations(url) == [("books-down", "inconclusive")] * 3
    assert h.verdicts(url, "operator") == {"applied": 1}


def test_http_observer_answers_from_the_real_books(rsettings: Settings, bank: h.Downstream) -> None:
    url = rsettings.require_database_url()
    bank.set_faults({"twice": ["execute_twice"]})
    with support.running(Relay(rsettings)):
        _enqueue(url, {"once": 10, "twice": 11})
        support.wait_for(lambda: len(bank.books()) == 3, 30, "three bookings")
    observer = HttpObserver(bank.observer_url, timeout_s=0.5)

    def ask(amount: int) -> tuple[str, int | None]:
        seen = observer.observe(ObservedEffect("k", "wire", bkey(amount)))
        return seen.answer, seen.count

    assert ask(10) == ("present", 1)
    assert ask(11) == ("duplicate", 2)
    assert ask(12) == ("absent", 0)
    assert observer.observe(ObservedEffect("k", "wire", None)).answer == "inconclusive"
    for mode in ("slow", "nonsense", "error", "down"):
        bank.set_faults(http=mode)
        seen = observer.observe(ObservedEffect("k", "wire", bkey(10)))
        assert seen.answer == "inconclusive", (mode, seen)
    bank.stop()
    seen = observer.observe(ObservedEffect("k", "wire", bkey(10)))
    assert seen.answer == "inconclusive" and "refused" in seen.detail.lower()

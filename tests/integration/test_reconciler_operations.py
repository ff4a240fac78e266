"""Operators and housekeeping: resolve, a Python observer, results overtaking the relay, purge."""

from __future__ import annotations

import getpass
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.errors import InvalidTransitionError
from relay.reconciler.compensation import ensure_compensations
from relay.reconciler.effects import lock_effect
from relay.reconciler.observers import Observation
from relay.reconciler.purge import purge, would_purge
from relay.reconciler.resolve import Decision, resolve
from relay.sql import query
from tests import support
from tests.downstream import harness as h
from tests.downstream import observers


@pytest.fixture
def rsettings(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    types = h.wire_types(
        prefix,
        python_observer="tests.downstream.observers:observe",
        outcome_timeout_s=1.0,
        max_attempts=2,
    )
    return h.reconciler_settings(
        database_url, services.kafka_bootstrap_servers, prefix, effect_types=types
    )


def _enqueue(url: str, keys: list[str], start: int = 0) -> None:
    with psycopg.connect(url) as conn:
        for i, key in enumerate(keys):
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": start + i})
        conn.commit()


def test_python_observer_and_every_operator_decision(rsettings: Settings, tmp_path: Path) -> None:
    url = rsettings.require_database_url()
    keys = ["p-present", "p-absent", "p-raises", "p-dup", "r-1", "r-2", "r-3", "r-4"]
    observers.ANSWERS.update(
        {
            "p-present": "present",
            "p-absent": "absent",  # re-dispatched once, then max_attempts (2) is spent
            "p-dup": Observation("duplicate", count=3),
            "r-1": "inconclusive",
            "r-2": "inconclusive",
            "r-3": "inconclusive",
            "r-4": "inconclusive",
        }
    )
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        _enqueue(url, keys)
        support.wait_for(
            lambda: (
                h.states(url, keys)
                == {
                    "p-present": "CONFIRMED",
                    "p-absent": "STUCK",
                    "p-raises": "STUCK",
                    "p-dup": "CONFIRMED",
                    **{k: "STUCK" for k in keys[4:]},
                }
            ),
            60,
            "observations to settle",
        )
        assert [c[0] for c in h.children(url, "p-dup")] == [
            "p-dup#compensation",
            "p-dup#compensation-2",
        ]
        absent = h.transitions(url, "p-absent")
        assert [t[1] for t in absent].count("DISPATCHING") == 2
        assert "after 2 attempts" in absent[-1][3]
        assert "KeyError" in h.transitions(url, "p-raises")[-1][3]

        with psycopg.connect(url, autocommit=True) as conn:
            for key, decision in [
                ("r-1", Decision.CONFIRM),
                ("r-2", Decision.REJECT),
                ("r-3", Decision.REDISPATCH),
                ("r-4", Decision.COMPENSATE),
            ]:
                resolve(conn, rsettings, key, decision, reason=f"ticket {key}", actor="bob")
            with pytest.raises(InvalidTransitionError, match="is CONFIRMED"):
                resolve(conn, rsettings, "r-1", Decision.REJECT, reason="again", actor="bob")
        observers.ANSWERS["r-3"] = "present"
        support.wait_for(lambda: h.state(url, "r-3#compensation") is None, 1, "nothing")
        support.wait_for(
            lambda: h.state(url, "r-4#compensation") == "STUCK", 30, "compensation to end"
        )
        support.wait_for(lambda: h.state(url, "r-3") == "CONFIRMED", 30, "re-dispatched r-3")
    assert h.states(url, ["r-1", "r-2", "r-4"]) == {
        "r-1": "CONFIRMED",
        "r-2": "REJECTED",
        "r-4": "CONFIRMED",
    }
    r3 = h.transitions(url, "r-3")
    assert ("STUCK", "PENDING", "bob") in [t[:3] for t in r3]
    assert [t[1] for t in r3].count("DISPATCHING") == 2
    # The compensation was sent; no result came for it within its deadline and no observer is
    # declared for reversals: a lost compensation is as visible as a lost wire.
    assert h.children(url, "r-4") == [("r-4#compensation", "wire-reversal", "STUCK")]
    assert ("DISPATCHING", "PUBLISHED") in [t[:2] for t in h.transitions(url, "r-4#compensation")]
    assert "operator decided to compensate: ticket r-4" in h.transitions(url, "r-4")[-1][3]

    config = support.write_config(tmp_path / "relay.toml", rsettings)
    shown = support.run_cli(config, "show", "r-1")
    assert shown.returncode == 0, shown.stderr
    story = shown.stdout
    # Intent, attempts, evidence, transitions, in that order; the evidence is every observer
    # answer that led to STUCK, then the operator's decision with who and why.
    assert story.index("attempts:") < story.index("evidence:") < story.index("transitions:")
    evidence = story[story.index("evidence:") : story.index("transitions:")]
    assert evidence.count(" observation inconclusive (") == 3, story
    assert "operator confirm (" in evidence, story
    assert "-> applied by bob: operator decided to confirm: ticket r-1" in evidence, story
    doc = json.loads(support.run_cli(config, "show", "r-1", "--json").stdout)
    assert [(v["kind"], v["outcome"], v["actor"]) for v in doc["evidence"]][-1] == (
        "operator",
        "confirm",
        "bob",
    )
    # "bob" is only what the operator claimed: the login and the OS user are recorded beside it.
    decided = doc["evidence"][-1]
    login = psycopg.conninfo.conninfo_to_dict(url).get("user")
    assert (decided["db_role"], decided["os_user"]) == (login, getpass.getuser())
    assert f"login {login}, OS user {getpass.getuser()}" in evidence, story
    wrong = support.run_cli(config, "resolve", "r-2", "--confirm", "--reason", "x")
    assert wrong.returncode == 2 and "is REJECTED" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    neither = support.run_cli(config, "resolve", "r-2", "--reason", "x")
    assert neither.returncode == 2 and "choose one of" in neither.stderr
    both = support.run_cli(config, "resolve", "r-2", "--confirm", "--reject", "--reason", "x")
    assert both.returncode == 2 and "choose one of" in both.stderr


class HoldBeforeCommit(Relay):
    """A relay that pauses between its Kafka send and its commit, while the test acts."""

    def __init__(self, settings: Settings, during: threading.Event, go: threading.Event) -> None:
        super().__init__(settings)
        self.during, self.go = during, go

    def _before_commit(self) -> None:
        if not self.during.is_set():
            self.during.set()
            assert self.go.wait(30)


def test_a_result_that_overtakes_the_relay_is_applied_once_published(
    rsettings: Settings, services: Services, prefix: str
) -> None:
    url = rsettings.require_database_url()
    observers.ANSWERS["fast"] = "inconclusive"
    during, go = threading.Event(), threading.Event()
    with (
        h.running_reconciler(rsettings) as rec,
        support.running(HoldBeforeCommit(rsettings, during, go)),
    ):
        _enqueue(url, ["fast"])
        assert during.wait(30)
        assert h.state(url, "fast") == "DISPATCHING"
        h.produce(services.kafka_bootstrap_servers, f"{prefix}.wire-results", [h.result("fast")])
        support.wait_for(lambda: rec.results.counts["deferred"] == 1, 30, "deferral")
        go.set()
        support.wait_for(lambda: h.state(url, "fast") == "CONFIRMED", 30, "confirmation")
    assert [t[:2] for t in h.transitions(url, "fast")][-2:] == [
        ("DISPATCHING", "PUBLISHED"),
        ("PUBLISHED", "CONFIRMED"),
    ]
    assert h.verdicts(url) == {"applied": 1}


def test_purge_removes_only_finished_effects_past_retention(
    rsettings: Settings, services: Services, prefix: str, tmp_path: Path
) -> None:
    url = rsettings.require_database_url()
    observers.ANSWERS.update({"old-dup": Observation("duplicate", count=2)})
    with h.running_reconciler(rsettings), support.running(Relay(rsettings)):
        _enqueue(url, ["old-ok", "old-dup", "old-stuck"])
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "email", "mail", {"to": "x"})
            relay.enqueue(conn, "email", "later", {"to": "y"})
            conn.commit()
        support.wait_for(lambda: h.state(url, "old-ok") == "PUBLISHED", 30, "publication")
        h.produce(
            services.kafka_bootstrap_servers,
            f"{prefix}.wire-results",
            [h.result("old-ok"), h.result("nobody"), (b"k", b"junk")],
        )
        support.wait_for(
            lambda: (
                h.states(url, ["old-ok", "old-dup", "old-stuck"])
                == {"old-ok": "CONFIRMED", "old-dup": "CONFIRMED", "old-stuck": "STUCK"}
            ),
            30,
            "outcomes",
        )
        support.wait_for(
            lambda: h.state(url, "old-dup#compensation") == "STUCK", 30, "compensation ends"
        )
        support.wait_for(lambda: support.status_backlog(url) == 0, 30, "status events sent")
        with psycopg.connect(url) as conn:
            # Scheduled at the enqueue: the running relay reads the intake and must not claim it.
            later = datetime.now(UTC) + timedelta(hours=1)
            relay.enqueue(conn, "wire", "new-pending", {**h.WIRE, "amount": 98}, available_at=later)
            conn.execute("UPDATE relay.effect SET available_at = now() + interval '1 hour'")
            conn.commit()
    support.read_intake(url)
    config = support.write_config(tmp_path / "relay.toml", rsettings)
    before = support.count_states(url)
    dry = support.run_cli(config, "purge", "--dry-run", "--older-than", "0s")
    assert dry.returncode == 0, dry.stderr
    # old-ok, mail, later (PUBLISHED, no result awaited); not old-dup:
    # its compensation is STUCK, so it stays as long as its compensation does.
    assert support.count_states(url) == before
    kept = support.run_cli(config, "purge")  # the default retention (30 days) keeps everything
    assert kept.returncode == 0 and "removed 0 effects" in kept.stdout, kept.stderr
    done = support.run_cli(config, "purge", "--older-than", "0s")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        left: dict[str, str] = dict(
            conn.execute(
                "SELECT operation_key, state FROM relay.effect WHERE effect_type <> 'relay.status'"
            ).fetchall()
        )
        status_left = conn.execute(
            "SELECT count(*) FROM relay.effect WHERE effect_type = 'relay.status'"
        ).fetchone()
        unattached = conn.execute(
            "SELECT count(*) FROM relay.evidence WHERE effect_id IS NULL"
        ).fetchone()
    assert left == {
        "old-dup": "CONFIRMED",
        "old-dup#compensation": "STUCK",
        "old-stuck": "STUCK",
        "new-pending": "PENDING",
    }
    assert status_left == (0,)  # status events are read from the transitions, not effects
    assert unattached == (0,)
    removed = int(done.stdout.split()[1])
    assert f"would remove {removed} effects" in dry.stdout


def _table_counts(conn: psycopg.Connection[Any]) -> tuple[int, int, int, int]:
    """Effects, attempts, transitions and evidence now in the database."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM relay.effect), (SELECT count(*) FROM relay.attempt),"
        " (SELECT count(*) FROM relay.transition), (SELECT count(*) FROM relay.evidence)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _settle(conn: psycopg.Connection[Any], keys: dict[str, tuple[str, str]]) -> None:
    """Put effects straight into a state, last changed that long ago (a PostgreSQL interval)."""
    for key, (state, age) in keys.items():
        conn.execute(
            "UPDATE relay.effect SET state = %s, updated_at = now() - %s::interval"
            " WHERE operation_key = %s",
            (state, age, key),
        )


def test_purge_takes_an_effect_and_its_compensations_together(rsettings: Settings) -> None:
    """A compensation never goes while the effect it undoes stays: a second execution reported
    for that effect later would find no compensation and create it again (a second refund)."""
    url = rsettings.require_database_url()
    one_day = 86400.0
    batch_of_one = rsettings.model_copy(update={"purge_batch_size": 1})
    with psycopg.connect(url, autocommit=True) as conn:
        relay.enqueue(conn, "wire", "fam", {**h.WIRE, "amount": 1})
        support.read_intake(url)
        for external_id, verdict in [("x1", "applied"), ("x2", "conflicting")]:
            conn.execute(
                "INSERT INTO relay.evidence (kind, effect_id, operation_key, outcome, external_id,"
                " verdict, actor) SELECT 'result', id, operation_key, 'committed', %s, %s, 'test'"
                " FROM relay.effect WHERE operation_key = 'fam'",
                (external_id, verdict),
            )
        with conn.transaction():
            parent = lock_effect(conn, "fam")
            assert parent is not None
            made = ensure_compensations(conn, rsettings, parent, actor="test", why="x2")
        assert made == ["fam#compensation"]
        # A compensation's own compensation (made by hand: no type here declares one).
        relay.enqueue(conn, "email", "fam-deep", {"to": "z"})
        support.read_intake(url)
        conn.execute(
            "UPDATE relay.effect SET parent_effect_id ="
            " (SELECT id FROM relay.effect WHERE operation_key = 'fam#compensation')"
            " WHERE operation_key = 'fam-deep'"
        )
        family = ["fam", "fam#compensation", "fam-deep"]

        def left() -> list[str]:
            rows = conn.execute(
                "SELECT operation_key FROM relay.effect WHERE operation_key = ANY(%s) ORDER BY id",
                (family,),
            ).fetchall()
            return [str(r[0]) for r in rows]

        # Every member finished but one is within retention, or one is unfinished: all stay.
        _settle(
            conn,
            {
                "fam": ("CONFIRMED", "3 days"),
                "fam#compensation": ("CONFIRMED", "1 hour"),
                "fam-deep": ("CANCELLED", "3 days"),
            },
        )
        assert would_purge(conn, one_day).effects == 0
        assert purge(conn, batch_of_one, one_day) == (0, 0, 0)
        _settle(
            conn, {"fam#compensation": ("CONFIRMED", "2 days"), "fam-deep": ("PENDING", "2 days")}
        )
        assert would_purge(conn, one_day).effects == 0
        assert purge(conn, batch_of_one, one_day) == (0, 0, 0)
        assert left() == family
        _settle(conn, {"fam-deep": ("CANCELLED", "2 days")})

        # The reconciler holds the parent (a second execution was just reported): the purge
        # skips the whole family, and the compensation is still there to be counted.
        with psycopg.connect(url) as holder:
            locked = lock_effect(holder, "fam")
            assert locked is not None
            assert purge(conn, batch_of_one, one_day) == (0, 0, 0)
            assert ensure_compensations(holder, rsettings, locked, actor="test", why="x2") == []
            holder.commit()
        assert h.children(url, "fam") == [("fam#compensation", "wire-reversal", "CONFIRMED")]
        assert left() == family

        # Somebody holds a compensation: the family waits, the parent does not go without it.
        with psycopg.connect(url) as holder:
            assert lock_effect(holder, "fam#compensation") is not None
            assert purge(conn, batch_of_one, one_day) == (0, 0, 0)
            holder.rollback()
        assert left() == family

        # One batch of one family takes all of it, in one statement, as the dry run said.
        expected = would_purge(conn, one_day)
        assert expected.effects == 3
        before = _table_counts(conn)
        with conn.transaction():
            gone = conn.execute(
                query("purge_batch"), {"retention_s": one_day, "limit": 1}
            ).fetchall()
        assert len(gone) == 3
        assert left() == []
        after = _table_counts(conn)
        assert (expected.effects, expected.attempts, expected.transitions, expected.evidence) == (
            before[0] - after[0],
            before[1] - after[1],
            before[2] - after[2],
            before[3] - after[3],
        )
        assert expected.evidence == 2
        assert purge(conn, batch_of_one, one_day) == (0, 0, 0)


def test_purge_judges_a_publication_by_its_deadline_not_by_the_current_config(
    rsettings: Settings,
) -> None:
    """PUBLISHED is finished only when no result was awaited at publication (no outcome
    deadline): a result topic added or removed since changes nothing."""
    url = rsettings.require_database_url()
    # The row path (no Kafka transaction for the status events to ride in): the e-mail gets an
    # effect row, PUBLISHED without a deadline.
    with support.running(Relay(rsettings.model_copy(update={"kafka_transactions": False}))):
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "wire", "awaited", {**h.WIRE, "amount": 2})
            relay.enqueue(conn, "email", "plain", {"to": "x"})
            conn.commit()
        support.wait_for(
            lambda: (
                h.states(url, ["awaited", "plain"])
                == {"awaited": "PUBLISHED", "plain": "PUBLISHED"}
            ),
            30,
            "publication",
        )
        # Status events are on from the start (relay run switches them): a transition whose
        # event is not out yet holds its effect back from purge, so let them go first.
        support.wait_for(lambda: support.status_backlog(url) == 0, 30, "status events sent")
    with psycopg.connect(url, autocommit=True) as conn:
        deadlines: dict[str, bool] = dict(
            conn.execute(
                "SELECT operation_key, outcome_deadline IS NOT NULL FROM relay.effect"
            ).fetchall()
        )
        assert deadlines == {"awaited": True, "plain": False}
        # The configuration changed since: wires no longer report results, emails now do.
        conn.execute("UPDATE relay.effect_type SET result_topic = NULL WHERE name = 'wire'")
        conn.execute(
            "UPDATE relay.effect_type SET result_topic = %s WHERE name = 'email'",
            (rsettings.effect_types["wire"].result_topic,),
        )
        expected = would_purge(conn, 0)
        before = _table_counts(conn)
        assert purge(conn, rsettings, 0) == (1, 0, 0)
        after = _table_counts(conn)
        assert (expected.effects, expected.attempts, expected.transitions, expected.evidence) == (
            1,
            before[1] - after[1],
            before[2] - after[2],
            before[3] - after[3],
        )
        assert before[0] - after[0] == 1
        # One attempt, and its one log row (which implies the enqueue and the claim).
        assert expected.attempts == 1 and expected.transitions == 1
    assert h.states(url, ["awaited", "plain"]) == {"awaited": "PUBLISHED"}

"""Ungrouped intents claimed per batch (migration 0013): no effect row until the outcome, then one
INSERT; a batch left without an outcome is written UNKNOWN and verified in Kafka. Real PostgreSQL
and Kafka."""

from __future__ import annotations

import psycopg
import pytest

import relay
from relay.config import Settings
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.dispatch.intake import Claim, Promoted, promote
from relay.dispatch.marker import int_array, text_array
from relay.dispatch.ticker import Ticker
from relay.errors import InvalidTransitionError
from relay.inspection import list_effects, stats
from relay.sql import query
from relay.states import EffectState
from tests import support

WIRE = {"account": "ACC1", "amount": 100, "date": "2026-12-04"}


def _effect_writes(url: str) -> tuple[int, int]:
    """Rows inserted into and updated in relay.effect since the database was made (the counters
    of ended backends: the relay's connections are closed before this is asked)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables "
            "WHERE schemaname = 'relay' AND relname = 'effect'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _claim_as(url: str, replica: str, epoch: int, lease_s: float) -> list[relay.Effect]:
    """A tick, then one read that claims every row it can for ``replica`` (as a relay would)."""
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        done = promote(
            conn,
            limit=100,
            claim=Claim(replica, epoch, lease_s=lease_s, limit=100, max_bytes=10**6),
        )
        assert done.claimed, done
        assert all(e.batch is not None for e in done.claimed), done.claimed
        found = [relay.get_effect(conn, e.operation_key) for e in done.claimed]
    return [e for e in found if e is not None]


def test_an_ungrouped_intent_is_written_once_with_its_outcome(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"b-{i}", {"i": i}) for i in range(300)])
        relay.enqueue(conn, "wire", "b-wire", WIRE)
        conn.commit()
    # The row path: status events on, and no Kafka transaction for them to ride in (with one,
    # the e-mails get no row at all: tests/integration/test_published_batches.py).
    with support.running(Relay(settings.model_copy(update={"kafka_transactions": False}))):
        support.wait_for(
            lambda: support.count_states(url) == {"PUBLISHED": 301},
            60,
            "publication",
        )
    support.wait_for(lambda: _effect_writes(url)[0] >= 301, 15, "the table's counters")
    inserted, updated = _effect_writes(url)
    # Before 0013 every effect row was inserted when read and updated with its outcome.
    assert (inserted, updated) == (301, 0)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (0,)
        attempts = conn.execute(
            "SELECT a.outcome, a.attempt, count(*) FROM relay.attempt a GROUP BY 1, 2"
        ).fetchall()
        assert attempts == [("acked", 1, 301)]
        wire = conn.execute(
            "SELECT business_key, outcome_deadline IS NOT NULL, published_offset IS NOT NULL, "
            "claimed_at <= published_at FROM relay.effect WHERE operation_key = 'b-wire'"
        ).fetchone()
        assert wire == ("ACC1:100:2026-12-04", True, True, True)
        story = conn.execute(
            "SELECT l.from_state, l.to_state FROM relay.transition_log l "
            "JOIN relay.effect e ON e.id = l.effect_id WHERE e.operation_key = 'b-7' "
            "ORDER BY l.transition_id, l.part"
        ).fetchall()
    assert story == [(None, "PENDING"), ("PENDING", "DISPATCHING"), ("DISPATCHING", "PUBLISHED")]


def test_a_batch_left_without_an_outcome_is_written_unknown_then_verified(
    settings: Settings, services: Services, prefix: str
) -> None:
    url = settings.require_database_url()
    keys = [f"lost-{i}" for i in range(3)]
    with psycopg.connect(url) as conn:
        for key in keys:
            relay.enqueue(conn, "email", key, {"to": key})
        conn.commit()
        # A replica that claims and then goes silent (it never publishes).
        conn.execute(
            "INSERT INTO relay.replica (replica_id, epoch, heartbeat_at) "
            "VALUES ('ghost', 1, now() - interval '1 hour')"
        )
        conn.commit()
    claimed = _claim_as(url, "ghost", 1, lease_s=0.5)
    assert sorted(e.operation_key for e in claimed) == keys
    assert {e.state for e in claimed} == {EffectState.DISPATCHING}
    assert support.count_states(url) == {"DISPATCHING": 3}
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM relay.effect").fetchone() == (0,)
        with pytest.raises(InvalidTransitionError, match="DISPATCHING"):
            relay.cancel(conn, keys[0])
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: support.count_states(url) == {"PUBLISHED": 3},
            60,
            "expiry, verification and a second attempt",
        )
    records = support.read_topic(services.kafka_bootstrap_servers, f"{prefix}.emails", 3)
    assert sorted(r.key.decode() for r in records) == keys
    with psycopg.connect(url, autocommit=True) as conn:
        attempts = conn.execute(
            "SELECT a.attempt, a.replica_id, a.outcome FROM relay.attempt a "
            "JOIN relay.effect e ON e.id = a.effect_id WHERE e.operation_key = %s "
            "ORDER BY a.attempt",
            (keys[0],),
        ).fetchall()
        story = conn.execute(
            "SELECT l.from_state, l.to_state FROM relay.transition_log l "
            "JOIN relay.effect e ON e.id = l.effect_id WHERE e.operation_key = %s "
            "ORDER BY l.transition_id, l.part",
            (keys[0],),
        ).fetchall()
    assert attempts == [(1, "ghost", "unknown"), (2, settings.replica_id, "acked")]
    assert story[:4] == [
        (None, "PENDING"),
        ("PENDING", "DISPATCHING"),
        ("DISPATCHING", "UNKNOWN"),
        ("UNKNOWN", "PENDING"),
    ]
    assert story[-1] == ("DISPATCHING", "PUBLISHED")


def test_relay_list_shows_the_intents_that_have_no_effect_row_yet(settings: Settings) -> None:
    """`relay list` lists what `relay stats` counts: intents not read yet (PENDING: a stopped
    relay's backlog) and intents claimed in a batch (DISPATCHING), which have no effect row."""
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        for i in range(3):
            relay.enqueue(conn, "email", f"unread-{i}", {"i": i})
        relay.enqueue(conn, "email", "unread-grouped", {"i": 9}, ordering_group="g")
        conn.commit()

    def listed(**filters: object) -> list[tuple[str, str]]:
        with psycopg.connect(url) as conn:
            rows = list_effects(conn, **filters)  # type: ignore[arg-type]
        return [(r["operation_key"], r["state"]) for r in rows]

    unread = [(f"unread-{i}", "PENDING") for i in range(3)] + [("unread-grouped", "PENDING")]
    assert listed(state="PENDING") == unread
    assert listed() == unread
    assert listed(group="g") == [("unread-grouped", "PENDING")]
    assert listed(effect_type="wire") == []
    assert listed(state="PENDING", limit=2) == unread[:2]
    assert listed(state="PENDING", older_than_s=3600) == []
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('lister', 1)")
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        claim = Claim("lister", 1, lease_s=60, limit=100, max_bytes=10**6)
        done = promote(conn, limit=100, claim=claim)
    # The ungrouped three in a batch (no effect row), the grouped one with its effect row.
    assert sorted(e.batch is None for e in done.claimed) == [False, False, False, True]
    assert sorted(listed(state="DISPATCHING")) == sorted((k, "DISPATCHING") for k, _ in unread)
    assert listed(state="PENDING") == []
    with psycopg.connect(url) as conn:
        counted = {(r["state"], int(r["effects"])) for r in stats(conn)}
    assert counted == {("DISPATCHING", 4)}


def test_a_new_incarnation_expires_the_last_ones_batches_and_its_outcomes_write_nothing(
    settings: Settings,
) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "email", "fenced-1", {"i": 1})
        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('r', 1)")
        conn.commit()
    [claimed] = _claim_as(url, "r", 1, lease_s=60)
    with psycopg.connect(url, autocommit=True) as conn:
        # The replica starts again (epoch 2) and expires what its last incarnation claimed.
        conn.execute(query("register_replica"), {"replica_id": "r"})
        [batch] = conn.execute("SELECT id FROM relay.dispatch_batch").fetchone() or [None]
        expired = conn.execute(
            query("expire_batches"),
            {
                "owner": "r",
                "epoch": 2,
                "limit": 10,
                "all_own": False,
                "held": [],
                "leave_receipted": False,
                "lease_s": 0.0,
            },
        ).fetchone()
        assert expired == (1,)
        assert conn.execute("SELECT count(*) FROM relay.dispatch_batch").fetchone() == (0,)
        # The last incarnation, still running, records its publish: nothing is written.
        marked = conn.execute(
            query("mark_batch_outcomes"),
            {
                "owner": "r",
                "epoch": 1,
                "actor": "r",
                "ids": [claimed.id],
                "batches": [batch],
                "states": ["PUBLISHED"],
                "outcomes": ["acked"],
                "reasons": ["published p0@0"],
                "partitions": [0],
                "offsets": [0],
                "delays_s": [0.0],
            },
        ).fetchall()
        assert marked == []
        row = conn.execute(
            "SELECT state, attempts, reason, published_offset FROM relay.effect "
            "WHERE operation_key = 'fenced-1'"
        ).fetchone()
        attempt = conn.execute(
            "SELECT replica_id, replica_epoch, outcome FROM relay.attempt"
        ).fetchall()
    assert row is not None and row[:2] == ("UNKNOWN", 1) and row[3] is None
    assert "replica r (epoch 1)" in row[2]
    assert attempt == [("r", 1, "unknown")]


def test_a_cancel_of_an_unread_intent_keeps_it_out_of_every_batch(settings: Settings) -> None:
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "email", "keep", {"i": 1})
        relay.enqueue(conn, "email", "drop", {"i": 2})
        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('r', 1)")
        conn.commit()
        relay.cancel(conn, "drop")
        conn.commit()
    claimed = _claim_as(url, "r", 1, lease_s=60)
    assert [e.operation_key for e in claimed] == ["keep"]
    assert support.count_states(url) == {"DISPATCHING": 1, "CANCELLED": 1}


def test_a_read_costs_its_batch_not_the_intake_whatever_the_statistics(
    settings: Settings,
) -> None:
    """Each part of a backlog is read by id: the rows of its batch looked up one by one, and the
    rest of a split pair read in id order up to the batch size. The plans must not depend on
    statistics made while the intake was small (a relay started on an empty outbox, then a
    burst before the next ANALYZE): a read without ordering groups keeps the plan its session
    made first (migration 0018), which hashed the whole intake at every read; the rest of a
    split pair, planned with too few rows in mind, was read in full and sorted at every part."""
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("ALTER TABLE relay.intake SET (autovacuum_enabled = false)")
        admin.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1)")
    claim = Claim("solo", 1, lease_s=60, limit=500, max_bytes=10**8)

    def enqueue(n: int, tag: str) -> None:
        with psycopg.connect(url) as conn:
            for first in range(0, n, 500):
                relay.enqueue_many(
                    conn,
                    [
                        relay.Intent("email", f"{tag}-{i}", {"to": "x" * 200})
                        for i in range(first, min(n, first + 500))
                    ],
                )
                conn.commit()

    # This backend's counts not yet reported (pg_stat_xact_*), around one read in a transaction
    # block: nothing is reported inside one.
    touched = (
        "SELECT seq_tup_read, coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
        "WHERE schemaname = 'relay' AND relname = 'intake'"
    )
    with (
        psycopg.connect(url, autocommit=True) as ticks,
        psycopg.connect(url) as reader,
    ):
        enqueue(300, "small")  # the plan of a read of 200 rows or more is made at this one
        Ticker().run_once(ticks)
        assert len(promote(reader, limit=500, claim=claim).claimed) == 300
        reader.commit()
        enqueue(6_000, "burst")
        Ticker().run_once(ticks)
        first = promote(reader, limit=500, claim=claim)  # the pair's ids: all 6,000, once
        reader.commit()
        assert len(first.claimed) == 500 and first.more
        before = reader.execute(touched).fetchone()
        second = promote(reader, limit=500, claim=claim)
        after = reader.execute(touched).fetchone()
        reader.commit()
    assert len(second.claimed) == 500
    assert before is not None and after is not None
    scanned, fetched = after[0] - before[0], after[1] - before[1]
    assert scanned == 0, f"the second part scanned {scanned} intake rows (of 6,300)"
    # Its 500 ids in order, then its 500 rows by id; not the 5,500 left of the pair.
    assert fetched <= 1_200, f"the second part fetched {fetched} intake rows (of 6,300)"


def test_a_small_read_never_scans_the_intake_whole_after_a_burst(settings: Settings) -> None:
    """The read keeps the plans its session made first (migration 0027: planning was 45 % of a
    small read's server CPU). Made on a small intake, a plan may scan it whole; after a burst,
    before the statistics change, every small read would then read every row (with sequential
    scans allowed, a read of 3 rows after 20,000 took 13 ms). Sequential scans are off for the
    whole function."""
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("ALTER TABLE relay.intake SET (autovacuum_enabled = false)")
        admin.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1)")
    claim = Claim("solo", 1, lease_s=60, limit=500, max_bytes=10**8)
    touched = (
        "SELECT seq_tup_read, coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
        "WHERE schemaname = 'relay' AND relname = 'intake'"
    )
    with (
        psycopg.connect(url, autocommit=True) as owner,
        psycopg.connect(url) as writer,
        psycopg.connect(url) as reader,
    ):

        def small_read(tag: str) -> tuple[int, int, int]:
            relay.enqueue_many(writer, [relay.Intent("email", f"{tag}-{i}", {}) for i in range(3)])
            writer.commit()
            Ticker().run_once(owner)
            before = reader.execute(touched).fetchone()
            done = promote(reader, limit=500, claim=claim)
            after = reader.execute(touched).fetchone()
            reader.commit()
            assert before is not None and after is not None
            return len(done.claimed), after[0] - before[0], after[1] - before[1]

        for n in range(8):  # the session's plans are made on a small intake
            small_read(f"small-{n}")
        owner.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload) "
            "SELECT 'burst-' || g, 'email', '{}' FROM generate_series(1, 20000) g"
        )
        # Read before (as if published): the reader stands after them.
        Ticker().run_once(owner)
        owner.execute(
            "UPDATE relay.intake_reader SET tick_from = (SELECT max(id) FROM relay.tick), "
            "tick_to = NULL, after_id = 0"
        )
        claimed, scanned, fetched = small_read("after")
    assert claimed == 3
    assert scanned == 0, f"a read of 3 rows scanned {scanned} intake rows (of 20,027)"
    # Its 3 ids by the txid index, then its 3 rows by id: not the burst through an index.
    assert fetched <= 20, f"a read of 3 rows fetched {fetched} intake rows (of 20,027)"


# Each case: how an intent "x" is written beside three clean ones in one read, what the read
# claims, and what becomes of "x". A clean read is claimed in one pass (migration 0023); any
# other row sends the read to the statement that decides row by row, and the clean ones must
# still be claimed there, "x" never with them unless it may be.
_ONE_PASS_CASES: dict[str, tuple[list[str], bool, str | None]] = {
    # case: (SQL run before the read, as the owner; x claimed; x's effect row state)
    "all clean": ([], False, None),
    "x refused when read": (
        [
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('x', 'email', '[1, 2]')"
        ],
        False,
        "REJECTED",
    ),
    "x not due": (
        [
            "INSERT INTO relay.intake (operation_key, effect_type, payload, available_at)"
            " VALUES ('x', 'email', '{}', now() + interval '1 hour')"
        ],
        False,
        "PENDING",
    ),
    "x's key names another effect": (
        [
            "INSERT INTO relay.effect (operation_key, effect_type, topic, payload)"
            " SELECT 'x', 'email', topic, '{}' FROM relay.effect_type WHERE name = 'email'",
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('x', 'email', '{}')",
        ],
        False,
        None,  # set aside in relay.intake_refused; the old effect keeps its row
    ),
    "x's key was purged": (
        [
            "INSERT INTO relay.purged_key (operation_key, effect_id, effect_type, final_state)"
            " VALUES ('x', 1, 'email', 'PUBLISHED')",
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('x', 'email', '{}')",
        ],
        False,
        "REJECTED",
    ),
    "x lacks its template's field": (
        [
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('x', 'wire', '{\"account\": \"A\"}')"
        ],
        False,
        "REJECTED",
    ),
    "x is grouped": (
        ["SELECT relay.enqueue('x', 'email', '{}', p_ordering_group => 'g')"],
        True,
        "DISPATCHING",
    ),
    "x was cancelled unread": (
        [
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('x', 'email', '{}')",
            "COMMIT",
            "SELECT relay.cancel('x')",
        ],
        False,
        "CANCELLED",
    ),
}


@pytest.mark.parametrize("case", list(_ONE_PASS_CASES))
def test_a_read_claims_in_one_pass_only_what_row_by_row_would(
    settings: Settings, case: str
) -> None:
    url = settings.require_database_url()
    before, x_claimed, x_state = _ONE_PASS_CASES[case]
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1)")
        for i in range(3):
            relay.enqueue(conn, "email", f"c{i}", {"i": i})
        for statement in before:
            conn.execute(statement)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        done = promote(
            conn, limit=100, claim=Claim("solo", 1, lease_s=60, limit=100, max_bytes=10**6)
        )
        batches = conn.execute("SELECT count(*), min(cardinality(ids)) FROM relay.dispatch_batch")
        n_batches, batch_size = batches.fetchone() or (0, 0)
        rows: dict[str, str] = dict(
            conn.execute("SELECT operation_key, state FROM relay.effect WHERE operation_key = 'x'")
        )
        set_aside = conn.execute("SELECT operation_key FROM relay.intake_refused").fetchall()
    claimed = [e.operation_key for e in done.claimed]
    assert claimed == ["c0", "c1", "c2", *(["x"] if x_claimed else [])]
    assert (n_batches, batch_size) == (1, 3), "the clean ones are claimed by one batch row"
    assert [e.id for e in done.claimed] == sorted(e.id for e in done.claimed)
    if case == "x's key names another effect":
        assert set_aside == [("x",)] and rows == {"x": "PENDING"}
    else:
        assert set_aside == []
        assert rows == ({"x": x_state} if x_state else {})
    if case == "all clean":
        assert (done.promoted, done.rejected, done.refused) == (0, 0, 0)


def test_a_read_over_the_claims_byte_cap_claims_the_rows_that_fit(settings: Settings) -> None:
    """The read ends where its rows reach the claim's byte cap (migration 0026): the rows past
    it are read by the next read and claimed there, not written to the pool as effect rows."""
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1)")
        for i in range(4):
            relay.enqueue(conn, "email", f"c{i}", {"body": "x" * 100})
        size = conn.execute(
            "SELECT pg_column_size(payload) FROM relay.intake WHERE operation_key = 'c0'"
        ).fetchone()
        conn.commit()
    assert size is not None
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        # Rows are claimed while those before them hold less than the cap: two a read here.
        cap = Claim("solo", 1, lease_s=60, limit=100, max_bytes=2 * int(size[0]))
        first = promote(conn, limit=100, claim=cap)
        second = promote(conn, limit=100, claim=cap)
        third = promote(conn, limit=100, claim=cap)
        written = conn.execute("SELECT count(*) FROM relay.effect").fetchone()
    assert [e.operation_key for e in first.claimed] == ["c0", "c1"] and first.more
    assert [e.operation_key for e in second.claimed] == ["c2", "c3"] and not second.more
    assert (first.promoted, second.promoted) == (0, 0) and written == (0,)
    assert third.rows == 0 and not third.more


def test_the_markers_array_literals_read_back_as_their_values(settings: Settings) -> None:
    """The marker sends a quiet batch's arrays as PostgreSQL's text form, not through
    psycopg's list adaptation: every value must come back as it was."""
    types = ["email", 'a"b', "c\\d", "e,f", " g ", "NULL", "{}", "ü"]
    numbers: list[int | None] = [0, -1, 2**62, None, 7]
    with psycopg.connect(settings.require_database_url()) as conn:
        row = conn.execute(
            "SELECT %s::text[], %s::bigint[]", (text_array(types), int_array(numbers))
        ).fetchone()
    assert row == (types, numbers)


def test_a_read_that_meets_an_ordering_group_takes_500_rows_and_the_rest_next(
    settings: Settings,
) -> None:
    """A read takes up to its limit (batch_size, 5,000 by default) of an ungrouped backlog, but
    at most 500 rows once an ordering group is among them (migration 0026): a large grouped read
    wrote many later effects behind their heads, each let go by an update later. The cut read
    ends as a pair cut at the limit does: every row is read once, in id order, none skipped."""
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1)")
    claim = Claim("solo", 1, lease_s=60, limit=5_000, max_bytes=10**8)
    with psycopg.connect(url) as conn:
        relay.enqueue_many(conn, [relay.Intent("email", f"u-{i}", {"i": i}) for i in range(1_200)])
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        whole = promote(conn, limit=5_000, claim=claim)
    assert whole.rows == 1_200 and not whole.more, whole.rows  # ungrouped: the whole limit

    with psycopg.connect(url) as conn:
        relay.enqueue_many(
            conn,
            [relay.Intent("email", f"u2-{i}", {"i": i}) for i in range(300)]
            + [
                relay.Intent("email", f"g-{i}", {"i": i}, ordering_group=f"order-{i % 400}")
                for i in range(900)
            ],
        )
        conn.commit()
        ids: dict[str, int] = {
            key: id_
            for key, id_ in conn.execute(
                "SELECT operation_key, id FROM relay.intake WHERE operation_key NOT LIKE 'u-%'"
            ).fetchall()
        }
    reads: list[Promoted] = []
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        while not reads or reads[-1].more:
            reads.append(promote(conn, limit=5_000, claim=claim))
            assert len(reads) <= 4, [(r.rows, r.more) for r in reads]
        written = {
            key: state
            for key, state in conn.execute(
                "SELECT operation_key, state FROM relay.effect WHERE operation_key LIKE 'g-%'"
            ).fetchall()
        }
    assert [(r.rows, r.more) for r in reads] == [(500, True), (500, True), (200, False)]
    by_id = sorted(ids, key=ids.__getitem__)
    assert [r.last_id for r in reads] == [ids[by_id[499]], ids[by_id[999]], ids[by_id[1_199]]]
    claimed = [e.operation_key for r in reads for e in r.claimed]
    assert len(claimed) == len(set(claimed))
    # Every intent read once: the ungrouped ones claimed, the grouped ones written as effects.
    assert {k for k in claimed if k.startswith("u2-")} == {f"u2-{i}" for i in range(300)}
    assert set(written) == {f"g-{i}" for i in range(900)}
    assert sum(r.promoted for r in reads) + sum(1 for k in claimed if k.startswith("g-")) == 900


def test_a_read_ends_before_the_first_grouped_row_when_500_ungrouped_rows_come_first(
    settings: Settings,
) -> None:
    """More than 500 ungrouped rows before the first grouped one: the read takes them all, as
    one clean batch claimed in one pass (no effect row), and ends before the grouped row; the
    next read starts there (migration 0026)."""
    url = settings.require_database_url()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("INSERT INTO relay.replica (replica_id, epoch) VALUES ('solo', 1)")
    claim = Claim("solo", 1, lease_s=60, limit=5_000, max_bytes=10**8)
    with psycopg.connect(url) as conn:
        relay.enqueue_many(
            conn,
            [relay.Intent("email", f"u-{i}", {"i": i}) for i in range(700)]
            + [relay.Intent("email", f"g-{i}", {"i": i}, ordering_group="order") for i in range(3)]
            + [relay.Intent("email", f"v-{i}", {"i": i}) for i in range(10)],
        )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        Ticker().run_once(conn)
        first = promote(conn, limit=5_000, claim=claim)
        second = promote(conn, limit=5_000, claim=claim)
        grouped = conn.execute(
            "SELECT operation_key, state FROM relay.effect ORDER BY id"
        ).fetchall()
    assert first.rows == 700 and first.more and first.promoted == 0
    assert {e.operation_key for e in first.claimed} == {f"u-{i}" for i in range(700)}
    assert len({e.batch for e in first.claimed}) == 1  # one batch row: claimed in one pass
    assert second.rows == 13 and not second.more
    # The group's head claimed, the two after it waiting behind it; the ungrouped ten claimed.
    assert [key for key, _ in grouped] == ["g-0", "g-1", "g-2"]
    assert grouped[0][1] == "DISPATCHING" and {s for _, s in grouped[1:]} == {"PENDING"}
    assert {e.operation_key for e in second.claimed} == {"g-0"} | {f"v-{i}" for i in range(10)}

"""The intake read between ticks (docs/design/intake.md §9), on the real PostgreSQL.

Every trap test runs a naive reader or ticker (a small helper here) through the same schedule
and asserts that it loses, repeats or misorders a row, then asserts that the real one
(relay/dispatch/ticker.py, relay/dispatch/intake.py) does not. Transactions are ordered with
explicit commits, locks and events, never with sleeps; nothing asserts a time.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.config import Settings
from relay.dispatch.intake import Batch, Position, read_batch
from relay.dispatch.ticker import Ticker, TickReason
from relay.migrations import sync_effect_types
from relay.roles import apply
from relay.sql import query
from tests import support

Conn = psycopg.Connection[Any]
GROUP_LOCK = "SELECT pg_advisory_xact_lock(1380273218, hashtext(%s))"  # stands in for a group lock
# Always due: a tick whenever asked, whether or not anything is new.
FORCED = Ticker(heartbeat_s=1e-6)


@pytest.fixture
def url(settings: Settings) -> str:
    return settings.require_database_url()


@pytest.fixture
def owner(url: str) -> Iterator[Conn]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def connect(url: str, *, autocommit: bool = True) -> Conn:
    return psycopg.connect(url, autocommit=autocommit)


def insert(conn: Conn, key: str, group: str | None = None) -> None:
    conn.execute(
        "INSERT INTO relay.intake (operation_key, effect_type, payload, ordering_group)"
        " VALUES (%s, 'email', '{}', %s)",
        (key, group),
    )


class Reader:
    """The real reader: a position moved by read_batch, the keys of every batch read."""

    def __init__(self, conn: Conn, *, limit: int = 2000) -> None:
        self.conn = conn
        self.limit = limit
        self.position = Position()
        self.batches: list[list[str]] = []

    def read(self) -> list[str]:
        """Every row up to the newest tick, as one list (several batches if a pair is split)."""
        keys: list[str] = []
        while True:
            batch: Batch = read_batch(self.conn, self.position, limit=self.limit)
            self.position = batch.next_position()
            if batch.tick_to is None:
                return keys
            got = [row.operation_key for row in batch.rows]
            if got:
                self.batches.append(got)
            keys += got


class IdCursorReader:
    """Naive: "rows after the last id I read", the cursor Marten's async daemon had."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.after = 0

    def read(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT id, operation_key FROM relay.intake WHERE id > %s ORDER BY id", (self.after,)
        ).fetchall()
        if rows:
            self.after = int(rows[-1][0])
        return [str(r[1]) for r in rows]


def xid_order(conn: Conn) -> list[str]:
    """Naive: every committed row, in xid order (as a horizon reader publishes them)."""
    return [
        str(r[0]) for r in conn.execute("SELECT operation_key FROM relay.intake ORDER BY txid, id")
    ]


class HorizonReader:
    """Naive: the rows of transactions below the oldest one still running, in xid order."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.after = "0"

    def read(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, i.operation_key"
            " FROM (SELECT 1) one LEFT JOIN relay.intake i"
            "   ON i.txid >= %s::xid8 AND i.txid < pg_snapshot_xmin(pg_current_snapshot())"
            " ORDER BY i.txid, i.id",
            (self.after,),
        ).fetchall()
        self.after = str(rows[0][0])
        return [str(r[1]) for r in rows if r[1] is not None]


def scalar(conn: Conn, statement: str, params: tuple[Any, ...] = ()) -> str:
    """The first column of the one row a statement returns, as text."""
    row = conn.execute(statement, params).fetchone()
    assert row is not None
    return str(row[0])


def tick(conn: Conn, ticker: Ticker = FORCED) -> int:
    done = ticker.run_once(conn)
    assert done.stored and done.tick_id is not None, done
    return done.tick_id


def wait_until_waiting(owner: Conn, pid: int) -> None:
    """Until backend ``pid`` waits for a lock (not a timed assertion: a bounded wait)."""
    support.wait_for(
        lambda: (
            owner.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            == (True,)
        ),
        60,
        f"backend {pid} waiting for a lock",
    )


def ticks_that_go_backwards(conn: Conn, table: str = "tick") -> list[tuple[int, int]]:
    """Consecutive ticks (a, b) where b does not see everything a saw, or has a lower xmin or
    xmax: the property every batch depends on."""
    rows = conn.execute(
        sql.SQL(
            "SELECT a.id, b.id FROM relay.{t} a JOIN relay.{t} b ON b.id = a.id + 1"
            " WHERE pg_snapshot_xmin(b.snap) < pg_snapshot_xmin(a.snap)"
            "    OR pg_snapshot_xmax(b.snap) < pg_snapshot_xmax(a.snap)"
            "    OR EXISTS (SELECT 1 FROM relay.intake i WHERE pg_visible_in_snapshot(i.txid,"
            "               a.snap) AND NOT pg_visible_in_snapshot(i.txid, b.snap))"
            " ORDER BY a.id"
        ).format(t=sql.Identifier(table))
    ).fetchall()
    return [(int(a), int(b)) for a, b in rows]


# --- (a) trap 1: an identity cursor skips a late commit --------------------------------------


def test_a_row_that_took_its_id_early_and_committed_late_is_read(url: str, owner: Conn) -> None:
    reader, naive = Reader(owner), IdCursorReader(owner)
    with connect(url, autocommit=False) as t1:
        insert(t1, "early-id")  # id 1, not committed
        insert(owner, "late-id")  # id 2, committed
        tick(owner, Ticker())
        assert reader.read() == ["late-id"]
        assert naive.read() == ["late-id"]
        t1.commit()
    assert tick(owner, Ticker()) > 0
    assert reader.read() == ["early-id"]
    assert naive.read() == [], "the id cursor moved past id 1 before it committed"
    assert reader.batches == [["late-id"], ["early-id"]]


# --- (b) trap 2: xid order below the horizon breaks an ordering group ------------------------


def test_a_group_is_read_in_commit_order_not_xid_order(url: str, owner: Conn) -> None:
    stepwise, merged = Reader(owner), Reader(owner)
    t2 = connect(url, autocommit=False)
    t3 = connect(url, autocommit=False)
    t1 = connect(url, autocommit=False)
    try:
        xid = {
            name: int(scalar(c, "SELECT pg_current_xact_id()::text"))
            for name, c in (("t2", t2), ("t3", t3))
        }
        t1.execute(GROUP_LOCK, ("G",))
        insert(t1, "first-in-G", "G")
        xid["t1"] = int(scalar(t1, "SELECT pg_current_xact_id()::text"))
        assert xid["t2"] < xid["t3"] < xid["t1"]  # the 150, 180, 200

        inserted, release = threading.Event(), threading.Event()

        def second() -> None:
            t2.execute(GROUP_LOCK, ("G",))  # waits for T1
            insert(t2, "second-in-G", "G")
            inserted.set()
            release.wait(60)
            t2.commit()

        worker = threading.Thread(target=second)
        worker.start()
        wait_until_waiting(owner, t2.info.backend_pid)
        t1.commit()
        assert inserted.wait(60)
        tick(owner, Ticker())  # T1 committed, T2 not yet
        assert stepwise.read() == ["first-in-G"]
        release.set()
        worker.join(60)
        tick(owner, Ticker())  # T2 committed; T3 still open
        assert stepwise.read() == ["second-in-G"]
        assert merged.read() == ["first-in-G", "second-in-G"]  # one pair: id order
        assert xid_order(owner) == ["second-in-G", "first-in-G"], "xid order is not commit order"
        assert "first-in-G" not in HorizonReader(owner).read(), "the horizon holds T1 back"
    finally:
        for c in (t1, t2, t3):
            c.close()


# --- (c) trap 4: a row written inside a SAVEPOINT ----------------------------------------------


def xmin_batch(conn: Conn, a: int, b: int) -> list[str]:
    """Naive: the batch between ticks a and b by the rows' xmin (epoch 0: a fresh cluster)."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT i.operation_key FROM relay.intake i, relay.tick a, relay.tick b"
            " WHERE a.id = %s AND b.id = %s"
            "   AND pg_visible_in_snapshot(i.xmin::text::xid8, b.snap)"
            "   AND NOT pg_visible_in_snapshot(i.xmin::text::xid8, a.snap) ORDER BY i.id",
            (a, b),
        )
    ]


def test_a_row_written_in_a_savepoint_is_read_once(url: str, owner: Conn) -> None:
    reader = Reader(owner)
    start = tick(owner)
    with connect(url, autocommit=False) as w:
        insert(w, "before-savepoint")
        w.execute("SAVEPOINT kept")
        insert(w, "in-savepoint")
        w.execute("RELEASE SAVEPOINT kept")
        w.execute("SAVEPOINT dropped")
        insert(w, "rolled-back")
        w.execute("ROLLBACK TO SAVEPOINT dropped")
        during = tick(owner)  # w still open
        assert reader.read() == [] and xmin_batch(owner, start, during) == []
        w.commit()
    after = tick(owner)
    xmin = scalar(owner, "SELECT xmin FROM relay.intake WHERE operation_key = 'in-savepoint'")
    txid = scalar(owner, "SELECT txid FROM relay.intake WHERE operation_key = 'in-savepoint'")
    assert xmin != txid, "the row's xmin is the subtransaction's xid"
    assert xmin_batch(owner, during, after) == ["before-savepoint"], "xmin loses the row"
    assert reader.read() == ["before-savepoint", "in-savepoint"]
    assert reader.read() == []


# --- (d) trap 5: a PREPAREd transaction ----------------------------------------------------------


def test_a_prepared_transaction_is_read_once_after_commit_prepared(url: str, owner: Conn) -> None:
    allowed = owner.execute("SHOW max_prepared_transactions").fetchone()
    if allowed is None or int(allowed[0]) == 0:
        pytest.skip(
            "the server has max_prepared_transactions = 0 (the suite's own cluster enables it: "
            "relay/devtools/services/postgres.py)"
        )
    reader, naive = Reader(owner), IdCursorReader(owner)
    kept, dropped = f"relay-test-{uuid.uuid4().hex}", f"relay-test-{uuid.uuid4().hex}"
    try:
        for gid, key in ((kept, "prepared"), (dropped, "prepared-then-rolled-back")):
            with connect(url, autocommit=False) as p:
                insert(p, key)
                p.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
        insert(owner, "after")
        tick(owner, Ticker())
        assert reader.read() == ["after"] and naive.read() == ["after"]
        for _ in range(3):
            tick(owner)
            assert reader.read() == []
        owner.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(dropped)))
        owner.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(kept)))
        assert tick(owner, Ticker()) > 0
        assert naive.read() == [], "the id cursor moved past the prepared row"
        assert reader.read() == ["prepared"]
        tick(owner)
        assert reader.read() == []
        assert reader.batches == [["after"], ["prepared"]]
    finally:
        for (gid,) in owner.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE gid IN (%s, %s)", (kept, dropped)
        ).fetchall():
            owner.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


# --- (e) trap 3: a long writing transaction delays nothing committed after it ----------------

LONG_S = 5.0


def test_a_long_writing_transaction_delays_nothing_else(url: str, owner: Conn) -> None:
    reader, horizon = Reader(owner), HorizonReader(owner)
    ticker = Ticker()
    with connect(url, autocommit=False) as long, connect(url) as writer:
        insert(long, "long")
        rounds, began = 0, time.monotonic()
        # Held open for LONG_S of wall time and at least 20 rounds, whichever is later: the
        # assertions are about what was read meanwhile, never about how fast.
        while rounds < 20 or time.monotonic() - began < LONG_S:
            key = f"later-{rounds}"
            insert(writer, key)
            tick(owner, ticker)
            assert reader.read() == [key]
            assert horizon.read() == [], "the horizon stalls behind the long transaction"
            rounds += 1
        long.commit()
    tick(owner, ticker)
    assert reader.read() == ["long"]
    tick(owner)
    assert reader.read() == []
    read = [key for batch in reader.batches for key in batch]
    assert sorted(read) == sorted(["long", *(f"later-{n}" for n in range(rounds))])


# --- (f) trap 7: two tickers; snapshots never go backwards --------------------------------------


def test_a_ticker_whose_snapshot_precedes_its_lock_goes_backwards(url: str, owner: Conn) -> None:
    """The naive ticker: the same lock and insert, but its snapshot is taken before the lock
    (REPEATABLE READ, after reading the last tick to decide). Ids come from a sequence, as PgQ's.
    """
    owner.execute(
        "CREATE TABLE relay.naive_tick (id bigserial PRIMARY KEY, snap pg_snapshot NOT NULL)"
    )
    owner.execute("INSERT INTO relay.naive_tick (id, snap) VALUES (0, '1:1:')")
    naive_tick = (
        "INSERT INTO relay.naive_tick (snap) SELECT pg_current_snapshot()",
        "LOCK TABLE relay.naive_tick IN SHARE ROW EXCLUSIVE MODE",
    )
    with connect(url, autocommit=False) as a, connect(url, autocommit=False) as b:
        for c in (a, b):
            c.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        b.execute("SELECT max(id) FROM relay.naive_tick")  # b's snapshot
        insert(owner, "between")
        a.execute("SELECT max(id) FROM relay.naive_tick")  # a's snapshot, after the insert
        a.execute(naive_tick[1])
        a.execute(naive_tick[0])
        a.commit()
        b.execute(naive_tick[1])
        b.execute(naive_tick[0])
        b.commit()
    assert ticks_that_go_backwards(owner, "naive_tick") == [(1, 2)]


def test_two_tickers_never_store_ticks_out_of_order(url: str, owner: Conn) -> None:
    reader = Reader(owner)
    lock = sql.SQL(query("tick_lock")).format(timeout=sql.Literal("60s"))
    real_b = Ticker(lock_timeout_s=60)
    with connect(url, autocommit=False) as a, connect(url) as b:
        a.execute(lock)  # ticker A holds the lock
        outcome: list[Any] = []
        worker = threading.Thread(target=lambda: outcome.append(real_b.run_once(b)))
        worker.start()
        wait_until_waiting(owner, b.info.backend_pid)
        insert(owner, "seen-by-a")
        a.execute(query("tick"), {"heartbeat_s": 1e-6})  # A's snapshot
        insert(owner, "after-a")
        a.commit()
        worker.join(60)
    assert outcome and outcome[0].stored and outcome[0].reason is TickReason.NEWS
    assert ticks_that_go_backwards(owner) == []
    assert reader.read() == ["seen-by-a", "after-a"]
    assert reader.batches == [["seen-by-a", "after-a"]]

    # Then both hammer while a writer inserts: still never backwards, every row read once.
    stop = threading.Event()

    def hammer() -> int:
        stored = 0
        with connect(url) as conn:
            ticker = Ticker(heartbeat_s=1e-6)
            for _ in range(150):
                stored += ticker.run_once(conn).stored
        return stored

    def write() -> int:
        n = 0
        with connect(url) as conn:
            while not stop.is_set():
                insert(conn, f"w-{n}")
                n += 1
        return n

    with ThreadPoolExecutor(3) as pool:
        writing = pool.submit(write)
        tickers = [pool.submit(hammer) for _ in range(2)]
        stored = sum(t.result() for t in tickers)
        stop.set()
        written = writing.result()
    tick(owner)
    assert stored == 300
    assert ticks_that_go_backwards(owner) == []
    assert sorted(reader.read()) == sorted(f"w-{n}" for n in range(written))


# --- (g) every row exactly once, in each writer's order, under 8 concurrent writers ------------


def test_every_row_is_read_once_under_eight_writers(url: str, owner: Conn) -> None:
    writers, per_writer = 8, 400
    stop = threading.Event()

    def write(w: int) -> None:
        with connect(url, autocommit=False) as conn:
            n = 0
            while n < per_writer:
                # One to three rows per transaction; every fifth in a savepoint.
                for _ in range(min(1 + n % 3, per_writer - n)):
                    if n % 5 == 0:
                        conn.execute("SAVEPOINT s")
                        insert(conn, f"w{w}-{n:04d}")
                        conn.execute("RELEASE SAVEPOINT s")
                    else:
                        insert(conn, f"w{w}-{n:04d}")
                    n += 1
                conn.commit()

    def tick_until_stopped() -> None:
        with connect(url) as conn:
            ticker = Ticker()
            while not stop.is_set():
                ticker.run_once(conn)

    reader = Reader(owner, limit=97)  # small: many pairs are split
    read: list[str] = []
    with ThreadPoolExecutor(writers + 2) as pool:
        tickers = [pool.submit(tick_until_stopped) for _ in range(2)]
        writing = [pool.submit(write, w) for w in range(writers)]
        while not all(f.done() for f in writing):
            read += reader.read()
        for f in writing:
            f.result()
        stop.set()
        for t in tickers:
            t.result()
    tick(owner)
    read += reader.read()
    expected = {f"w{w}-{n:04d}" for w in range(writers) for n in range(per_writer)}
    assert len(read) == len(set(read)), "a row was read twice"
    assert set(read) == expected
    for w in range(writers):
        mine = [k for k in read if k.startswith(f"w{w}-")]
        assert mine == sorted(mine), f"writer {w}'s rows out of its commit order"
    assert ticks_that_go_backwards(owner) == []


# --- trap 6: a reader that does not see everything its tick saw ---------------------------------


def test_a_reader_with_an_older_snapshot_reads_nothing_rather_than_part(
    url: str, owner: Conn
) -> None:
    start = tick(owner)
    with connect(url, autocommit=False) as stale:
        stale.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        stale.execute("SELECT 1 FROM relay.tick LIMIT 1")  # its snapshot, before the commit
        insert(owner, "committed-after-the-snapshot")
        end = tick(owner)
        # Naive: the pair's snapshots read apart from the rows (another statement, another
        # connection), then the rows with the stale snapshot: an empty "batch" it would move past.
        sa, sb = (
            scalar(owner, "SELECT snap::text FROM relay.tick WHERE id = %s", (t,))
            for t in (start, end)
        )
        partial = stale.execute(
            "SELECT operation_key FROM relay.intake WHERE pg_visible_in_snapshot(txid, %s)"
            " AND NOT pg_visible_in_snapshot(txid, %s)",
            (sb, sa),
        ).fetchall()
        assert partial == [], "the stale reader misses the row its pair holds"
        batch = read_batch(stale, Position(start))
        assert batch.tick_to is None and batch.rows == ()
    batch = read_batch(owner, Position(start))
    assert (batch.tick_to, [r.operation_key for r in batch.rows]) == (
        end,
        ["committed-after-the-snapshot"],
    )


# --- the ticker's choices, the enum and the grants ----------------------------------------------


def test_the_ticker_ticks_on_news_or_heartbeat_only(url: str, owner: Conn) -> None:
    ticker = Ticker(heartbeat_s=3600)
    first = ticker.run_once(owner)  # tick 0 is from 1970: the heartbeat is due
    assert (first.stored, first.reason) == (True, TickReason.HEARTBEAT)
    idle = ticker.run_once(owner)
    assert (idle.stored, idle.reason, idle.tick_id) == (False, TickReason.NOTHING_NEW, 1)
    with connect(url, autocommit=False) as w:
        insert(w, "open")
        assert ticker.run_once(owner).reason is TickReason.NOTHING_NEW  # not visible yet
        w.commit()
    news = ticker.run_once(owner)
    assert (news.stored, news.reason, news.tick_id) == (True, TickReason.NEWS, 2)
    with connect(url, autocommit=False) as w:
        insert(w, "rolled-back")
        w.rollback()
    assert ticker.run_once(owner).reason is TickReason.NOTHING_NEW
    seq = owner.execute("SELECT intake_seq FROM relay.tick WHERE id = 2").fetchone()
    assert seq == (1,)


def test_a_busy_ticker_gives_up_after_its_lock_timeout(url: str, owner: Conn) -> None:
    lock = sql.SQL(query("tick_lock")).format(timeout=sql.Literal("60s"))
    with connect(url, autocommit=False) as holder:
        holder.execute(lock)
        done = Ticker(lock_timeout_s=0.05).run_once(owner)
    assert (done.stored, done.reason) == (False, TickReason.BUSY)


def test_migrate_adds_declared_types_to_the_intake_enum(
    settings: Settings, url: str, owner: Conn
) -> None:
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        owner.execute(
            "INSERT INTO relay.intake (operation_key, effect_type, payload)"
            " VALUES ('k', 'sms', '{}')"
        )
    types = {
        **settings.effect_types,
        "sms": settings.effect_types["email"].model_copy(update={"name": "sms"}),
    }
    more = settings.model_copy(update={"effect_types": types})
    sync_effect_types(owner, more)
    sync_effect_types(owner, more)  # nothing missing: no ALTER
    owner.execute(
        "INSERT INTO relay.intake (operation_key, effect_type, payload) VALUES ('k', 'sms', '{}')"
    )
    labels = owner.execute("SELECT enum_range(NULL::relay.effect_type_name)::text[]").fetchone()
    assert labels is not None and sorted(labels[0]) == ["email", "sms", "wire"]


@pytest.fixture
def logins(url: str, prefix: str) -> Iterator[dict[str, str]]:
    role_prefix = f"{prefix.lower()}_"
    with psycopg.connect(url, autocommit=True) as conn:
        names = apply(conn, role_prefix)
        for role in names.values():
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(f"{role}_login"), sql.Identifier(role)
                )
            )
    try:
        yield {kind: make_conninfo(url, user=f"{role}_login") for kind, role in names.items()}
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for role in names.values():
                for name in (f"{role}_login", role):
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_application_only_inserts_and_only_the_relay_ticks(
    logins: dict[str, str], owner: Conn
) -> None:
    plain = (
        "INSERT INTO relay.intake (operation_key, effect_type, payload, business_key, traceparent,"
        " available_at) VALUES (%s, %s, '{}', NULL, NULL, NULL)"
        " ON CONFLICT DO NOTHING"
    )
    with connect(logins["application"]) as app:
        assert app.execute(plain, ("app-1", "wire")).rowcount == 1
        assert app.execute(plain, ("app-1", "wire")).rowcount == 0  # created or not, no SELECT
        refused: list[tuple[str, type[Exception]]] = [
            ("SELECT * FROM relay.intake", psycopg.errors.InsufficientPrivilege),
            ("UPDATE relay.intake SET payload = '{}'", psycopg.errors.InsufficientPrivilege),
            ("DELETE FROM relay.intake", psycopg.errors.InsufficientPrivilege),
            (
                "INSERT INTO relay.intake (operation_key, effect_type, payload, txid)"
                " VALUES ('x', 'wire', '{}', '1')",
                psycopg.errors.InsufficientPrivilege,
            ),
            (
                "INSERT INTO relay.intake (operation_key, effect_type, payload, enqueued_by)"
                " VALUES ('x', 'wire', '{}', 'someone')",
                psycopg.errors.InsufficientPrivilege,
            ),
            (
                # A group only through relay.enqueue, which takes the group's lock first.
                "INSERT INTO relay.intake (operation_key, effect_type, payload, ordering_group)"
                " VALUES ('x', 'wire', '{}', 'g')",
                psycopg.errors.InsufficientPrivilege,
            ),
            (
                "INSERT INTO relay.intake (operation_key, effect_type, payload)"
                " VALUES ('x', 'relay.status', '{}')",
                psycopg.errors.InvalidTextRepresentation,
            ),
            (
                "INSERT INTO relay.intake (operation_key, effect_type, payload)"
                " VALUES ('x', 'undeclared', '{}')",
                psycopg.errors.InvalidTextRepresentation,
            ),
            (
                "LOCK TABLE relay.tick IN SHARE ROW EXCLUSIVE MODE",
                psycopg.errors.InsufficientPrivilege,
            ),
            (
                "INSERT INTO relay.tick (id, snap, intake_seq) VALUES (99, '1:1:', 0)",
                psycopg.errors.InsufficientPrivilege,
            ),
        ]
        for statement, error in refused:
            with pytest.raises(error), app.transaction():
                app.execute(statement)
    for kind in ("reconciler", "operator"):
        with (
            connect(logins[kind]) as other,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
            other.transaction(),
        ):
            other.execute("LOCK TABLE relay.tick IN SHARE ROW EXCLUSIVE MODE")
    with connect(logins["relay"]) as daemon:
        assert Ticker().run_once(daemon).reason is TickReason.NEWS
        batch = read_batch(daemon, Position())
        assert [(r.operation_key, r.enqueued_by) for r in batch.rows] == [
            ("app-1", conninfo_to_dict(logins["application"])["user"])
        ]

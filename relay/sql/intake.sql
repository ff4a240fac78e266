-- The intake (issue 19, docs/design/intake.md §3-§4): the ticker and the batch read.

-- name: tick_lock
-- The first statement of a tick, in a transaction of its own. READ COMMITTED: the snapshot the
-- tick stores is then the next statement's, taken after this lock was granted, so after the
-- previous tick committed. SHARE ROW EXCLUSIVE conflicts with itself and with writers of the
-- table, not with readers; taking it needs UPDATE, DELETE or TRUNCATE on relay.tick, which only
-- the relay role has. {timeout} is composed as a literal (a utility statement takes no
-- parameters), so this is one round trip.
SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
SET LOCAL lock_timeout = {timeout};
LOCK TABLE relay.tick IN SHARE ROW EXCLUSIVE MODE;

-- name: tick
-- Store pg_current_snapshot() as the next tick when an intake row is visible now that the last
-- tick did not see (exact: the same snapshot decides and is stored), or when the last tick is
-- older than the heartbeat. Never a snapshot below the last one (a restored or other server).
-- Returns the flags whatever was decided, and the stored id if a tick was stored.
WITH last AS (
    SELECT t.id, t.snap, t.at FROM relay.tick t ORDER BY t.id DESC LIMIT 1
), next AS (
    SELECT coalesce(l.id, -1) + 1 AS id, s.snap, l.id AS last_id, l.snap AS last_snap,
           l.id IS NULL AS first,
           coalesce(pg_snapshot_xmin(s.snap) < pg_snapshot_xmin(l.snap)
                    OR pg_snapshot_xmax(s.snap) < pg_snapshot_xmax(l.snap), false) AS backwards,
           coalesce(l.at <= clock_timestamp() - make_interval(secs => %(heartbeat_s)s), true)
               AS heartbeat_due,
           coalesce(EXISTS (
               SELECT 1 FROM relay.intake i
               WHERE i.txid >= pg_snapshot_xmax(l.snap) AND pg_visible_in_snapshot(i.txid, s.snap)
           ) OR EXISTS (
               SELECT 1 FROM relay.intake i
               WHERE i.txid = ANY (ARRAY(
                   SELECT x FROM pg_snapshot_xip(l.snap) AS x
                   WHERE pg_visible_in_snapshot(x, s.snap)))
           ), false) AS news
    FROM (SELECT pg_current_snapshot() AS snap) s
    LEFT JOIN last l ON true
), stored AS (
    INSERT INTO relay.tick (id, snap, intake_seq)
    SELECT n.id, n.snap, coalesce(pg_sequence_last_value('relay.intake_id_seq'), 0)
    FROM next n
    WHERE NOT n.backwards AND (n.first OR n.news OR n.heartbeat_due)
    RETURNING id
)
SELECT n.last_id, (SELECT s.id FROM stored s), n.first, n.news, n.heartbeat_due, n.backwards,
       n.snap::text, n.last_snap::text
FROM next n;

-- name: read_intake_batch
-- One batch: the tick pair and the rows visible in tick b and not in tick a, in one statement
-- (PgQ's batch_event_sql). Reading the pair here means the statement's snapshot, taken after
-- tick b committed, sees every row tick b saw: never a partial batch. b is %(tick_to)s when a
-- split pair is continued, else the newest tick at most %(max_ticks)s after a. Candidates: an
-- index range for transactions that began after tick a, plus exact probes for the xids tick a saw
-- in progress and tick b sees committed (a long transaction costs one probe). The set of rows
-- between two stored snapshots is fixed, so the id cursor %(after_id)s inside a pair skips
-- nothing. No pair yet: no row. A pair without rows: one row of NULLs after the tick ids.
WITH pair AS MATERIALIZED (
    SELECT a.id AS tick_from, b.id AS tick_to, a.snap AS sa, b.snap AS sb
    FROM relay.tick a
    CROSS JOIN LATERAL (
        SELECT t.id, t.snap FROM relay.tick t
        WHERE t.id > a.id
          AND t.id <= coalesce(%(tick_to)s::bigint, a.id + %(max_ticks)s::bigint)
          AND (%(tick_to)s::bigint IS NULL OR t.id = %(tick_to)s::bigint)
        ORDER BY t.id DESC
        LIMIT 1
    ) b
    WHERE a.id = %(tick_from)s::bigint
), candidates AS (
    SELECT i.* FROM relay.intake i
    WHERE i.txid >= (SELECT pg_snapshot_xmax(p.sa) FROM pair p)
      AND i.txid < (SELECT pg_snapshot_xmax(p.sb) FROM pair p)
    UNION ALL
    SELECT i.* FROM relay.intake i
    WHERE i.txid = ANY (ARRAY(
        SELECT x FROM pair p, pg_snapshot_xip(p.sa) AS x WHERE pg_visible_in_snapshot(x, p.sb)))
)
SELECT p.tick_from, p.tick_to, r.id, r.operation_key, r.effect_type::text, r.payload::text,
       r.business_key, r.traceparent, r.available_at, r.ordering_group, r.enqueued_by,
       r.txid::text
FROM pair p
LEFT JOIN LATERAL (
    SELECT c.* FROM candidates c
    WHERE pg_visible_in_snapshot(c.txid, p.sb) AND NOT pg_visible_in_snapshot(c.txid, p.sa)
      AND c.id > %(after_id)s::bigint
    ORDER BY c.id
    LIMIT %(limit)s::integer
) r ON true
ORDER BY r.id;

-- name: intake_sequence
-- The intake's last drawn id: the relay's cheap "anything new?" between ticks (no lock, no
-- snapshot of the table). A drawn id is not a commit: the relay ticks until the row is read or
-- the heartbeat passes.
SELECT coalesce(pg_sequence_last_value('relay.intake_id_seq'), 0);

-- name: promote_intake
-- The next batch between ticks, read and claimed (relay.promote_intake, migration 0013): the
-- rows claimed for the owner first (id set; batch_id set for those claimed by a batch row), then
-- the summary (id NULL). Without an owner (p_claim 0), the summary alone.
SELECT id, operation_key, message_key, effect_type, topic, payload, business_key, traceparent,
       attempts, created_at, ordering_group, batch_id,
       promoted, claimed, rejected, refused, tick_from, tick_to, more, last_id, status_in_txn,
       claimed_at
FROM relay.promote_intake(%(limit)s, %(max_ticks)s, %(owner)s, %(epoch)s, %(lease_s)s,
                          %(claim)s, %(max_bytes)s, %(status_in_txn)s);

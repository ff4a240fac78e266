-- The relay's run: replicas, claims, outcomes, leases, verification, doorbell, status events.

-- name: register_replica
-- A new incarnation of a replica takes the next epoch; the old one is fenced from then on.
INSERT INTO relay.replica AS r (replica_id, epoch) VALUES (%(replica_id)s, 1)
ON CONFLICT (replica_id) DO UPDATE
    SET epoch = r.epoch + 1, started_at = now(), heartbeat_at = now()
RETURNING epoch;

-- name: lock_replica_id
-- The process that runs a replica holds this session lock on its main connection as long as
-- it lives: PostgreSQL releases it when the process stops or dies (its connection closes).
SELECT pg_try_advisory_lock(1919249529, hashtext(%(replica_id)s));

-- name: replica_last_heartbeat
-- Whether a replica id was in use lately: its epoch and how long ago its last heartbeat was.
SELECT epoch, extract(epoch FROM now() - heartbeat_at)::float8 AS age_s
FROM relay.replica WHERE replica_id = %(replica_id)s;

-- name: status_events_switch
-- Read before it is set: the relay's role may only write it when it differs (docs/security.md).
SELECT status_events FROM relay.reconciler_config;

-- name: heartbeat
UPDATE relay.replica SET heartbeat_at = now()
WHERE replica_id = %(replica_id)s AND epoch = %(epoch)s;

-- name: claimer_session
-- The claim must be an ordered scan of the partial index that stops at the batch. A queue's
-- statistics never match it (analysed while nothing was PENDING, or never): the planner then
-- took a backlog for a handful of rows and read and sorted all of it for every claim (45 ms at
-- 100,000, growing with the backlog). The claimer's own connection forbids those plans.
SET enable_bitmapscan = off;
SET enable_seqscan = off;

-- name: claim_batch
-- Claim due PENDING effects: the claim (attempt number, owner, epoch, lease, claimed_at) is on
-- the effect row and committed before any publish; the attempt's own row and the transitions are
-- written once, with the outcome (mark_outcomes, or expire_leases if this replica dies). The
-- replica check stops a fenced incarnation from claiming anything.
WITH fence AS (
    SELECT 1 FROM relay.replica
    WHERE replica_id = %(owner)s AND epoch = %(epoch)s
), locked AS (
    -- One ordered scan of the partial index that locks as it goes and stops at the batch: rows
    -- another replica holds are skipped without counting, so replicas claiming at once take
    -- different rows instead of all choosing the first ones and finding them taken.
    SELECT e.id, e.available_at, pg_column_size(e.payload) AS size
    FROM relay.effect e
    -- effect_claim_idx: an effect waiting behind its group's head is not in it, so effects
    -- planted behind a head that never settles cost a claim nothing (issue 18, item 7).
    WHERE e.state = 'PENDING' AND NOT e.behind_head AND e.available_at <= now()
      AND EXISTS (SELECT 1 FROM fence)
      AND (e.ordering_group IS NULL OR (
          -- A grouped effect goes only when the one before it in its group (cancelled ones
          -- aside) is settled: confirmed, published with no result awaited, or released by an
          -- operator. Settled effects never become unsettled, so an older snapshot can only
          -- hold an effect back, never let one jump ahead; and the effect before it settled
          -- only after its own predecessor did.
          e.group_released_at IS NULL AND NOT EXISTS (
              SELECT 1 FROM (
                  SELECT p.state, p.effect_type, p.group_released_at
                  FROM relay.effect p
                  WHERE p.ordering_group = e.ordering_group AND p.id < e.id
                    AND p.state <> 'CANCELLED'
                  ORDER BY p.id DESC LIMIT 1
              ) p
              WHERE p.group_released_at IS NULL
                AND (p.state NOT IN ('CONFIRMED', 'PUBLISHED')
                     OR (p.state = 'PUBLISHED' AND EXISTS (
                         SELECT 1 FROM relay.effect_type t
                         WHERE t.name = p.effect_type AND t.result_topic IS NOT NULL))))))
    ORDER BY e.available_at, e.id
    LIMIT %(limit)s
    FOR UPDATE OF e SKIP LOCKED
), claimed AS (
    -- Capped by bytes as well as by count (always at least one): a few huge payloads must not
    -- take the relay's memory. pg_column_size reads the stored size without decompressing. The
    -- rows past the cap are unlocked when this statement commits.
    SELECT d.id FROM (
        SELECT l.id, l.size, sum(l.size) OVER (ORDER BY l.available_at, l.id) AS running
        FROM locked l
    ) d
    WHERE d.running - d.size < %(max_bytes)s
), moved AS (
    UPDATE relay.effect AS e
    SET state = 'DISPATCHING', attempts = e.attempts + 1, owner = %(owner)s,
        owner_epoch = %(epoch)s, lease_until = now() + make_interval(secs => %(lease_s)s),
        claimed_at = now(), updated_at = now(), reason = NULL
    FROM claimed WHERE e.id = claimed.id
    RETURNING e.id, e.operation_key, coalesce(e.message_key, e.operation_key) AS message_key,
              e.effect_type, e.topic, e.payload, e.business_key, e.traceparent, e.attempts,
              e.created_at, e.ordering_group
)
SELECT id, operation_key, message_key, effect_type, topic, payload::text AS payload,
       business_key, traceparent, attempts, created_at, ordering_group
FROM moved ORDER BY id

-- name: is_fenced
SELECT NOT EXISTS (
    SELECT 1 FROM relay.replica WHERE replica_id = %(owner)s AND epoch = %(epoch)s
) AS fenced;

-- name: mark_outcomes
-- Record how each attempt ended, in one statement for the batch: the effect's new state, the
-- attempt's row, and one transition (the outcome, implying the claim and, for a first attempt,
-- the enqueue: see relay.transition_log). Compare-and-set on owner, epoch and attempt: a
-- replica that lost its lease (paused, fenced) changes nothing.
WITH outcome AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(states)s::text[],
                         %(outcomes)s::text[], %(reasons)s::text[], %(partitions)s::int[],
                         %(offsets)s::bigint[], %(delays_s)s::float8[])
        AS o(id, attempt, state, outcome, reason, partition, "offset", delay_s)
), located AS MATERIALIZED (
    -- Each row found by its id alone and locked, the compare-and-set checked on the row found.
    -- Written so that no plan can start from the state index: a queue's statistics never match
    -- its states (analysed while all was PENDING, or never), and a plan that scans the
    -- DISPATCHING rows for each outcome made marking quadratic (500 rows: 13 ms became 450 ms).
    -- The quals stay outside the subquery (its LIMIT keeps the planner from pushing them in).
    SELECT o.*, x.row_ref FROM outcome o
    CROSS JOIN LATERAL (
        SELECT e.ctid AS row_ref, e.state, e.owner, e.owner_epoch, e.attempts
        FROM relay.effect e WHERE e.id = o.id
        LIMIT 1  -- the id is unique; a LIMIT keeps the outer quals out of this scan
        FOR UPDATE OF e
    ) x
    WHERE x.state = 'DISPATCHING' AND x.owner = %(owner)s AND x.owner_epoch = %(epoch)s
      AND x.attempts = o.attempt
), moved AS (
    UPDATE relay.effect AS e
    SET state = o.state, reason = o.reason, owner = NULL, owner_epoch = NULL,
        lease_until = NULL, updated_at = now(),
        published_partition = coalesce(o.partition, e.published_partition),
        published_offset = coalesce(o."offset", e.published_offset),
        published_at = CASE WHEN o.state = 'PUBLISHED' THEN now() ELSE e.published_at END,
        outcome_deadline = CASE
            WHEN o.state = 'PUBLISHED' AND t.result_topic IS NOT NULL
                THEN now() + make_interval(secs => t.outcome_timeout_s)
            ELSE NULL END,
        available_at = CASE
            WHEN o.state = 'PENDING' THEN now() + make_interval(secs => o.delay_s)
            ELSE e.available_at END
    FROM located o, relay.effect_type t
    WHERE e.ctid = o.row_ref AND e.id = o.id AND t.name = e.effect_type
    RETURNING e.id, o.attempt, o.state, o.outcome, o.reason, o.partition, o."offset",
              e.claimed_at, e.created_at, e.parent_effect_id, e.effect_type
), attempts AS (
    INSERT INTO relay.attempt (effect_id, attempt, replica_id, replica_epoch, started_at,
                               ended_at, outcome, reason, partition, "offset")
    SELECT m.id, m.attempt, %(owner)s, %(epoch)s, m.claimed_at, now(), m.outcome, m.reason,
           m.partition, m."offset"
    FROM moved m
), log AS MATERIALIZED (
    SELECT * FROM relay.transition_context
), transitions AS (
    -- One row: the outcome, implying the claim before it (the attempt's row says who and when)
    -- and, for a first attempt, the enqueue (relay.transition_log shows all three).
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt, at,
                                  status_pending, implied_claim, implied_enqueue)
    SELECT m.id, 'DISPATCHING', m.state, m.reason, %(owner)s, m.attempt, now(),
           log.status AND m.effect_type <> 'relay.status', true,
           m.attempt = 1 AND m.parent_effect_id IS NULL AND m.created_at >= log.lean_since
    FROM moved m CROSS JOIN log
    ORDER BY m.id
)
SELECT id FROM moved

-- name: mark_batch_outcomes
-- The outcomes of intents claimed in batches (relay.dispatch_batch). Published ones that need
-- nothing more (their type awaits no result, and status events are off or rode in the batch's
-- Kafka transaction) go into one relay.published_batch row per batch and type, with their
-- partitions and offsets, and get no row of their own. Every other one has its effect row written
-- once, in its outcome's state, with its attempt's row and one transition, as mark_outcomes
-- writes them for a claimed row; an UNKNOWN one whose status events rode in the transaction has
-- them held (relay.status_held) until its record is looked for. A batch whose every intent is
-- recorded is deleted. Compare-and-set on the batch's owner and epoch: a batch whose lease was
-- expired (its effects written UNKNOWN, the batch gone) or a fenced incarnation's writes nothing.
-- The actor is who records the outcomes: the owner's marker, or a settler (relay/dispatch/
-- settler.py) recording a dead owner's batch in that owner's name (its attempts are the owner's).
WITH outcome AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(batches)s::bigint[], %(states)s::text[],
                         %(outcomes)s::text[], %(reasons)s::text[], %(partitions)s::int[],
                         %(offsets)s::bigint[], %(delays_s)s::float8[])
        AS o(id, batch, state, outcome, reason, partition, "offset", delay_s)
), live AS MATERIALIZED (
    SELECT b.id, b.claimed_at, b.ids, b.status_ids FROM relay.dispatch_batch b
    -- IN over unnest, not = ANY: the planner estimates = ANY over an array of one batch id per
    -- intent element by element (about 1 ms of planning a call).
    WHERE b.id IN (SELECT unnest(%(batches)s::bigint[]))
      AND b.owner = %(owner)s AND b.owner_epoch = %(epoch)s
    FOR UPDATE
), log AS MATERIALIZED (
    SELECT * FROM relay.transition_context
), in_txn AS MATERIALIZED (
    -- The intents whose status events rode in their batch's Kafka transaction.
    SELECT unnest(l.status_ids) AS id FROM live l
), quiet AS MATERIALIZED (
    -- Uncorrelated conditions first, filters decided once: with status events on and none in
    -- the transaction, the intake is not probed for any intent.
    SELECT o.id, o.batch, o.partition, o."offset", i.effect_type::text AS effect_type,
           l.claimed_at
    FROM outcome o
    JOIN live l ON l.id = o.batch
    JOIN relay.intake i ON i.id = o.id
    JOIN relay.effect_type t ON t.name = i.effect_type::text
    WHERE o.state = 'PUBLISHED' AND o."offset" IS NOT NULL
      AND (EXISTS (SELECT 1 FROM in_txn)
           OR NOT (SELECT c.status_events FROM relay.reconciler_config c))
      AND (o.id IN (SELECT x.id FROM in_txn x)
           OR (t.result_topic IS NULL
               AND NOT (SELECT c.status_events FROM relay.reconciler_config c)))
), published AS (
    INSERT INTO relay.published_batch (batch_id, effect_type, owner, owner_epoch, claimed_at,
                                       first_id, last_id, n, ids, partitions, offsets)
    SELECT q.batch, q.effect_type, %(owner)s, %(epoch)s, q.claimed_at, min(q.id), max(q.id),
           count(*), array_agg(q.id ORDER BY q.id), array_agg(q.partition ORDER BY q.id),
           array_agg(q."offset" ORDER BY q.id)
    FROM quiet q
    GROUP BY q.batch, q.effect_type, q.claimed_at
), made AS (
    INSERT INTO relay.effect AS e (id, operation_key, effect_type, topic, payload, business_key,
                                   traceparent, available_at, created_at, updated_at,
                                   enqueued_by, state, reason, attempts, claimed_at,
                                   published_partition, published_offset, published_at,
                                   outcome_deadline)
    SELECT r.id, r.operation_key, r.effect_type, r.topic, r.payload, r.business_key,
           r.traceparent,
           CASE WHEN o.state = 'PENDING' THEN now() + make_interval(secs => o.delay_s)
                ELSE r.available_at END,
           r.created_at, now(), r.enqueued_by, o.state, o.reason, 1, l.claimed_at,
           o.partition, o."offset", CASE WHEN o.state = 'PUBLISHED' THEN now() END,
           CASE WHEN o.state = 'PUBLISHED' AND t.result_topic IS NOT NULL
                THEN now() + make_interval(secs => t.outcome_timeout_s) END
    FROM outcome o
    JOIN live l ON l.id = o.batch
    JOIN relay.intake_as_effect r ON r.id = o.id
    LEFT JOIN relay.effect_type t ON t.name = r.effect_type
    WHERE o.id NOT IN (SELECT q.id FROM quiet q)
    ORDER BY r.id
    ON CONFLICT DO NOTHING
    RETURNING e.id, e.state, e.reason, e.claimed_at, e.created_at, e.effect_type
), attempts AS (
    INSERT INTO relay.attempt (effect_id, attempt, replica_id, replica_epoch, started_at,
                               ended_at, outcome, reason, partition, "offset")
    SELECT m.id, 1, %(owner)s, %(epoch)s, m.claimed_at, now(), o.outcome, m.reason,
           o.partition, o."offset"
    FROM made m JOIN outcome o ON o.id = m.id
), transitions AS (
    -- One row, implying the claim and the enqueue before it, as mark_outcomes writes it.
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt, at,
                                  status_pending, implied_claim, implied_enqueue)
    SELECT m.id, 'DISPATCHING', m.state, m.reason, %(actor)s, 1, now(),
           log.status AND m.effect_type <> 'relay.status', true, m.created_at >= log.lean_since
    FROM made m CROSS JOIN log
    ORDER BY m.id
), held AS (
    -- Its status events may be visible (the commit went unanswered): they wait for the lookup.
    INSERT INTO relay.status_held (effect_id, batch_id)
    SELECT m.id, o.batch FROM made m JOIN outcome o ON o.id = m.id
    WHERE m.state = 'UNKNOWN' AND m.id IN (SELECT x.id FROM in_txn x)
    ON CONFLICT DO NOTHING
), closed AS (
    DELETE FROM relay.dispatch_batch b USING live l
    WHERE b.id = l.id AND NOT EXISTS (
        SELECT 1 FROM unnest(l.ids) AS x(id)
        WHERE x.id NOT IN (SELECT m.id FROM made m)
          AND x.id NOT IN (SELECT q.id FROM quiet q)
          AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = x.id)
          AND NOT EXISTS (SELECT 1 FROM relay.published_intent(x.id)))
)
SELECT id FROM made
UNION ALL
SELECT id FROM quiet

-- name: mark_quiet_batch
-- mark_batch_outcomes for the happy path, with no work per intent: a whole batch acknowledged,
-- every intent of a type that awaits no result, status events off or every intent's in the
-- batch's Kafka transaction. The batch becomes one
-- relay.published_batch row per type and is deleted. Nothing is written unless the batch is
-- still this incarnation's and holds exactly these ids (the ids, types, partitions and offsets
-- are the relay's own: it read the types from the intake); the marker then falls back to
-- mark_batch_outcomes, which decides per intent.
WITH live AS MATERIALIZED (
    SELECT b.id, b.claimed_at FROM relay.dispatch_batch b
    WHERE b.id = %(batch)s AND b.owner = %(owner)s AND b.owner_epoch = %(epoch)s
      AND b.ids = %(ids)s::bigint[]
      AND (b.status_ids = b.ids OR NOT (SELECT c.status_events FROM relay.reconciler_config c))
      AND NOT EXISTS (SELECT 1 FROM relay.effect_type t
                      WHERE t.name IN (SELECT unnest(%(types)s::text[]))
                        AND t.result_topic IS NOT NULL)
    FOR UPDATE
), published AS (
    INSERT INTO relay.published_batch (batch_id, effect_type, owner, owner_epoch, claimed_at,
                                       first_id, last_id, n, ids, partitions, offsets)
    SELECT l.id, x.effect_type, %(owner)s, %(epoch)s, l.claimed_at, min(x.id), max(x.id),
           count(*), array_agg(x.id ORDER BY x.id), array_agg(x.partition ORDER BY x.id),
           array_agg(x."offset" ORDER BY x.id)
    FROM live l
    CROSS JOIN unnest(%(ids)s::bigint[], %(types)s::text[], %(partitions)s::int[],
                      %(offsets)s::bigint[]) AS x(id, effect_type, partition, "offset")
    GROUP BY l.id, l.claimed_at, x.effect_type
), closed AS (
    DELETE FROM relay.dispatch_batch b USING live l WHERE b.id = l.id
)
SELECT count(*) FROM live

-- name: mark_quiet_batch_of_one_type
-- mark_quiet_batch for a batch whose intents are all of one type (a drain's every batch): the
-- arrays go into the row as they came, in id order, with no unnest, sort and grouping per intent
-- (that cost about 4.5 us of the server's CPU an intent, most of the marker's work).
WITH arg AS (
    SELECT %(ids)s::bigint[] AS ids
), live AS MATERIALIZED (
    SELECT b.id, b.claimed_at, a.ids FROM relay.dispatch_batch b, arg a
    WHERE b.id = %(batch)s AND b.owner = %(owner)s AND b.owner_epoch = %(epoch)s
      AND b.ids = a.ids
      -- The three arrays side by side (the ids' order is the batch's, checked just above).
      AND cardinality(%(partitions)s::int[]) = cardinality(a.ids)
      AND cardinality(%(offsets)s::bigint[]) = cardinality(a.ids)
      AND (b.status_ids = b.ids OR NOT (SELECT c.status_events FROM relay.reconciler_config c))
      AND NOT EXISTS (SELECT 1 FROM relay.effect_type t
                      WHERE t.name = %(effect_type)s AND t.result_topic IS NOT NULL)
    FOR UPDATE OF b
), published AS (
    INSERT INTO relay.published_batch (batch_id, effect_type, owner, owner_epoch, claimed_at,
                                       first_id, last_id, n, ids, partitions, offsets)
    SELECT l.id, %(effect_type)s, %(owner)s, %(epoch)s, l.claimed_at, l.ids[1],
           l.ids[cardinality(l.ids)], cardinality(l.ids), l.ids, %(partitions)s::int[],
           %(offsets)s::bigint[]
    FROM live l
), closed AS (
    DELETE FROM relay.dispatch_batch b USING live l WHERE b.id = l.id
)
SELECT count(*) FROM live

-- name: expire_batches
-- A batch left past its lease (its replica died or hangs), a previous incarnation's, or (after a
-- reconnect) one of this replica's that no stage holds: its intents may or may not be in Kafka.
-- Each without an effect row is written UNKNOWN, with its attempt's row and transition, as
-- expire_leases writes a claimed row's (status events that rode in its transaction held until the
-- record is looked for); the batch is deleted.
-- With leave_receipted, a batch whose incarnation writes receipts is left to the settler
-- (batches_to_settle), which finds out whether it committed without making it UNKNOWN: this
-- replica's own, and another's for one more lease (its owner settles it, or, once the owner's
-- heartbeat is a lease old, any replica); past that, a live owner that cannot reach Kafka
-- would hold it DISPATCHING for as long: it expires.
WITH expired AS (
    SELECT b.id, b.owner, b.owner_epoch, b.claimed_at, b.ids, b.status_ids
    FROM relay.dispatch_batch b
    WHERE (b.lease_until < now()
           OR (b.owner = %(owner)s AND b.owner_epoch < %(epoch)s)
           OR (%(all_own)s AND b.owner = %(owner)s AND NOT (b.ids && %(held)s::bigint[])))
      AND NOT (%(leave_receipted)s
               AND (b.owner = %(owner)s
                    OR b.lease_until > now() - make_interval(secs => %(lease_s)s))
               AND EXISTS (SELECT 1 FROM relay.receipt_writer w
                           WHERE w.replica_id = b.owner AND w.epoch = b.owner_epoch))
    ORDER BY b.lease_until
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), member AS (
    SELECT x.id, x.owner, x.owner_epoch, x.claimed_at, m.id AS effect_id
    FROM expired x CROSS JOIN LATERAL unnest(x.ids) AS m(id)
), in_txn AS MATERIALIZED (
    -- Whose status events rode in the transaction: a set probed by hash (= ANY of the batch's
    -- array for each member was quadratic: 0.46 s for a batch of 5,000, 3.1 s for 20,000).
    SELECT unnest(x.status_ids) AS id FROM expired x
), made AS (
    INSERT INTO relay.effect AS e (id, operation_key, effect_type, topic, payload, business_key,
                                   traceparent, available_at, created_at, updated_at,
                                   enqueued_by, state, reason, attempts, claimed_at)
    SELECT r.id, r.operation_key, r.effect_type, r.topic, r.payload, r.business_key,
           r.traceparent, r.available_at, r.created_at, now(), r.enqueued_by, 'UNKNOWN',
           format('attempt 1 of replica %%s (epoch %%s) ended without a recorded outcome',
                  m.owner, m.owner_epoch),
           1, m.claimed_at
    FROM member m
    JOIN relay.intake_as_effect r ON r.id = m.effect_id
    -- Published already, by an earlier part of a batch the marker had to split.
    WHERE NOT EXISTS (SELECT 1 FROM relay.published_intent(m.effect_id))
    ORDER BY r.id
    ON CONFLICT DO NOTHING
    RETURNING e.id, e.reason, e.claimed_at, e.created_at, e.effect_type
), attempts AS (
    INSERT INTO relay.attempt (effect_id, attempt, replica_id, replica_epoch, started_at,
                               ended_at, outcome, reason)
    SELECT d.id, 1, m.owner, m.owner_epoch, d.claimed_at, now(), 'unknown', d.reason
    FROM made d JOIN member m ON m.effect_id = d.id
), log AS MATERIALIZED (
    SELECT * FROM relay.transition_context
), transitions AS (
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt, at,
                                  status_pending, implied_claim, implied_enqueue)
    SELECT d.id, 'DISPATCHING', 'UNKNOWN', d.reason, %(owner)s, 1, now(),
           log.status AND d.effect_type <> 'relay.status', true, d.created_at >= log.lean_since
    FROM made d JOIN member m ON m.effect_id = d.id CROSS JOIN log
    ORDER BY d.id
), held AS (
    INSERT INTO relay.status_held (effect_id, batch_id)
    SELECT d.id, m.id FROM made d JOIN member m ON m.effect_id = d.id
    WHERE d.id IN (SELECT t.id FROM in_txn t)
    ON CONFLICT DO NOTHING
), gone AS (
    DELETE FROM relay.dispatch_batch b USING expired x WHERE b.id = x.id
)
SELECT count(*) AS expired FROM made

-- name: register_receipts
-- This incarnation writes a receipt into each Kafka transaction it commits: recorded before it
-- publishes anything. Its earlier incarnations' rows are forgotten once they left no batch.
WITH gone AS (
    DELETE FROM relay.receipt_writer w
    WHERE w.replica_id = %(replica_id)s AND w.epoch < %(epoch)s
      AND NOT EXISTS (SELECT 1 FROM relay.dispatch_batch b
                      WHERE b.owner = w.replica_id AND b.owner_epoch = w.epoch)
)
INSERT INTO relay.receipt_writer (replica_id, epoch, topic, install, window_s)
VALUES (%(replica_id)s, %(epoch)s, %(topic)s, %(install)s, %(window_s)s)
ON CONFLICT DO NOTHING;

-- name: stop_receipts
-- From now on this incarnation may commit a transaction without a receipt: its batches are
-- no longer settled by the absence of one.
DELETE FROM relay.receipt_writer WHERE replica_id = %(replica_id)s AND epoch = %(epoch)s;

-- name: batches_to_settle
-- Batches left without an outcome by an incarnation that writes receipts, which this replica
-- settles by reading its receipts: its own earlier incarnations' (its producer fenced theirs when
-- it started), its own past their lease (no transaction of its producer is open between two
-- publishes) or whose commit went unanswered (the producer was replaced since), and another replica's past their lease once that replica has sent no heartbeat for
-- a lease (it is fenced first); a live replica settles its own.
SELECT b.id, b.owner, b.owner_epoch, b.claimed_at, b.ids, w.topic, w.install, w.window_s
FROM relay.dispatch_batch b
JOIN relay.receipt_writer w ON w.replica_id = b.owner AND w.epoch = b.owner_epoch
LEFT JOIN relay.replica r ON r.replica_id = b.owner
-- Never a later incarnation's: a fenced process must not settle its successor's batches.
WHERE (b.owner = %(owner)s AND b.owner_epoch <= %(epoch)s
       AND (b.owner_epoch < %(epoch)s OR b.lease_until < now()))
   -- Its own whose commit went unanswered, once its producer was replaced.
   OR (b.owner = %(owner)s AND b.owner_epoch = %(epoch)s AND b.id = ANY(%(unanswered)s::bigint[]))
   OR (b.owner <> %(owner)s AND b.lease_until < now()
       AND (r.heartbeat_at IS NULL
            OR r.heartbeat_at < now() - make_interval(secs => %(lease_s)s)))
ORDER BY b.claimed_at, b.id
LIMIT %(limit)s;

-- name: expire_leases
-- An effect left DISPATCHING past its lease (its replica died or hangs) may or may not be in
-- Kafka: it becomes UNKNOWN, never PENDING, and its attempt and transition are written as
-- mark_outcomes would have. A restarted replica expires its own older epochs at once; a replica
-- that reconnected, all of its own that none of its stages holds (a claim whose answer was lost
-- with the connection).
WITH expired AS (
    SELECT e.id, e.attempts, e.owner, e.owner_epoch FROM relay.effect e
    WHERE e.state = 'DISPATCHING'
      AND (e.lease_until < now()
           OR (e.owner = %(owner)s AND e.owner_epoch < %(epoch)s)
           OR (%(all_own)s AND e.owner = %(owner)s AND e.id <> ALL(%(held)s::bigint[])))
    ORDER BY e.lease_until
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE relay.effect AS e
    SET state = 'UNKNOWN', owner = NULL, owner_epoch = NULL, lease_until = NULL,
        updated_at = now(),
        reason = format('attempt %%s of replica %%s (epoch %%s) ended without a recorded outcome',
                        x.attempts, x.owner, x.owner_epoch)
    FROM expired x WHERE e.id = x.id
    RETURNING e.id, e.attempts, e.reason, x.owner AS claimer, x.owner_epoch AS claimer_epoch,
              e.claimed_at, e.created_at, e.parent_effect_id, e.effect_type
), attempts AS (
    -- Claims made before migration 0004 have their row already (outcome NULL).
    INSERT INTO relay.attempt AS a (effect_id, attempt, replica_id, replica_epoch, started_at,
                                    ended_at, outcome, reason)
    SELECT m.id, m.attempts, m.claimer, m.claimer_epoch, coalesce(m.claimed_at, now()), now(),
           'unknown', m.reason
    FROM moved m
    ON CONFLICT (effect_id, attempt) DO UPDATE
        SET ended_at = now(), outcome = 'unknown', reason = excluded.reason
        WHERE a.outcome IS NULL
), log AS MATERIALIZED (
    SELECT * FROM relay.transition_context
), transitions AS (
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt, at,
                                  status_pending, implied_claim, implied_enqueue)
    SELECT m.id, 'DISPATCHING', 'UNKNOWN', m.reason, %(owner)s, m.attempts, now(),
           log.status AND m.effect_type <> 'relay.status',
           -- Claims made before migration 0004 wrote their claim transition at claim time.
           m.claimed_at IS NOT NULL,
           m.attempts = 1 AND m.parent_effect_id IS NULL AND m.created_at >= log.lean_since
    FROM moved m CROSS JOIN log
    ORDER BY m.id
)
SELECT count(*) AS expired FROM moved

-- name: arm_doorbell
-- Armed for a short while only, and re-armed by the waiting relay: when the last idle relay
-- dies, writers stop sending a NOTIFY per enqueue soon after.
UPDATE relay.doorbell SET armed = true,
    armed_until = now() + make_interval(secs => %(armed_for_s)s)

-- name: disarm_doorbell
UPDATE relay.doorbell SET armed = false, armed_until = NULL WHERE armed_until IS NOT NULL

-- name: listen_doorbell
LISTEN relay_doorbell;

-- name: claim_verifications
-- The relay's own UNKNOWN effects (never acknowledged) that are due for a check in Kafka. A
-- replica checks its own attempts (its current producer has fenced the one that made them); the
-- attempts of another replica only once that replica is silent past its lease (dead or paused):
-- fencing a live replica from here would abort its current transaction.
WITH due AS (
    SELECT e.id FROM relay.effect e
    JOIN relay.attempt a ON a.effect_id = e.id AND a.attempt = e.attempts
    LEFT JOIN relay.replica r ON r.replica_id = a.replica_id
    WHERE e.state = 'UNKNOWN' AND e.published_offset IS NULL
      AND coalesce(e.verify_at, '-infinity') <= now()
      AND (e.lease_until IS NULL OR e.lease_until < now())
      AND (a.replica_id = %(owner)s
           OR r.replica_id IS NULL
           OR r.heartbeat_at < now() - make_interval(secs => %(lease_s)s))
    ORDER BY e.verify_at NULLS FIRST, e.id
    LIMIT %(limit)s
    FOR UPDATE OF e SKIP LOCKED
), taken AS (
    UPDATE relay.effect AS e
    SET owner = %(owner)s, owner_epoch = %(epoch)s,
        lease_until = now() + make_interval(secs => %(lease_s)s)
    FROM due WHERE e.id = due.id
    RETURNING e.id, e.operation_key, coalesce(e.message_key, e.operation_key) AS message_key,
              e.topic, e.attempts, e.verify_tries, e.ordering_group
)
SELECT t.id, t.operation_key, t.message_key, t.topic, t.attempts, t.verify_tries, a.replica_id,
       a.replica_epoch, a.started_at, t.ordering_group
FROM taken t JOIN relay.attempt a ON a.effect_id = t.id AND a.attempt = t.attempts
ORDER BY t.id;

-- name: finish_verifications
-- Record what a round of checks found, one row per effect: PUBLISHED (found), PENDING (absent: a
-- new attempt may be made), UNKNOWN again (Kafka could not be asked; checked later) or STUCK
-- (budget spent). One statement a round (one a check cost 2.8 ms an effect: 14 s of the 26 s a
-- crashed batch of 5,000 took to be verified and sent again). Compare-and-set on the verifying
-- replica's owner/epoch and each effect's attempt. Status events held for an effect (they rode in
-- the record's Kafka transaction): found, they are in Kafka with the record and the log's are not
-- published; otherwise the log's go. Returns the effects moved, with their new state.
WITH v AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(states)s::text[],
                         %(reasons)s::text[], %(verifications)s::text[], %(partitions)s::int[],
                         %(offsets)s::bigint[], %(retry_in_s)s::float8[])
        AS v(id, attempt, state, reason, verification, partition, "offset", retry_in_s)
), moved AS (
    UPDATE relay.effect AS e
    SET state = v.state, reason = v.reason, owner = NULL, owner_epoch = NULL,
        lease_until = NULL, updated_at = now(),
        verify_tries = CASE WHEN v.state = 'UNKNOWN' THEN e.verify_tries + 1 ELSE 0 END,
        verify_at = CASE WHEN v.state = 'UNKNOWN'
                         THEN now() + make_interval(secs => v.retry_in_s) ELSE NULL END,
        available_at = CASE WHEN v.state = 'PENDING' THEN now() ELSE e.available_at END,
        published_partition = coalesce(v.partition, e.published_partition),
        published_offset = coalesce(v."offset", e.published_offset),
        published_at = CASE WHEN v.state = 'PUBLISHED' THEN now() ELSE e.published_at END,
        outcome_deadline = CASE
            WHEN v.state = 'PUBLISHED' AND t.result_topic IS NOT NULL
                THEN now() + make_interval(secs => t.outcome_timeout_s)
            ELSE e.outcome_deadline END
    FROM v, relay.effect_type t
    WHERE e.id = v.id AND t.name = e.effect_type AND e.state = 'UNKNOWN'
      AND e.owner = %(owner)s AND e.owner_epoch = %(epoch)s AND e.attempts = v.attempt
    RETURNING e.id, e.attempts, e.effect_type, v.state, v.reason, v.verification, v.partition,
              v."offset"
), attempt AS (
    UPDATE relay.attempt AS a
    SET verification = m.verification, verified_at = now(),
        partition = coalesce(m.partition, a.partition),
        "offset" = coalesce(m."offset", a."offset")
    FROM moved m WHERE a.effect_id = m.id AND a.attempt = m.attempts
), unheld AS (
    -- Only the first attempt's events rode in a batch's transaction: a hold left over from it
    -- (a person sent the effect again) is dropped here and says nothing of a later attempt's.
    DELETE FROM relay.status_held h USING moved m
    WHERE h.effect_id = m.id AND m.state <> 'UNKNOWN'
    RETURNING h.effect_id, m.attempts = 1 AND m.state = 'PUBLISHED' AS told
), told AS (
    UPDATE relay.transition t SET status_pending = false
    FROM unheld u
    WHERE t.effect_id = u.effect_id AND u.told AND t.status_pending
), transition AS (
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                  status_pending)
    SELECT m.id, 'UNKNOWN', m.state, m.reason, %(owner)s, m.attempts,
           c.status_events AND m.effect_type <> 'relay.status'
           AND m.id NOT IN (SELECT u.effect_id FROM unheld u WHERE u.told)
    FROM moved m, relay.reconciler_config c
    WHERE m.state <> 'UNKNOWN'
    ORDER BY m.id
)
SELECT m.id, m.state FROM moved m;

-- name: release_verifications
-- Checks a round claimed and did not reach before its deadline: given back to the due ones at
-- once, no try counted (compare-and-set on the verifying replica).
UPDATE relay.effect
SET owner = NULL, owner_epoch = NULL, lease_until = NULL
WHERE id = ANY (%(ids)s::bigint[]) AND state = 'UNKNOWN'
  AND owner = %(owner)s AND owner_epoch = %(epoch)s;

-- name: take_status_lease
-- One replica at a time publishes status events, so that one effect's events keep their order.
-- The holder renews its lease at every pass; another replica takes it over once it has lapsed
-- (or at once from an earlier incarnation of itself). Returns what the last holder handed to
-- Kafka without recording it as published: to be looked for before anything new is sent.
UPDATE relay.status_publisher
SET owner = %(owner)s, owner_epoch = %(epoch)s,
    lease_until = now() + make_interval(secs => %(lease_s)s)
WHERE owner IS NULL OR owner = %(owner)s OR lease_until < now()
RETURNING inflight, inflight_at, owner_epoch;

-- name: status_batch
-- Transitions whose status event is due, in log order (one effect's transitions are written in
-- order under its row lock, so log order is their order), each with the transitions its row
-- implies just before it (part 0 and 1; see relay.transition_log).
-- The due ids are an array so that the condition reaches each arm of the log as an index probe:
-- joined as a table, the plan hashed the whole log (every transition, effect and attempt) at
-- every poll, 32 ms at 20,000 effects and growing with the history, with nothing due.
SELECT l.transition_id, l.part, l.effect_id, e.operation_key, e.effect_type, l.from_state,
       l.to_state, l.reason, l.attempt, l.at, e.traceparent
FROM relay.transition_log l
JOIN relay.effect e ON e.id = l.effect_id
WHERE l.transition_id = ANY (ARRAY(
    SELECT t.id FROM relay.transition t
    WHERE t.status_pending
      -- Held: its events rode in a Kafka transaction whose end is not known yet.
      AND NOT EXISTS (SELECT 1 FROM relay.status_held h JOIN relay.effect e ON e.id = h.effect_id
                      WHERE h.effect_id = t.effect_id AND e.state = 'UNKNOWN'
                        AND e.attempts = 1 AND e.published_offset IS NULL)
    ORDER BY t.id LIMIT %(limit)s))
ORDER BY l.transition_id, l.part;

-- name: status_inflight
-- Recorded before the publish: which transitions go to Kafka now. Compare-and-set on the lease.
UPDATE relay.status_publisher SET inflight = %(ids)s::bigint[], inflight_at = now()
WHERE owner = %(owner)s AND owner_epoch = %(epoch)s AND lease_until > now()
RETURNING inflight_at;

-- name: status_published
-- The events of these transitions are in Kafka (committed, or found there after a crash).
WITH held AS (
    UPDATE relay.status_publisher SET inflight = '{}', inflight_at = NULL
    WHERE owner = %(owner)s AND owner_epoch = %(epoch)s
    RETURNING 1
)
UPDATE relay.transition SET status_pending = false
WHERE id = ANY(%(ids)s::bigint[]) AND status_pending AND EXISTS (SELECT 1 FROM held);

-- name: status_inflight_keys
SELECT t.id, t.effect_id, e.operation_key
FROM relay.transition t JOIN relay.effect e ON e.id = t.effect_id
WHERE t.id = ANY(%(ids)s::bigint[]);

-- name: status_backlog
SELECT count(*) FROM relay.transition WHERE status_pending;

-- name: database_identity
-- What the status publisher's transactional id is made from: the cluster's system identifier
-- (the same on its physical standbys, so a failover keeps the id) and this database's name.
SELECT s.system_identifier::text, current_database() FROM pg_control_system() s;

-- name: database_name
-- The same where pg_control_system() is not granted: the database's name alone.
SELECT '', current_database();

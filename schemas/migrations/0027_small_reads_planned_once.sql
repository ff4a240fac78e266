-- 0027: relay.promote_intake's statements keep their plans, instead of being planned at every
-- call. Live load reads a few rows at a time, and planning the read's statements for each call's
-- values was 45 % of such a read's server CPU (5 rows: 1.57 against 0.86 ms). Sequential scans
-- are off for all of the function's statements (the rest of a split pair no longer turns them
-- back on after its own read), so that a plan made while the intake was small never scans it
-- whole once it has grown, until the statistics of a table it reads change and it is made
-- again: the intake is read by its indexes. The large reads with ordering groups are still
-- planned for their values (the function sets that itself). Same signature: grants are kept.

CREATE OR REPLACE FUNCTION relay.promote_intake(
    p_limit integer, p_max_ticks integer, p_owner text DEFAULT NULL, p_epoch bigint DEFAULT NULL,
    p_lease_s double precision DEFAULT NULL, p_claim integer DEFAULT 0,
    p_max_bytes bigint DEFAULT NULL, p_status_in_txn boolean DEFAULT false)
RETURNS TABLE (id bigint, operation_key text, message_key text, effect_type text, topic text,
               payload text, business_key text, traceparent text, attempts integer,
               created_at timestamptz, ordering_group text, batch_id bigint, promoted integer,
               claimed integer, rejected integer, refused integer, tick_from bigint,
               tick_to bigint, more boolean, last_id bigint, status_in_txn boolean,
               claimed_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
-- Plans kept for the session (until the statistics of a table they read change), with no
-- sequential scan, so that a plan made while the intake was small never scans it whole once it
-- has grown; the read of the rows chooses its plan by the batch (below).
SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = on
SET enable_mergejoin = on
SET enable_bitmapscan = on
SET enable_seqscan = off
SET enable_sort = on
AS $fn$
#variable_conflict use_column
DECLARE
    v_pos     relay.intake_reader%ROWTYPE;
    v_to      bigint;
    v_read    integer;
    v_last    bigint;
    v_status  boolean;
    v_limit   integer;
    v_claim   integer := 0;
    v_batch   bigint[];
    v_grouped boolean;
    v_first   record;
    v_touched bigint[];
    v_free    bigint[];
    v_defer   bigint[] := '{}';
    v_work    bigint[];
    v_fast    boolean := false;
    v_more    boolean;
    v_first_grouped bigint;
    v_bytes   bigint;
    v_keep    integer;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 OR p_max_ticks IS NULL
       OR p_max_ticks < 1 THEN
        RAISE EXCEPTION 'a promotion reads 1 to 50000 rows over at least one tick'
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_claim, 0) > 0 THEN
        IF p_owner IS NULL OR p_epoch IS NULL OR p_lease_s IS NULL OR p_lease_s <= 0
           OR p_max_bytes IS NULL OR p_max_bytes < 1 THEN
            RAISE EXCEPTION 'a claim needs an owner, its epoch, a lease and a byte cap'
                USING ERRCODE = '22023';
        END IF;
        -- A fenced incarnation still reads (that publishes nothing) but claims nothing.
        IF EXISTS (SELECT 1 FROM relay.replica r
                   WHERE r.replica_id = p_owner AND r.epoch = p_epoch) THEN
            v_claim := p_claim;
        END IF;
    END IF;
    SELECT * INTO v_pos FROM relay.intake_reader r FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT c.status_events INTO v_status FROM relay.reconciler_config c;
    SELECT l.max_payload_bytes INTO v_limit FROM relay.limits l;

    -- The batch's ids, with the tick pair, in one statement: its snapshot is taken after tick b
    -- committed, so it sees every row tick b saw (never part of a batch). The set of rows
    -- between two stored snapshots is fixed, so the rows themselves are then read by id.
    IF v_pos.tick_to IS NULL THEN
        -- A new pair: the rows as relay/sql/intake.sql reads them (an index range for the
        -- transactions that began after tick a, exact probes for those tick a saw in progress).
        WITH pair AS MATERIALIZED (
            SELECT a.id AS tick_from, b.id AS tick_to, a.snap AS sa, b.snap AS sb
            FROM relay.tick a
            CROSS JOIN LATERAL (
                SELECT t.id, t.snap FROM relay.tick t
                WHERE t.id > a.id AND t.id <= a.id + p_max_ticks
                ORDER BY t.id DESC
                LIMIT 1
            ) b
            WHERE a.id = v_pos.tick_from
        ), candidates AS (
            -- touched: the row's xmax is set (a cancel may hold it; see below).
            -- size: the payload as stored (no detoasting), for the claim's byte cap.
            SELECT i.id, i.txid, i.ordering_group IS NOT NULL AS grouped,
                   i.xmax <> '0'::xid AS touched, pg_column_size(i.payload) AS size
            FROM relay.intake i
            WHERE i.txid >= (SELECT pg_snapshot_xmax(p.sa) FROM pair p)
              AND i.txid < (SELECT pg_snapshot_xmax(p.sb) FROM pair p)
            UNION ALL
            SELECT i.id, i.txid, i.ordering_group IS NOT NULL, i.xmax <> '0'::xid,
                   pg_column_size(i.payload)
            FROM relay.intake i
            WHERE i.txid = ANY (ARRAY(
                SELECT x FROM pair p, pg_snapshot_xip(p.sa) AS x
                WHERE pg_visible_in_snapshot(x, p.sb)))
        )
        SELECT p.tick_to, s.ids, s.grouped, s.touched, s.first_grouped, s.bytes
        INTO v_to, v_batch, v_grouped, v_touched, v_first_grouped, v_bytes
        FROM pair p
        CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(c.id ORDER BY c.id), '{}') AS ids,
                   coalesce(bool_or(c.grouped), false) AS grouped,
                   coalesce(array_agg(c.id) FILTER (WHERE c.touched), '{}') AS touched,
                   min(c.id) FILTER (WHERE c.grouped) AS first_grouped,
                   coalesce(sum(c.size), 0)::bigint AS bytes
            FROM (SELECT c.id, c.grouped, c.touched, c.size FROM candidates c
                  WHERE pg_visible_in_snapshot(c.txid, p.sb)
                    AND NOT pg_visible_in_snapshot(c.txid, p.sa)
                  ORDER BY c.id
                  LIMIT p_limit) c
        ) s;
    ELSE
        -- The rest of a split pair, in id order after the last id read: every row of the pair
        -- drew its id before tick b, so no later than the sequence's value stored with it. An
        -- index range bounded by both ends (reading the pair's candidates again at every part
        -- cost the whole pair per part: 40 parts of a 20,000-row backlog read 400,000 rows).
        -- Read in the index's order and stopped at the limit, whatever the statistics: planned
        -- for fewer rows than the pair has (a burst before the next ANALYZE), the range was read
        -- in full by a bitmap scan and sorted at every part. The function's SET clause restores
        -- these settings.
        PERFORM set_config('enable_bitmapscan', 'off', true);
        PERFORM set_config('enable_sort', 'off', true);
        SELECT b.id, s.ids, s.grouped, s.touched, s.first_grouped, s.bytes
        INTO v_to, v_batch, v_grouped, v_touched, v_first_grouped, v_bytes
        FROM relay.tick a, relay.tick b
        CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(r.id ORDER BY r.id), '{}') AS ids,
                   coalesce(bool_or(r.grouped), false) AS grouped,
                   coalesce(array_agg(r.id) FILTER (WHERE r.touched), '{}') AS touched,
                   min(r.id) FILTER (WHERE r.grouped) AS first_grouped,
                   coalesce(sum(r.size), 0)::bigint AS bytes
            FROM (SELECT i.id, i.ordering_group IS NOT NULL AS grouped,
                         i.xmax <> '0'::xid AS touched, pg_column_size(i.payload) AS size
                  FROM relay.intake i
                  WHERE i.id > v_pos.after_id AND i.id <= b.intake_seq
                    AND pg_visible_in_snapshot(i.txid, b.snap)
                    AND NOT pg_visible_in_snapshot(i.txid, a.snap)
                  ORDER BY i.id
                  LIMIT p_limit) r
        ) s
        WHERE a.id = v_pos.tick_from AND b.id = v_pos.tick_to;
        PERFORM set_config('enable_bitmapscan', 'on', true);
        PERFORM set_config('enable_sort', 'on', true);
    END IF;
    IF v_to IS NULL THEN
        RETURN;  -- no tick after tick_from yet
    END IF;
    v_read := cardinality(v_batch);
    v_more := v_read >= p_limit;
    -- Where the read ends (the rest of the pair is read next, as a pair cut at the limit is):
    -- - With ordering groups, after 500 rows: a large read writes a group's later effects
    --   behind their head, and each must then be let go by an update when the head settles
    --   (6,000 groups of 10, reads of 5,000: 1,946-2,147 effects/s and 391-416 us of PostgreSQL
    --   CPU an effect, against 3,795-3,849/s and 182-192 us in reads of 500). When more than
    --   500 ungrouped rows come first, the read ends before the first grouped one instead: one
    --   clean batch.
    -- - When claiming, where the rows before a row hold the claim's byte cap (as stored): the
    --   rows past it would be written to the pool as effect rows, claimed and marked one by one
    --   (a read of 5,000 passes 16 MiB from about 3.4 KB a payload).
    -- An ungrouped read under the cap takes the whole limit (one Kafka transaction: larger
    -- ones drain faster).
    v_keep := v_read;
    IF v_first_grouped IS NOT NULL THEN
        v_keep := array_position(v_batch, v_first_grouped) - 1;
        IF v_keep <= 500 THEN
            v_keep := least(v_read, 500);
        END IF;
    END IF;
    IF v_claim > 0 AND v_bytes >= p_max_bytes AND v_keep > 1 THEN
        SELECT greatest(1, count(*)) INTO v_keep
        FROM (SELECT sum(pg_column_size(i.payload)) OVER (ORDER BY x.n)
                     - pg_column_size(i.payload) AS before
              FROM unnest(v_batch[1:v_keep]) WITH ORDINALITY AS x(id, n)
              JOIN relay.intake i ON i.id = x.id) w
        WHERE w.before < p_max_bytes;
    END IF;
    IF v_keep < v_read THEN
        v_batch := v_batch[1:v_keep];
        v_read := v_keep;
        v_more := true;
        v_touched := ARRAY(SELECT x FROM unnest(v_touched) AS x WHERE x <= v_batch[v_keep]);
        v_grouped := coalesce(v_first_grouped <= v_batch[v_keep], false);
    END IF;
    v_last := v_batch[v_read];
    -- A cancel locks its intent's row while it decides, to the end of its caller's transaction
    -- (relay.cancel): such a row is passed by for now, with the later ones of its group, and
    -- read again at every read until it is free (intake_reader.deferred), so that a cancel
    -- left open holds back its own intent only. Rows never locked (xmax unset, read for free
    -- with the ids) skip all of this; the others are locked for this read, or found held.
    v_work := v_batch;
    v_touched := v_touched || v_pos.deferred;
    IF cardinality(v_touched) > 0 THEN
        v_work := ARRAY(SELECT DISTINCT x FROM unnest(v_batch || v_pos.deferred) AS x ORDER BY x);
        v_free := ARRAY(SELECT i.id FROM relay.intake i WHERE i.id = ANY (v_touched)
                        FOR KEY SHARE SKIP LOCKED);
        v_defer := ARRAY(
            SELECT w.id FROM unnest(v_work) AS w(id)
            JOIN relay.intake i ON i.id = w.id
            WHERE (w.id = ANY (v_touched) AND NOT w.id = ANY (v_free))
               OR (i.ordering_group IS NOT NULL AND EXISTS (
                       SELECT 1 FROM relay.intake l
                       WHERE l.id = ANY (v_touched) AND NOT l.id = ANY (v_free)
                         AND l.ordering_group = i.ordering_group AND l.id < i.id))
            ORDER BY w.id);
        IF cardinality(v_defer) > 0 THEN
            v_work := ARRAY(SELECT x FROM unnest(v_work) AS x
                            WHERE NOT x = ANY (v_defer) ORDER BY x);
        END IF;
        v_grouped := v_grouped OR EXISTS (SELECT 1 FROM relay.intake i
                                          WHERE i.id = ANY (v_work)
                                            AND i.ordering_group IS NOT NULL);
    END IF;
    -- The plan of the read below, by its size and its groups. A custom plan costs about 2.5 ms to
    -- make at every call (5 us an effect of a batch of 500), most of a small read's cost (the
    -- live load: 5 rows, 3.1 ms in all against 0.6 ms with the generic plan). The generic plan
    -- probes by index for every row, as fast per row as the custom one at any size when no row
    -- has a group (500 rows: 7.5 against 10.5 ms, 2,000: 28 against 30); with groups it loops
    -- over the group rules for every row (2,000 grouped rows: 290 against 60-77 ms), so a large
    -- read with a grouped row is planned for its values. The function's SET clause restores the
    -- setting when it returns.
    --
    -- The generic plan is made once a session, with the statistics of that moment: made while
    -- the intake was small, it hashed the whole intake at every read once a backlog had come in
    -- before the next ANALYZE (a relay started on an empty outbox, then a burst). Made without
    -- hash or merge joins, every row of the batch is looked up by id whatever the statistics
    -- said (a LATERAL lookup per row instead cost 4 us a row more). The function's SET clause
    -- restores these settings too.
    IF v_read < 200 OR NOT v_grouped THEN
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
        PERFORM set_config('enable_hashjoin', 'off', true);
        PERFORM set_config('enable_mergejoin', 'off', true);
    ELSE
        PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
    END IF;

    -- The common case in one pass (a drain's every batch): nothing read was ever locked or
    -- deferred, no row has a group, and the claim can take them all. Then if every row is due
    -- and passes every check below (those of the full statement that follows, in the same
    -- order), one batch row claims them all and they are returned; nothing else is written.
    -- Otherwise this returns no row, writes nothing, and the full statement decides row by
    -- row. The full statement's stages (set aside, checked, the claim's window, the effect
    -- rows) cost about 6 us a row more than this one (a read of 500 rows, 256-byte payloads:
    -- 20.5 against 14.5 us of the backend's CPU a row).
    IF NOT v_grouped AND cardinality(v_touched) = 0 AND v_claim >= v_read AND v_read > 0 THEN
        RETURN QUERY
        WITH rows AS MATERIALIZED (
            SELECT r.id, r.operation_key, r.effect_type::text AS effect_type, r.payload,
                   r.business_key, r.traceparent, r.enqueued_at,
                   t.topic AS type_topic, t.business_key AS template,
                   v_status AND p_status_in_txn AND t.name IS NOT NULL AND t.result_topic IS NULL
                       AS status_in_txn,
                   pg_column_size(r.payload) AS size,
                   greatest(coalesce(r.available_at, r.enqueued_at), r.enqueued_at) <= now()
                   AND length(r.operation_key) BETWEEN 1 AND 512
                   -- No effect row holds its key, nor its id (a cancel's).
                   AND NOT EXISTS (SELECT 1 FROM relay.effect e
                                   WHERE e.operation_key = r.operation_key)
                   AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = r.id)
                   AND NOT EXISTS (SELECT 1 FROM relay.purged_key k
                                   WHERE k.operation_key = r.operation_key)
                   AND relay.intake_refusal(r.operation_key, r.effect_type::text, r.payload,
                                            r.business_key, r.traceparent, r.available_at,
                                            r.ordering_group, t.topic, v_limit) IS NULL
                   AND (t.business_key IS NULL
                        OR relay.business_key_refusal(r.effect_type::text, t.business_key,
                                                      r.payload, r.operation_key,
                                                      r.business_key) IS NULL) AS clean
            FROM unnest(v_work) AS x(id)
            JOIN relay.intake r ON r.id = x.id
            LEFT JOIN relay.effect_type t ON t.name = r.effect_type::text
        ), batched AS (
            -- The claim's byte cap, as the window below applies it: a row is claimed when the
            -- rows before it hold less than p_max_bytes, so all are when all but the last do.
            INSERT INTO relay.dispatch_batch AS d (owner, owner_epoch, lease_until, ids,
                                                   status_ids)
            SELECT p_owner, p_epoch, now() + make_interval(secs => p_lease_s),
                   array_agg(k.id ORDER BY k.id),
                   coalesce(array_agg(k.id ORDER BY k.id) FILTER (WHERE k.status_in_txn), '{}')
            FROM rows k
            HAVING bool_and(k.clean)
               AND sum(k.size) - (array_agg(k.size ORDER BY k.id DESC))[1] < p_max_bytes
            RETURNING d.id
        )
        SELECT c.id, c.operation_key, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
               c.payload::text,
               CASE WHEN c.business_key IS NOT NULL THEN c.business_key
                    WHEN c.template IS NOT NULL
                        THEN relay.business_key(c.template, c.payload, c.operation_key) END,
               c.traceparent, 1, c.enqueued_at, NULL::text, d.id, NULL::integer, NULL::integer,
               NULL::integer, NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean,
               NULL::bigint, c.status_in_txn, now()
        FROM batched d CROSS JOIN rows c
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, v_read,
               0, 0, v_pos.tick_from, v_to, v_more, v_last, NULL::boolean,
               NULL::timestamptz
        FROM batched d
        ORDER BY 1 NULLS LAST;
        v_fast := FOUND;
    END IF;

    IF NOT v_fast THEN
        RETURN QUERY
        WITH batch AS MATERIALIZED (
            SELECT r.id, r.operation_key, r.effect_type::text AS effect_type, r.payload,
                   r.business_key, r.traceparent, r.available_at, r.ordering_group, r.enqueued_by,
                   r.enqueued_at
            -- Joined to the ids, not filtered by = ANY: the planner estimates an ANY over an array
            -- constant element by element (about 1 ms of planning at every call for 500 ids).
            FROM unnest(v_work) AS x(id)
            JOIN relay.intake r ON r.id = x.id
        ), taken AS MATERIALIZED (
            -- A key already naming another effect (a key the relay reserves, written by hand, or an
            -- effect from before the intake), or one no effect row can hold: set aside, never
            -- published, never a second effect.
            SELECT b.id, format('operation key %s already names effect %s',
                                quote_literal(b.operation_key), e.id) AS why
            FROM batch b
            -- A probe of the unique key per row (a join the planner may hash reads every effect).
            CROSS JOIN LATERAL (
                SELECT e.id FROM relay.effect e
                WHERE e.operation_key = b.operation_key AND e.id <> b.id
                LIMIT 1
            ) e
            UNION ALL
            SELECT b.id, format('operation key of %s characters (1 to 512 allowed)',
                                length(b.operation_key))
            FROM batch b
            WHERE length(b.operation_key) NOT BETWEEN 1 AND 512
        ), set_aside AS (
            INSERT INTO relay.intake_refused (id, operation_key, effect_type, enqueued_by, reason)
            SELECT b.id, left(b.operation_key, 512), b.effect_type, b.enqueued_by, x.why
            FROM batch b JOIN taken x ON x.id = b.id
            ON CONFLICT ON CONSTRAINT intake_refused_pkey DO NOTHING
            RETURNING 1
        ), checked AS MATERIALIZED (
            -- Each row's checks once (a lateral expression referenced in several places is copied
            -- into each of them by the planner: the checks ran seven times a row).
            SELECT b.*, t.topic AS type_topic, t.business_key AS template,
                   coalesce(t.key_by_group, false) AS key_by_group,
                   -- Its status events may ride in its batch's Kafka transaction (status_ids).
                   v_status AND p_status_in_txn AND t.name IS NOT NULL AND t.result_topic IS NULL
                       AS status_in_txn,
                   greatest(coalesce(b.available_at, b.enqueued_at), b.enqueued_at) AS due_at,
                   coalesce(
                       (SELECT format('operation key %s named effect %s (type %s, %s), purged at %s: not used again within the dedupe window',
                                      quote_literal(k.operation_key), k.effect_id,
                                      quote_literal(k.effect_type), k.final_state, k.purged_at)
                        FROM relay.purged_key k WHERE k.operation_key = b.operation_key),
                       relay.intake_refusal(b.operation_key, b.effect_type, b.payload,
                                            b.business_key, b.traceparent, b.available_at,
                                            b.ordering_group, t.topic, v_limit),
                       CASE WHEN t.business_key IS NOT NULL
                            THEN relay.business_key_refusal(b.effect_type, t.business_key,
                                                            b.payload, b.operation_key,
                                                            b.business_key) END) AS why,
                   -- Written already: by a cancel before this read (the reader skips it).
                   EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = b.id) AS written
            FROM batch b
            LEFT JOIN relay.effect_type t ON t.name = b.effect_type
            WHERE NOT EXISTS (SELECT 1 FROM taken x WHERE x.id = b.id)
        ), firsts AS MATERIALIZED (
            -- The first effect of each group written here (an effect row already there, written by
            -- a cancel before this read, is not written again) and the group's effect before it.
            SELECT f.id, f.ordering_group,
                   (SELECT p.id FROM relay.effect p
                    WHERE p.ordering_group = f.ordering_group AND p.id < f.id
                      AND p.state <> 'CANCELLED'
                    ORDER BY p.id DESC LIMIT 1) AS prev_id
            FROM (SELECT DISTINCT ON (c.ordering_group) c.id, c.ordering_group
                  FROM checked c
                  WHERE c.why IS NULL AND c.ordering_group IS NOT NULL AND NOT c.written
                  ORDER BY c.ordering_group, c.id) f
        ), held AS MATERIALIZED (
            -- Those effects before, locked FOR SHARE (never waiting: one locked by a change in flight
            -- is skipped, and the effect after it is then not held back; see
            -- relay.release_next_in_group for why a wrong "not behind" is harmless and a wrong
            -- "behind" is not). Locked and unsettled: it cannot settle before this transaction
            -- commits, and its settling then lets the effect written here go. With the first
            -- effect after it (joined here, by an index probe each, not later to firsts).
            SELECT p.id, f.id AS first_id
            FROM firsts f
            JOIN relay.effect p ON p.id = f.prev_id
            WHERE p.state <> 'CANCELLED'
              AND NOT relay.lets_group_go(p.state, p.effect_type, p.group_released_at)
            FOR SHARE OF p SKIP LOCKED
        ), claims AS MATERIALIZED (
            -- What claim_batch would take of these at once, by its rules: due, and ungrouped or the
            -- first of its group here with the effect before it settled (settled never comes undone,
            -- so this snapshot's word is final); capped by count and by bytes. With the columns the
            -- batch's rows are returned with (joined back to checked, the estimates of these CTEs
            -- made the planner loop over one for each row of the other: 450 ms for 2,000).
            SELECT d.id, d.operation_key, d.effect_type, d.type_topic, d.payload, d.business_key,
                   d.template, d.traceparent, d.enqueued_at, d.ordering_group, d.status_in_txn
            FROM (
                SELECT c.id, c.operation_key, c.effect_type, c.type_topic, c.payload,
                       c.business_key, c.template, c.traceparent, c.enqueued_at, c.ordering_group,
                       c.status_in_txn,
                       pg_column_size(c.payload) AS size,
                       sum(pg_column_size(c.payload)) OVER (ORDER BY c.id) AS running,
                       row_number() OVER (ORDER BY c.id) AS n
                FROM checked c
                WHERE v_claim > 0 AND c.why IS NULL AND NOT c.written AND c.due_at <= now()
                  -- Uncorrelated IN (hashed once), not EXISTS per row: the planner took firsts for a
                  -- few rows and scanned it for every row read (2,000 groups in a read of 2,000:
                  -- 146 us an effect).
                  AND (c.ordering_group IS NULL OR c.id IN (
                      SELECT f.id FROM firsts f
                      LEFT JOIN relay.effect p ON p.id = f.prev_id
                      WHERE f.prev_id IS NULL
                         OR relay.lets_group_go(p.state, p.effect_type, p.group_released_at)))
            ) d
            WHERE d.n <= v_claim AND d.running - d.size < p_max_bytes
        ), batched AS (
            -- The claimed ungrouped rows: one batch row is their claim, committed before any
            -- publish. Their effect rows are written once, with their outcome (mark_batch_outcomes
            -- in relay/sql/dispatch.sql; expire_batches if the lease runs out). Grouped ones are
            -- written DISPATCHING below: the group rules read the effect before in relay.effect.
            -- With status events on and a transactional caller, the status events of an intent
            -- whose type awaits no result ride in the batch's Kafka transaction (status_ids).
            INSERT INTO relay.dispatch_batch AS d (owner, owner_epoch, lease_until, ids, status_ids)
            SELECT p_owner, p_epoch, now() + make_interval(secs => p_lease_s),
                   array_agg(k.id ORDER BY k.id),
                   coalesce(array_agg(k.id ORDER BY k.id) FILTER (WHERE k.status_in_txn), '{}')
            FROM claims k
            WHERE k.ordering_group IS NULL
            HAVING count(*) > 0
            RETURNING d.id, d.ids
        ), made AS (
            INSERT INTO relay.effect AS e (id, operation_key, effect_type, topic, payload,
                                           business_key, traceparent, available_at, created_at,
                                           updated_at, ordering_group, message_key, enqueued_by,
                                           state, reason, attempts, owner, owner_epoch, lease_until,
                                           claimed_at, behind_head)
            -- A refused row keeps its payload only as bounded text (it may be no object, or
            -- nest deeper than anything that reads effects should decode), and no group.
            SELECT c.id, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
                   CASE WHEN c.why IS NULL THEN c.payload
                        ELSE jsonb_build_object('refused_payload', left(c.payload::text, 4096)) END,
                   CASE WHEN c.why IS NOT NULL THEN NULL
                        WHEN c.business_key IS NOT NULL THEN c.business_key
                        WHEN c.template IS NOT NULL
                            THEN relay.business_key(c.template, c.payload, c.operation_key) END,
                   CASE WHEN c.why IS NULL THEN c.traceparent END,
                   CASE WHEN c.why IS NULL THEN c.due_at ELSE c.enqueued_at END,
                   c.enqueued_at, now(), CASE WHEN c.why IS NULL THEN c.ordering_group END,
                   CASE WHEN c.key_by_group AND c.why IS NULL THEN c.ordering_group END,
                   c.enqueued_by,
                   CASE WHEN c.why IS NOT NULL THEN 'REJECTED'
                        WHEN k.id IS NOT NULL THEN 'DISPATCHING' ELSE 'PENDING' END,
                   CASE WHEN c.why IS NOT NULL THEN 'refused when read: ' || c.why END,
                   CASE WHEN k.id IS NOT NULL THEN 1 ELSE 0 END,
                   CASE WHEN k.id IS NOT NULL THEN p_owner END,
                   CASE WHEN k.id IS NOT NULL THEN p_epoch END,
                   CASE WHEN k.id IS NOT NULL THEN now() + make_interval(secs => p_lease_s) END,
                   CASE WHEN k.id IS NOT NULL THEN now() END,
                   -- Behind its group's head: a grouped effect after another one written here, or
                   -- the first one here when the effect before it is held unsettled.
                   c.why IS NULL AND c.ordering_group IS NOT NULL
                   AND (c.id NOT IN (SELECT f.id FROM firsts f)
                        OR c.id IN (SELECT h.first_id FROM held h))
            -- Only grouped rows need to know whether they were claimed; the ungrouped claimed ones
            -- are the batch's (a join of every row to the claims was sorted and merged: 1 ms of 500).
            FROM checked c
            LEFT JOIN claims k ON k.id = c.id AND c.ordering_group IS NOT NULL
            WHERE c.ordering_group IS NOT NULL OR c.id NOT IN (SELECT b.id FROM claims b)
            ORDER BY c.id
            ON CONFLICT DO NOTHING
            RETURNING e.id, e.state, e.reason, e.created_at, e.operation_key, e.message_key,
                      e.effect_type, e.topic, e.payload, e.business_key, e.traceparent, e.attempts,
                      e.ordering_group
        ), noted AS (
            -- A refused intent's story: enqueued, then REJECTED (the happy path's transitions are
            -- implied, as before).
            INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                          at, status_pending)
            SELECT m.id, s.from_state, s.to_state, s.reason, s.actor, 0, s.at, v_status
            FROM made m
            CROSS JOIN LATERAL (VALUES (NULL, 'PENDING', 'enqueued', 'application', m.created_at),
                                       ('PENDING', 'REJECTED', m.reason, 'relay', now()))
                AS s(from_state, to_state, reason, actor, at)
            WHERE m.state = 'REJECTED'
        )
        -- The claimed rows as claim_batch returns them (those of the batch with its id), then the
        -- summary (id NULL).
        SELECT m.id, m.operation_key, coalesce(m.message_key, m.operation_key), m.effect_type,
               m.topic, m.payload::text, m.business_key, m.traceparent, m.attempts, m.created_at,
               m.ordering_group, NULL::bigint, NULL::integer, NULL::integer, NULL::integer,
               NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint, false, now()
        FROM made m
        WHERE m.state = 'DISPATCHING'
        UNION ALL
        SELECT c.id, c.operation_key, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
               c.payload::text,
               CASE WHEN c.business_key IS NOT NULL THEN c.business_key
                    WHEN c.template IS NOT NULL
                        THEN relay.business_key(c.template, c.payload, c.operation_key) END,
               c.traceparent, 1, c.enqueued_at, NULL::text, d.id, NULL::integer, NULL::integer,
               NULL::integer, NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint,
               c.status_in_txn, now()
        FROM claims c CROSS JOIN batched d
        WHERE c.ordering_group IS NULL
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               (SELECT count(*) FILTER (WHERE m.state = 'PENDING') FROM made m)::integer,
               ((SELECT count(*) FILTER (WHERE m.state = 'DISPATCHING') FROM made m)
                + coalesce((SELECT sum(cardinality(d.ids)) FROM batched d), 0))::integer,
               (SELECT count(*) FILTER (WHERE m.state = 'REJECTED') FROM made m)::integer,
               (SELECT count(*) FROM set_aside)::integer,
               v_pos.tick_from, v_to, v_more, v_last, NULL::boolean, NULL::timestamptz
        ORDER BY 1 NULLS LAST;
    END IF;

    -- An effect of the batch a cancel wrote first (an intent cancelled before this read): the
    -- effect after it in its group may have been written behind it above; let it go if the one
    -- before lets it (rare: relay.release_next_in_group never waits on a lock).
    -- (Over the batch's id span, a superset of its ids: release_next_in_group is idempotent, and
    -- the span costs the planner nothing, where = ANY (v_batch) cost 1 ms a call.)
    FOR v_first IN
        SELECT e.ordering_group, e.id FROM relay.effect e
        WHERE e.id BETWEEN v_work[1] AND v_work[cardinality(v_work)] AND e.state = 'CANCELLED'
          AND e.ordering_group IS NOT NULL
        ORDER BY e.id
    LOOP
        PERFORM relay.release_next_in_group(v_first.ordering_group, v_first.id);
    END LOOP;

    -- The reader's position, after the rows it passes are written.
    IF v_more THEN
        UPDATE relay.intake_reader
        SET tick_to = v_to, after_id = v_last, read_at = now(),
            promoted = relay.intake_reader.promoted + v_read, deferred = v_defer;
    ELSE
        UPDATE relay.intake_reader
        SET tick_from = v_to, tick_to = NULL, after_id = 0, read_at = now(),
            promoted = relay.intake_reader.promoted + v_read, deferred = v_defer;
        -- Ticks before the one the reader stands on are needed by no one (tick 0 stays).
        IF v_to % 64 = 0 THEN
            DELETE FROM relay.tick t WHERE t.id > 0 AND t.id < v_to;
        END IF;
    END IF;
END
$fn$;

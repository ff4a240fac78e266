-- 0012: the relay claims what it reads (issue 19, docs/design/intake.md, the bridge's drain).
--
-- relay.promote_intake takes an owner: the due, ungrouped rows of the batch it reads are written
-- already claimed (DISPATCHING, attempt 1, the owner's lease), as claim_batch would have claimed
-- them a moment later, and returned to the caller. An effect row on the happy path is now written
-- by one INSERT and one UPDATE (its outcome), not an INSERT and two UPDATEs. Rows that are grouped
-- or not due yet are written PENDING as before, for claim_batch and its group check.
--
-- The checks of a row run once: as a lateral expression referenced by seven columns, they were
-- copied into each (measured: relay.intake_refusal called seven times a row, and the purged-key
-- probe with it), and the refusal check is inlined (no SET clause: a call cost 7 us a row).
--
-- The later parts of a split pair (a backlog bigger than one read) are an id range, from the last
-- id read up to the sequence's value stored with tick b: reading the pair's candidates again for
-- every part cost the whole pair per part.

-- Whoever could execute the old function can execute the new one (the relay role of an install
-- whose roles were applied), so an upgrade needs no second `relay roles --apply`.
CREATE TEMPORARY TABLE promote_intake_grantees ON COMMIT DROP AS
SELECT a.grantee::regrole::text AS grantee
FROM pg_proc p, aclexplode(p.proacl) a
WHERE p.oid = 'relay.promote_intake(integer, integer)'::regprocedure
  AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;

DROP FUNCTION relay.promote_intake(integer, integer);

-- The relay's read of the intake: the next batch between two ticks (relay/sql/intake.sql's
-- read_intake_batch, the same statement), written as effect rows in one INSERT, and the reader's
-- position moved, in the caller's transaction. Returns nothing when another replica is reading.
-- With an owner and p_claim > 0, due ungrouped rows (up to p_claim rows and p_max_bytes of
-- payload, at least one) are written already claimed by that owner (DISPATCHING, attempt 1, a
-- lease), as relay/sql/dispatch.sql's claim_batch would claim them, and returned first: the happy
-- path writes its effect row once, not once and again at the claim. Then one summary row (id
-- NULL) with the counts and the position.
CREATE FUNCTION relay.promote_intake(
    p_limit integer, p_max_ticks integer, p_owner text DEFAULT NULL, p_epoch bigint DEFAULT NULL,
    p_lease_s double precision DEFAULT NULL, p_claim integer DEFAULT 0,
    p_max_bytes bigint DEFAULT NULL)
RETURNS TABLE (id bigint, operation_key text, message_key text, effect_type text, topic text,
               payload text, business_key text, traceparent text, attempts integer,
               created_at timestamptz, ordering_group text, promoted integer, claimed integer,
               rejected integer, refused integer, tick_from bigint, tick_to bigint,
               more boolean, last_id bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
-- Planned for each call's values: a generic plan of the read (chosen while the tables were small)
-- cost twice as much per row as the custom one, and planning costs about 1 ms a call.
SET plan_cache_mode = force_custom_plan
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
            SELECT i.id, i.txid FROM relay.intake i
            WHERE i.txid >= (SELECT pg_snapshot_xmax(p.sa) FROM pair p)
              AND i.txid < (SELECT pg_snapshot_xmax(p.sb) FROM pair p)
            UNION ALL
            SELECT i.id, i.txid FROM relay.intake i
            WHERE i.txid = ANY (ARRAY(
                SELECT x FROM pair p, pg_snapshot_xip(p.sa) AS x
                WHERE pg_visible_in_snapshot(x, p.sb)))
        )
        SELECT p.tick_to, ARRAY(
            SELECT c.id FROM candidates c
            WHERE pg_visible_in_snapshot(c.txid, p.sb) AND NOT pg_visible_in_snapshot(c.txid, p.sa)
            ORDER BY c.id
            LIMIT p_limit)
        INTO v_to, v_batch
        FROM pair p;
    ELSE
        -- The rest of a split pair, in id order after the last id read: every row of the pair
        -- drew its id before tick b, so no later than the sequence's value stored with it. An
        -- index range bounded by both ends (reading the pair's candidates again at every part
        -- cost the whole pair per part: 40 parts of a 20,000-row backlog read 400,000 rows).
        SELECT b.id, ARRAY(
            SELECT i.id FROM relay.intake i
            WHERE i.id > v_pos.after_id AND i.id <= b.intake_seq
              AND pg_visible_in_snapshot(i.txid, b.snap)
              AND NOT pg_visible_in_snapshot(i.txid, a.snap)
            ORDER BY i.id
            LIMIT p_limit)
        INTO v_to, v_batch
        FROM relay.tick a, relay.tick b
        WHERE a.id = v_pos.tick_from AND b.id = v_pos.tick_to;
    END IF;
    IF v_to IS NULL THEN
        RETURN;  -- no tick after tick_from yet
    END IF;
    v_read := cardinality(v_batch);
    v_last := v_batch[v_read];

    RETURN QUERY
    WITH batch AS MATERIALIZED (
        SELECT r.id, r.operation_key, r.effect_type::text AS effect_type, r.payload,
               r.business_key, r.traceparent, r.available_at, r.ordering_group, r.enqueued_by,
               r.enqueued_at
        FROM relay.intake r
        WHERE r.id = ANY (v_batch)
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
               greatest(coalesce(b.available_at, b.enqueued_at), b.enqueued_at) AS due_at,
               coalesce(
                   (SELECT format('operation key %s named effect %s (type %s, %s), purged at %s: not used again within the dedupe window',
                                  quote_literal(k.operation_key), k.effect_id,
                                  quote_literal(k.effect_type), k.final_state, k.purged_at)
                    FROM relay.purged_key k WHERE k.operation_key = b.operation_key),
                   relay.intake_refusal(b.operation_key, b.effect_type, b.payload,
                                        b.business_key, b.traceparent, b.available_at,
                                        b.ordering_group, t.topic, v_limit)) AS why
        FROM batch b
        LEFT JOIN relay.effect_type t ON t.name = b.effect_type
        WHERE NOT EXISTS (SELECT 1 FROM taken x WHERE x.id = b.id)
    ), claims AS MATERIALIZED (
        -- What claim_batch would take of these at once: due, ungrouped (a grouped one waits for
        -- the claim's check of its group), capped by count and by bytes.
        SELECT d.id FROM (
            SELECT c.id, pg_column_size(c.payload) AS size,
                   sum(pg_column_size(c.payload)) OVER (ORDER BY c.id) AS running,
                   row_number() OVER (ORDER BY c.id) AS n
            FROM checked c
            WHERE v_claim > 0 AND c.why IS NULL AND c.ordering_group IS NULL
              AND c.due_at <= now()
        ) d
        WHERE d.n <= v_claim AND d.running - d.size < p_max_bytes
    ), made AS (
        INSERT INTO relay.effect AS e (id, operation_key, effect_type, topic, payload,
                                       business_key, traceparent, available_at, created_at,
                                       updated_at, ordering_group, message_key, enqueued_by,
                                       state, reason, attempts, owner, owner_epoch, lease_until,
                                       claimed_at)
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
               CASE WHEN k.id IS NOT NULL THEN now() END
        FROM checked c
        LEFT JOIN claims k ON k.id = c.id
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
    -- The claimed rows as claim_batch returns them, then the summary (id NULL).
    SELECT m.id, m.operation_key, coalesce(m.message_key, m.operation_key), m.effect_type,
           m.topic, m.payload::text, m.business_key, m.traceparent, m.attempts, m.created_at,
           m.ordering_group, NULL::integer, NULL::integer, NULL::integer, NULL::integer,
           NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint
    FROM made m
    WHERE m.state = 'DISPATCHING'
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT count(*) FILTER (WHERE m.state = 'PENDING') FROM made m)::integer,
           (SELECT count(*) FILTER (WHERE m.state = 'DISPATCHING') FROM made m)::integer,
           (SELECT count(*) FILTER (WHERE m.state = 'REJECTED') FROM made m)::integer,
           (SELECT count(*) FROM set_aside)::integer,
           v_pos.tick_from, v_to, v_read >= p_limit, v_last
    ORDER BY 1 NULLS LAST;

    -- The reader's position, after the rows it passes are written.
    IF v_read >= p_limit THEN
        UPDATE relay.intake_reader
        SET tick_to = v_to, after_id = v_last, read_at = now(),
            promoted = relay.intake_reader.promoted + v_read;
    ELSE
        UPDATE relay.intake_reader
        SET tick_from = v_to, tick_to = NULL, after_id = 0, read_at = now(),
            promoted = relay.intake_reader.promoted + v_read;
        -- Ticks before the one the reader stands on are needed by no one (tick 0 stays).
        IF v_to % 64 = 0 THEN
            DELETE FROM relay.tick t WHERE t.id > 0 AND t.id < v_to;
        END IF;
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION relay.promote_intake(integer, integer, text, bigint, double precision,
                                            integer, bigint) FROM PUBLIC;

-- The checks the intake does not make, as one expression per row: NULL when the row is fine,
-- else why it is refused. Shared by promote_intake; the same limits relay.enqueue applies.
-- Inlined into the reader's statement (a call cost 7 us a row): no SET clause (it runs with its
-- caller's search_path, and every caller is a function that sets its own), and STABLE, not
-- IMMUTABLE (format() of a time is stable; an IMMUTABLE body with a stable call is not inlined).
CREATE OR REPLACE FUNCTION relay.intake_refusal(
    p_operation_key text, p_effect_type text, p_payload jsonb, p_business_key text,
    p_traceparent text, p_available_at timestamptz, p_ordering_group text, p_topic text,
    p_max_payload_bytes integer
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT CASE
    WHEN length(p_operation_key) NOT BETWEEN 1 AND 512
        THEN 'operation key must be 1 to 512 characters'
    WHEN strpos(p_operation_key, '#compensation') > 0
         AND p_operation_key ~ '#compensation(-[0-9]+)?$'
        THEN 'operation key is reserved for the relay''s own compensations'
    WHEN p_topic IS NULL
        THEN format('effect type %s is not declared', quote_literal(p_effect_type))
    WHEN jsonb_typeof(p_payload) <> 'object' THEN 'payload must be a JSON object'
    WHEN jsonb_path_exists(p_payload,
                           'strict $.**{100} ? (@.type() == "object" || @.type() == "array")')
        THEN 'payload nests deeper than 100 levels'
    WHEN pg_column_size(p_payload) * 6 > p_max_payload_bytes
         AND octet_length(p_payload::text) > p_max_payload_bytes
        THEN format('payload is %s bytes of JSON, more than max_payload_bytes (%s)',
                    octet_length(p_payload::text), p_max_payload_bytes)
    WHEN p_business_key IS NOT NULL AND length(p_business_key) NOT BETWEEN 1 AND 512
        THEN 'business key must be 1 to 512 characters'
    WHEN p_available_at IS NOT NULL AND NOT isfinite(p_available_at)
        THEN format('available_at must be a finite time, not %s', p_available_at)
    WHEN p_traceparent IS NOT NULL
         AND p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        THEN 'traceparent is not a W3C traceparent'
    WHEN p_ordering_group IS NOT NULL AND length(p_ordering_group) NOT BETWEEN 1 AND 512
        THEN 'ordering group must be 1 to 512 characters'
END
$fn$;

DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT grantee FROM promote_intake_grantees LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION relay.promote_intake(integer, integer, text, '
                       'bigint, double precision, integer, bigint) TO %s', r.grantee);
    END LOOP;
END
$do$;

-- 0012: the relay claims what it reads (issue 19, docs/design/intake.md, the bridge's drain), and
-- a claim reads only the heads of ordering groups (issue 18, item 7).
--
-- relay.promote_intake takes an owner: the due rows of the batch it reads that claim_batch would
-- claim at once (ungrouped, or the first of its group there with the effect before it settled)
-- are written already claimed (DISPATCHING, attempt 1, the owner's lease) and returned to the
-- caller. An effect row on the happy path is now written by one INSERT and one UPDATE (its
-- outcome), not an INSERT and two UPDATEs. The other rows (behind their group's head, not due yet)
-- are written PENDING as before, for claim_batch and its group check.
--
-- The checks of a row run once: as a lateral expression referenced by seven columns, they were
-- copied into each (measured: relay.intake_refusal called seven times a row, and the purged-key
-- probe with it), and the refusal check is inlined (no SET clause: a call cost 7 us a row).
--
-- The later parts of a split pair (a backlog bigger than one read) are an id range, from the last
-- id read up to the sequence's value stored with tick b: reading the pair's candidates again for
-- every part cost the whole pair per part.

-- Issue 18, item 7: a claim reads only what it may claim. A grouped effect written behind an
-- unsettled one waits outside the claim's index (behind_head) until the effect before it lets it
-- go; effects planted behind a head that never becomes due cost a claim nothing.
ALTER TABLE relay.effect ADD COLUMN behind_head boolean NOT NULL DEFAULT false;

-- Whether an effect lets the next one of its group go (claim_batch's rule, in one place): settled
-- (CONFIRMED, or PUBLISHED by a type that awaits no result) or released by an operator.
-- Cancelled effects are skipped by the callers, not judged here. (Not inlined: its sub-select
-- keeps the planner from it; about 2.6 us a call.)
CREATE FUNCTION relay.lets_group_go(p_state text, p_effect_type text,
                                    p_released_at timestamptz)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT p_released_at IS NOT NULL OR p_state = 'CONFIRMED'
       OR (p_state = 'PUBLISHED' AND NOT EXISTS (
               SELECT 1 FROM relay.effect_type t
               WHERE t.name = p_effect_type AND t.result_topic IS NOT NULL))
$fn$;

-- The first effect after p_after in its group (cancelled ones aside) stops waiting behind the
-- head when the one before it lets it go, or when that cannot be known without waiting. Called
-- by a trigger when an effect of the group settles, is cancelled or released, and by the reader
-- for the first effect of each group it writes. Idempotent; never waits on a lock.
--
-- behind_head is a hint that keeps an effect out of the claim's index; the claim still checks
-- the group itself. So a wrong false costs only a look at the effect per claim, while a wrong
-- true would stall the group: it is set true only under a FOR SHARE lock on the effect before,
-- seen unsettled. That effect cannot settle before this transaction commits, and the trigger of
-- its settling, run after, finds the waiting effect and lets it go. If the effect before is
-- locked by a change in flight (SKIP LOCKED), the answer is false.
CREATE FUNCTION relay.release_next_in_group(p_group text, p_after bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_next bigint;
    v_prev bigint;
    v_row  relay.effect%ROWTYPE;
BEGIN
    SELECT w.id INTO v_next FROM relay.effect w
    WHERE w.ordering_group = p_group AND w.id > p_after AND w.state <> 'CANCELLED'
    ORDER BY w.id LIMIT 1;
    IF v_next IS NULL THEN
        RETURN;
    END IF;
    SELECT p.id INTO v_prev FROM relay.effect p
    WHERE p.ordering_group = p_group AND p.id < v_next AND p.state <> 'CANCELLED'
    ORDER BY p.id DESC LIMIT 1;
    IF v_prev IS NOT NULL THEN
        SELECT p.* INTO v_row FROM relay.effect p WHERE p.id = v_prev FOR SHARE SKIP LOCKED;
        IF v_row.id IS NOT NULL AND v_row.state <> 'CANCELLED'
           AND NOT relay.lets_group_go(v_row.state, v_row.effect_type, v_row.group_released_at)
        THEN
            RETURN;  -- still the head, unsettled, and locked until this transaction ends
        END IF;
    END IF;
    UPDATE relay.effect SET behind_head = false WHERE id = v_next AND behind_head;
END
$fn$;
REVOKE ALL ON FUNCTION relay.release_next_in_group(text, bigint) FROM PUBLIC;

CREATE FUNCTION relay.effect_group_moved() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM relay.release_next_in_group(NEW.ordering_group, NEW.id);
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION relay.effect_group_moved() FROM PUBLIC;

-- An effect of a group that settles, is cancelled or released lets the next one go.
CREATE TRIGGER effect_group_moved AFTER UPDATE OF state, group_released_at ON relay.effect
    FOR EACH ROW
    WHEN (NEW.ordering_group IS NOT NULL
          AND ((NEW.state IN ('CONFIRMED', 'PUBLISHED', 'CANCELLED')
                AND NEW.state IS DISTINCT FROM OLD.state)
               OR (NEW.group_released_at IS NOT NULL AND OLD.group_released_at IS NULL)))
    EXECUTE FUNCTION relay.effect_group_moved();

-- The claim's scan: due PENDING effects not waiting behind their group's head. (The index on all
-- PENDING effects stays for the counts.)
CREATE INDEX effect_claim_idx ON relay.effect (available_at, id)
    WHERE state = 'PENDING' AND NOT behind_head;

-- Effects already waiting behind an unsettled one.
UPDATE relay.effect e SET behind_head = true
WHERE e.state = 'PENDING' AND e.ordering_group IS NOT NULL
  AND EXISTS (
      SELECT 1 FROM (
          SELECT p.state, p.effect_type, p.group_released_at FROM relay.effect p
          WHERE p.ordering_group = e.ordering_group AND p.id < e.id AND p.state <> 'CANCELLED'
          ORDER BY p.id DESC LIMIT 1
      ) p
      WHERE NOT relay.lets_group_go(p.state, p.effect_type, p.group_released_at));

-- A group holds at most max_pending_per_group intents not yet published (issue 18, item 7),
-- checked by relay.enqueue under the group's lock; the limit is synced from the config like
-- max_payload_bytes.
ALTER TABLE relay.limits ADD COLUMN max_pending_per_group integer NOT NULL DEFAULT 10000;
CREATE INDEX intake_group_idx ON relay.intake (ordering_group, id)
    WHERE ordering_group IS NOT NULL;

CREATE OR REPLACE FUNCTION relay.enqueue(
    p_operation_key  text,
    p_effect_type    text,
    p_payload        jsonb,
    p_business_key   text DEFAULT NULL,
    p_traceparent    text DEFAULT NULL,
    p_available_at   timestamptz DEFAULT NULL,
    p_ordering_group text DEFAULT NULL,
    OUT effect_id    bigint,
    OUT state        text,
    OUT created      boolean
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $fn$
#variable_conflict use_column
DECLARE
    v_topic    text;
    v_template text;
    v_by_group boolean;
    v_limit    integer;
    v_ring     boolean;
    v_purged   boolean;
    v_existing relay.effect%ROWTYPE;
    v_in       relay.intake%ROWTYPE;
    v_gone     relay.purged_key%ROWTYPE;
    v_in_enum  boolean;
    v_key      text := p_business_key;
    v_owner    text;
    v_cap      integer;
    v_held     bigint;
BEGIN
    IF p_operation_key IS NULL OR length(p_operation_key) = 0 OR length(p_operation_key) > 512 THEN
        RAISE EXCEPTION 'operation key must be 1 to 512 characters' USING ERRCODE = 'RL002';
    END IF;
    IF strpos(p_operation_key, '#compensation') > 0
       AND p_operation_key ~ '#compensation(-[0-9]+)?$' THEN
        RAISE EXCEPTION 'operation key % is reserved for the relay''s own compensations',
            quote_literal(p_operation_key) USING ERRCODE = 'RL002';
    END IF;
    IF p_ordering_group IS NOT NULL
       AND (length(p_ordering_group) = 0 OR length(p_ordering_group) > 512) THEN
        RAISE EXCEPTION 'ordering group of % must be 1 to 512 characters', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'payload of % must be a JSON object', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    -- A container at level 100 means nesting deeper than the Python API accepts (objects and
    -- arrays at levels 0 to 99): such a document cannot be decoded by the daemons' JSON parsers.
    IF jsonb_path_exists(p_payload,
                         'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'payload of % nests deeper than 100 levels', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF p_business_key IS NOT NULL
       AND (length(p_business_key) = 0 OR length(p_business_key) > 512) THEN
        RAISE EXCEPTION 'business key of % must be 1 to 512 characters', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF p_available_at IS NOT NULL AND NOT isfinite(p_available_at) THEN
        RAISE EXCEPTION 'available_at of % must be a finite time, not %', p_operation_key,
            p_available_at USING ERRCODE = 'RL002';
    END IF;
    IF p_traceparent IS NOT NULL
       AND p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        RAISE EXCEPTION 'traceparent of % is not a W3C traceparent', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF starts_with(p_effect_type, 'relay.') THEN
        RAISE EXCEPTION 'effect type % is reserved for the relay', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001';
    END IF;
    -- What the database knows, in one statement: the type, the limits, the doorbell (one row
    -- each) and whether the key was purged.
    SELECT t.topic, t.business_key, t.key_by_group, l.max_payload_bytes,
           coalesce(d.armed_until > now(), false),
           EXISTS (SELECT 1 FROM relay.purged_key k WHERE k.operation_key = p_operation_key),
           EXISTS (SELECT 1 FROM pg_enum n
                   WHERE n.enumtypid = 'relay.effect_type_name'::regtype
                     AND n.enumlabel = p_effect_type)
    INTO v_topic, v_template, v_by_group, v_limit, v_ring, v_purged, v_in_enum
    FROM relay.limits l
    LEFT JOIN relay.doorbell d ON true
    LEFT JOIN relay.effect_type t ON t.name = p_effect_type;
    IF v_topic IS NULL THEN
        RAISE EXCEPTION 'effect type % is not declared', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001',
                  HINT = 'declare it in the config file and run relay migrate';
    END IF;
    IF pg_column_size(p_payload) * 6 > v_limit AND octet_length(p_payload::text) > v_limit THEN
        RAISE EXCEPTION 'payload of % is % bytes of JSON, more than max_payload_bytes (%)',
            p_operation_key, octet_length(p_payload::text), v_limit USING ERRCODE = 'RL006';
    END IF;
    IF v_purged THEN
        SELECT * INTO v_gone FROM relay.purged_key k WHERE k.operation_key = p_operation_key;
        RAISE EXCEPTION 'operation key % named effect % (type %, %), purged at %: not used again within the dedupe window',
            quote_literal(p_operation_key), v_gone.effect_id, quote_literal(v_gone.effect_type),
            v_gone.final_state, v_gone.purged_at USING ERRCODE = 'RL003';
    END IF;
    IF v_key IS NULL AND v_template IS NOT NULL THEN
        v_key := relay.business_key(v_template, p_payload, p_operation_key);
    END IF;
    IF NOT v_in_enum THEN
        RAISE EXCEPTION 'effect type % is declared but not in relay.effect_type_name',
            quote_literal(p_effect_type) USING ERRCODE = 'RL001',
            HINT = 'run relay migrate as the schema owner (type names longer than 63 bytes cannot be enqueued)';
    END IF;
    -- An effect from before the intake, or made by the relay, under this key: the same intent
    -- again returns it, another one is refused.
    SELECT * INTO v_existing FROM relay.effect e WHERE e.operation_key = p_operation_key;
    IF FOUND THEN
        IF v_existing.effect_type <> p_effect_type OR v_existing.payload <> p_payload
           OR v_existing.ordering_group IS DISTINCT FROM p_ordering_group THEN
            RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
                quote_literal(p_operation_key), v_existing.id,
                quote_literal(v_existing.effect_type) USING ERRCODE = 'RL003';
        END IF;
        effect_id := v_existing.id;
        state := v_existing.state;
        created := false;
        RETURN;
    END IF;
    IF p_ordering_group IS NOT NULL THEN
        -- A group belongs to the login that first used it: another login is refused before it
        -- waits or holds anything. The group's row is its ordering lock, taken before the id is
        -- drawn and held until this transaction ends, so ids within a group follow commit order
        -- (the order the relay reads and publishes). No role but the owner of this function can
        -- lock that row: an advisory lock would be anyone's, and two groups could share one.
        SELECT g.owner INTO v_owner FROM relay.ordering_group g WHERE g.name = p_ordering_group;
        IF v_owner IS NULL THEN
            INSERT INTO relay.ordering_group (name, owner) VALUES (p_ordering_group, session_user)
            ON CONFLICT (name) DO NOTHING;
            SELECT g.owner INTO v_owner FROM relay.ordering_group g
            WHERE g.name = p_ordering_group;
        END IF;
        IF v_owner IS DISTINCT FROM session_user THEN
            RAISE EXCEPTION 'ordering group % belongs to login %, not %',
                quote_literal(p_ordering_group), quote_literal(v_owner), quote_literal(session_user)
                USING ERRCODE = 'RL007',
                      HINT = 'an ordering group is used by one login; choose another group name';
        END IF;
        PERFORM 1 FROM relay.ordering_group g WHERE g.name = p_ordering_group FOR UPDATE;
        -- A group holds at most max_pending_per_group intents not yet published (issue 18, item
        -- 7): counted under the group's lock, from the newest back (a group's intents are read
        -- and published in id order), so the count costs at most the limit.
        IF NOT EXISTS (SELECT 1 FROM relay.intake i WHERE i.operation_key = p_operation_key) THEN
            SELECT l.max_pending_per_group INTO v_cap FROM relay.limits l;
            SELECT (SELECT count(*) FROM (
                        SELECT 1 FROM relay.intake i
                        WHERE i.ordering_group = p_ordering_group
                          AND i.id > coalesce((SELECT max(x.id) FROM relay.effect x
                                               WHERE x.ordering_group = p_ordering_group
                                                 AND x.state <> 'CANCELLED'), 0)
                        LIMIT v_cap) unread)
                 + (SELECT count(*) FROM (
                        SELECT 1 FROM relay.effect e
                        WHERE e.ordering_group = p_ordering_group AND e.state = 'PENDING'
                          AND e.id > coalesce((SELECT max(x.id) FROM relay.effect x
                                               WHERE x.ordering_group = p_ordering_group
                                                 AND x.state NOT IN ('PENDING', 'CANCELLED')), 0)
                        LIMIT v_cap) waiting)
            INTO v_held;
            IF v_held >= v_cap THEN
                RAISE EXCEPTION 'ordering group % already holds % intents not yet published '
                                '(max_pending_per_group): % was not enqueued',
                    quote_literal(p_ordering_group), v_held, quote_literal(p_operation_key)
                    USING ERRCODE = 'RL008',
                          HINT = 'retry once the group drains (relay list --group), or raise '
                                 'max_pending_per_group';
            END IF;
        END IF;
    END IF;

    INSERT INTO relay.intake AS i (operation_key, effect_type, payload, business_key,
                                   traceparent, available_at, ordering_group)
    VALUES (p_operation_key, p_effect_type::relay.effect_type_name, p_payload, v_key,
            p_traceparent, p_available_at, p_ordering_group)
    ON CONFLICT DO NOTHING
    RETURNING i.id INTO effect_id;

    IF effect_id IS NOT NULL THEN
        IF v_ring THEN
            PERFORM pg_notify('relay_doorbell', '');
        END IF;
        state := 'PENDING';
        created := true;
        RETURN;
    END IF;

    SELECT * INTO v_in FROM relay.intake i WHERE i.operation_key = p_operation_key;
    IF v_in.effect_type::text <> p_effect_type OR v_in.payload <> p_payload
       OR v_in.ordering_group IS DISTINCT FROM p_ordering_group THEN
        RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
            quote_literal(p_operation_key), v_in.id, quote_literal(v_in.effect_type::text)
            USING ERRCODE = 'RL003';
    END IF;
    effect_id := v_in.id;
    state := coalesce((SELECT e.state FROM relay.effect e WHERE e.id = v_in.id),
                      (SELECT 'REJECTED' FROM relay.intake_refused f WHERE f.id = v_in.id),
                      'PENDING');
    created := false;
END
$fn$;

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
    v_first   record;
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
              WHERE c.why IS NULL AND c.ordering_group IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = c.id)
              ORDER BY c.ordering_group, c.id) f
    ), held AS MATERIALIZED (
        -- Those effects before, locked FOR SHARE (never waiting: one locked by a change in flight
        -- is skipped, and the effect after it is then not held back; see
        -- relay.release_next_in_group for why a wrong "not behind" is harmless and a wrong
        -- "behind" is not). Locked and unsettled: it cannot settle before this transaction
        -- commits, and its settling then lets the effect written here go.
        SELECT p.id FROM relay.effect p
        WHERE p.id IN (SELECT f.prev_id FROM firsts f)
          AND p.state <> 'CANCELLED'
          AND NOT relay.lets_group_go(p.state, p.effect_type, p.group_released_at)
        FOR SHARE SKIP LOCKED
    ), claims AS MATERIALIZED (
        -- What claim_batch would take of these at once, by its rules: due, and ungrouped or the
        -- first of its group here with the effect before it settled (settled never comes undone,
        -- so this snapshot's word is final); capped by count and by bytes.
        SELECT d.id FROM (
            SELECT c.id, pg_column_size(c.payload) AS size,
                   sum(pg_column_size(c.payload)) OVER (ORDER BY c.id) AS running,
                   row_number() OVER (ORDER BY c.id) AS n
            FROM checked c
            WHERE v_claim > 0 AND c.why IS NULL AND c.due_at <= now()
              AND (c.ordering_group IS NULL OR EXISTS (
                  SELECT 1 FROM firsts f
                  LEFT JOIN relay.effect p ON p.id = f.prev_id
                  WHERE f.id = c.id
                    AND (f.prev_id IS NULL
                         OR relay.lets_group_go(p.state, p.effect_type, p.group_released_at))))
        ) d
        WHERE d.n <= v_claim AND d.running - d.size < p_max_bytes
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
               AND (NOT EXISTS (SELECT 1 FROM firsts f WHERE f.id = c.id)
                    OR EXISTS (SELECT 1 FROM firsts f JOIN held h ON h.id = f.prev_id
                               WHERE f.id = c.id))
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

    -- An effect of the batch a cancel wrote first (an intent cancelled before this read): the
    -- effect after it in its group may have been written behind it above; let it go if the one
    -- before lets it (rare: relay.release_next_in_group never waits on a lock).
    FOR v_first IN
        SELECT e.ordering_group, e.id FROM relay.effect e
        WHERE e.id = ANY (v_batch) AND e.state = 'CANCELLED' AND e.ordering_group IS NOT NULL
        ORDER BY e.id
    LOOP
        PERFORM relay.release_next_in_group(v_first.ordering_group, v_first.id);
    END LOOP;

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

-- 0014: a type with a business-key template owns its business key (issue 18, item 8b).
--
-- An explicit business key for such a type must equal the one its template computes: the SQL
-- function relay.enqueue and the Python and contrib enqueue statements refuse another one (RL002,
-- relay.checked_business_key), and the relay's read of the intake rejects a row written by hand
-- with one, naming why. The read also rejects a row whose payload lacks a field of the template
-- (relay.business_key_refusal): before, relay.business_key raised inside the read, and one such
-- row written by hand stopped every read of the intake, every application's intents with it.

-- The business key an intent is stored with: the type's own when it has a template (an explicit
-- one must equal it: an application must not pick another effect's key, issue 18 item 8b), else
-- the caller's. Raises RL002, as relay.business_key does; the enqueue paths call it.
CREATE FUNCTION relay.checked_business_key(p_template text, p_payload jsonb,
                                           p_operation_key text, p_given text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_key text;
BEGIN
    IF p_template IS NULL THEN
        RETURN p_given;
    END IF;
    v_key := relay.business_key(p_template, p_payload, p_operation_key);
    IF p_given IS NOT NULL AND p_given <> v_key THEN
        RAISE EXCEPTION 'business key of % differs from the one its type computes from the template %: a type with a template takes no other',
            p_operation_key, quote_literal(p_template) USING ERRCODE = 'RL002';
    END IF;
    RETURN v_key;
END
$fn$;

-- Why a row read from the intake cannot have its type's business key (NULL when it can): a field
-- of the template missing (relay.business_key would raise, and one row would stop every read),
-- or an explicit key other than the computed one. Inlined into the reader's statement.
CREATE FUNCTION relay.business_key_refusal(p_effect_type text, p_template text, p_payload jsonb,
                                           p_operation_key text, p_given text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT CASE
    WHEN p_template IS NULL THEN NULL
    WHEN jsonb_typeof(p_payload) <> 'object' THEN 'payload must be a JSON object'
    WHEN EXISTS (SELECT 1 FROM regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}', 'g') AS m(f)
                 WHERE p_payload ->> m.f[1] IS NULL)
        THEN format('payload lacks field %s needed by the business key %s',
                    (SELECT string_agg(quote_literal(m.f[1]), ', ')
                     FROM regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}', 'g') AS m(f)
                     WHERE p_payload ->> m.f[1] IS NULL),
                    quote_literal(p_template))
    WHEN p_given IS NOT NULL
         AND p_given <> relay.business_key(p_template, p_payload, p_operation_key)
        THEN format('business key differs from the one type %s computes from its template %s',
                    quote_literal(p_effect_type), quote_literal(p_template))
END
$fn$;

-- The one write of an enqueue, called in the application's transaction. SECURITY DEFINER: an
-- application role needs EXECUTE on it and nothing on the tables. Raises RL001..RL006.
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
    v_key := relay.checked_business_key(v_template, p_payload, p_operation_key, v_key);
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

-- The relay's read of the intake: the next batch between two ticks (relay/sql/intake.sql's
-- read_intake_batch, the same statement), written as effect rows in one INSERT, and the reader's
-- position moved, in the caller's transaction. Returns nothing when another replica is reading.
-- With an owner and p_claim > 0, due ungrouped rows (up to p_claim rows and p_max_bytes of
-- payload, at least one) are written already claimed by that owner (DISPATCHING, attempt 1, a
-- lease), as relay/sql/dispatch.sql's claim_batch would claim them, and returned first: the happy
-- path writes its effect row once, not once and again at the claim. Then one summary row (id
-- NULL) with the counts and the position.
CREATE OR REPLACE FUNCTION relay.promote_intake(
    p_limit integer, p_max_ticks integer, p_owner text DEFAULT NULL, p_epoch bigint DEFAULT NULL,
    p_lease_s double precision DEFAULT NULL, p_claim integer DEFAULT 0,
    p_max_bytes bigint DEFAULT NULL)
RETURNS TABLE (id bigint, operation_key text, message_key text, effect_type text, topic text,
               payload text, business_key text, traceparent text, attempts integer,
               created_at timestamptz, ordering_group text, batch_id bigint, promoted integer,
               claimed integer, rejected integer, refused integer, tick_from bigint,
               tick_to bigint, more boolean, last_id bigint)
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
               d.template, d.traceparent, d.enqueued_at, d.ordering_group
        FROM (
            SELECT c.id, c.operation_key, c.effect_type, c.type_topic, c.payload,
                   c.business_key, c.template, c.traceparent, c.enqueued_at, c.ordering_group,
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
        INSERT INTO relay.dispatch_batch AS d (owner, owner_epoch, lease_until, ids)
        SELECT p_owner, p_epoch, now() + make_interval(secs => p_lease_s),
               array_agg(k.id ORDER BY k.id)
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
        FROM checked c
        LEFT JOIN claims k ON k.id = c.id
        WHERE k.id IS NULL OR c.ordering_group IS NOT NULL
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
           NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint
    FROM made m
    WHERE m.state = 'DISPATCHING'
    UNION ALL
    SELECT c.id, c.operation_key, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
           c.payload::text,
           CASE WHEN c.business_key IS NOT NULL THEN c.business_key
                WHEN c.template IS NOT NULL
                    THEN relay.business_key(c.template, c.payload, c.operation_key) END,
           c.traceparent, 1, c.enqueued_at, NULL::text, d.id, NULL::integer, NULL::integer,
           NULL::integer, NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint
    FROM claims c CROSS JOIN batched d
    WHERE c.ordering_group IS NULL
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT count(*) FILTER (WHERE m.state = 'PENDING') FROM made m)::integer,
           ((SELECT count(*) FILTER (WHERE m.state = 'DISPATCHING') FROM made m)
            + coalesce((SELECT sum(cardinality(d.ids)) FROM batched d), 0))::integer,
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

-- 0025: a published batch is purged a batch at a time. At retention relay.purge_batch emptied
-- each intent's intake row (a new version with new index entries: the pages were full) and wrote
-- a relay.purged_key row for it, and at the end of the dedupe window relay.purge_forgotten_keys
-- deleted both: about 50 us of PostgreSQL CPU an intent, more than publishing it. Now the
-- emptying is a heap-only update (the intake keeps 30 % of each page free for it) that marks the
-- row purged (intake.purged_at) and keeps its key there; the batch's ids move to
-- relay.emptied_batch, by which the rows are deleted when the dedupe window ends. relay.enqueue
-- refuses such a key as it refuses one in relay.purged_key, which keeps the keys of effects with
-- an effect row. Rows already emptied keep their relay.purged_key rows and go as before.
-- relay.enqueue no longer counts a marked row against its group's max_pending_per_group: it
-- counted every intake row after the group's newest effect row, so a group whose effects were all
-- purged counted its emptied rows as not yet published, and refused every new intent until the
-- dedupe window ended. Rows emptied before this migration are not marked here (an UPDATE of every
-- one, under the lock this migration holds on the intake, would stop every enqueue meanwhile):
-- they still count until their keys are forgotten. relay.cancel refuses a purged intent (it
-- wrote an effect row for it, with the emptied payload, and cancelled that). Functions keep
-- their signatures: grants are kept.

ALTER TABLE relay.intake ADD COLUMN purged_at timestamptz;
-- Applies to pages filled from now on.
ALTER TABLE relay.intake SET (fillfactor = 70);

-- Published batches whose intents were emptied at retention (relay.purge_batch): their intake
-- rows keep the keys until the dedupe window ends, then go by these ids, a batch at a time
-- (relay.purge_forgotten_keys), with no per-intent row written in between.
CREATE TABLE relay.emptied_batch (
    id         bigint PRIMARY KEY,
    ids        bigint[] NOT NULL,
    emptied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE relay.emptied_batch ALTER COLUMN ids SET STORAGE EXTERNAL;
CREATE INDEX emptied_batch_at_idx ON relay.emptied_batch (emptied_at, id);
REVOKE ALL ON relay.emptied_batch FROM PUBLIC;

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
           EXISTS (SELECT 1 FROM relay.purged_key k WHERE k.operation_key = p_operation_key)
           OR EXISTS (SELECT 1 FROM relay.intake i
                      WHERE i.operation_key = p_operation_key AND i.purged_at IS NOT NULL),
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
        IF NOT FOUND THEN
            -- Purged in its published batch: the emptied intake row keeps the key.
            SELECT i.operation_key, i.id, i.effect_type::text, 'PUBLISHED', i.purged_at
            INTO v_gone FROM relay.intake i WHERE i.operation_key = p_operation_key;
        END IF;
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
            -- The newest rows first: a purged row (published, kept for the dedupe window) is
            -- older than any not published, and counts toward the limit's scan, not the count.
            SELECT (SELECT count(*) FROM (
                        SELECT i.purged_at FROM relay.intake i
                        WHERE i.ordering_group = p_ordering_group
                          AND i.id > coalesce((SELECT max(x.id) FROM relay.effect x
                                               WHERE x.ordering_group = p_ordering_group
                                                 AND x.state <> 'CANCELLED'), 0)
                        ORDER BY i.id DESC
                        LIMIT v_cap) unread
                    WHERE unread.purged_at IS NULL)
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
    IF v_in.purged_at IS NOT NULL THEN
        -- Emptied at retention (relay.purge_batch) after the check above: its key is kept in
        -- the intake row itself.
        RAISE EXCEPTION 'operation key % named effect % (type %, %), purged at %: not used again within the dedupe window',
            quote_literal(p_operation_key), v_in.id, quote_literal(v_in.effect_type::text),
            'PUBLISHED', v_in.purged_at USING ERRCODE = 'RL003';
    END IF;
    IF v_in.effect_type::text <> p_effect_type OR v_in.payload <> p_payload
       OR v_in.ordering_group IS DISTINCT FROM p_ordering_group THEN
        RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
            quote_literal(p_operation_key), v_in.id, quote_literal(v_in.effect_type::text)
            USING ERRCODE = 'RL003';
    END IF;
    effect_id := v_in.id;
    state := coalesce((SELECT e.state FROM relay.effect e WHERE e.id = v_in.id),
                      (SELECT 'REJECTED' FROM relay.intake_refused f WHERE f.id = v_in.id),
                      (SELECT 'DISPATCHING' FROM relay.dispatch_batch b
                       WHERE v_in.id = ANY (b.ids) LIMIT 1),
                      (SELECT 'PUBLISHED' FROM relay.published_intent(v_in.id)),
                      'PENDING');
    created := false;
END
$fn$;

CREATE OR REPLACE FUNCTION relay.intake_effect(p_operation_key text)
RETURNS TABLE (id bigint, operation_key text, effect_type text, topic text, payload jsonb,
               business_key text, traceparent text, available_at timestamptz,
               created_at timestamptz, ordering_group text, state text,
               claimed_at timestamptz, published_partition integer, published_offset bigint,
               published_at timestamptz)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT i.id, i.operation_key, i.effect_type::text, coalesce(t.topic, ''), i.payload,
       CASE WHEN i.business_key IS NOT NULL OR t.business_key IS NULL THEN i.business_key
            WHEN relay.business_key_refusal(i.effect_type::text, t.business_key, i.payload,
                                            i.operation_key, NULL) IS NULL
                THEN relay.business_key(t.business_key, i.payload, i.operation_key) END,
       i.traceparent,
       greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at), i.enqueued_at,
       i.ordering_group,
       CASE WHEN p.published_batch IS NOT NULL THEN 'PUBLISHED'
            WHEN b.id IS NOT NULL THEN 'DISPATCHING' ELSE 'PENDING' END,
       coalesce(p.claimed_at, b.claimed_at), p."partition", p."offset", p.published_at
FROM relay.intake i
LEFT JOIN relay.effect_type t ON t.name = i.effect_type::text
LEFT JOIN LATERAL (
    SELECT d.id, d.claimed_at FROM relay.dispatch_batch d WHERE i.id = ANY (d.ids) LIMIT 1
) b ON true
LEFT JOIN LATERAL relay.published_intent(i.id) p ON true
WHERE i.operation_key = p_operation_key
  AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.purged_key k
                  WHERE k.operation_key = i.operation_key AND k.effect_id = i.id)
  AND i.purged_at IS NULL
$fn$;

CREATE OR REPLACE FUNCTION relay.purge_batch(p_retention_s double precision, p_limit integer)
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_retention_s IS NULL OR p_retention_s < 0 OR p_retention_s = 'infinity'
       OR p_retention_s = 'NaN' THEN
        RAISE EXCEPTION 'retention must be a finite number of seconds, not %', p_retention_s
            USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 THEN
        RAISE EXCEPTION 'a purge batch takes 1 to 50000 effects, not %', p_limit
            USING ERRCODE = '22023';
    END IF;
    -- One small batch of whole families: see relay/reconciler/purge.py.
    RETURN QUERY
    WITH RECURSIVE blocked(id) AS (
        SELECT c.parent_effect_id FROM relay.effect c
        WHERE c.parent_effect_id IS NOT NULL
          AND (c.updated_at >= now() - make_interval(secs => p_retention_s)
               OR NOT (c.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
                       OR (c.state = 'PUBLISHED' AND c.outcome_deadline IS NULL)))
        UNION
        SELECT p.parent_effect_id FROM relay.effect p JOIN blocked b ON p.id = b.id
        WHERE p.parent_effect_id IS NOT NULL
    ), root AS MATERIALIZED (
        SELECT r.id FROM relay.effect r
        WHERE r.parent_effect_id IS NULL
          AND r.updated_at < now() - make_interval(secs => p_retention_s)
          AND (r.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
               OR (r.state = 'PUBLISHED' AND r.outcome_deadline IS NULL))
          AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.id = r.id)
          AND NOT EXISTS (SELECT 1 FROM relay.transition t
                          WHERE t.effect_id = r.id AND t.status_pending)
          AND NOT (r.state = 'REJECTED' AND r.ordering_group IS NOT NULL
                   AND r.group_released_at IS NULL)
        ORDER BY r.updated_at
        LIMIT p_limit
        FOR UPDATE OF r SKIP LOCKED
    ), family(id, root_id) AS (
        SELECT root.id, root.id FROM root
        UNION
        SELECT c.id, f.root_id FROM relay.effect c JOIN family f ON c.parent_effect_id = f.id
    ), held AS MATERIALIZED (
        SELECT c.id FROM relay.effect c
        WHERE c.id IN (SELECT f.id FROM family f WHERE f.id <> f.root_id)
          AND c.updated_at < now() - make_interval(secs => p_retention_s)
          AND (c.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
               OR (c.state = 'PUBLISHED' AND c.outcome_deadline IS NULL))
          AND NOT EXISTS (SELECT 1 FROM relay.transition t
                          WHERE t.effect_id = c.id AND t.status_pending)
        FOR UPDATE OF c SKIP LOCKED
    ), whole AS (
        SELECT f.id FROM family f
        WHERE NOT EXISTS (
            SELECT 1 FROM family m
            WHERE m.root_id = f.root_id AND m.id <> m.root_id
              AND NOT EXISTS (SELECT 1 FROM held h WHERE h.id = m.id)
        )
    ), gone AS (
        DELETE FROM relay.effect e WHERE e.id = ANY (ARRAY(SELECT w.id FROM whole w))
        RETURNING e.id, e.operation_key, e.effect_type, e.state
    ), gone_attempts AS (
        DELETE FROM relay.attempt a WHERE a.effect_id IN (SELECT g.id FROM gone g)
    ), gone_transitions AS (
        DELETE FROM relay.transition t WHERE t.effect_id IN (SELECT g.id FROM gone g)
    ), gone_evidence AS (
        DELETE FROM relay.evidence v WHERE v.effect_id IN (SELECT g.id FROM gone g)
    ), emptied AS (
        -- The intent's key stays in the intake until the dedupe window ends (its unique key
        -- refuses the key's reuse at enqueue); its content goes now.
        UPDATE relay.intake i SET payload = '{}'::jsonb, business_key = NULL, traceparent = NULL,
                                  purged_at = now()
        WHERE i.id IN (SELECT g.id FROM gone g)
    ), remembered AS (
        INSERT INTO relay.purged_key AS k (operation_key, effect_id, effect_type, final_state)
        SELECT g.operation_key, g.id, g.effect_type, g.state FROM gone g
        ON CONFLICT (operation_key) DO UPDATE
            SET effect_id = excluded.effect_id, effect_type = excluded.effect_type,
                final_state = excluded.final_state, purged_at = now()
    )
    SELECT g.id FROM gone g;

    -- Published batches past retention (their intents have no effect row): about p_limit
    -- intents, whole batches, oldest first. Each intent's content goes in place, a heap-only
    -- update (the intake keeps room on its pages), and its key stays in that row, marked
    -- purged, until the dedupe window ends; the batch's ids move to relay.emptied_batch, by
    -- which relay.purge_forgotten_keys deletes the rows then. Nothing else is written per intent.
    RETURN QUERY
    WITH old AS MATERIALIZED (
        SELECT p.id, p.ids FROM relay.published_batch p
        WHERE p.id IN (
            SELECT o.id FROM (
                SELECT q.id, q.n, sum(q.n) OVER (ORDER BY q.published_at, q.id) AS running
                FROM relay.published_batch q
                WHERE q.published_at < now() - make_interval(secs => p_retention_s)
            ) o
            WHERE o.running - o.n < p_limit)
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM relay.published_batch p USING old o WHERE p.id = o.id
    ), kept AS (
        INSERT INTO relay.emptied_batch (id, ids) SELECT o.id, o.ids FROM old o
    ), emptied AS (
        UPDATE relay.intake i SET payload = '{}'::jsonb, business_key = NULL, traceparent = NULL,
                                  purged_at = now()
        WHERE i.id = ANY (ARRAY(SELECT x.id FROM old o CROSS JOIN LATERAL unnest(o.ids) AS x(id)))
        RETURNING i.id
    )
    SELECT e.id FROM emptied e;
END
$fn$;

CREATE OR REPLACE FUNCTION relay.purge_forgotten_keys(p_dedupe_window_s double precision, p_limit integer)
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_dedupe_window_s IS NULL OR p_dedupe_window_s < 0 OR p_dedupe_window_s = 'infinity'
       OR p_dedupe_window_s = 'NaN' THEN
        RAISE EXCEPTION 'the dedupe window must be a finite number of seconds, not %',
            p_dedupe_window_s USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 THEN
        RAISE EXCEPTION 'a purge batch takes 1 to 50000 keys, not %', p_limit
            USING ERRCODE = '22023';
    END IF;
    -- Keys of purged effects past the dedupe window may be used again.
    RETURN QUERY
    WITH old AS (
        SELECT o.operation_key FROM relay.purged_key o
        WHERE o.purged_at < now() - make_interval(secs => p_dedupe_window_s)
        ORDER BY o.purged_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM relay.purged_key k USING old WHERE k.operation_key = old.operation_key
        RETURNING k.operation_key, k.effect_id
    ), gone_intake AS (
        DELETE FROM relay.intake i USING gone g
        WHERE i.id = g.effect_id AND i.operation_key = g.operation_key
    )
    SELECT g.operation_key FROM gone g;

    -- Intents emptied in their published batch (relay.purge_batch): whole batches, oldest
    -- first, about p_limit intents; their intake rows go by the batch's ids.
    RETURN QUERY
    WITH old AS MATERIALIZED (
        SELECT b.id, b.ids FROM relay.emptied_batch b
        WHERE b.id IN (
            SELECT o.id FROM (
                SELECT q.id, q.n, sum(q.n) OVER (ORDER BY q.emptied_at, q.id) AS running
                FROM (SELECT e.id, e.emptied_at, cardinality(e.ids) AS n
                      FROM relay.emptied_batch e
                      WHERE e.emptied_at < now() - make_interval(secs => p_dedupe_window_s)
                      ORDER BY e.emptied_at, e.id
                      LIMIT p_limit) q
            ) o
            WHERE o.running - o.n < p_limit)
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM relay.emptied_batch b USING old o WHERE b.id = o.id
    ), gone_intake AS (
        DELETE FROM relay.intake i
        WHERE i.id = ANY (ARRAY(SELECT x.id FROM old o CROSS JOIN LATERAL unnest(o.ids) AS x(id)))
          AND i.purged_at IS NOT NULL
        RETURNING i.operation_key
    )
    SELECT g.operation_key FROM gone_intake g;
END
$fn$;

CREATE OR REPLACE FUNCTION relay.cancel(p_operation_key text, p_reason text DEFAULT 'cancelled',
                                        p_actor text DEFAULT 'application')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_effect   relay.effect%ROWTYPE;
    v_in       relay.intake%ROWTYPE;
    v_status   boolean := (SELECT c.status_events FROM relay.reconciler_config c);
    -- Operators, daemons and the owner may change any effect; applications may not.
    v_operator boolean := has_table_privilege(session_user, 'relay.effect', 'UPDATE');
    v_actor    text := format('%s [login %s]', p_actor, session_user);
    v_taken    text;
BEGIN
    SELECT * INTO v_effect FROM relay.effect e WHERE e.operation_key = p_operation_key FOR UPDATE;
    IF NOT FOUND THEN
        -- No effect row: an intent not read yet, or claimed in a batch whose outcome is not
        -- recorded. Only the intent's own login (or an operator) goes further, before anything
        -- is locked: a refused call must hold nothing, even in a transaction left open.
        SELECT * INTO v_in FROM relay.intake i
        WHERE i.operation_key = p_operation_key
          AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id);
        IF FOUND THEN
            IF NOT v_operator AND v_in.enqueued_by IS DISTINCT FROM session_user THEN
                RAISE EXCEPTION 'effect % was not enqueued by login %: an application cancels only its own effects',
                    quote_literal(p_operation_key), session_user USING ERRCODE = 'RL007';
            END IF;
            -- Told apart under this intent's own row lock, held to the end of the caller's
            -- transaction: a reader passes a locked row by (relay.promote_intake defers it, and
            -- the later ones of its group), so a cancel left open holds back this intent only,
            -- never the read. Then a read already in flight is waited for (its lock on the
            -- reader's row, taken and let go in a subtransaction), so that what it wrote is
            -- seen below. Under REPEATABLE READ a read since the caller's snapshot fails this
            -- with a serialization error (40001), to be retried.
            PERFORM 1 FROM relay.intake i WHERE i.id = v_in.id FOR UPDATE;
            BEGIN
                PERFORM 1 FROM relay.intake_reader r FOR SHARE;
                RAISE EXCEPTION USING ERRCODE = 'RL900';
            EXCEPTION WHEN SQLSTATE 'RL900' THEN
                NULL;
            END;
            SELECT * INTO v_effect FROM relay.effect e
            WHERE e.operation_key = p_operation_key FOR UPDATE;
        END IF;
    END IF;
    IF v_effect.id IS NULL AND v_in.id IS NOT NULL THEN
        -- An intent the relay has not read yet: its effect row is written now (as the reader
        -- would write it), so that the reader skips it and the cancel below has a row to move.
        -- One statement: a batch's outcome moves it from one table to the other at once.
        SELECT CASE
                   -- Purged past retention (its key kept for the dedupe window): never again.
                   -- Read again: a purge may have committed while this waited for the row.
                   WHEN EXISTS (SELECT 1 FROM relay.intake i
                                WHERE i.id = v_in.id AND i.purged_at IS NOT NULL)
                        OR EXISTS (SELECT 1 FROM relay.purged_key k
                                   WHERE k.operation_key = v_in.operation_key
                                     AND k.effect_id = v_in.id)
                       THEN 'purged'
                   WHEN EXISTS (SELECT 1 FROM relay.dispatch_batch b
                                WHERE v_in.id = ANY (b.ids)) THEN 'DISPATCHING'
                   WHEN EXISTS (SELECT 1 FROM relay.published_intent(v_in.id))
                       THEN 'PUBLISHED' END
        INTO v_taken;
        IF v_taken IS NOT NULL THEN
            RAISE EXCEPTION 'effect % is %, only a PENDING effect can be cancelled',
                quote_literal(p_operation_key), v_taken USING ERRCODE = 'RL005';
        END IF;
        INSERT INTO relay.effect (id, operation_key, effect_type, topic, payload, business_key,
                                  traceparent, available_at, created_at, ordering_group,
                                  message_key, enqueued_by)
        SELECT v_in.id, v_in.operation_key, t.name, t.topic, v_in.payload,
               coalesce(v_in.business_key,
                        CASE WHEN t.business_key IS NOT NULL
                             THEN relay.business_key(t.business_key, v_in.payload,
                                                     v_in.operation_key) END),
               v_in.traceparent,
               greatest(coalesce(v_in.available_at, v_in.enqueued_at), v_in.enqueued_at),
               v_in.enqueued_at, v_in.ordering_group,
               CASE WHEN t.key_by_group THEN v_in.ordering_group END, v_in.enqueued_by
        FROM relay.effect_type t WHERE t.name = v_in.effect_type::text
        ON CONFLICT DO NOTHING;
        SELECT * INTO v_effect FROM relay.effect e
        WHERE e.operation_key = p_operation_key FOR UPDATE;
    END IF;
    IF v_effect.id IS NULL THEN
        RAISE EXCEPTION 'no effect has operation key %', quote_literal(p_operation_key)
            USING ERRCODE = 'RL004';
    END IF;
    IF NOT v_operator AND (v_effect.parent_effect_id IS NOT NULL
                           OR starts_with(v_effect.effect_type, 'relay.')) THEN
        RAISE EXCEPTION 'effect % was made by the relay: only an operator can cancel it',
            quote_literal(p_operation_key) USING ERRCODE = 'RL007';
    END IF;
    IF NOT v_operator AND v_effect.enqueued_by IS DISTINCT FROM session_user THEN
        RAISE EXCEPTION 'effect % was not enqueued by login %: an application cancels only its own effects',
            quote_literal(p_operation_key), session_user USING ERRCODE = 'RL007';
    END IF;
    IF v_effect.state <> 'PENDING' THEN
        RAISE EXCEPTION 'effect % is %, only a PENDING effect can be cancelled',
            quote_literal(p_operation_key), v_effect.state USING ERRCODE = 'RL005';
    END IF;
    UPDATE relay.effect SET state = 'CANCELLED', reason = p_reason, updated_at = now()
    WHERE id = v_effect.id;
    IF v_effect.attempts = 0 AND v_effect.parent_effect_id IS NULL
       AND v_effect.created_at >= (SELECT m.applied_at FROM relay.schema_migration m
                                   WHERE m.version = 4) THEN
        INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                      at, status_pending)
        VALUES (v_effect.id, NULL, 'PENDING', 'enqueued', 'application', 0,
                v_effect.created_at, v_status);
    END IF;
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                  status_pending)
    VALUES (v_effect.id, 'PENDING', 'CANCELLED', p_reason, v_actor, v_effect.attempts, v_status);
    RETURN 'CANCELLED';
END
$fn$;

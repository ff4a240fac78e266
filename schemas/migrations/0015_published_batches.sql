-- 0015: intents published in a batch that needs nothing more get no rows of their own (issue 19,
-- bookkeeping per batch; docs/design/intake.md §13).
--
-- When every record of a batch claimed from the intake is acknowledged, those of a type that
-- awaits no downstream result, with status events off, are recorded by one relay.published_batch
-- row per batch and type (who claimed them, when, and where each record lies in Kafka) instead of
-- an effect, an attempt and a transition row each. Everything that reads effects reads them there
-- too: relay.published_intent (by id), relay.published_effect (all), relay.intake_effect
-- (get_effect, `relay show`: PUBLISHED with its partition and offset), `relay stats`, `list`, the
-- metrics, the console's overview, the reconciler (a result for one is misrouted), `relay.cancel`
-- (refused: PUBLISHED), and `relay purge` (whole batches past retention, their keys remembered
-- for the dedupe window like any purged effect's). relay.promote_intake joins the batch's ids
-- instead of filtering by = ANY (an array of 500 cost about 1 ms of planning at every call), and
-- plans a small read once (the generic plan), a large one at every call.

-- Intents of a batch published and acknowledged that need nothing more: their type awaits no
-- downstream result and status events are off (issue 19, bookkeeping per batch). One row per
-- batch and type holds what an effect row would (who claimed them and when, where each record
-- lies in Kafka); they get no effect, attempt or transition row. relay.published_intent finds an
-- id's row through the id span; `relay purge` removes the row and the intake's payloads.
CREATE TABLE relay.published_batch (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id     bigint NOT NULL,
    effect_type  text NOT NULL,
    owner        text NOT NULL,
    owner_epoch  bigint NOT NULL,
    claimed_at   timestamptz NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    first_id     bigint NOT NULL,
    last_id      bigint NOT NULL,
    n            integer NOT NULL,
    -- Parallel arrays, in id order.
    ids          bigint[] NOT NULL,
    partitions   integer[] NOT NULL,
    offsets      bigint[] NOT NULL
);
-- Spans of batches overlap (a late commit is read after later ids): a range index, not a b-tree.
CREATE INDEX published_batch_span_idx ON relay.published_batch
    USING gist (int8range(first_id, last_id, '[]'));
CREATE INDEX published_batch_at_idx ON relay.published_batch (published_at, id);
REVOKE ALL ON relay.published_batch FROM PUBLIC;

-- The published batch an intent without an effect row lies in, and where its record is; nothing
-- when it lies in none. Inlined into its callers (a probe of the span index, then the id's place
-- in the batch).
CREATE FUNCTION relay.published_intent(p_id bigint)
RETURNS TABLE (published_batch bigint, effect_type text, owner text, owner_epoch bigint,
               claimed_at timestamptz, published_at timestamptz, "partition" integer,
               "offset" bigint)
LANGUAGE sql STABLE
AS $fn$
SELECT p.id, p.effect_type, p.owner, p.owner_epoch, p.claimed_at, p.published_at,
       p.partitions[k.i], p.offsets[k.i]
FROM relay.published_batch p
CROSS JOIN LATERAL (SELECT array_position(p.ids, p_id) AS i) k
WHERE int8range(p.first_id, p.last_id, '[]') @> p_id AND k.i IS NOT NULL
$fn$;

-- Every intent of the published batches, as the effect row it does not have would show it (for
-- whole-outbox readers such as the fault suite's checker; by id, relay.published_intent).
CREATE VIEW relay.published_effect AS
SELECT x.id, i.operation_key, p.effect_type, x."partition", x."offset", i.business_key,
       i.traceparent, i.enqueued_at AS created_at, p.owner, p.owner_epoch, p.claimed_at,
       p.published_at, p.id AS published_batch
FROM relay.published_batch p
CROSS JOIN LATERAL unnest(p.ids, p.partitions, p.offsets) AS x(id, "partition", "offset")
JOIN relay.intake i ON i.id = x.id;

-- Intents claimed in a batch not recorded yet: DISPATCHING, with no effect row (few rows: a
-- batch lives from its claim to its outcome).
CREATE OR REPLACE VIEW relay.batch_effect AS
SELECT i.id, i.operation_key, i.effect_type::text AS effect_type, i.traceparent,
       i.enqueued_at, b.id AS batch_id, b.owner, b.owner_epoch, b.claimed_at, b.lease_until
FROM relay.dispatch_batch b
CROSS JOIN LATERAL unnest(b.ids) AS x(id)
JOIN relay.intake i ON i.id = x.id
WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = x.id)
  AND NOT EXISTS (SELECT 1 FROM relay.published_intent(x.id));

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
                      (SELECT 'DISPATCHING' FROM relay.dispatch_batch b
                       WHERE v_in.id = ANY (b.ids) LIMIT 1),
                      (SELECT 'PUBLISHED' FROM relay.published_intent(v_in.id)),
                      'PENDING');
    created := false;
END
$fn$;

-- Withdraw an intent no attempt has touched yet.
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
        -- recorded. Told apart under the reader's lock (the reader skips a round while a cancel
        -- holds it, and a batch's claim and its outcome are each one statement).
        PERFORM 1 FROM relay.intake_reader r FOR UPDATE;
        SELECT * INTO v_effect FROM relay.effect e
        WHERE e.operation_key = p_operation_key FOR UPDATE;
    END IF;
    IF v_effect.id IS NULL THEN
        -- An intent the relay has not read yet: its effect row is written now (as the reader
        -- would write it), so that the reader skips it and the cancel below has a row to move.
        SELECT * INTO v_in FROM relay.intake i
        WHERE i.operation_key = p_operation_key
          AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id);
        IF FOUND THEN
            IF NOT v_operator AND v_in.enqueued_by IS DISTINCT FROM session_user THEN
                RAISE EXCEPTION 'effect % was not enqueued by login %: an application cancels only its own effects',
                    quote_literal(p_operation_key), session_user USING ERRCODE = 'RL007';
            END IF;
            -- One statement: a batch's outcome moves it from one table to the other at once.
            SELECT CASE
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

-- The purge (`relay purge`): SECURITY DEFINER, so the operator role purges without any right to
-- delete rows; one batch per call, granted by `relay roles` to the operator role.
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
        UPDATE relay.intake i SET payload = '{}'::jsonb, business_key = NULL, traceparent = NULL
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
    -- intents, whole batches, oldest first; remembered and emptied as the effects above.
    RETURN QUERY
    WITH old AS MATERIALIZED (
        SELECT p.id, p.effect_type, p.ids FROM relay.published_batch p
        WHERE p.id IN (
            SELECT o.id FROM (
                SELECT q.id, q.n, sum(q.n) OVER (ORDER BY q.published_at, q.id) AS running
                FROM relay.published_batch q
                WHERE q.published_at < now() - make_interval(secs => p_retention_s)
            ) o
            WHERE o.running - o.n < p_limit)
        FOR UPDATE SKIP LOCKED
    ), member AS (
        SELECT x.id, o.effect_type FROM old o CROSS JOIN LATERAL unnest(o.ids) AS x(id)
    ), gone AS (
        DELETE FROM relay.published_batch p USING old o WHERE p.id = o.id
    ), emptied AS (
        UPDATE relay.intake i SET payload = '{}'::jsonb, business_key = NULL, traceparent = NULL
        FROM member m WHERE i.id = m.id
        RETURNING i.id, i.operation_key, m.effect_type
    ), remembered AS (
        INSERT INTO relay.purged_key AS k (operation_key, effect_id, effect_type, final_state)
        SELECT e.operation_key, e.id, e.effect_type, 'PUBLISHED' FROM emptied e
        ON CONFLICT (operation_key) DO UPDATE
            SET effect_id = excluded.effect_id, effect_type = excluded.effect_type,
                final_state = excluded.final_state, purged_at = now()
    )
    SELECT e.id FROM emptied e;
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
    -- The plan of the read below, by its size. A custom plan costs about 2.5 ms to make at every
    -- call, most of a small read's cost (the live load: 5 rows, 3.1 ms in all against 0.6 ms with
    -- the generic plan); from a few hundred rows on (a backlog) it pays for itself (500 rows: 15
    -- against 32 ms; 200: even). The function's SET clause restores the setting when it returns.
    PERFORM set_config('plan_cache_mode',
                       CASE WHEN v_read < 200 THEN 'force_generic_plan'
                            ELSE 'force_custom_plan' END, true);

    RETURN QUERY
    WITH batch AS MATERIALIZED (
        SELECT r.id, r.operation_key, r.effect_type::text AS effect_type, r.payload,
               r.business_key, r.traceparent, r.available_at, r.ordering_group, r.enqueued_by,
               r.enqueued_at
        -- Joined to the ids, not filtered by = ANY: the planner estimates an ANY over an array
        -- constant element by element (about 1 ms of planning at every call for 500 ids).
        FROM unnest(v_batch) AS x(id)
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
    -- (Over the batch's id span, a superset of its ids: release_next_in_group is idempotent, and
    -- the span costs the planner nothing, where = ANY (v_batch) cost 1 ms a call.)
    FOR v_first IN
        SELECT e.ordering_group, e.id FROM relay.effect e
        WHERE e.id BETWEEN v_batch[1] AND v_last AND e.state = 'CANCELLED'
          AND e.ordering_group IS NOT NULL
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

-- relay.intake_effect returns three more columns: dropped and made again, with its grants.
CREATE TEMPORARY TABLE published_intake_effect_grantees ON COMMIT DROP AS
SELECT a.grantee::regrole::text AS grantee
FROM pg_proc p, aclexplode(p.proacl) a
WHERE p.oid = 'relay.intake_effect(text)'::regprocedure
  AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
DROP FUNCTION relay.intake_effect(text);

-- An intent without an effect row, as get_effect shows it, for any login that reads effects:
-- PENDING (not read yet), DISPATCHING (claimed in a batch, its outcome not recorded yet) or
-- PUBLISHED (in a published batch: relay.published_batch).
CREATE FUNCTION relay.intake_effect(p_operation_key text)
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
  AND NOT EXISTS (SELECT 1 FROM relay.purged_key k WHERE k.effect_id = i.id)
$fn$;
REVOKE ALL ON FUNCTION relay.intake_effect(text) FROM PUBLIC;

-- Whoever may read the effects' story (SELECT on relay.transition_log: daemons, operators, the
-- console's viewers) reads the published batches; whoever may promote (the relay) writes them;
-- the viewers read the intake's ids and enqueue times. An upgrade needs no second `relay roles
-- --apply`.
DO $grants$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT grantee FROM published_intake_effect_grantees LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION relay.intake_effect(text) TO %s', r.grantee);
    END LOOP;
    FOR r IN SELECT DISTINCT a.grantee::regrole::text AS grantee
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'relay.transition_log'::regclass AND a.privilege_type = 'SELECT'
               AND a.grantee <> 0 AND a.grantee <> c.relowner LOOP
        EXECUTE format('GRANT SELECT ON relay.published_batch, relay.published_effect TO %s',
                       r.grantee);
        IF NOT has_table_privilege(r.grantee, 'relay.intake', 'SELECT') THEN
            EXECUTE format('GRANT SELECT (id, enqueued_at) ON relay.intake TO %s', r.grantee);
        END IF;
    END LOOP;
    FOR r IN SELECT DISTINCT a.grantee::regrole::text AS grantee
             FROM pg_proc p, aclexplode(p.proacl) a
             WHERE p.oid = 'relay.promote_intake(integer, integer, text, bigint, double precision, integer, bigint)'::regprocedure
               AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner LOOP
        EXECUTE format('GRANT INSERT ON relay.published_batch TO %s', r.grantee);
    END LOOP;
END
$grants$;

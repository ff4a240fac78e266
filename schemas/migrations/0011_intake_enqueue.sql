-- 0011: enqueue through the intake (issue 19, docs/design/intake.md slice 2, and the bridge of
-- slice 3): an intent is one plain INSERT into relay.intake; `relay run` reads the intake between
-- ticks, in commit order, and writes each row's effect row in bulk ("promotion"), after which
-- everything goes on as before (claim, publish, mark, reconcile).
--
-- - One id sequence for the intake and relay.effect: an intake row's id is its effect's id, and a
--   relay-made effect (a compensation) draws from the same sequence, so the two never meet.
-- - relay.enqueue (the SQL entry point, and the Python face's path for grouped intents and for a
--   duplicate key) checks as before and writes the intake. A grouped intent locks its group's row
--   in relay.ordering_group before it draws its id (a default or a trigger would be too late), and
--   a group belongs to the login that first used it: no other login can enter it, lock it or stall
--   it (issue 18, item 2). The application has no INSERT on intake.ordering_group: a group is set
--   only through the function.
-- - relay.promote_intake: the relay's batch read and the effect rows it writes, with the checks the
--   intake no longer makes (a row written by hand that fails them becomes REJECTED with its reason;
--   a key that names another effect is set aside in relay.intake_refused).
-- - relay.cancel of an intent not read yet writes its effect row first (then cancels it), so the
--   reader skips it; relay.intake_effect shows such an intent to get_effect.
-- - purge keeps a purged intent's key in the intake (payload emptied) until the dedupe window ends,
--   so the intake's unique key refuses its reuse at enqueue.

ALTER TABLE relay.intake ADD COLUMN enqueued_at timestamptz NOT NULL DEFAULT now();

-- One sequence: relay.effect draws from the intake's identity sequence.
ALTER TABLE relay.effect ALTER COLUMN id DROP IDENTITY;
SELECT setval(pg_get_serial_sequence('relay.intake', 'id'), m.top)
FROM (SELECT greatest((SELECT max(e.id) FROM relay.effect e), (SELECT max(i.id) FROM relay.intake i),
                      pg_sequence_last_value('relay.intake_id_seq')) AS top) m
WHERE m.top IS NOT NULL;
ALTER TABLE relay.effect ALTER COLUMN id SET DEFAULT nextval('relay.intake_id_seq'::regclass);

-- Where the promotion reads next: after tick tick_from (inside the pair fixed at tick_to, after
-- id after_id, when a pair was cut at the batch size). One row; its row lock makes one reader.
CREATE TABLE relay.intake_reader (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    tick_from  bigint NOT NULL,
    tick_to    bigint,
    after_id   bigint NOT NULL,
    read_at    timestamptz,
    promoted   bigint NOT NULL DEFAULT 0
);
INSERT INTO relay.intake_reader (tick_from, tick_to, after_id) VALUES (0, NULL, 0);

-- Intake rows that could not become an effect: their key already names another effect.
CREATE TABLE relay.intake_refused (
    id            bigint PRIMARY KEY,
    operation_key text NOT NULL,
    effect_type   text NOT NULL,
    enqueued_by   text NOT NULL,
    reason        text NOT NULL,
    refused_at    timestamptz NOT NULL DEFAULT now()
);

-- Ordering groups and the login each belongs to; the row is the group's ordering lock.
CREATE TABLE relay.ordering_group (
    name       text PRIMARY KEY,
    owner      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON relay.intake_reader, relay.intake_refused, relay.ordering_group FROM PUBLIC;
INSERT INTO relay.ordering_group (name, owner)
SELECT e.ordering_group, min(coalesce(e.enqueued_by, current_user))
FROM relay.effect e WHERE e.ordering_group IS NOT NULL
GROUP BY e.ordering_group;

-- Intents committed to the intake that the relay has not written as effects yet: those its
-- reader's tick does not see (a range of the txid index, plus the xids that tick saw running),
-- less any it read in a split pair or that a cancel wrote, and those set aside. What `relay
-- stats` and the metrics count as PENDING beside the effect rows.
CREATE VIEW relay.intake_unread AS
SELECT i.id, i.operation_key, i.effect_type::text AS effect_type, i.enqueued_at,
       greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at) AS due
FROM relay.intake_reader r
JOIN relay.tick t ON t.id = r.tick_from
JOIN relay.intake i
  ON (i.txid >= pg_snapshot_xmax(t.snap) OR i.txid = ANY (ARRAY(SELECT pg_snapshot_xip(t.snap))))
 AND NOT pg_visible_in_snapshot(i.txid, t.snap)
WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id);

-- The checks the intake does not make, as one expression per row: NULL when the row is fine,
-- else why it is refused. Shared by promote_intake; the same limits relay.enqueue applies.
CREATE FUNCTION relay.intake_refusal(
    p_operation_key text, p_effect_type text, p_payload jsonb, p_business_key text,
    p_traceparent text, p_available_at timestamptz, p_ordering_group text, p_topic text,
    p_max_payload_bytes integer
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
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

-- The relay's read of the intake: the next batch between two ticks (relay/sql/intake.sql's
-- read_intake_batch, the same statement), written as effect rows in one INSERT, and the reader's
-- position moved, in the caller's transaction. Returns nothing when another replica is reading.
CREATE FUNCTION relay.promote_intake(p_limit integer, p_max_ticks integer)
RETURNS TABLE (promoted integer, rejected integer, refused integer, tick_from bigint,
               tick_to bigint, more boolean, last_id bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $fn$
#variable_conflict use_column
DECLARE
    v_pos     relay.intake_reader%ROWTYPE;
    v_to      bigint;
    v_read    integer;
    v_last    bigint;
    v_status  boolean;
    v_limit   integer;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 OR p_max_ticks IS NULL
       OR p_max_ticks < 1 THEN
        RAISE EXCEPTION 'a promotion reads 1 to 50000 rows over at least one tick'
            USING ERRCODE = '22023';
    END IF;
    SELECT * INTO v_pos FROM relay.intake_reader r FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT c.status_events INTO v_status FROM relay.reconciler_config c;
    SELECT l.max_payload_bytes INTO v_limit FROM relay.limits l;

    -- One statement: its snapshot is taken after tick b committed, so it sees every row tick b
    -- saw (never part of a batch). The pair and the rows are read as in relay/sql/intake.sql.
    WITH pair AS MATERIALIZED (
        SELECT a.id AS tick_from, b.id AS tick_to, a.snap AS sa, b.snap AS sb
        FROM relay.tick a
        CROSS JOIN LATERAL (
            SELECT t.id, t.snap FROM relay.tick t
            WHERE t.id > a.id
              AND t.id <= coalesce(v_pos.tick_to, a.id + p_max_ticks)
              AND (v_pos.tick_to IS NULL OR t.id = v_pos.tick_to)
            ORDER BY t.id DESC
            LIMIT 1
        ) b
        WHERE a.id = v_pos.tick_from
    ), candidates AS (
        SELECT i.* FROM relay.intake i
        WHERE i.txid >= (SELECT pg_snapshot_xmax(p.sa) FROM pair p)
          AND i.txid < (SELECT pg_snapshot_xmax(p.sb) FROM pair p)
        UNION ALL
        SELECT i.* FROM relay.intake i
        WHERE i.txid = ANY (ARRAY(
            SELECT x FROM pair p, pg_snapshot_xip(p.sa) AS x
            WHERE pg_visible_in_snapshot(x, p.sb)))
    ), batch AS MATERIALIZED (
        SELECT p.tick_to AS pair_to, r.id, r.operation_key, r.effect_type::text AS effect_type,
               r.payload, r.business_key, r.traceparent, r.available_at, r.ordering_group,
               r.enqueued_by, r.enqueued_at
        FROM pair p
        LEFT JOIN LATERAL (
            SELECT c.* FROM candidates c
            WHERE pg_visible_in_snapshot(c.txid, p.sb) AND NOT pg_visible_in_snapshot(c.txid, p.sa)
              AND c.id > v_pos.after_id
            ORDER BY c.id
            LIMIT p_limit
        ) r ON true
    ), taken AS MATERIALIZED (
        -- A key already naming another effect (a key the relay reserves, written by hand, or an
        -- effect from before the intake), or one no effect row can hold: set aside, never
        -- published, never a second effect.
        SELECT b.id, format('operation key %s already names effect %s',
                            quote_literal(b.operation_key), e.id) AS why
        FROM batch b
        JOIN relay.effect e ON e.operation_key = b.operation_key AND e.id <> b.id
        WHERE b.id IS NOT NULL
        UNION ALL
        SELECT b.id, format('operation key of %s characters (1 to 512 allowed)',
                            length(b.operation_key))
        FROM batch b
        WHERE b.id IS NOT NULL AND length(b.operation_key) NOT BETWEEN 1 AND 512
    ), set_aside AS (
        INSERT INTO relay.intake_refused (id, operation_key, effect_type, enqueued_by, reason)
        SELECT b.id, left(b.operation_key, 512), b.effect_type, b.enqueued_by, x.why
        FROM batch b JOIN taken x ON x.id = b.id
        ON CONFLICT (id) DO NOTHING
        RETURNING 1
    ), made AS (
        INSERT INTO relay.effect AS e (id, operation_key, effect_type, topic, payload,
                                       business_key, traceparent, available_at, created_at,
                                       updated_at, ordering_group, message_key, enqueued_by,
                                       state, reason)
        -- A refused row keeps its payload only as bounded text (it may be no object, or
        -- nest deeper than anything that reads effects should decode), and no group.
        SELECT b.id, b.operation_key, b.effect_type, coalesce(t.topic, ''),
               CASE WHEN v.why IS NULL THEN b.payload
                    ELSE jsonb_build_object('refused_payload', left(b.payload::text, 4096)) END,
               CASE WHEN v.why IS NOT NULL THEN NULL
                    WHEN b.business_key IS NOT NULL THEN b.business_key
                    WHEN t.business_key IS NOT NULL
                        THEN relay.business_key(t.business_key, b.payload, b.operation_key) END,
               CASE WHEN v.why IS NULL THEN b.traceparent END,
               CASE WHEN v.why IS NULL
                    THEN greatest(coalesce(b.available_at, b.enqueued_at), b.enqueued_at)
                    ELSE b.enqueued_at END,
               b.enqueued_at, now(), CASE WHEN v.why IS NULL THEN b.ordering_group END,
               CASE WHEN t.key_by_group AND v.why IS NULL THEN b.ordering_group END,
               b.enqueued_by,
               CASE WHEN v.why IS NULL THEN 'PENDING' ELSE 'REJECTED' END,
               CASE WHEN v.why IS NOT NULL THEN 'refused when read: ' || v.why END
        FROM batch b
        LEFT JOIN relay.effect_type t ON t.name = b.effect_type
        CROSS JOIN LATERAL (
            SELECT coalesce(
                (SELECT format('operation key %s named effect %s (type %s, %s), purged at %s: not used again within the dedupe window',
                               quote_literal(k.operation_key), k.effect_id,
                               quote_literal(k.effect_type), k.final_state, k.purged_at)
                 FROM relay.purged_key k WHERE k.operation_key = b.operation_key),
                relay.intake_refusal(b.operation_key, b.effect_type, b.payload, b.business_key,
                                     b.traceparent, b.available_at, b.ordering_group, t.topic,
                                     v_limit)) AS why
        ) v
        WHERE b.id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM taken x WHERE x.id = b.id)
        ORDER BY b.id
        ON CONFLICT DO NOTHING
        RETURNING e.id, e.state, e.reason, e.created_at
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
    SELECT (SELECT max(b.pair_to) FROM batch b), (SELECT count(b.id) FROM batch b),
           (SELECT max(b.id) FROM batch b),
           (SELECT count(*) FILTER (WHERE m.state = 'PENDING') FROM made m),
           (SELECT count(*) FILTER (WHERE m.state = 'REJECTED') FROM made m),
           (SELECT count(*) FROM set_aside)
    INTO v_to, v_read, v_last, promoted, rejected, refused;
    IF v_to IS NULL THEN
        RETURN;  -- no tick after tick_from yet
    END IF;

    tick_from := v_pos.tick_from;
    tick_to := v_to;
    last_id := v_last;
    more := v_read >= p_limit;
    IF more THEN
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
    RETURN NEXT;
END
$fn$;
REVOKE ALL ON FUNCTION relay.promote_intake(integer, integer) FROM PUBLIC;

-- An intent not read yet, as get_effect shows it (PENDING), for any login that reads effects.
CREATE FUNCTION relay.intake_effect(p_operation_key text)
RETURNS TABLE (id bigint, operation_key text, effect_type text, topic text, payload jsonb,
               business_key text, traceparent text, available_at timestamptz,
               created_at timestamptz, ordering_group text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT i.id, i.operation_key, i.effect_type::text, coalesce(t.topic, ''), i.payload,
       i.business_key, i.traceparent,
       greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at), i.enqueued_at,
       i.ordering_group
FROM relay.intake i
LEFT JOIN relay.effect_type t ON t.name = i.effect_type::text
WHERE i.operation_key = p_operation_key
  AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.purged_key k WHERE k.effect_id = i.id)
$fn$;
REVOKE ALL ON FUNCTION relay.intake_effect(text) FROM PUBLIC;


-- relay.enqueue writes the intake (see the top of this file).
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

-- relay.cancel of an intent not read yet.
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
BEGIN
    SELECT * INTO v_effect FROM relay.effect e WHERE e.operation_key = p_operation_key FOR UPDATE;
    IF NOT FOUND THEN
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

-- Purge keeps a purged intent's key in the intake until the dedupe window ends.
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
END
$fn$;

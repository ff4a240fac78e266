-- 0004: a lean outbox. The application's transaction writes one row per intent; the relay
-- writes each attempt and its transitions once, when the outcome is known; status events are
-- read from the transitions log instead of being effects of their own. Also: business keys that
-- cannot collide, reserved names no application can write, a doorbell that lapses by itself.
--
-- Upgrade: stop the relays and reconcilers of 0003, run `relay migrate`, start the new ones.
-- Status events already written as `relay.status` effects are still published as before.

-- When the current attempt was claimed (its attempt row is written with its outcome).
ALTER TABLE relay.effect ADD COLUMN claimed_at timestamptz;

-- One index over the states that are not PENDING replaces four: every state change used to add
-- entries to (effect_type, state), the open-state and finished-state indexes and the lease index.
-- PENDING rows (the claim's partial index) stay out of it, so an enqueue adds no entry to it.
DROP INDEX relay.effect_type_state_idx;
DROP INDEX relay.effect_open_state_idx;
DROP INDEX relay.effect_finished_idx;
DROP INDEX relay.effect_dispatching_idx;
CREATE INDEX effect_state_idx ON relay.effect (state, updated_at) INCLUDE (effect_type)
    WHERE state <> 'PENDING';

-- Attempts, transitions and evidence are written only by the relay's own statements, about
-- effects those statements hold locked; their foreign keys cost a lookup and a row lock per row
-- (a third of an outcome's marking). `relay purge` deletes them together with their effect.
ALTER TABLE relay.attempt DROP CONSTRAINT IF EXISTS attempt_effect_id_fkey;
ALTER TABLE relay.transition DROP CONSTRAINT IF EXISTS transition_effect_id_fkey;
ALTER TABLE relay.evidence DROP CONSTRAINT IF EXISTS evidence_effect_id_fkey;

-- Status events: the transitions log is their outbox. A transition written while status events
-- are on waits in this small partial index until the relay has published it.
ALTER TABLE relay.transition ADD COLUMN status_pending boolean NOT NULL DEFAULT false;
CREATE INDEX transition_status_idx ON relay.transition (id) WHERE status_pending;

ALTER TABLE relay.reconciler_config ADD COLUMN status_events boolean NOT NULL DEFAULT false;
UPDATE relay.reconciler_config SET status_events = (status_effect_type IS NOT NULL);
DROP TRIGGER transition_status_events ON relay.transition;
DROP FUNCTION relay.emit_status_events();

-- Which relay replica publishes status events (one at a time, so one effect's events keep their
-- order), and the transitions it handed to Kafka before recording them as published: after a
-- crash the next holder looks for them in Kafka instead of publishing them twice.
CREATE TABLE relay.status_publisher (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    owner       text,
    owner_epoch bigint,
    lease_until timestamptz,
    inflight    bigint[] NOT NULL DEFAULT '{}',
    inflight_at timestamptz
);
INSERT INTO relay.status_publisher (id) VALUES (true);

-- Who really decided: the database login (session_user, whatever --actor claims) of every
-- evidence row, and the OS user of an operator's command. Older rows say nothing (NULL).
ALTER TABLE relay.evidence ADD COLUMN db_role text, ADD COLUMN os_user text;
ALTER TABLE relay.evidence ALTER COLUMN db_role SET DEFAULT session_user;

-- Deduplication outlives the purge: the keys of purged effects are remembered (for
-- dedupe_window_s after their purge), and relay.enqueue refuses them instead of publishing a
-- retried old intent a second time.
CREATE TABLE relay.purged_key (
    operation_key text PRIMARY KEY,
    effect_id     bigint NOT NULL,
    effect_type   text NOT NULL,
    final_state   text NOT NULL,
    purged_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purged_key_at_idx ON relay.purged_key (purged_at);

-- Limits every caller of relay.enqueue meets, whatever its language (synced from the settings by
-- `relay migrate`, `relay run` and `relay reconcile`).
CREATE TABLE relay.limits (
    id                boolean PRIMARY KEY DEFAULT true CHECK (id),
    max_payload_bytes integer NOT NULL DEFAULT 1000000
);
INSERT INTO relay.limits (id) VALUES (true);

-- The doorbell lapses by itself: an idle relay arms it for a short while and re-arms it while it
-- waits, so writers stop paying for a NOTIFY soon after the last idle relay died.
ALTER TABLE relay.doorbell ADD COLUMN armed_until timestamptz;

-- A business key from its template: each field's value is escaped ('%' and every character of
-- the template's own text become %XX), so distinct values give distinct keys and a value is
-- never expanded again. Templates must separate their fields by text (checked by the config).
CREATE FUNCTION relay.business_key(p_template text, p_payload jsonb, p_operation_key text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_literal text := regexp_replace(p_template, '\{[A-Za-z0-9_]+\}', '', 'g') || '%';
    v_out     text := '';
    v_part    text[];
    v_value   text;
BEGIN
    FOR v_part IN SELECT regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}|([^{]+|\{)', 'g') LOOP
        IF v_part[1] IS NULL THEN
            v_out := v_out || v_part[2];
            CONTINUE;
        END IF;
        v_value := p_payload ->> v_part[1];
        IF v_value IS NULL THEN
            RAISE EXCEPTION 'payload of % lacks field % needed by the business key %',
                p_operation_key, quote_literal(v_part[1]), quote_literal(p_template)
                USING ERRCODE = 'RL002';
        END IF;
        IF translate(v_value, v_literal, '') <> v_value THEN
            SELECT string_agg(
                       CASE WHEN strpos(v_literal, s.c) > 0
                            THEN (SELECT string_agg('%' || lpad(upper(to_hex(get_byte(b.v, i))), 2, '0'), ''
                                                    ORDER BY i)
                                  FROM (SELECT convert_to(s.c, 'UTF8') AS v) b,
                                       generate_series(0, length(b.v) - 1) AS i)
                            ELSE s.c END,
                       '' ORDER BY s.n)
            INTO v_value
            FROM regexp_split_to_table(v_value, '') WITH ORDINALITY AS s(c, n);
        END IF;
        v_out := v_out || v_value;
    END LOOP;
    RETURN v_out;
END
$fn$;

-- The one write of an enqueue: the effect row (its first transition is implied by its own
-- columns and written to the log when the relay first claims it). What the database knows (the
-- type, the limits, the doorbell, a purged key) is read in one statement. SECURITY DEFINER with
-- a pinned search_path: an application role needs EXECUTE on this function and nothing on the
-- tables. One row out (OUT parameters), not a set: no tuplestore per call.
DROP FUNCTION relay.enqueue(text, text, jsonb, text, text, timestamptz);
CREATE FUNCTION relay.enqueue(
    p_operation_key text,
    p_effect_type   text,
    p_payload       jsonb,
    p_business_key  text DEFAULT NULL,
    p_traceparent   text DEFAULT NULL,
    p_available_at  timestamptz DEFAULT NULL,
    OUT effect_id   bigint,
    OUT state       text,
    OUT created     boolean
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- An enqueue is a handful of index lookups: never worth compiling (JIT costs milliseconds).
SET jit = off
AS $fn$
#variable_conflict use_column
DECLARE
    v_topic    text;
    v_template text;
    v_limit    integer;
    v_ring     boolean;
    v_purged   boolean;
    v_key      text := p_business_key;
    v_existing relay.effect%ROWTYPE;
    v_gone     relay.purged_key%ROWTYPE;
BEGIN
    IF p_operation_key IS NULL OR length(p_operation_key) = 0 OR length(p_operation_key) > 512 THEN
        RAISE EXCEPTION 'operation key must be 1 to 512 characters' USING ERRCODE = 'RL002';
    END IF;
    IF strpos(p_operation_key, '#compensation') > 0
       AND p_operation_key ~ '#compensation(-[0-9]+)?$' THEN
        RAISE EXCEPTION 'operation key % is reserved for the relay''s own compensations',
            quote_literal(p_operation_key) USING ERRCODE = 'RL002';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'payload of % must be a JSON object', p_operation_key
            USING ERRCODE = 'RL002';
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
    SELECT (SELECT t.topic FROM relay.effect_type t WHERE t.name = p_effect_type),
           (SELECT t.business_key FROM relay.effect_type t WHERE t.name = p_effect_type),
           (SELECT l.max_payload_bytes FROM relay.limits l),
           coalesce((SELECT d.armed_until > now() FROM relay.doorbell d), false),
           EXISTS (SELECT 1 FROM relay.purged_key k WHERE k.operation_key = p_operation_key)
    INTO v_topic, v_template, v_limit, v_ring, v_purged;
    IF v_topic IS NULL THEN
        RAISE EXCEPTION 'effect type % is not declared', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001',
                  HINT = 'declare it in the config file and run relay migrate';
    END IF;
    -- The stored size is a cheap lower bound of the JSON text's (which escapes at most 6 to 1):
    -- the text is only made for payloads that could be over the limit.
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

    INSERT INTO relay.effect AS e (operation_key, effect_type, topic, payload, business_key,
                                   traceparent, available_at)
    VALUES (p_operation_key, p_effect_type, v_topic, p_payload, v_key, p_traceparent,
            coalesce(p_available_at, now()))
    ON CONFLICT ON CONSTRAINT effect_operation_key_unique DO NOTHING
    RETURNING e.id INTO effect_id;

    IF effect_id IS NOT NULL THEN
        IF v_ring THEN
            PERFORM pg_notify('relay_doorbell', '');
        END IF;
        state := 'PENDING';
        created := true;
        RETURN;
    END IF;

    SELECT * INTO v_existing FROM relay.effect e WHERE e.operation_key = p_operation_key;
    IF v_existing.effect_type <> p_effect_type OR v_existing.payload <> p_payload THEN
        RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
            quote_literal(p_operation_key), v_existing.id, quote_literal(v_existing.effect_type)
            USING ERRCODE = 'RL003';
    END IF;
    effect_id := v_existing.id;
    state := v_existing.state;
    created := false;
END
$fn$;

-- The effect type is checked by relay.enqueue (and no declared type is ever deleted). The
-- foreign key added a FOR KEY SHARE lock of the type's row to every enqueue: with concurrent
-- writers, a multixact on one hot row per transaction.
ALTER TABLE relay.effect DROP CONSTRAINT IF EXISTS effect_effect_type_fkey;

-- A compensation of an effect, made by the reconciler or an operator: keyed KEY#compensation,
-- then KEY#compensation-2..., a namespace relay.enqueue refuses to applications.
CREATE FUNCTION relay.enqueue_compensation(
    p_parent_id   bigint,
    p_index       integer,
    p_effect_type text,
    p_payload     jsonb,
    p_reason      text,
    p_actor       text
) RETURNS TABLE (effect_id bigint, operation_key text, created boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    v_suffix   text := CASE WHEN p_index = 0 THEN '#compensation'
                            ELSE '#compensation-' || (p_index + 1) END;
    v_key      text;
    v_type     relay.effect_type%ROWTYPE;
    v_parent   relay.effect%ROWTYPE;
    v_id       bigint;
BEGIN
    SELECT * INTO v_parent FROM relay.effect e WHERE e.id = p_parent_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no effect has id %', p_parent_id USING ERRCODE = 'RL004';
    END IF;
    v_key := left(v_parent.operation_key, 512 - length(v_suffix)) || v_suffix;
    SELECT * INTO v_type FROM relay.effect_type t WHERE t.name = p_effect_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'effect type % is not declared', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001';
    END IF;
    INSERT INTO relay.effect AS e (operation_key, effect_type, topic, payload, business_key,
                                   traceparent, parent_effect_id)
    VALUES (v_key, p_effect_type, v_type.topic, p_payload,
            CASE WHEN v_type.business_key IS NOT NULL
                 THEN relay.business_key(v_type.business_key, p_payload, v_key) END,
            v_parent.traceparent, p_parent_id)
    ON CONFLICT ON CONSTRAINT effect_operation_key_unique DO NOTHING
    RETURNING e.id INTO v_id;
    IF v_id IS NULL THEN
        SELECT e.id INTO v_id FROM relay.effect e
        WHERE e.operation_key = v_key AND e.parent_effect_id = p_parent_id
          AND e.effect_type = p_effect_type;
        IF v_id IS NULL THEN
            RAISE EXCEPTION 'operation key % already names another intent', quote_literal(v_key)
                USING ERRCODE = 'RL003';
        END IF;
        RETURN QUERY SELECT v_id, v_key, false;
        RETURN;
    END IF;
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                  status_pending)
    SELECT v_id, NULL, 'PENDING', p_reason, p_actor, 0, c.status_events
    FROM relay.reconciler_config c;
    IF (SELECT d.armed_until > now() FROM relay.doorbell d) THEN
        PERFORM pg_notify('relay_doorbell', '');
    END IF;
    RETURN QUERY SELECT v_id, v_key, true;
END
$fn$;
REVOKE ALL ON FUNCTION relay.enqueue_compensation(bigint, integer, text, jsonb, text, text)
    FROM PUBLIC;

-- Withdraw an intent that no attempt has touched yet; its implied first transition is written
-- to the log first (effects enqueued before this migration wrote theirs at enqueue).
CREATE OR REPLACE FUNCTION relay.cancel(p_operation_key text, p_reason text DEFAULT 'cancelled',
                                        p_actor text DEFAULT 'application')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_effect relay.effect%ROWTYPE;
    v_status boolean := (SELECT c.status_events FROM relay.reconciler_config c);
BEGIN
    SELECT * INTO v_effect FROM relay.effect e WHERE e.operation_key = p_operation_key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no effect has operation key %', quote_literal(p_operation_key)
            USING ERRCODE = 'RL004';
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
    VALUES (v_effect.id, 'PENDING', 'CANCELLED', p_reason, p_actor, v_effect.attempts, v_status);
    RETURN 'CANCELLED';
END
$fn$;

-- The one-row tables have statistics from the start, so no plan takes them for big ones.
ANALYZE relay.limits, relay.doorbell, relay.status_publisher, relay.reconciler_config,
    relay.effect_type;

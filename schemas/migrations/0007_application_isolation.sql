-- 0007: every enqueue path enforces the Python API's limits. A payload written through the SQL
-- function could nest 3,000 levels deep, deeper than the daemons' JSON parsers go, and stop the
-- reconciler on every result batch that touched it; a business key had no length limit; an
-- available_at of infinity never came due and one of -infinity or year 1 jumped every other
-- application's backlog. Now, as in Python: payloads nest at most 100 levels, business keys are
-- 1 to 512 characters, available_at is finite, and a time in the past means "due now" (it is
-- stored as the enqueue's time, so no application can move ahead of effects already waiting).
--
-- A compensation's key was its parent's cut to fit 512 characters: two long keys sharing their
-- first 499 characters got one compensation key, and the second compensation was refused. A key
-- that must be cut now ends with a digest of the whole parent key.
--
-- Applications cancelled anyone's effects, the relay's compensations included, under whatever
-- actor they named. An effect now records the login that enqueued it (`enqueued_by`, NULL for
-- the relay's own and for rows from before this migration); `relay.cancel` lets a caller without
-- UPDATE on relay.effect (an application) cancel only effects it enqueued, never a relay-made
-- one, and every transition it writes names the caller's login after the actor it was given.
--
-- Evidence names the login that wrote it: the database sets `db_role`, whatever the writer says.
-- A result that arrives on another type's result topic is kept with the verdict 'misrouted'.
--
-- Upgrade: `relay migrate` while relays run is safe; the signatures are unchanged, so the grants
-- made by `relay roles` stay as they are. Rows written before this migration are not rewritten:
-- the reconciler no longer decodes payloads to apply a result, and sets aside one it cannot
-- decode with a reason.

ALTER TABLE relay.effect ADD COLUMN enqueued_by text;

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
    INTO v_topic, v_template, v_by_group, v_limit, v_ring, v_purged
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
    IF p_ordering_group IS NOT NULL THEN
        -- Commit order is publication order: the lock is held until this transaction ends, so
        -- the next enqueue of the group takes its id (the order the relay follows) only after
        -- this one is committed or rolled back.
        PERFORM pg_advisory_xact_lock(1380273218, hashtext(p_ordering_group));
    END IF;

    INSERT INTO relay.effect AS e (operation_key, effect_type, topic, payload, business_key,
                                   traceparent, available_at, ordering_group, message_key,
                                   enqueued_by)
    VALUES (p_operation_key, p_effect_type, v_topic, p_payload, v_key, p_traceparent,
            greatest(coalesce(p_available_at, now()), now()), p_ordering_group,
            CASE WHEN v_by_group THEN p_ordering_group END, session_user)
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
    IF v_existing.effect_type <> p_effect_type OR v_existing.payload <> p_payload
       OR v_existing.ordering_group IS DISTINCT FROM p_ordering_group THEN
        RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
            quote_literal(p_operation_key), v_existing.id, quote_literal(v_existing.effect_type)
            USING ERRCODE = 'RL003';
    END IF;
    effect_id := v_existing.id;
    state := v_existing.state;
    created := false;
END
$fn$;

CREATE OR REPLACE FUNCTION relay.enqueue_compensation(
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
    v_key := v_parent.operation_key || v_suffix;
    IF length(v_key) > 512 THEN
        -- Cut to fit, with a digest of the whole parent key: distinct parents, distinct keys.
        v_key := left(v_parent.operation_key, 512 - length(v_suffix) - 17) || '~'
                 || left(md5(v_parent.operation_key), 16) || v_suffix;
    END IF;
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

CREATE OR REPLACE FUNCTION relay.cancel(p_operation_key text, p_reason text DEFAULT 'cancelled',
                                        p_actor text DEFAULT 'application')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_effect   relay.effect%ROWTYPE;
    v_status   boolean := (SELECT c.status_events FROM relay.reconciler_config c);
    -- Operators, daemons and the owner may change any effect; applications may not.
    v_operator boolean := has_table_privilege(session_user, 'relay.effect', 'UPDATE');
    v_actor    text := format('%s [login %s]', p_actor, session_user);
BEGIN
    SELECT * INTO v_effect FROM relay.effect e WHERE e.operation_key = p_operation_key FOR UPDATE;
    IF NOT FOUND THEN
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

CREATE FUNCTION relay.evidence_login() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    NEW.db_role := session_user;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER evidence_login BEFORE INSERT ON relay.evidence
    FOR EACH ROW EXECUTE FUNCTION relay.evidence_login();

ALTER TABLE relay.evidence DROP CONSTRAINT evidence_verdict_valid,
    ADD CONSTRAINT evidence_verdict_valid CHECK (verdict IN (
        'applied', 'repeated', 'deferred', 'ignored', 'malformed', 'orphaned', 'conflicting',
        'late', 'failed', 'misrouted'));

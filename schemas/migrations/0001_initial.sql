-- 0001: the outbox, its attempts and transitions, effect types, replicas and the doorbell.
-- Applied by `relay migrate` inside one transaction under an advisory lock.

CREATE TABLE relay.effect_type (
    name               text PRIMARY KEY,
    topic              text NOT NULL,
    idempotent         boolean NOT NULL,
    business_key       text,
    result_topic       text,
    outcome_timeout_s  double precision NOT NULL,
    has_observer       boolean NOT NULL DEFAULT false,
    compensation       text,
    max_attempts       integer NOT NULL DEFAULT 5,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- An UNKNOWN outcome of a non-idempotent effect must be resolvable somehow.
    CONSTRAINT effect_type_resolvable
        CHECK (idempotent OR business_key IS NOT NULL OR has_observer OR compensation IS NOT NULL)
);

CREATE TABLE relay.effect (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_key       text NOT NULL,
    effect_type         text NOT NULL REFERENCES relay.effect_type (name),
    topic               text NOT NULL,
    payload             jsonb NOT NULL,
    business_key        text,
    traceparent         text,
    state               text NOT NULL DEFAULT 'PENDING',
    attempts            integer NOT NULL DEFAULT 0,
    available_at        timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Who holds a DISPATCHING effect, with which replica epoch, until when. Marks are
    -- compare-and-set on (owner, owner_epoch) so that a paused replica cannot mark anything.
    owner               text,
    owner_epoch         bigint,
    lease_until         timestamptz,
    reason              text,
    published_partition integer,
    published_offset    bigint,
    published_at        timestamptz,
    outcome_deadline    timestamptz,
    parent_effect_id    bigint REFERENCES relay.effect (id),
    CONSTRAINT effect_operation_key_unique UNIQUE (operation_key),
    CONSTRAINT effect_operation_key_nonempty CHECK (length(operation_key) BETWEEN 1 AND 512),
    CONSTRAINT effect_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT effect_state_valid CHECK (state IN ('PENDING', 'DISPATCHING', 'PUBLISHED',
        'CONFIRMED', 'REJECTED', 'UNKNOWN', 'STUCK', 'CANCELLED'))
);

-- The relay's claim scans only this small partial index, however large the table grows.
CREATE INDEX effect_pending_idx ON relay.effect (available_at, id) WHERE state = 'PENDING';
-- Leases to recover, and the reconciler's work lists.
CREATE INDEX effect_dispatching_idx ON relay.effect (lease_until) WHERE state = 'DISPATCHING';
CREATE INDEX effect_open_state_idx ON relay.effect (state, updated_at)
    WHERE state IN ('PUBLISHED', 'UNKNOWN', 'STUCK');
CREATE INDEX effect_type_state_idx ON relay.effect (effect_type, state);

CREATE TABLE relay.attempt (
    effect_id     bigint NOT NULL REFERENCES relay.effect (id) ON DELETE CASCADE,
    attempt       integer NOT NULL,
    replica_id    text NOT NULL,
    replica_epoch bigint NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    -- acked | rejected | unknown | not_sent | released ; NULL while in flight.
    outcome       text,
    reason        text,
    partition     integer,
    "offset"      bigint,
    PRIMARY KEY (effect_id, attempt),
    CONSTRAINT attempt_outcome_valid
        CHECK (outcome IN ('acked', 'rejected', 'unknown', 'not_sent', 'released'))
);

CREATE TABLE relay.transition (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    effect_id   bigint NOT NULL REFERENCES relay.effect (id) ON DELETE CASCADE,
    from_state  text,
    to_state    text NOT NULL,
    reason      text NOT NULL,
    actor       text NOT NULL,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transition_effect_idx ON relay.transition (effect_id, id);

-- One row per relay replica: the epoch grows at every start, and fences the previous incarnation.
CREATE TABLE relay.replica (
    replica_id   text PRIMARY KEY,
    epoch        bigint NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- The doorbell: an idle relay arms it, and only then does an enqueue send a NOTIFY. A busy relay
-- leaves it disarmed, so writers pay no cluster-wide notify lock while the relay has work.
CREATE TABLE relay.doorbell (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    armed  boolean NOT NULL DEFAULT false
);
INSERT INTO relay.doorbell (id, armed) VALUES (true, false);

-- The function other languages call inside their own transaction. Returns the effect, and
-- whether this call created it. Raises SQLSTATE RL001..RL004 on bad input (see relay.errors).
CREATE FUNCTION relay.enqueue(
    p_operation_key text,
    p_effect_type   text,
    p_payload       jsonb,
    p_business_key  text DEFAULT NULL,
    p_traceparent   text DEFAULT NULL,
    p_available_at  timestamptz DEFAULT NULL
) RETURNS TABLE (effect_id bigint, state text, created boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    v_type     relay.effect_type%ROWTYPE;
    v_key      text := p_business_key;
    v_field    text;
    v_value    text;
    v_existing relay.effect%ROWTYPE;
    v_id       bigint;
BEGIN
    IF p_operation_key IS NULL OR length(p_operation_key) = 0 OR length(p_operation_key) > 512 THEN
        RAISE EXCEPTION 'operation key must be 1 to 512 characters' USING ERRCODE = 'RL002';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'payload of % must be a JSON object', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    SELECT * INTO v_type FROM relay.effect_type t WHERE t.name = p_effect_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'effect type % is not declared', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001',
                  HINT = 'declare it in the config file and run relay migrate';
    END IF;
    IF v_key IS NULL AND v_type.business_key IS NOT NULL THEN
        v_key := v_type.business_key;
        FOR v_field IN
            SELECT DISTINCT m[1] FROM regexp_matches(v_type.business_key, '\{([A-Za-z0-9_]+)\}', 'g') AS m
        LOOP
            v_value := p_payload ->> v_field;
            IF v_value IS NULL THEN
                RAISE EXCEPTION 'payload of % lacks field % needed by the business key %',
                    p_operation_key, quote_literal(v_field), quote_literal(v_type.business_key)
                    USING ERRCODE = 'RL002';
            END IF;
            v_key := replace(v_key, '{' || v_field || '}', v_value);
        END LOOP;
    END IF;

    INSERT INTO relay.effect AS e (operation_key, effect_type, topic, payload, business_key,
                                   traceparent, available_at)
    VALUES (p_operation_key, p_effect_type, v_type.topic, p_payload, v_key, p_traceparent,
            coalesce(p_available_at, now()))
    ON CONFLICT ON CONSTRAINT effect_operation_key_unique DO NOTHING
    RETURNING e.id INTO v_id;

    IF v_id IS NOT NULL THEN
        INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt)
        VALUES (v_id, NULL, 'PENDING', 'enqueued', 'application', 0);
        IF (SELECT d.armed FROM relay.doorbell d) THEN
            PERFORM pg_notify('relay_doorbell', '');
        END IF;
        RETURN QUERY SELECT v_id, 'PENDING'::text, true;
        RETURN;
    END IF;

    SELECT * INTO v_existing FROM relay.effect e WHERE e.operation_key = p_operation_key;
    IF v_existing.effect_type <> p_effect_type OR v_existing.payload <> p_payload THEN
        RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
            quote_literal(p_operation_key), v_existing.id, quote_literal(v_existing.effect_type)
            USING ERRCODE = 'RL003';
    END IF;
    RETURN QUERY SELECT v_existing.id, v_existing.state, false;
END
$fn$;

-- Withdraw an intent that no attempt has touched yet.
CREATE FUNCTION relay.cancel(p_operation_key text, p_reason text DEFAULT 'cancelled',
                             p_actor text DEFAULT 'application')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_effect relay.effect%ROWTYPE;
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
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt)
    VALUES (v_effect.id, 'PENDING', 'CANCELLED', p_reason, p_actor, v_effect.attempts);
    RETURN 'CANCELLED';
END
$fn$;

-- 0002: the reconciler. Evidence of downstream outcomes, observation bookkeeping, status events.
-- Additive only: safe to apply while relays of 0001/0003 run.

-- What the reconciler learnt about the current attempt's downstream outcome.
ALTER TABLE relay.effect
    ADD COLUMN external_id   text,
    ADD COLUMN observe_at    timestamptz,
    ADD COLUMN observe_tries integer NOT NULL DEFAULT 0;

-- The Kafka key when it is not the effect's own operation key: a status event is keyed by the
-- operation key of the effect it reports on, so that one effect's events stay in order on one
-- partition (its own operation key must be unique, so it cannot be that key).
ALTER TABLE relay.effect ADD COLUMN message_key text;

-- The deadline sweep, the observation queue, compensations of an effect, and the purge.
CREATE INDEX effect_deadline_idx ON relay.effect (outcome_deadline)
    WHERE state = 'PUBLISHED' AND outcome_deadline IS NOT NULL;
CREATE INDEX effect_observe_idx ON relay.effect (observe_at)
    WHERE state = 'UNKNOWN' AND published_offset IS NOT NULL;
CREATE INDEX effect_parent_idx ON relay.effect (parent_effect_id)
    WHERE parent_effect_id IS NOT NULL;
CREATE INDEX effect_finished_idx ON relay.effect (updated_at)
    WHERE state IN ('CONFIRMED', 'REJECTED', 'CANCELLED', 'PUBLISHED');

-- Everything observed about effects after their attempts, kept also when it is rejected, late or
-- ambiguous: downstream results (one row per Kafka record: redelivery is a no-op), observer
-- answers and operators' decisions.
CREATE TABLE relay.evidence (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text NOT NULL,
    effect_id      bigint REFERENCES relay.effect (id) ON DELETE CASCADE,
    operation_key  text,
    topic          text,
    partition      integer,
    "offset"       bigint,
    -- result: committed | rejected | unknown; observation: present | absent | duplicate |
    -- inconclusive; operator: confirm | reject | redispatch | compensate.
    outcome        text,
    external_id    text,
    observed_count integer,
    detail         text,
    raw            bytea,
    raw_size       integer,
    attempt        integer,
    -- What the reconciler did with it.
    verdict        text NOT NULL,
    reason         text,
    actor          text NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    applied_at     timestamptz,
    CONSTRAINT evidence_kind_valid CHECK (kind IN ('result', 'observation', 'operator')),
    CONSTRAINT evidence_verdict_valid CHECK (verdict IN (
        'applied', 'repeated', 'deferred', 'ignored', 'malformed', 'orphaned', 'conflicting',
        'late', 'failed')),
    CONSTRAINT evidence_record_unique UNIQUE (topic, partition, "offset")
);
CREATE INDEX evidence_effect_idx ON relay.evidence (effect_id, id);
CREATE INDEX evidence_deferred_idx ON relay.evidence (id) WHERE verdict = 'deferred';
CREATE INDEX evidence_unattached_idx ON relay.evidence (received_at) WHERE effect_id IS NULL;

-- Which effect type carries status events (NULL: none). Set by `relay reconcile` at start.
CREATE TABLE relay.reconciler_config (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    status_effect_type text REFERENCES relay.effect_type (name)
);
INSERT INTO relay.reconciler_config (id) VALUES (true);

-- One status event per transition, written to the outbox in the transaction that wrote the
-- transition, whoever wrote it (application, relay, reconciler, operator). Status effects are
-- themselves effects, so they are published by the relay like any other; their own transitions
-- emit nothing.
CREATE FUNCTION relay.emit_status_events() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_type relay.effect_type%ROWTYPE;
    v_made integer;
BEGIN
    SELECT t.* INTO v_type
    FROM relay.reconciler_config c JOIN relay.effect_type t ON t.name = c.status_effect_type;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- Status effects' own transitions (also those inserted below, which fire this trigger once
    -- more, one level deeper) emit nothing. No pg_trigger_depth() test: an application that
    -- enqueues from its own trigger gets its status events too.
    IF NOT EXISTS (SELECT 1 FROM new_rows n JOIN relay.effect e ON e.id = n.effect_id
                   WHERE e.effect_type <> v_type.name) THEN
        RETURN NULL;
    END IF;
    WITH src AS (
        SELECT n.id AS transition_id, n.from_state, n.to_state, n.reason, n.attempt, n.at,
               e.operation_key, e.effect_type, e.traceparent
        FROM new_rows n JOIN relay.effect e ON e.id = n.effect_id
        WHERE e.effect_type <> v_type.name
    ), made AS (
        INSERT INTO relay.effect (operation_key, message_key, effect_type, topic, payload,
                                  traceparent)
        SELECT left(s.operation_key, 480) || '#status#' || s.transition_id, s.operation_key,
               v_type.name,
               v_type.topic,
               jsonb_build_object(
                   'operation_key', s.operation_key, 'effect_type', s.effect_type,
                   'state', s.to_state, 'previous_state', s.from_state, 'reason', s.reason,
                   'attempt', s.attempt, 'at', s.at, 'traceparent', s.traceparent),
               s.traceparent
        FROM src s
        ORDER BY s.transition_id
        RETURNING id
    )
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt)
    SELECT id, NULL, 'PENDING', 'status event', 'reconciler', 0 FROM made;
    GET DIAGNOSTICS v_made = ROW_COUNT;
    IF v_made > 0 AND (SELECT d.armed FROM relay.doorbell d) THEN
        PERFORM pg_notify('relay_doorbell', '');
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER transition_status_events
    AFTER INSERT ON relay.transition
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION relay.emit_status_events();

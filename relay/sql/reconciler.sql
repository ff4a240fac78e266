-- The reconciler's queries (relay reconcile, resolve, purge). Loaded by relay.sql with the others.

-- name: set_status_effect_type
-- Status events are emitted (by a trigger on relay.transition) only while this names a type.
UPDATE relay.reconciler_config SET status_effect_type = %(name)s
WHERE status_effect_type IS DISTINCT FROM %(name)s;

-- name: insert_result_evidence
-- One row per Kafka record: a redelivered record conflicts and is not applied again.
INSERT INTO relay.evidence (kind, operation_key, topic, partition, "offset", outcome,
                            external_id, detail, raw, raw_size, verdict, reason, actor)
VALUES ('result', %(operation_key)s, %(topic)s, %(partition)s, %(offset)s, %(outcome)s,
        %(external_id)s, %(detail)s, %(raw)s, %(raw_size)s, %(verdict)s, %(reason)s, %(actor)s)
ON CONFLICT ON CONSTRAINT evidence_record_unique DO NOTHING
RETURNING id;

-- name: insert_evidence
INSERT INTO relay.evidence (kind, effect_id, operation_key, outcome, external_id, observed_count,
                            detail, attempt, verdict, reason, actor, applied_at)
VALUES (%(kind)s, %(effect_id)s, %(operation_key)s, %(outcome)s, %(external_id)s,
        %(observed_count)s, %(detail)s, %(attempt)s, %(verdict)s, %(reason)s, %(actor)s,
        CASE WHEN %(verdict)s = 'applied' THEN now() END)
RETURNING id;

-- name: finish_evidence
UPDATE relay.evidence
SET effect_id = %(effect_id)s, verdict = %(verdict)s, reason = %(reason)s, attempt = %(attempt)s,
    applied_at = CASE WHEN %(verdict)s = 'applied' THEN now() ELSE applied_at END
WHERE id = %(id)s;

-- name: lock_effect
-- The effect a result or a decision is about, locked until the transaction ends.
SELECT id, operation_key, effect_type, state, attempts, external_id, payload, business_key,
       published_offset
FROM relay.effect WHERE operation_key = %(operation_key)s
FOR UPDATE;

-- name: move_effect
-- One state change with its transition row, compare-and-set on the state (and attempt when
-- given). Leaving for PENDING forgets the last publication: the next attempt records its own.
WITH moved AS (
    UPDATE relay.effect AS e
    SET state = %(to_state)s, reason = %(reason)s, updated_at = now(),
        owner = NULL, owner_epoch = NULL, lease_until = NULL,
        external_id = coalesce(%(external_id)s, e.external_id),
        available_at = CASE WHEN %(to_state)s = 'PENDING'
                            THEN now() + make_interval(secs => %(delay_s)s)
                            ELSE e.available_at END,
        published_partition = CASE WHEN %(to_state)s = 'PENDING' THEN NULL
                                   ELSE e.published_partition END,
        published_offset = CASE WHEN %(to_state)s = 'PENDING' THEN NULL
                                ELSE e.published_offset END,
        published_at = CASE WHEN %(to_state)s = 'PENDING' THEN NULL ELSE e.published_at END,
        outcome_deadline = NULL,
        observe_at = CASE WHEN %(to_state)s = 'UNKNOWN' THEN now() END,
        observe_tries = CASE WHEN %(to_state)s = 'UNKNOWN' AND e.state = 'UNKNOWN'
                             THEN e.observe_tries ELSE 0 END
    WHERE e.id = %(id)s AND e.state = %(from_state)s
      AND (%(attempt)s::int IS NULL OR e.attempts = %(attempt)s)
    RETURNING e.id, e.attempts
)
INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt)
SELECT id, %(from_state)s, %(to_state)s, %(reason)s, %(actor)s, attempts FROM moved
RETURNING effect_id;

-- name: compensation_needs
-- How many extra executions are known: distinct committed external ids beyond the first, or an
-- observer's count beyond one; and how many compensations exist already.
SELECT
    greatest(
        (SELECT count(DISTINCT v.external_id) FROM relay.evidence v
         WHERE v.effect_id = %(id)s AND v.kind = 'result' AND v.outcome = 'committed'
           AND v.verdict IN ('applied', 'conflicting', 'repeated')) - 1,
        (SELECT coalesce(max(v.observed_count), 0) FROM relay.evidence v
         WHERE v.effect_id = %(id)s AND v.kind = 'observation' AND v.outcome = 'duplicate') - 1,
        %(at_least)s::int
    )::int AS extra,
    (SELECT count(*) FROM relay.effect c WHERE c.parent_effect_id = %(id)s)::int AS existing;

-- name: attach_compensation
-- Link a compensation to the effect it undoes, and say in its first transition who made it.
WITH linked AS (
    UPDATE relay.effect SET parent_effect_id = %(parent_id)s
    WHERE id = %(id)s AND parent_effect_id IS NULL
    RETURNING id
)
UPDATE relay.transition t SET actor = %(actor)s, reason = %(reason)s
FROM linked WHERE t.effect_id = linked.id AND t.from_state IS NULL;

-- name: expire_deadlines
-- PUBLISHED effects whose downstream result did not come in time: nobody knows whether they took
-- effect, so they are UNKNOWN (and observed next), never retried blindly.
WITH due AS (
    SELECT e.id FROM relay.effect e
    WHERE e.state = 'PUBLISHED' AND e.outcome_deadline IS NOT NULL
      AND e.outcome_deadline < now()
    ORDER BY e.outcome_deadline
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE relay.effect AS e
    SET state = 'UNKNOWN', updated_at = now(), observe_at = now(), observe_tries = 0,
        reason = format('no downstream result within %%ss of publication', t.outcome_timeout_s),
        outcome_deadline = NULL
    FROM due, relay.effect_type t
    WHERE e.id = due.id AND t.name = e.effect_type
    RETURNING e.id, e.attempts, e.reason
)
INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt)
SELECT id, 'PUBLISHED', 'UNKNOWN', reason, %(actor)s, attempts FROM moved
RETURNING effect_id;

-- name: claim_deferred_evidence
-- Results that arrived while their effect was still DISPATCHING (the downstream answered before
-- the relay recorded the Kafka acknowledgement), applied once the relay has recorded it.
SELECT v.id, v.operation_key, v.topic, v.partition, v."offset", v.outcome, v.external_id,
       v.detail
FROM relay.evidence v JOIN relay.effect e ON e.id = v.effect_id
WHERE v.verdict = 'deferred' AND e.state <> 'DISPATCHING'
ORDER BY v.id
LIMIT %(limit)s
FOR UPDATE OF v SKIP LOCKED;

-- name: claim_observations
-- UNKNOWN effects whose publication is known (the Kafka hop is the relay's own business) and
-- whose observation is due. The claim moves observe_at forward: a lease against other replicas.
WITH due AS (
    SELECT e.id FROM relay.effect e
    WHERE e.state = 'UNKNOWN' AND e.published_offset IS NOT NULL
      AND coalesce(e.observe_at, '-infinity') <= now()
    ORDER BY e.observe_at NULLS FIRST, e.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE relay.effect AS e SET observe_at = now() + make_interval(secs => %(lease_s)s)
FROM due WHERE e.id = due.id
RETURNING e.id, e.operation_key, e.effect_type, e.payload, e.business_key, e.attempts,
          e.observe_tries, e.observe_at;

-- name: lock_observed
-- The observed effect, if nothing moved it while its observer was asked.
SELECT id, state, attempts, observe_tries FROM relay.effect
WHERE id = %(id)s AND state = 'UNKNOWN' AND attempts = %(attempt)s AND observe_at = %(lease)s
FOR UPDATE;

-- name: reschedule_observation
UPDATE relay.effect
SET observe_tries = observe_tries + 1, observe_at = now() + make_interval(secs => %(delay_s)s),
    reason = %(reason)s
WHERE id = %(id)s AND state = 'UNKNOWN';

-- name: get_evidence
SELECT kind, topic, partition, "offset", outcome, external_id, observed_count, detail, attempt,
       verdict, reason, actor, received_at, applied_at
FROM relay.evidence WHERE effect_id = %(effect_id)s ORDER BY id;

-- name: evidence_counts
SELECT kind, verdict, count(*)::bigint AS records FROM relay.evidence
GROUP BY kind, verdict ORDER BY kind, verdict;

-- name: purge_counts
-- What a purge would remove now: finished effects past retention with no compensation left.
WITH gone AS (
    SELECT e.id FROM relay.effect e JOIN relay.effect_type t ON t.name = e.effect_type
    WHERE e.updated_at < now() - make_interval(secs => %(retention_s)s)
      AND (e.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
           OR (e.state = 'PUBLISHED' AND t.result_topic IS NULL))
      AND NOT EXISTS (SELECT 1 FROM relay.effect c WHERE c.parent_effect_id = e.id)
)
SELECT (SELECT count(*) FROM gone)::bigint AS effects,
       (SELECT count(*) FROM relay.attempt a JOIN gone g ON g.id = a.effect_id)::bigint
           AS attempts,
       (SELECT count(*) FROM relay.transition x JOIN gone g ON g.id = x.effect_id)::bigint
           AS transitions,
       ((SELECT count(*) FROM relay.evidence v JOIN gone g ON g.id = v.effect_id)
        + (SELECT count(*) FROM relay.evidence v WHERE v.effect_id IS NULL
           AND v.received_at < now() - make_interval(secs => %(retention_s)s)))::bigint
           AS evidence;

-- name: purge_batch
-- One small batch of finished effects past retention; attempts, transitions and evidence go with
-- them (ON DELETE CASCADE). Compensations go first: an effect that has one waits for it. Rows
-- locked by anyone are skipped, so the purge never waits on the relay or on writers.
WITH gone AS (
    SELECT e.id FROM relay.effect e JOIN relay.effect_type t ON t.name = e.effect_type
    WHERE e.updated_at < now() - make_interval(secs => %(retention_s)s)
      AND (e.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
           OR (e.state = 'PUBLISHED' AND t.result_topic IS NULL))
      AND NOT EXISTS (SELECT 1 FROM relay.effect c WHERE c.parent_effect_id = e.id)
    ORDER BY e.updated_at
    LIMIT %(limit)s
    FOR UPDATE OF e SKIP LOCKED
)
DELETE FROM relay.effect e USING gone WHERE e.id = gone.id
RETURNING e.id;

-- name: purge_unattached_evidence
-- Malformed and orphaned results past retention (they belong to no effect).
WITH gone AS (
    SELECT id FROM relay.evidence
    WHERE effect_id IS NULL AND received_at < now() - make_interval(secs => %(retention_s)s)
    ORDER BY received_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM relay.evidence v USING gone WHERE v.id = gone.id
RETURNING v.id;

-- name: adopt_external_id
-- A CONFIRMED effect (by observation or an operator) learns the downstream's id of its execution.
UPDATE relay.effect SET external_id = %(external_id)s
WHERE id = %(id)s AND external_id IS NULL;

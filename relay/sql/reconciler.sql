-- The reconciler's queries (relay reconcile, resolve, purge). Loaded by relay.sql with the others.

-- name: set_status_events
-- Status events are read from the transitions written while this is on.
UPDATE relay.reconciler_config SET status_events = %(on)s WHERE status_events <> %(on)s;

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
                            detail, attempt, verdict, reason, actor, os_user, applied_at)
VALUES (%(kind)s, %(effect_id)s, %(operation_key)s, %(outcome)s, %(external_id)s,
        %(observed_count)s, %(detail)s, %(attempt)s, %(verdict)s, %(reason)s, %(actor)s,
        %(os_user)s, CASE WHEN %(verdict)s = 'applied' THEN now() END)
RETURNING id;

-- name: finish_evidence
UPDATE relay.evidence
SET effect_id = %(effect_id)s, verdict = %(verdict)s, reason = %(reason)s, attempt = %(attempt)s,
    applied_at = CASE WHEN %(verdict)s = 'applied' THEN now() ELSE applied_at END
WHERE id = %(id)s;

-- name: lock_effect
-- The effect a result or a decision is about, locked until the transaction ends.
SELECT id, operation_key, effect_type, state, attempts, external_id, business_key,
       published_offset, traceparent
FROM relay.effect WHERE operation_key = %(operation_key)s
FOR UPDATE;

-- name: told_by_its_transaction
-- A person confirms that an UNKNOWN effect happened: its record reached the downstream, so its
-- Kafka transaction committed, and the status events that rode in it (relay.status_held) are
-- visible. The log's transitions until now tell that story again: marked told, never sent (as
-- the verifier does when it finds the record). Only while the hold is live, as status_batch
-- reads it (the first attempt, UNKNOWN, not found yet): a hold left from an attempt a person
-- sent again says nothing of the later ones. The hold row itself stays (inert once the effect
-- has left UNKNOWN; the operator deletes no row).
UPDATE relay.transition t SET status_pending = false
WHERE t.effect_id = %(effect_id)s AND t.status_pending
  AND EXISTS (SELECT 1 FROM relay.status_held h JOIN relay.effect e ON e.id = h.effect_id
              WHERE h.effect_id = t.effect_id AND e.state = 'UNKNOWN' AND e.attempts = 1
                AND e.published_offset IS NULL);

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
INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                              status_pending)
SELECT m.id, %(from_state)s, %(to_state)s, %(reason)s, %(actor)s, m.attempts, c.status_events
FROM moved m, relay.reconciler_config c
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

-- name: enqueue_compensation
-- The compensation's payload is its parent's with two fields added, built here: the reconciler
-- never decodes a payload (one it could not decode must not stop a decision).
SELECT c.effect_id, c.operation_key, c.created
FROM relay.effect p,
     relay.enqueue_compensation(
         %(parent_id)s, %(index)s, %(effect_type)s,
         p.payload || jsonb_build_object('compensates', p.operation_key,
                                         'compensation', %(index)s::int + 1),
         %(reason)s, %(actor)s) AS c
WHERE p.id = %(parent_id)s;

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
INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                              status_pending)
SELECT m.id, 'PUBLISHED', 'UNKNOWN', m.reason, %(actor)s, m.attempts, c.status_events
FROM moved m, relay.reconciler_config c
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
-- UNKNOWN effects whose observation is due. Those whose publication is known; and, when the
-- relay cannot check its own ambiguous publishes in Kafka (unpublished: kafka_transactions is
-- off), those whose publication is unknown too, once the type's outcome_timeout_s has passed
-- since they became UNKNOWN (the downstream may still be reading the record) and no relay holds
-- them. With transactions on, the relay checks those itself. The claim moves observe_at forward:
-- a lease against other replicas. Effects asked already in this sweep are left for the next.
WITH due AS (
    SELECT e.id FROM relay.effect e JOIN relay.effect_type t ON t.name = e.effect_type
    WHERE e.state = 'UNKNOWN' AND e.id <> ALL(%(asked)s::bigint[])
      AND ((e.published_offset IS NOT NULL AND coalesce(e.observe_at, '-infinity') <= now())
           OR (%(unpublished)s::boolean AND e.published_offset IS NULL
               AND (e.lease_until IS NULL OR e.lease_until < now())
               AND coalesce(e.observe_at,
                            e.updated_at + make_interval(secs => t.outcome_timeout_s)) <= now()))
    ORDER BY e.observe_at NULLS FIRST, e.id
    LIMIT %(limit)s
    FOR UPDATE OF e SKIP LOCKED
)
UPDATE relay.effect AS e SET observe_at = now() + make_interval(secs => %(lease_s)s)
FROM due WHERE e.id = due.id
RETURNING e.id, e.operation_key, e.effect_type, e.payload::text, e.business_key, e.attempts,
          e.observe_tries, e.observe_at, e.published_offset IS NULL AS unpublished;

-- name: lock_observed
-- The observed effect, if nothing moved it while its observer was asked.
SELECT id, state, attempts, observe_tries, traceparent FROM relay.effect
WHERE id = %(id)s AND state = 'UNKNOWN' AND attempts = %(attempt)s AND observe_at = %(lease)s
FOR UPDATE;

-- name: reschedule_observation
UPDATE relay.effect
SET observe_tries = observe_tries + 1, observe_at = now() + make_interval(secs => %(delay_s)s),
    reason = %(reason)s
WHERE id = %(id)s AND state = 'UNKNOWN';

-- name: get_evidence
SELECT kind, topic, partition, "offset", outcome, external_id, observed_count, detail, attempt,
       verdict, reason, actor, db_role, os_user, received_at, applied_at
FROM relay.evidence WHERE effect_id = %(effect_id)s ORDER BY id;

-- name: evidence_counts
SELECT kind, verdict, count(*)::bigint AS records FROM relay.evidence
GROUP BY kind, verdict ORDER BY kind, verdict;

-- name: purge_counts
-- What a purge would remove now, decided as purge_batch decides (without its batches and locks):
-- whole families, each an effect with every compensation under it, all finished and past
-- retention.
WITH RECURSIVE blocked(id) AS (
    SELECT c.parent_effect_id FROM relay.effect c
    WHERE c.parent_effect_id IS NOT NULL
      AND (c.updated_at >= now() - make_interval(secs => %(retention_s)s)
           OR NOT (c.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
                   OR (c.state = 'PUBLISHED' AND c.outcome_deadline IS NULL)))
    UNION
    SELECT p.parent_effect_id FROM relay.effect p JOIN blocked b ON p.id = b.id
    WHERE p.parent_effect_id IS NOT NULL
), gone(id) AS (
    SELECT r.id FROM relay.effect r
    WHERE r.parent_effect_id IS NULL
      AND r.updated_at < now() - make_interval(secs => %(retention_s)s)
      AND (r.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
           OR (r.state = 'PUBLISHED' AND r.outcome_deadline IS NULL))
      AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.id = r.id)
      AND NOT EXISTS (SELECT 1 FROM relay.transition t WHERE t.effect_id = r.id AND t.status_pending)
      -- A REJECTED effect parks its ordering group until `relay unblock` releases it.
      AND NOT (r.state = 'REJECTED' AND r.ordering_group IS NOT NULL
               AND r.group_released_at IS NULL)
    UNION
    SELECT c.id FROM relay.effect c JOIN gone g ON c.parent_effect_id = g.id
)
SELECT ((SELECT count(*) FROM gone)
        -- Published batches past retention: intents without effect rows (relay.purge_batch).
        + (SELECT coalesce(sum(p.n), 0) FROM relay.published_batch p
           WHERE p.published_at < now() - make_interval(secs => %(retention_s)s)))::bigint
           AS effects,
       (SELECT count(*) FROM relay.attempt a JOIN gone g ON g.id = a.effect_id)::bigint
           AS attempts,
       (SELECT count(*) FROM relay.transition x JOIN gone g ON g.id = x.effect_id)::bigint
           AS transitions,
       ((SELECT count(*) FROM relay.evidence v JOIN gone g ON g.id = v.effect_id)
        + (SELECT count(*) FROM relay.evidence v WHERE v.effect_id IS NULL
           AND v.received_at < now() - make_interval(secs => %(retention_s)s)))::bigint
           AS evidence,
       (SELECT count(*) FROM relay.intake_refused r
        WHERE r.refused_at < now() - make_interval(secs => %(retention_s)s))::bigint AS refused;

-- name: purge_batch
-- One small batch of whole families: an effect goes only together with every compensation under
-- it, in one statement, and only when all of them are finished (CONFIRMED, REJECTED, CANCELLED,
-- or PUBLISHED with no result awaited: outcome_deadline is set at publication when the type then
-- had a result topic) and past retention. A compensation never goes alone while its parent
-- exists, so compensation_needs always counts it. Attempts, transitions and evidence go with the
-- effects, in the same statement. Rows locked by anyone are skipped, and a family with any member
-- locked waits for a later run, so the purge never waits on the relay or on writers. (A
-- compensation committed while this statement runs is not seen: the foreign key on
-- parent_effect_id then fails the batch, rolled back, never orphaned.) The statement is
-- relay.purge_batch (schemas/migrations/0008_purge_function.sql), SECURITY DEFINER: the operator
-- role purges without any right to delete rows.
SELECT id FROM relay.purge_batch(%(retention_s)s::double precision, %(limit)s::integer) AS id;

-- name: purge_forgotten_keys
-- Keys of purged effects past the dedupe window may be used again (relay.purge_forgotten_keys).
SELECT operation_key
FROM relay.purge_forgotten_keys(%(dedupe_window_s)s::double precision, %(limit)s::integer)
    AS operation_key;

-- name: purge_refused_intake
-- Intents set aside when read (their key names another effect; never published) past retention,
-- with their intake rows (relay.purge_refused_intake).
SELECT id
FROM relay.purge_refused_intake(%(retention_s)s::double precision, %(limit)s::integer) AS id;

-- name: purge_unattached_evidence
-- Malformed and orphaned results past retention, which belong to no effect
-- (relay.purge_unattached_evidence).
SELECT id
FROM relay.purge_unattached_evidence(%(retention_s)s::double precision, %(limit)s::integer) AS id;

-- name: adopt_external_id
-- A CONFIRMED effect (by observation or an operator) learns the downstream's id of its execution.
UPDATE relay.effect SET external_id = %(external_id)s
WHERE id = %(id)s AND external_id IS NULL;

-- name: insert_results_evidence
-- A batch of result records, one evidence row each, in arrival order (evidence ids keep the
-- order in which one effect's results are applied). A redelivered record conflicts: not returned.
INSERT INTO relay.evidence (kind, operation_key, topic, partition, "offset", outcome,
                            external_id, detail, raw, raw_size, verdict, reason, actor)
SELECT 'result', r.operation_key, r.topic, r.partition, r."offset", r.outcome, r.external_id,
       r.detail, r.raw, r.raw_size, r.verdict, r.reason, %(actor)s
FROM unnest(%(operation_keys)s::text[], %(topics)s::text[], %(partitions)s::int[],
            %(offsets)s::bigint[], %(outcomes)s::text[], %(external_ids)s::text[],
            %(details)s::text[], %(raws)s::bytea[], %(raw_sizes)s::int[], %(verdicts)s::text[],
            %(reasons)s::text[])
     WITH ORDINALITY AS r(operation_key, topic, partition, "offset", outcome, external_id,
                          detail, raw, raw_size, verdict, reason, n)
ORDER BY r.n
ON CONFLICT ON CONSTRAINT evidence_record_unique DO NOTHING
RETURNING id, topic, partition, "offset";

-- name: lock_effects
-- The effects a batch of results is about, locked until the transaction ends (in id order, so
-- two replicas never wait on each other in a circle).
SELECT id, operation_key, effect_type, state, attempts, external_id, business_key,
       published_offset, traceparent
FROM relay.effect WHERE operation_key = ANY(%(keys)s::text[])
ORDER BY id
FOR UPDATE;

-- name: batch_effects
-- Intents claimed in a batch whose outcome the relay has not recorded: no effect row yet, so
-- DISPATCHING (a result for one waits, deferred, until its row is written).
SELECT id, operation_key, effect_type, 'DISPATCHING' AS state, 1 AS attempts,
       NULL::text AS external_id, NULL::text AS business_key, NULL::bigint AS published_offset,
       traceparent
FROM relay.batch_effect WHERE operation_key = ANY(%(keys)s::text[]);

-- name: published_effects
-- Intents published in a batch that needs nothing more (their type awaited no result): no effect
-- row, PUBLISHED. A result for one is misrouted, as for any effect of a type without results.
SELECT i.id, i.operation_key, p.effect_type, 'PUBLISHED' AS state, 1 AS attempts,
       NULL::text AS external_id, i.business_key, p."offset" AS published_offset, i.traceparent
FROM relay.intake i
CROSS JOIN LATERAL relay.published_intent(i.id) p
WHERE i.operation_key = ANY(%(keys)s::text[])
  AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id);

-- name: effects_with_deferred
-- Which of these effects have a result still waiting (deferred), other than the results being
-- applied, and the first of them: a later result of the effect waits behind it.
SELECT effect_id, min(id) AS first_id FROM relay.evidence
WHERE verdict = 'deferred' AND effect_id = ANY(%(ids)s::bigint[])
  AND id <> ALL(%(applying)s::bigint[])
GROUP BY effect_id;

-- name: move_effects
-- move_effect for many effects at once (never to PENDING): compare-and-set on the state, with
-- the transitions, in one statement.
WITH m AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(from_states)s::text[], %(to_states)s::text[],
                         %(reasons)s::text[], %(external_ids)s::text[])
        AS m(id, from_state, to_state, reason, external_id)
), moved AS (
    UPDATE relay.effect AS e
    SET state = m.to_state, reason = m.reason, updated_at = now(),
        owner = NULL, owner_epoch = NULL, lease_until = NULL,
        external_id = coalesce(m.external_id, e.external_id),
        outcome_deadline = NULL,
        observe_at = CASE WHEN m.to_state = 'UNKNOWN' THEN now() END,
        observe_tries = CASE WHEN m.to_state = 'UNKNOWN' AND e.state = 'UNKNOWN'
                             THEN e.observe_tries ELSE 0 END
    FROM m WHERE e.id = m.id AND e.state = m.from_state
    RETURNING e.id, m.from_state, m.to_state, m.reason, e.attempts
)
INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                              status_pending)
SELECT moved.id, moved.from_state, moved.to_state, moved.reason, %(actor)s, moved.attempts,
       c.status_events
FROM moved, relay.reconciler_config c
ORDER BY moved.id
RETURNING effect_id, from_state, to_state;

-- name: finish_evidences
UPDATE relay.evidence AS v
SET effect_id = f.effect_id, verdict = f.verdict, reason = f.reason, attempt = f.attempt,
    applied_at = CASE WHEN f.verdict = 'applied' THEN now() ELSE v.applied_at END
FROM unnest(%(ids)s::bigint[], %(effect_ids)s::bigint[], %(verdicts)s::text[],
            %(reasons)s::text[], %(attempts)s::int[])
    AS f(id, effect_id, verdict, reason, attempt)
WHERE v.id = f.id;

-- name: group_blocker
-- What parks a group: its latest effect that is REJECTED, UNKNOWN or STUCK and not released,
-- locked for `relay unblock`; with how many effects wait behind it.
SELECT b.id, b.operation_key, b.state, b.reason, b.attempts,
       (SELECT count(*) FROM relay.effect w
        WHERE w.ordering_group = b.ordering_group AND w.id > b.id AND w.state = 'PENDING')
           AS waiting
FROM relay.effect b
WHERE b.ordering_group = %(group)s AND b.group_released_at IS NULL
  AND b.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
ORDER BY b.id DESC LIMIT 1
FOR UPDATE OF b;

-- name: group_head
-- A group that is not parked may still wait: on its head, PENDING and not due yet (scheduled far
-- ahead). That head, when it is due, and how many effects wait behind it.
SELECT h.operation_key, h.available_at,
       (SELECT count(*) FROM relay.effect w
        WHERE w.ordering_group = h.ordering_group AND w.id > h.id AND w.state = 'PENDING')
           AS waiting
FROM relay.effect h
WHERE h.ordering_group = %(group)s AND h.state = 'PENDING' AND NOT h.behind_head
  AND h.available_at > now()
ORDER BY h.id LIMIT 1;

-- name: release_group
-- The group goes on without this effect (never claimed again), and a waiting relay is woken.
WITH released AS (
    UPDATE relay.effect SET group_released_at = now() WHERE id = %(id)s RETURNING id
)
SELECT pg_notify('relay_doorbell', '') FROM released;

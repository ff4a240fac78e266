-- What the operator console (relay console) reads and records. Lists are paged by id (keyset:
-- WHERE id > the last one shown), never by OFFSET, so a page costs the same at any depth.

-- name: console_overview
-- Effects by type and state with the age of the oldest change, for every state but the finished
-- CONFIRMED and CANCELLED (counting those would read the whole table: relay stats does). Read
-- from the state index and the claim's partial index.
SELECT o.effect_type, o.state, sum(o.n)::bigint AS effects,
       extract(epoch FROM now() - min(o.oldest))::float8 AS oldest_age_s
FROM (
    SELECT effect_type, state, count(*) AS n, min(updated_at) AS oldest
    FROM relay.effect
    WHERE state IN ('DISPATCHING', 'PUBLISHED', 'REJECTED', 'UNKNOWN', 'STUCK')
    GROUP BY effect_type, state
    UNION ALL
    SELECT effect_type, 'PENDING', count(*), min(updated_at)
    FROM relay.effect WHERE state = 'PENDING'
    GROUP BY effect_type
    UNION ALL
    -- Intents of published batches (no effect row), one row a batch.
    SELECT effect_type, 'PUBLISHED', sum(n), min(published_at)
    FROM relay.published_batch
    GROUP BY effect_type
) o
GROUP BY o.effect_type, o.state
ORDER BY 1, 2;

-- name: console_alerts
-- What the alerts of relay/observability/alerts.py watch, as relay_* gauges report it: the
-- oldest due PENDING, the oldest UNKNOWN (since its last transition into UNKNOWN), and the
-- parked groups with the effects they hold back.
SELECT
    (SELECT coalesce(extract(epoch FROM now() - min(available_at)), 0)::float8
     FROM relay.effect WHERE state = 'PENDING' AND available_at <= now()) AS oldest_pending_age_s,
    (SELECT coalesce(extract(epoch FROM now() - min(coalesce(
                (SELECT max(t.at) FROM relay.transition t
                 WHERE t.effect_id = e.id AND t.to_state = e.state),
                e.updated_at))), 0)::float8
     FROM relay.effect e WHERE e.state = 'UNKNOWN') AS oldest_unknown_age_s,
    (SELECT count(*) FROM (
        SELECT DISTINCT ON (x.ordering_group) x.ordering_group, x.id
        FROM relay.effect x
        WHERE x.ordering_group IS NOT NULL AND x.group_released_at IS NULL
          AND x.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
        ORDER BY x.ordering_group, x.id DESC
    ) b WHERE EXISTS (SELECT 1 FROM relay.effect w
                      WHERE w.ordering_group = b.ordering_group AND w.id > b.id
                        AND w.state = 'PENDING'))::float8 AS parked;

-- name: console_effects
-- Effects filtered as the console's list asks; every filter is optional. key is the whole
-- operation key (the unique index finds it); key_part and error match anywhere in the operation
-- key and in the reason (case-insensitive for the reason), among the effects the other filters
-- leave (the console asks for a state with them). effect_attention_idx keeps a list of UNKNOWN,
-- STUCK or REJECTED effects an ordered scan of those alone, however many others there are.
SELECT e.id, e.operation_key, e.effect_type, e.state, e.attempts, e.updated_at, e.reason,
       e.ordering_group, extract(epoch FROM now() - e.updated_at)::float8 AS age_s
FROM relay.effect e
WHERE e.id > %(after)s
  AND (%(state)s::text IS NULL OR e.state = %(state)s)
  AND (%(effect_type)s::text IS NULL OR e.effect_type = %(effect_type)s)
  AND (%(group)s::text IS NULL OR e.ordering_group = %(group)s)
  AND (%(key)s::text IS NULL OR e.operation_key = %(key)s)
  AND (%(key_part)s::text IS NULL OR strpos(e.operation_key, %(key_part)s) > 0)
  AND (%(error)s::text IS NULL OR strpos(lower(e.reason), lower(%(error)s)) > 0)
  AND (%(older_than_s)s::float8 IS NULL
       OR e.updated_at <= now() - make_interval(secs => %(older_than_s)s))
ORDER BY e.id
LIMIT %(limit)s;

-- name: console_parked_groups
-- Parked ordering groups: the latest REJECTED, UNKNOWN or STUCK effect of a group (not released)
-- with PENDING effects after it, as relay_parked_groups counts them; with how many wait.
SELECT b.id, b.ordering_group, b.operation_key, b.effect_type, b.state, b.reason, b.attempts,
       b.updated_at, extract(epoch FROM now() - b.updated_at)::float8 AS age_s, w.waiting
FROM (
    SELECT DISTINCT ON (x.ordering_group) x.id, x.ordering_group, x.operation_key, x.effect_type,
           x.state, x.reason, x.attempts, x.updated_at
    FROM relay.effect x
    WHERE x.ordering_group IS NOT NULL AND x.group_released_at IS NULL
      AND x.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
    ORDER BY x.ordering_group, x.id DESC
) b
CROSS JOIN LATERAL (
    SELECT count(*) AS waiting FROM relay.effect p
    WHERE p.ordering_group = b.ordering_group AND p.id > b.id AND p.state = 'PENDING'
) w
WHERE b.id > %(after)s AND w.waiting > 0
  AND (%(state)s::text IS NULL OR b.state = %(state)s)
  AND (%(effect_type)s::text IS NULL OR b.effect_type = %(effect_type)s)
  AND (%(group)s::text IS NULL OR b.ordering_group = %(group)s)
  AND (%(key)s::text IS NULL OR b.operation_key = %(key)s)
  AND (%(key_part)s::text IS NULL OR strpos(b.operation_key, %(key_part)s) > 0)
  AND (%(error)s::text IS NULL OR strpos(lower(b.reason), lower(%(error)s)) > 0)
  AND (%(older_than_s)s::float8 IS NULL
       OR b.updated_at <= now() - make_interval(secs => %(older_than_s)s))
ORDER BY b.id
LIMIT %(limit)s;

-- name: console_schedule
-- What an effect's story page adds to relay show: the timers and counters of what the relay and
-- the reconciler will do next by themselves, and what its type declares.
SELECT e.id, e.state, e.updated_at, e.attempts, e.observe_at, e.observe_tries, e.verify_at,
       e.verify_tries, e.lease_until, e.published_offset IS NOT NULL AS publication_known,
       e.outcome_deadline, e.available_at, e.ordering_group, e.group_released_at,
       e.parent_effect_id, t.has_observer, t.outcome_timeout_s, t.max_attempts, t.compensation,
       t.result_topic, c.status_events, now() AS now,
       (SELECT count(*) FROM relay.evidence v
        WHERE v.effect_id = e.id AND v.kind = 'observation') AS observations
FROM relay.effect e
LEFT JOIN relay.effect_type t ON t.name = e.effect_type
CROSS JOIN relay.reconciler_config c
WHERE e.id = %(effect_id)s;

-- name: console_group_blocker
-- group_blocker without the lock: what parks a group, and how many wait behind it.
SELECT b.id, b.operation_key, b.state, b.reason, b.attempts, b.updated_at,
       (SELECT count(*) FROM relay.effect w
        WHERE w.ordering_group = b.ordering_group AND w.id > b.id AND w.state = 'PENDING')
           AS waiting
FROM relay.effect b
WHERE b.ordering_group = %(group)s AND b.group_released_at IS NULL
  AND b.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
ORDER BY b.id DESC LIMIT 1;

-- name: console_lock_effect
-- The effect a decision is about, locked until the decision commits or is refused.
SELECT id, state, updated_at, attempts, ordering_group
FROM relay.effect WHERE operation_key = %(operation_key)s
FOR UPDATE;

-- name: console_changes_since
-- What happened to an effect after the moment an operator's page showed it: who moved it.
SELECT from_state, to_state, actor, reason, at FROM relay.transition_log
WHERE effect_id = %(effect_id)s AND at > %(since)s
ORDER BY transition_id, part;

-- name: console_insert_audit
INSERT INTO relay.console_audit (actor, auth, access, client_address, action, operation_key,
                                 ordering_group, seen, reason, outcome, detail)
VALUES (%(actor)s, %(auth)s, %(access)s, %(client_address)s, %(action)s, %(operation_key)s,
        %(ordering_group)s, %(seen)s, %(reason)s, %(outcome)s, %(detail)s);

-- name: console_audit_page
-- The audit, newest first, paged by id (before: the smallest id shown).
SELECT id, at, actor, auth, access, client_address, action, operation_key, ordering_group,
       seen::text AS seen, reason, outcome, detail, db_role
FROM relay.console_audit
WHERE id < %(before)s
  AND (%(key)s::text IS NULL OR operation_key = %(key)s)
ORDER BY id DESC
LIMIT %(limit)s;

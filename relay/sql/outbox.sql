-- What the application runs (enqueue, cancel, get_effect); the types and limits enqueue checks.

-- name: sync_effect_type
INSERT INTO relay.effect_type AS t (name, topic, idempotent, business_key, result_topic,
                                    outcome_timeout_s, has_observer, compensation, max_attempts,
                                    key_by_group)
VALUES (%(name)s, %(topic)s, %(idempotent)s, %(business_key)s, %(result_topic)s,
        %(outcome_timeout_s)s, %(has_observer)s, %(compensation)s, %(max_attempts)s,
        %(key_by_group)s)
ON CONFLICT (name) DO UPDATE SET
    topic = excluded.topic, idempotent = excluded.idempotent,
    business_key = excluded.business_key, result_topic = excluded.result_topic,
    outcome_timeout_s = excluded.outcome_timeout_s, has_observer = excluded.has_observer,
    compensation = excluded.compensation, max_attempts = excluded.max_attempts,
    key_by_group = excluded.key_by_group, updated_at = now()
WHERE (t.topic, t.idempotent, t.business_key, t.result_topic, t.outcome_timeout_s,
       t.has_observer, t.compensation, t.max_attempts, t.key_by_group)
      IS DISTINCT FROM
      (excluded.topic, excluded.idempotent, excluded.business_key, excluded.result_topic,
       excluded.outcome_timeout_s, excluded.has_observer, excluded.compensation,
       excluded.max_attempts, excluded.key_by_group);

-- name: sync_limits
UPDATE relay.limits SET max_payload_bytes = %(max_payload_bytes)s
WHERE max_payload_bytes <> %(max_payload_bytes)s;

-- name: has_group_limit
-- Whether the schema has max_pending_per_group (migration 0012): sync runs on older ones too.
SELECT EXISTS (
    SELECT 1 FROM pg_attribute
    WHERE attrelid = 'relay.limits'::regclass AND attname = 'max_pending_per_group'
      AND NOT attisdropped
);

-- name: sync_group_limit
UPDATE relay.limits SET max_pending_per_group = %(max_pending_per_group)s
WHERE max_pending_per_group <> %(max_pending_per_group)s;

-- name: enqueue_intake
-- An ungrouped intent: one plain INSERT into the intake (docs/design/intake.md slice 2). A key
-- already there makes no row (the bare ON CONFLICT needs no SELECT right) and the caller then
-- runs `enqueue`, which compares and returns the first intent. RETURNING 1 names no column, and
-- currval() is this row's id: the application reads nothing it did not write. The one lookup
-- left is the type's business-key template (a pk probe, only a row when the type has one), so
-- that a payload lacking its field is refused here, not when the relay reads it; the function
-- that computes or checks the key is called only for such a type or when a key is given (an
-- explicit key must not be one another type's template makes). No CTE around the INSERT: a RETURNING
-- that names no column needs no SELECT right either (the CTE, and the function called for every
-- row, cost about 8 us of the server's CPU per intent, a third of the statement).
INSERT INTO relay.intake (operation_key, effect_type, payload, business_key, traceparent,
                          available_at)
SELECT %(operation_key)s, %(effect_type)s::relay.effect_type_name, p.payload,
       CASE WHEN t.business_key IS NULL AND %(business_key)s::text IS NULL THEN NULL
            ELSE relay.checked_business_key(t.business_key, p.payload, %(operation_key)s,
                                            %(business_key)s::text) END,
       %(traceparent)s, %(available_at)s
FROM (SELECT %(payload)s::jsonb AS payload) p
LEFT JOIN relay.effect_type t ON t.name = %(effect_type)s AND t.business_key IS NOT NULL
ON CONFLICT DO NOTHING
RETURNING currval('relay.intake_id_seq') AS effect_id, 'PENDING' AS state, true AS created;

-- name: enqueue
-- A grouped intent (the function takes the group's lock before the id is drawn), or a key the
-- intake already holds (the function returns the first intent, or refuses a different one).
SELECT effect_id, state, created
FROM relay.enqueue(%(operation_key)s, %(effect_type)s, %(payload)s::jsonb, %(business_key)s,
                   %(traceparent)s, %(available_at)s, %(ordering_group)s);

-- name: cancel
SELECT relay.cancel(%(operation_key)s, %(reason)s, %(actor)s);

-- name: get_effect
SELECT id, operation_key, effect_type, topic, payload, business_key, traceparent, state,
       attempts, available_at, created_at, updated_at, owner, owner_epoch, lease_until, reason,
       published_partition, published_offset, published_at, outcome_deadline, ordering_group,
       group_released_at
FROM relay.effect WHERE operation_key = %(operation_key)s;

-- name: get_intake_effect
-- An intent without an effect row (asked only when get_effect found none; relay.intake_effect
-- reads the intake for logins that may not): PENDING, not read yet, DISPATCHING, claimed in a
-- batch whose outcome is not recorded yet, or PUBLISHED in a published batch.
SELECT i.id, i.operation_key, i.effect_type, i.topic, i.payload, i.business_key, i.traceparent,
       i.state, CASE WHEN i.state = 'PENDING' THEN 0 ELSE 1 END AS attempts, i.available_at,
       i.created_at, coalesce(i.published_at, i.claimed_at, i.created_at) AS updated_at,
       NULL::text AS owner, NULL::bigint AS owner_epoch, NULL::timestamptz AS lease_until,
       NULL::text AS reason, i.published_partition, i.published_offset, i.published_at,
       NULL::timestamptz AS outcome_deadline, i.ordering_group,
       NULL::timestamptz AS group_released_at
FROM relay.intake_effect(%(operation_key)s) i;

-- name: may_read_intake
SELECT has_function_privilege('relay.intake_effect(text)', 'EXECUTE');

-- name: missing_effect_type_names
-- Declared types the intake's enum lacks (none before migration 0010), and whether this login
-- may add them (only the type's owner may: the daemons sync as roles that do not own it).
SELECT n.name, pg_has_role(t.typowner, 'USAGE') AS may_add
FROM unnest(%(names)s::text[]) AS n(name)
JOIN pg_type t ON t.oid = to_regtype('relay.effect_type_name')
WHERE NOT starts_with(n.name, 'relay.')
  AND NOT EXISTS (SELECT 1 FROM pg_enum e WHERE e.enumtypid = t.oid AND e.enumlabel = n.name)
ORDER BY n.name;

-- name: add_effect_type_name
-- A utility statement takes no parameters: {name} is composed as a literal (psycopg.sql).
ALTER TYPE relay.effect_type_name ADD VALUE IF NOT EXISTS {name};

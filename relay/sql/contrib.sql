-- Statements of the integrations (relay.contrib) in their drivers' own placeholder styles.

-- name: enqueue_named
-- SQLAlchemy text(): named parameters. The payload is bound as text and cast here, so that a
-- driver's own JSON codec (asyncpg's, a project's custom one) cannot encode it a second time.
SELECT effect_id, state, created
FROM relay.enqueue(:operation_key, :effect_type, CAST(CAST(:payload AS text) AS jsonb),
                   :business_key, :traceparent, :available_at, :ordering_group);

-- name: enqueue_numbered
-- asyncpg: numbered parameters, in the order of the SQL function's arguments.
SELECT effect_id, state, created
FROM relay.enqueue($1, $2, $3::text::jsonb, $4, $5, $6, $7);

-- name: enqueue_intake_named
-- SQLAlchemy: outbox.sql's enqueue_intake (an ungrouped intent, one plain INSERT).
INSERT INTO relay.intake (operation_key, effect_type, payload, business_key, traceparent,
                          available_at)
SELECT :operation_key, CAST(:effect_type AS relay.effect_type_name), p.payload,
       CASE WHEN t.business_key IS NULL AND CAST(:business_key AS text) IS NULL THEN NULL
            ELSE relay.checked_business_key(t.business_key, p.payload, :operation_key,
                                            CAST(:business_key AS text)) END,
       :traceparent, :available_at
FROM (SELECT CAST(CAST(:payload AS text) AS jsonb) AS payload) p
LEFT JOIN relay.effect_type t ON t.name = :effect_type AND t.business_key IS NOT NULL
ON CONFLICT DO NOTHING
RETURNING currval('relay.intake_id_seq') AS effect_id, 'PENDING' AS state, true AS created;

-- name: enqueue_intake_numbered
-- asyncpg: outbox.sql's enqueue_intake, numbered as enqueue_numbered ($7 unused: ungrouped).
INSERT INTO relay.intake (operation_key, effect_type, payload, business_key, traceparent,
                          available_at)
SELECT $1::text, $2::text::relay.effect_type_name, p.payload,
       CASE WHEN t.business_key IS NULL AND $4::text IS NULL THEN NULL
            ELSE relay.checked_business_key(t.business_key, p.payload, $1::text, $4::text) END,
       $5::text, $6::timestamptz
FROM (SELECT $3::text::jsonb AS payload) p
LEFT JOIN relay.effect_type t ON t.name = $2::text AND t.business_key IS NOT NULL
ON CONFLICT DO NOTHING
RETURNING currval('relay.intake_id_seq') AS effect_id, 'PENDING' AS state, true AS created;

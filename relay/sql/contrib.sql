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

-- Queries of relay.observability: what the /metrics endpoint reads from the outbox itself.

-- name: observability_snapshot
-- One scrape's view of the outbox in one statement, so that every replica reports the same truth:
-- effects by type and state (PENDING from the claim's partial index, the others from the state
-- index, which carries the type), every declared type
-- (so that a zero is reported as 0, not as a missing series), and how long the oldest due
-- PENDING, UNKNOWN and STUCK effects have waited. PENDING includes the intents not read from the
-- intake yet, so that a stopped relay's backlog shows. An effect's time in UNKNOWN/STUCK starts at its
-- last transition into that state (updated_at moves on at every failed verification).
WITH unread AS MATERIALIZED (
    SELECT u.effect_type, u.due FROM relay.intake_unread u
)
SELECT 'effects' AS kind, d.effect_type, d.state, sum(d.n)::float8 AS value
FROM (
    SELECT effect_type, state, count(*) AS n FROM relay.effect
    WHERE state <> 'PENDING'
    GROUP BY effect_type, state
    UNION ALL
    -- DISPATCHING also counts the intents claimed in a batch, which have no effect row yet.
    SELECT b.effect_type, 'DISPATCHING', count(*) FROM relay.batch_effect b
    GROUP BY b.effect_type
    UNION ALL
    -- PUBLISHED also counts the intents of published batches, which have no effect row.
    SELECT p.effect_type, 'PUBLISHED', sum(p.n) FROM relay.published_batch p
    GROUP BY p.effect_type
) d
GROUP BY d.effect_type, d.state
UNION ALL
-- PENDING also counts the intents the relay has not read from the intake yet (see unread).
SELECT 'effects', p.effect_type, 'PENDING', sum(p.n)::float8
FROM (
    SELECT effect_type, count(*) AS n FROM relay.effect WHERE state = 'PENDING'
    GROUP BY effect_type
    UNION ALL
    SELECT u.effect_type, count(*) FROM unread u GROUP BY u.effect_type
) p
GROUP BY p.effect_type
UNION ALL
SELECT 'type', name, NULL, 0 FROM relay.effect_type
UNION ALL
SELECT 'oldest_age', NULL, 'PENDING',
       coalesce(extract(epoch FROM now() - least(
           (SELECT min(available_at) FROM relay.effect
            WHERE state = 'PENDING' AND available_at <= now()),
           (SELECT min(u.due) FROM unread u WHERE u.due <= now()))), 0)::float8
UNION ALL
SELECT 'oldest_age', NULL, e.state,
       coalesce(extract(epoch FROM now() - min(coalesce(
           (SELECT max(t.at) FROM relay.transition t
            WHERE t.effect_id = e.id AND t.to_state = e.state),
           e.updated_at))), 0)::float8
FROM relay.effect e
WHERE e.state IN ('UNKNOWN', 'STUCK')
GROUP BY e.state
UNION ALL
-- Ordering groups parked behind a REJECTED, UNKNOWN or STUCK effect (the latest of the group,
-- not released) with effects waiting, and how many wait (from the small blocker index).
SELECT 'parked', NULL, NULL, count(*)::float8 FROM (
    SELECT b.ordering_group, b.id FROM (
        SELECT DISTINCT ON (x.ordering_group) x.ordering_group, x.id
        FROM relay.effect x
        WHERE x.ordering_group IS NOT NULL AND x.group_released_at IS NULL
          AND x.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
        ORDER BY x.ordering_group, x.id DESC
    ) b
    WHERE EXISTS (SELECT 1 FROM relay.effect w
                  WHERE w.ordering_group = b.ordering_group AND w.id > b.id
                    AND w.state = 'PENDING')
) parked
UNION ALL
SELECT 'parked_effects', NULL, NULL, count(w.*)::float8 FROM (
    SELECT DISTINCT ON (x.ordering_group) x.ordering_group, x.id
    FROM relay.effect x
    WHERE x.ordering_group IS NOT NULL AND x.group_released_at IS NULL
      AND x.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
    ORDER BY x.ordering_group, x.id DESC
) b
JOIN relay.effect w ON w.ordering_group = b.ordering_group AND w.id > b.id
    AND w.state = 'PENDING';

-- name: observability_ping
SELECT 1;

-- The queries of `relay demo`. Loaded by relay.sql with the others.

-- name: demo_progress
-- One run's effects by state; `awaiting` counts the PUBLISHED ones whose type still awaits a
-- downstream result (a PUBLISHED effect of a type without results is done).
-- An intent without an effect row is PENDING (not read yet), DISPATCHING (claimed in a batch) or
-- PUBLISHED (in a published batch).
SELECT e.state, count(*)::int AS effects,
       count(*) FILTER (WHERE e.state = 'PUBLISHED' AND t.result_topic IS NOT NULL)::int
           AS awaiting
FROM (
    SELECT f.state, f.effect_type FROM relay.effect f WHERE f.operation_key = ANY(%(keys)s)
    UNION ALL
    SELECT CASE WHEN EXISTS (SELECT 1 FROM relay.published_intent(i.id)) THEN 'PUBLISHED'
                WHEN EXISTS (SELECT 1 FROM relay.dispatch_batch b WHERE i.id = ANY (b.ids))
                THEN 'DISPATCHING' ELSE 'PENDING' END,
           i.effect_type::text
    FROM relay.intake i
    WHERE i.operation_key = ANY(%(keys)s)
      AND NOT EXISTS (SELECT 1 FROM relay.effect f WHERE f.id = i.id)
) e JOIN relay.effect_type t ON t.name = e.effect_type
GROUP BY e.state;

-- name: demo_in_flight
-- Effects of any run on their way through the relay, status events included.
SELECT (SELECT count(*) FROM relay.effect WHERE state IN ('PENDING', 'DISPATCHING', 'UNKNOWN'))
       + (SELECT count(*) FROM relay.batch_effect);

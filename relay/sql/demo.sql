-- The queries of `relay demo`. Loaded by relay.sql with the others.

-- name: demo_progress
-- One run's effects by state; `awaiting` counts the PUBLISHED ones whose type still awaits a
-- downstream result (a PUBLISHED effect of a type without results is done).
SELECT e.state, count(*)::int AS effects,
       count(*) FILTER (WHERE e.state = 'PUBLISHED' AND t.result_topic IS NOT NULL)::int
           AS awaiting
FROM relay.effect e JOIN relay.effect_type t ON t.name = e.effect_type
WHERE e.operation_key = ANY(%(keys)s)
GROUP BY e.state;

-- name: demo_in_flight
-- Effects of any run on their way through the relay, status events included.
SELECT count(*)::int FROM relay.effect WHERE state IN ('PENDING', 'DISPATCHING', 'UNKNOWN');

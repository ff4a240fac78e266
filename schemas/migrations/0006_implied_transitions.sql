-- 0006: one row per attempt in the transitions log. An attempt's outcome row says which
-- transitions it implies: the claim before it (PENDING -> DISPATCHING, read off the attempt's
-- own row: who claimed it, when) and, for a first attempt, the enqueue (read off the effect's
-- created_at). The relay wrote those as rows of their own: three rows per effect where one
-- suffices, a third of the cost of marking a batch. relay.transition_log shows the whole log,
-- implied transitions included, in order; status events are made from it.
--
-- Upgrade: `relay migrate`, then restart the relays (older relays keep writing three rows, which
-- the view shows as they are).

ALTER TABLE relay.transition
    ADD COLUMN implied_enqueue boolean NOT NULL DEFAULT false,
    ADD COLUMN implied_claim boolean NOT NULL DEFAULT false;

-- Ordered by (transition_id, part): an implied transition comes just before the row that
-- implies it (part 0 the enqueue, 1 the claim, 2 the row itself).
CREATE VIEW relay.transition_log AS
SELECT t.id AS transition_id, 0 AS part, t.effect_id, NULL::text AS from_state,
       'PENDING'::text AS to_state, 'enqueued'::text AS reason, 'application'::text AS actor,
       0 AS attempt, e.created_at AS at, t.status_pending
FROM relay.transition t JOIN relay.effect e ON e.id = t.effect_id
WHERE t.implied_enqueue
UNION ALL
SELECT t.id, 1, t.effect_id, 'PENDING', 'DISPATCHING', 'claimed for publication', a.replica_id,
       t.attempt, a.started_at, t.status_pending
FROM relay.transition t
JOIN relay.attempt a ON a.effect_id = t.effect_id AND a.attempt = t.attempt
WHERE t.implied_claim
UNION ALL
SELECT t.id, 2, t.effect_id, t.from_state, t.to_state, t.reason, t.actor, t.attempt, t.at,
       t.status_pending
FROM relay.transition t;

-- Whoever could read the log can read the view (the role split of `relay roles`).
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'relay.transition'::regclass AND a.privilege_type = 'SELECT'
               AND a.grantee <> 0 LOOP
        EXECUTE format('GRANT SELECT ON relay.transition_log TO %s', g.grantee::regrole);
    END LOOP;
END
$$;

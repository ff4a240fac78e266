-- 0008: the purge is three SECURITY DEFINER functions, owned by the schema owner with a pinned
-- search_path, so `relay purge` runs under the operator role without any right to delete rows.
-- The operator role needed DELETE on attempts and transitions for it (which it never had, so the
-- purge failed under it), and held UPDATE and DELETE on evidence: with the purge inside these
-- functions, evidence is append-only for every role but the owner (`relay roles` revokes the
-- operator's UPDATE and DELETE on it; the reconciler keeps UPDATE to record a verdict).
--
-- The statements are those `relay purge` ran until now, with the same parameters; each function
-- is one batch, called in a short transaction of its own. Nothing else may be deleted through
-- them: finished effects past retention (with their family, attempts, transitions, evidence),
-- unattached evidence past retention, purged keys past the dedupe window.
--
-- Upgrade: `relay migrate`, then `relay roles --apply` (which grants EXECUTE on these functions
-- to the operator role and revokes the rights the purge no longer needs). Until then every role
-- that could delete effects (the operator role) may execute them, and nobody but the owner may
-- delete evidence.

CREATE FUNCTION relay.purge_batch(p_retention_s double precision, p_limit integer)
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_retention_s IS NULL OR p_retention_s < 0 OR p_retention_s = 'infinity'
       OR p_retention_s = 'NaN' THEN
        RAISE EXCEPTION 'retention must be a finite number of seconds, not %', p_retention_s
            USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 THEN
        RAISE EXCEPTION 'a purge batch takes 1 to 50000 effects, not %', p_limit
            USING ERRCODE = '22023';
    END IF;
    -- One small batch of whole families: see relay/reconciler/purge.py.
    RETURN QUERY
    WITH RECURSIVE blocked(id) AS (
        SELECT c.parent_effect_id FROM relay.effect c
        WHERE c.parent_effect_id IS NOT NULL
          AND (c.updated_at >= now() - make_interval(secs => p_retention_s)
               OR NOT (c.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
                       OR (c.state = 'PUBLISHED' AND c.outcome_deadline IS NULL)))
        UNION
        SELECT p.parent_effect_id FROM relay.effect p JOIN blocked b ON p.id = b.id
        WHERE p.parent_effect_id IS NOT NULL
    ), root AS MATERIALIZED (
        SELECT r.id FROM relay.effect r
        WHERE r.parent_effect_id IS NULL
          AND r.updated_at < now() - make_interval(secs => p_retention_s)
          AND (r.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
               OR (r.state = 'PUBLISHED' AND r.outcome_deadline IS NULL))
          AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.id = r.id)
          AND NOT EXISTS (SELECT 1 FROM relay.transition t
                          WHERE t.effect_id = r.id AND t.status_pending)
          AND NOT (r.state = 'REJECTED' AND r.ordering_group IS NOT NULL
                   AND r.group_released_at IS NULL)
        ORDER BY r.updated_at
        LIMIT p_limit
        FOR UPDATE OF r SKIP LOCKED
    ), family(id, root_id) AS (
        SELECT root.id, root.id FROM root
        UNION
        SELECT c.id, f.root_id FROM relay.effect c JOIN family f ON c.parent_effect_id = f.id
    ), held AS MATERIALIZED (
        SELECT c.id FROM relay.effect c
        WHERE c.id IN (SELECT f.id FROM family f WHERE f.id <> f.root_id)
          AND c.updated_at < now() - make_interval(secs => p_retention_s)
          AND (c.state IN ('CONFIRMED', 'REJECTED', 'CANCELLED')
               OR (c.state = 'PUBLISHED' AND c.outcome_deadline IS NULL))
          AND NOT EXISTS (SELECT 1 FROM relay.transition t
                          WHERE t.effect_id = c.id AND t.status_pending)
        FOR UPDATE OF c SKIP LOCKED
    ), whole AS (
        SELECT f.id FROM family f
        WHERE NOT EXISTS (
            SELECT 1 FROM family m
            WHERE m.root_id = f.root_id AND m.id <> m.root_id
              AND NOT EXISTS (SELECT 1 FROM held h WHERE h.id = m.id)
        )
    ), gone AS (
        DELETE FROM relay.effect e WHERE e.id = ANY (ARRAY(SELECT w.id FROM whole w))
        RETURNING e.id, e.operation_key, e.effect_type, e.state
    ), gone_attempts AS (
        DELETE FROM relay.attempt a WHERE a.effect_id IN (SELECT g.id FROM gone g)
    ), gone_transitions AS (
        DELETE FROM relay.transition t WHERE t.effect_id IN (SELECT g.id FROM gone g)
    ), gone_evidence AS (
        DELETE FROM relay.evidence v WHERE v.effect_id IN (SELECT g.id FROM gone g)
    ), remembered AS (
        INSERT INTO relay.purged_key AS k (operation_key, effect_id, effect_type, final_state)
        SELECT g.operation_key, g.id, g.effect_type, g.state FROM gone g
        ON CONFLICT (operation_key) DO UPDATE
            SET effect_id = excluded.effect_id, effect_type = excluded.effect_type,
                final_state = excluded.final_state, purged_at = now()
    )
    SELECT g.id FROM gone g;
END
$fn$;

CREATE FUNCTION relay.purge_unattached_evidence(p_retention_s double precision, p_limit integer)
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_retention_s IS NULL OR p_retention_s < 0 OR p_retention_s = 'infinity'
       OR p_retention_s = 'NaN' THEN
        RAISE EXCEPTION 'retention must be a finite number of seconds, not %', p_retention_s
            USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 THEN
        RAISE EXCEPTION 'a purge batch takes 1 to 50000 records, not %', p_limit
            USING ERRCODE = '22023';
    END IF;
    -- Malformed and orphaned results past retention (they belong to no effect).
    RETURN QUERY
    WITH old AS (
        SELECT o.id FROM relay.evidence o
        WHERE o.effect_id IS NULL
          AND o.received_at < now() - make_interval(secs => p_retention_s)
        ORDER BY o.received_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM relay.evidence v USING old WHERE v.id = old.id
    RETURNING v.id;
END
$fn$;

CREATE FUNCTION relay.purge_forgotten_keys(p_dedupe_window_s double precision, p_limit integer)
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_dedupe_window_s IS NULL OR p_dedupe_window_s < 0 OR p_dedupe_window_s = 'infinity'
       OR p_dedupe_window_s = 'NaN' THEN
        RAISE EXCEPTION 'the dedupe window must be a finite number of seconds, not %',
            p_dedupe_window_s USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 THEN
        RAISE EXCEPTION 'a purge batch takes 1 to 50000 keys, not %', p_limit
            USING ERRCODE = '22023';
    END IF;
    -- Keys of purged effects past the dedupe window may be used again.
    RETURN QUERY
    WITH old AS (
        SELECT o.operation_key FROM relay.purged_key o
        WHERE o.purged_at < now() - make_interval(secs => p_dedupe_window_s)
        ORDER BY o.purged_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM relay.purged_key k USING old WHERE k.operation_key = old.operation_key
    RETURNING k.operation_key;
END
$fn$;

REVOKE ALL ON FUNCTION relay.purge_batch(double precision, integer),
    relay.purge_unattached_evidence(double precision, integer),
    relay.purge_forgotten_keys(double precision, integer) FROM PUBLIC;

-- Whoever could purge before (the operator role of `relay roles`: DELETE on relay.effect) may
-- still; nobody but the owner deletes evidence now.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'relay.effect'::regclass AND a.privilege_type = 'DELETE'
               AND a.grantee <> 0 AND a.grantee <> c.relowner LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION relay.purge_batch(double precision, integer), '
                       'relay.purge_unattached_evidence(double precision, integer), '
                       'relay.purge_forgotten_keys(double precision, integer) TO %s',
                       g.grantee::regrole);
    END LOOP;
    FOR g IN SELECT DISTINCT a.grantee
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'relay.evidence'::regclass AND a.privilege_type = 'DELETE'
               AND a.grantee <> c.relowner LOOP
        IF g.grantee = 0 THEN
            REVOKE DELETE ON relay.evidence FROM PUBLIC;
        ELSE
            EXECUTE format('REVOKE DELETE ON relay.evidence FROM %s', g.grantee::regrole);
        END IF;
    END LOOP;
END
$$;

-- 0020: `relay purge` removes intents set aside when read (relay.intake_refused) past retention,
-- with their intake rows: before, nothing ever removed them. The operator role calls it as it
-- calls the other purge functions (`relay roles --apply` grants it).

-- Intents set aside when read (relay.intake_refused: their key names another effect, so they were
-- never published and have no effect row) past retention: the record and the intake row go. The
-- key stays refused: it still names the other effect, which the next read of a reuse finds.
CREATE FUNCTION relay.purge_refused_intake(p_retention_s double precision, p_limit integer)
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
        RAISE EXCEPTION 'a purge batch takes 1 to 50000 intents, not %', p_limit
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    WITH old AS (
        SELECT o.id FROM relay.intake_refused o
        WHERE o.refused_at < now() - make_interval(secs => p_retention_s)
        ORDER BY o.refused_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM relay.intake_refused r USING old WHERE r.id = old.id
        RETURNING r.id
    ), gone_intake AS (
        -- (An intake row with an effect row of its own id is not a refused one: kept.)
        DELETE FROM relay.intake i USING gone g
        WHERE i.id = g.id AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
    )
    SELECT g.id FROM gone g;
END
$fn$;
REVOKE ALL ON FUNCTION relay.purge_refused_intake(double precision, integer) FROM PUBLIC;

-- 0027: relay.promote_intake's statements planned once a session, not at every call. Live load
-- reads a few rows at a time, and planning the read's statements for each call's values was
-- 45 % of such a read's server CPU (5 rows: 1.57 against 0.86 ms). Sequential scans are off for
-- the function's statements, so that a plan made while the intake was small never scans it
-- whole once it has grown (until an ANALYZE replans it): they read the intake by its indexes,
-- as the rest of a split pair already did. The large reads with ordering groups are still
-- planned for their values (the function sets that itself), now without sequential scans too:
-- a paired drain of 6,000 groups of 10 went at the same rate (1.06, 0.95). Same signature:
-- grants are kept.

ALTER FUNCTION relay.promote_intake(integer, integer, text, bigint, double precision, integer,
                                    bigint, boolean)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION relay.promote_intake(integer, integer, text, bigint, double precision, integer,
                                    bigint, boolean)
    SET enable_seqscan = off;

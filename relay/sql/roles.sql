-- The role split: one NOLOGIN role per kind of process, printed or applied by `relay roles`.
-- Run as the owner of the relay schema (whoever ran `relay migrate`); then give each login its
-- role (GRANT <prefix>application TO app_user). The placeholders are quoted identifiers.

-- name: role_grants
DO $$ BEGIN CREATE ROLE {application} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE {relay} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE {reconciler} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE {operator} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;

GRANT USAGE ON SCHEMA relay TO {application}, {relay}, {reconciler}, {operator};

-- Applications: write intents only through the SECURITY DEFINER functions (which validate them
-- and write nothing else), withdraw them, and read effects. No table write of any kind.
REVOKE EXECUTE ON FUNCTION relay.enqueue(text, text, jsonb, text, text, timestamptz, text),
    relay.cancel(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.enqueue(text, text, jsonb, text, text, timestamptz, text),
    relay.cancel(text, text, text) TO {application}, {operator};
GRANT SELECT ON relay.effect TO {application};

-- Every daemon and operator reads the outbox, its declared types and its schema version.
GRANT SELECT ON ALL TABLES IN SCHEMA relay TO {relay}, {reconciler}, {operator};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA relay TO {relay}, {reconciler}, {operator};
GRANT INSERT, UPDATE ON relay.effect_type TO {relay}, {reconciler};
GRANT UPDATE ON relay.limits TO {relay}, {reconciler};

-- The relay: claims and marks effects, writes attempts and transitions, its replica row, the
-- doorbell and the status-event lease; checks its own ambiguous publishes.
GRANT UPDATE ON relay.effect, relay.doorbell, relay.status_publisher TO {relay};
GRANT INSERT, UPDATE ON relay.attempt, relay.transition, relay.replica TO {relay};

-- The reconciler: evidence, moves, compensations, the status-event switch.
GRANT UPDATE ON relay.effect, relay.reconciler_config, relay.attempt TO {reconciler};
GRANT INSERT, UPDATE ON relay.evidence, relay.transition TO {reconciler};
GRANT EXECUTE ON FUNCTION relay.enqueue_compensation(bigint, integer, text, jsonb, text, text)
    TO {reconciler}, {operator};

-- Operators: `relay resolve` (moves, evidence, compensations), `relay cancel`, `relay purge`.
GRANT UPDATE, DELETE ON relay.effect TO {operator};
GRANT INSERT, UPDATE, DELETE ON relay.evidence, relay.purged_key TO {operator};
GRANT INSERT, UPDATE ON relay.transition TO {operator};

-- The role split: one NOLOGIN role per kind of process, printed or applied by `relay roles`.
-- Run as the owner of the relay schema (whoever ran `relay migrate`); then give each login its
-- role (GRANT <prefix>application TO app_user). The placeholders are quoted identifiers ({x})
-- and the same names as string literals ({x_name}).
--
-- A role is created only when it is missing: creating one needs CREATEROLE, and on PostgreSQL
-- 15 and older a CREATEROLE role can make itself a member of any non-superuser role
-- (pg_execute_server_program among them). Create the roles once as an administrator; the owner
-- then applies the grants without CREATEROLE (docs/security.md).

-- name: missing_roles
SELECT r.name FROM unnest(%(names)s::text[]) AS r(name)
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles p WHERE p.rolname = r.name)
ORDER BY r.name;

-- name: role_grants
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY[{application_name}, {relay_name}, {reconciler_name},
                             {operator_name}, {viewer_name}]::text[] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object THEN
                NULL;  -- created meanwhile by a concurrent run
            END;
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA relay TO {application}, {relay}, {reconciler}, {operator}, {viewer};

-- Applications: write intents only through the SECURITY DEFINER functions (which validate them
-- and write nothing else), withdraw them, and read effects. No table write of any kind.
REVOKE EXECUTE ON FUNCTION relay.enqueue(text, text, jsonb, text, text, timestamptz, text),
    relay.cancel(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.enqueue(text, text, jsonb, text, text, timestamptz, text),
    relay.cancel(text, text, text) TO {application}, {operator};
GRANT SELECT ON relay.effect TO {application};
-- The intake (issue 19): an intent is one plain INSERT of the application's own columns, nothing
-- else. It cannot set an id, a txid, who enqueued or when, nor an ordering group (a grouped
-- intent goes through relay.enqueue, which takes the group's lock first); it cannot read, update
-- or delete a row (not even its own), and the enum refuses relay-made and undeclared types.
-- SELECT on the sequence is for currval(): the id of the row just inserted, without reading it.
GRANT INSERT (operation_key, effect_type, payload, business_key, traceparent, available_at)
    ON relay.intake TO {application};
REVOKE INSERT (ordering_group) ON relay.intake FROM {application};
GRANT SELECT ON SEQUENCE relay.intake_id_seq TO {application};
-- The one lookup of an intent's INSERT: its type's business-key template.
GRANT SELECT (name, business_key) ON relay.effect_type TO {application};
REVOKE EXECUTE ON FUNCTION relay.intake_effect(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.intake_effect(text) TO {application}, {operator};

-- Every daemon and operator reads the outbox, its declared types and its schema version.
GRANT SELECT ON ALL TABLES IN SCHEMA relay TO {relay}, {reconciler}, {operator};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA relay TO {relay}, {reconciler}, {operator};
GRANT INSERT, UPDATE ON relay.effect_type TO {relay}, {reconciler};
GRANT UPDATE ON relay.limits TO {relay}, {reconciler};

-- The relay: claims and marks effects, writes attempts and transitions, its replica row, the
-- doorbell and the status-event lease; checks its own ambiguous publishes.
GRANT UPDATE ON relay.effect, relay.doorbell, relay.status_publisher TO {relay};
GRANT INSERT, UPDATE ON relay.attempt, relay.transition, relay.replica TO {relay};
-- The ticker stores ticks and deletes those no reader needs; DELETE is also what lets it take its
-- lock (LOCK TABLE relay.tick IN SHARE ROW EXCLUSIVE MODE needs UPDATE, DELETE or TRUNCATE), a
-- lock no application, reconciler or operator role can take (relay/dispatch/ticker.py).
GRANT INSERT, DELETE ON relay.tick TO {relay};
-- The relay reads the intake between ticks and writes the effect rows, claiming what it can
-- publish at once (relay.promote_intake).
GRANT EXECUTE ON FUNCTION relay.promote_intake(integer, integer, text, bigint, double precision,
                                               integer, bigint, boolean) TO {relay};
-- It writes the effect rows of a batch claimed that way with their outcomes, and deletes the
-- batch (relay.dispatch_batch; UPDATE for the lock it takes on it first).
GRANT INSERT ON relay.effect TO {relay};
GRANT UPDATE, DELETE ON relay.dispatch_batch TO {relay};
-- Published intents that need nothing more are recorded per batch (relay.published_batch).
GRANT INSERT ON relay.published_batch TO {relay};
-- Whether its incarnation writes receipts into its Kafka transactions (relay.receipt_writer).
GRANT INSERT, DELETE ON relay.receipt_writer TO {relay};
-- Status events of a batch whose Kafka transaction ended without an answer wait for the record to
-- be looked for (relay.status_held).
GRANT INSERT, DELETE ON relay.status_held TO {relay};

-- The reconciler: evidence, moves, compensations, the status-event switch.
GRANT UPDATE ON relay.effect, relay.reconciler_config, relay.attempt TO {reconciler};
GRANT INSERT, UPDATE ON relay.evidence, relay.transition TO {reconciler};
GRANT EXECUTE ON FUNCTION relay.enqueue_compensation(bigint, integer, text, jsonb, text, text)
    TO {reconciler}, {operator};

-- Operators: `relay resolve` and `relay unblock` (moves, evidence, compensations), `relay
-- cancel`, and `relay purge` through its SECURITY DEFINER functions (no right to delete rows).
GRANT UPDATE ON relay.effect TO {operator};
GRANT INSERT ON relay.evidence TO {operator};
GRANT INSERT, UPDATE ON relay.transition TO {operator};
GRANT EXECUTE ON FUNCTION relay.purge_batch(double precision, integer),
    relay.purge_unattached_evidence(double precision, integer),
    relay.purge_forgotten_keys(double precision, integer),
    relay.purge_refused_intake(double precision, integer) TO {operator};
-- `relay console` decides as an operator login: it records every decision, refused ones too, in
-- its append-only audit (a trigger refuses UPDATE and DELETE to everyone). A viewer's refused
-- decision is audited through that operator login too: the viewer writes nothing, anywhere.
GRANT INSERT ON relay.console_audit TO {operator};

-- The console's viewers (console_viewer_database_url): SELECT on what its pages read (the
-- overview, the lists, an effect's story and outlook, the audit) and nothing else: no write of
-- any kind, no function, no sequence, not the intake, the replicas or the ticks.
GRANT SELECT ON relay.effect, relay.effect_type, relay.attempt, relay.transition,
    relay.transition_log, relay.evidence, relay.reconciler_config, relay.console_audit,
    relay.published_batch TO {viewer};
-- The story of an intent published in a batch starts at its enqueue: its time, by id (no key,
-- payload or anything else of the intake).
GRANT SELECT (id, enqueued_at) ON relay.intake TO {viewer};

-- Rights earlier versions of this script granted that no command needs: evidence is
-- append-only for every role but the owner (the reconciler records a result's verdict on it).
REVOKE DELETE ON relay.effect FROM {operator};
REVOKE INSERT, UPDATE, DELETE ON relay.purged_key FROM {operator};
REVOKE DELETE ON relay.evidence FROM {application}, {relay}, {reconciler}, {operator};
REVOKE UPDATE ON relay.evidence FROM {application}, {relay}, {operator};

-- The operator console's audit (relay console): every decision asked for in the console, applied
-- or refused, with who asked, from where, what they saw and why. Append-only: no statement may
-- change or remove a row (the trigger refuses UPDATE, DELETE and TRUNCATE, whoever runs them).

CREATE TABLE relay.console_audit (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    -- The identity the console established (its own sign-in, or the proxy's header).
    actor          text NOT NULL,
    auth           text NOT NULL,
    access         text NOT NULL,
    client_address text,
    action         text NOT NULL,
    operation_key  text,
    ordering_group text,
    -- What the operator's page showed: state, updated_at, attempts (or the group's blocker).
    seen           jsonb NOT NULL DEFAULT '{}',
    reason         text,
    outcome        text NOT NULL,
    -- Refused: why, and what changed meanwhile; applied: what it did.
    detail         text,
    -- The login that wrote the row, set by the database.
    db_role        text DEFAULT session_user,
    CONSTRAINT console_audit_outcome_valid CHECK (outcome IN ('applied', 'refused')),
    CONSTRAINT console_audit_access_valid CHECK (access IN ('none', 'viewer', 'operator'))
);
CREATE INDEX console_audit_key_idx ON relay.console_audit (operation_key, id);

-- The console's lists of what needs a person, in id order: only effects in these states have an
-- entry, so the relay's own transitions (PENDING to CONFIRMED) never write to it.
CREATE INDEX effect_attention_idx ON relay.effect (state, id)
    WHERE state IN ('UNKNOWN', 'STUCK', 'REJECTED');

CREATE FUNCTION relay.console_audit_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'relay.console_audit is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;
CREATE TRIGGER console_audit_append_only BEFORE UPDATE OR DELETE ON relay.console_audit
    FOR EACH ROW EXECUTE FUNCTION relay.console_audit_append_only();
CREATE TRIGGER console_audit_no_truncate BEFORE TRUNCATE ON relay.console_audit
    FOR EACH STATEMENT EXECUTE FUNCTION relay.console_audit_append_only();
CREATE TRIGGER console_audit_login BEFORE INSERT ON relay.console_audit
    FOR EACH ROW EXECUTE FUNCTION relay.evidence_login();

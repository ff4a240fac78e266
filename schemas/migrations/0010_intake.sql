-- 0010: the intake of issue 19 (docs/design/intake.md §2-§4, slice 1): an append-only table the
-- application only inserts into, the enum of declared types that checks an insert's type with no
-- lookup and no lock, and the ticks (stored snapshots) the relay reads it between. Nothing writes
-- or reads the intake yet: `relay.enqueue` and `relay run` keep using relay.effect until slices 2
-- and 3; this migration only adds objects.
--
-- The enum starts with the declared types already synced (never the relay's own `relay.*`
-- types: relay-made effects do not go through the intake); `relay migrate` adds every type
-- declared later (ALTER TYPE ... ADD VALUE; values are never removed). The intake's ids start
-- after relay.effect's, so an intake id can become an effect id without a collision. An enum
-- label holds at most 63 bytes: a longer declared name (the config allows 128) is left out, and
-- such a type cannot be written to the intake.
--
-- Upgrade: `relay migrate`, then `relay roles --apply` (the application role's column INSERT on
-- the intake, the relay role's rights on the ticks).

DO $$
BEGIN
    EXECUTE (
        SELECT format('CREATE TYPE relay.effect_type_name AS ENUM (%s)',
                      coalesce(string_agg(quote_literal(t.name), ', ' ORDER BY t.name), ''))
        FROM relay.effect_type t
        WHERE NOT starts_with(t.name, 'relay.') AND octet_length(t.name) <= 63);
END
$$;

CREATE TABLE relay.intake (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_key  text NOT NULL,
    effect_type    relay.effect_type_name NOT NULL,
    payload        jsonb NOT NULL,
    business_key   text,
    traceparent    text,
    available_at   timestamptz,
    ordering_group text,
    enqueued_by    text NOT NULL DEFAULT session_user,
    txid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT intake_operation_key_unique UNIQUE (operation_key)
);
CREATE INDEX intake_read_idx ON relay.intake (txid);
REVOKE ALL ON relay.intake FROM PUBLIC;

SELECT setval(pg_get_serial_sequence('relay.intake', 'id'), max(e.id))
FROM relay.effect e HAVING max(e.id) IS NOT NULL;

CREATE TABLE relay.tick (
    id         bigint PRIMARY KEY,
    snap       pg_snapshot NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    intake_seq bigint NOT NULL
);
-- Tick 0, "the beginning": its snapshot sees no transaction, so the pair (0, b) holds every row
-- committed before tick b, however old. A reader starts there.
INSERT INTO relay.tick (id, snap, at, intake_seq) VALUES (0, '1:1:', 'epoch', 0);

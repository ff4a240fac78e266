-- The relay schema as schemas/migrations/0001..0012 leave it: a reference to read, applied by
-- nothing (`relay migrate` applies the migrations). tests/integration/test_schema.py checks
-- that the migrations reach exactly this. Columns are in their table's physical order;
-- function bodies are the migrations' text.

CREATE SCHEMA relay;

-- Tables ------------------------------------------------------------------------------------

-- Declared effect types, synced from the config by `relay migrate` (never deleted).
CREATE TABLE relay.effect_type (
    name               text PRIMARY KEY,
    topic              text NOT NULL,
    idempotent         boolean NOT NULL,
    -- Template like '{account}:{date}', filled by relay.business_key.
    business_key       text,
    result_topic       text,
    outcome_timeout_s  double precision NOT NULL,
    has_observer       boolean NOT NULL DEFAULT false,
    compensation       text,
    max_attempts       integer NOT NULL DEFAULT 5,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- Records keyed by the ordering group instead of the operation key.
    key_by_group       boolean NOT NULL DEFAULT false,
    -- An UNKNOWN outcome of a non-idempotent effect must be resolvable somehow.
    CONSTRAINT effect_type_resolvable
        CHECK (idempotent OR business_key IS NOT NULL OR has_observer OR compensation IS NOT NULL)
);

-- The outbox: one row per intent, written by relay.enqueue in the application's transaction.
-- No foreign key to effect_type: relay.enqueue checks the type (a key would lock its row).
CREATE TABLE relay.effect (
    -- Drawn from the intake's sequence (set after relay.intake below): an intent's effect has
    -- its intake row's id.
    id                  bigint PRIMARY KEY,
    operation_key       text NOT NULL,
    effect_type         text NOT NULL,
    topic               text NOT NULL,
    payload             jsonb NOT NULL,
    business_key        text,
    traceparent         text,
    state               text NOT NULL DEFAULT 'PENDING',
    attempts            integer NOT NULL DEFAULT 0,
    available_at        timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- The claim of a DISPATCHING (or verifying) effect: compare-and-set on (owner, owner_epoch).
    owner               text,
    owner_epoch         bigint,
    lease_until         timestamptz,
    reason              text,
    -- Where the last publication landed, and until when its downstream result is awaited.
    published_partition integer,
    published_offset    bigint,
    published_at        timestamptz,
    outcome_deadline    timestamptz,
    -- A compensation's effect.
    parent_effect_id    bigint REFERENCES relay.effect (id),
    -- The reconciler's: the downstream's id of the execution, the observation queue.
    external_id         text,
    observe_at          timestamptz,
    observe_tries       integer NOT NULL DEFAULT 0,
    -- The Kafka key when it is not the operation key (status effects, key_by_group).
    message_key         text,
    -- The relay's own checks of ambiguous publishes in Kafka.
    verify_at           timestamptz,
    verify_tries        integer NOT NULL DEFAULT 0,
    -- When the current attempt was claimed (its attempt row is written with its outcome).
    claimed_at          timestamptz,
    -- Ordering groups; group_released_at is set by `relay unblock`.
    ordering_group      text,
    group_released_at   timestamptz,
    -- The login that enqueued it (session_user in relay.enqueue); NULL for the relay's own.
    enqueued_by         text,
    -- Written behind an unsettled effect of its group: out of the claim's index until the effect
    -- before it lets it go (relay.release_next_in_group).
    behind_head         boolean NOT NULL DEFAULT false,
    CONSTRAINT effect_operation_key_unique UNIQUE (operation_key),
    CONSTRAINT effect_operation_key_nonempty CHECK (length(operation_key) BETWEEN 1 AND 512),
    CONSTRAINT effect_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT effect_state_valid CHECK (state IN ('PENDING', 'DISPATCHING', 'PUBLISHED',
        'CONFIRMED', 'REJECTED', 'UNKNOWN', 'STUCK', 'CANCELLED')),
    CONSTRAINT effect_ordering_group_length
        CHECK (ordering_group IS NULL OR length(ordering_group) BETWEEN 1 AND 512)
);
-- The claim: an ordered scan of this partial index, however large the table grows.
CREATE INDEX effect_pending_idx ON relay.effect (available_at, id) WHERE state = 'PENDING';
-- The claim's scan: due PENDING effects not waiting behind their group's head. (The index on all
-- PENDING effects stays for the counts.)
CREATE INDEX effect_claim_idx ON relay.effect (available_at, id)
    WHERE state = 'PENDING' AND NOT behind_head;
-- Every state but PENDING (so an enqueue adds no entry): leases, work lists, metrics.
CREATE INDEX effect_state_idx ON relay.effect (state, updated_at) INCLUDE (effect_type)
    WHERE state <> 'PENDING';
-- The deadline sweep, the observation queue, the relay's verification queue, compensations.
CREATE INDEX effect_deadline_idx ON relay.effect (outcome_deadline)
    WHERE state = 'PUBLISHED' AND outcome_deadline IS NOT NULL;
CREATE INDEX effect_observe_idx ON relay.effect (observe_at)
    WHERE state = 'UNKNOWN' AND published_offset IS NOT NULL;
CREATE INDEX effect_verify_idx ON relay.effect (verify_at)
    WHERE state = 'UNKNOWN' AND published_offset IS NULL;
CREATE INDEX effect_parent_idx ON relay.effect (parent_effect_id)
    WHERE parent_effect_id IS NOT NULL;
-- The effect before this one in its group; the effects that park their group.
CREATE INDEX effect_group_idx ON relay.effect (ordering_group, id)
    WHERE ordering_group IS NOT NULL;
CREATE INDEX effect_group_blocker_idx ON relay.effect (ordering_group, id)
    WHERE ordering_group IS NOT NULL AND group_released_at IS NULL
      AND state IN ('REJECTED', 'UNKNOWN', 'STUCK');
-- The console's lists of what needs a person, in id order: only effects in these states have an
-- entry, so the relay's own transitions (PENDING to CONFIRMED) never write to it.
CREATE INDEX effect_attention_idx ON relay.effect (state, id)
    WHERE state IN ('UNKNOWN', 'STUCK', 'REJECTED');

-- One row per attempt, written with its outcome. Attempts, transitions and evidence have no
-- foreign key to their effect: only the relay's statements write them, about locked effects,
-- and `relay purge` deletes them with it.
CREATE TABLE relay.attempt (
    effect_id     bigint NOT NULL,
    attempt       integer NOT NULL,
    replica_id    text NOT NULL,
    replica_epoch bigint NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    -- NULL while in flight (claims made before 0004).
    outcome       text,
    reason        text,
    partition     integer,
    "offset"      bigint,
    verification  text,
    verified_at   timestamptz,
    PRIMARY KEY (effect_id, attempt),
    CONSTRAINT attempt_outcome_valid
        CHECK (outcome IN ('acked', 'rejected', 'unknown', 'not_sent', 'released', 'aborted'))
);

-- The transitions log; one row may imply the enqueue and the claim before it (transition_log).
CREATE TABLE relay.transition (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    effect_id       bigint NOT NULL,
    from_state      text,
    to_state        text NOT NULL,
    reason          text NOT NULL,
    actor           text NOT NULL,
    attempt         integer NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    -- Its status event is still to be published (status events on).
    status_pending  boolean NOT NULL DEFAULT false,
    implied_enqueue boolean NOT NULL DEFAULT false,
    implied_claim   boolean NOT NULL DEFAULT false
);
CREATE INDEX transition_effect_idx ON relay.transition (effect_id, id);
CREATE INDEX transition_status_idx ON relay.transition (id) WHERE status_pending;

-- Downstream results, observer answers and operators' decisions, kept whatever their verdict.
CREATE TABLE relay.evidence (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text NOT NULL,
    effect_id      bigint,
    operation_key  text,
    topic          text,
    partition      integer,
    "offset"       bigint,
    outcome        text,
    external_id    text,
    observed_count integer,
    detail         text,
    raw            bytea,
    raw_size       integer,
    attempt        integer,
    verdict        text NOT NULL,
    reason         text,
    actor          text NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    applied_at     timestamptz,
    -- Who really decided: the database login and an operator's OS user.
    db_role        text DEFAULT session_user,
    os_user        text,
    CONSTRAINT evidence_kind_valid CHECK (kind IN ('result', 'observation', 'operator')),
    CONSTRAINT evidence_verdict_valid CHECK (verdict IN (
        'applied', 'repeated', 'deferred', 'ignored', 'malformed', 'orphaned', 'conflicting',
        'late', 'failed', 'misrouted')),
    -- One row per Kafka record: a redelivery is a no-op.
    CONSTRAINT evidence_record_unique UNIQUE (topic, partition, "offset")
);
CREATE INDEX evidence_effect_idx ON relay.evidence (effect_id, id);
CREATE INDEX evidence_deferred_idx ON relay.evidence (id) WHERE verdict = 'deferred';
CREATE INDEX evidence_unattached_idx ON relay.evidence (received_at) WHERE effect_id IS NULL;

-- Keys of purged effects, refused by relay.enqueue for the dedupe window.
CREATE TABLE relay.purged_key (
    operation_key text PRIMARY KEY,
    effect_id     bigint NOT NULL,
    effect_type   text NOT NULL,
    final_state   text NOT NULL,
    purged_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purged_key_at_idx ON relay.purged_key (purged_at);

-- One row per relay replica: the epoch grows at every start and fences the one before.
CREATE TABLE relay.replica (
    replica_id   text PRIMARY KEY,
    epoch        bigint NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Decisions asked for in the operator console, applied or refused (append-only: see below).
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

-- One-row tables (id is always true).

-- Armed by an idle relay for a while: only then does an enqueue send a NOTIFY.
CREATE TABLE relay.doorbell (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    armed       boolean NOT NULL DEFAULT false,
    armed_until timestamptz
);
INSERT INTO relay.doorbell (id, armed) VALUES (true, false);

-- The replica publishing status events, and what it handed to Kafka before recording it.
CREATE TABLE relay.status_publisher (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    owner       text,
    owner_epoch bigint,
    lease_until timestamptz,
    inflight    bigint[] NOT NULL DEFAULT '{}',
    inflight_at timestamptz
);
INSERT INTO relay.status_publisher (id) VALUES (true);

-- Status events on or off, set by `relay reconcile` (status_effect_type: status effects of 0002).
CREATE TABLE relay.reconciler_config (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    status_effect_type text REFERENCES relay.effect_type (name),
    status_events      boolean NOT NULL DEFAULT false
);
INSERT INTO relay.reconciler_config (id) VALUES (true);

-- Limits every caller of relay.enqueue meets, synced from the settings.
CREATE TABLE relay.limits (
    id                boolean PRIMARY KEY DEFAULT true CHECK (id),
    max_payload_bytes integer NOT NULL DEFAULT 1000000,
    max_pending_per_group integer NOT NULL DEFAULT 10000
);
INSERT INTO relay.limits (id) VALUES (true);

-- The applied migrations (created by relay.migrations, one row per file).
CREATE TABLE relay.schema_migration (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The intake (0010, docs/design/intake.md §2): the application only inserts; the relay reads it
-- between ticks. The enum holds the declared types (added by `relay migrate`, never `relay.*`):
-- an undeclared type fails at insert with no lookup. The ids start after relay.effect's.
CREATE TYPE relay.effect_type_name AS ENUM ();

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
    -- The top-level xid (xmin is a subtransaction's inside a SAVEPOINT): what snapshots speak of.
    txid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    enqueued_at    timestamptz NOT NULL DEFAULT now(),
    -- Set by relay.purge_batch when the intent's content goes at retention: the row stays, with
    -- its key, until the dedupe window ends (no application role may write it).
    purged_at      timestamptz,
    CONSTRAINT intake_operation_key_unique UNIQUE (operation_key)
);
-- Room on each page for the row's emptied version at retention, so that the purge's update is
-- a heap-only one (no new index entries): migration 0025.
ALTER TABLE relay.intake SET (fillfactor = 70);
CREATE INDEX intake_read_idx ON relay.intake (txid);
-- A group's newest intents, counted against max_pending_per_group by relay.enqueue.
CREATE INDEX intake_group_idx ON relay.intake (ordering_group, id)
    WHERE ordering_group IS NOT NULL;
REVOKE ALL ON relay.intake FROM PUBLIC;

-- Stored snapshots: a batch is the intake rows visible in one tick and not in an earlier one.
CREATE TABLE relay.tick (
    id         bigint PRIMARY KEY,
    snap       pg_snapshot NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    intake_seq bigint NOT NULL
);
-- Tick 0, "the beginning": its snapshot sees no transaction, so the pair (0, b) holds every row
-- committed before tick b, however old. A reader starts there.
INSERT INTO relay.tick (id, snap, at, intake_seq) VALUES (0, '1:1:', 'epoch', 0);

ALTER TABLE relay.effect ALTER COLUMN id SET DEFAULT nextval('relay.intake_id_seq'::regclass);

-- Where the promotion reads next: after tick tick_from (inside the pair fixed at tick_to, after
-- id after_id, when a pair was cut at the batch size). One row; its row lock makes one reader.
CREATE TABLE relay.intake_reader (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    tick_from  bigint NOT NULL,
    tick_to    bigint,
    after_id   bigint NOT NULL,
    read_at    timestamptz,
    promoted   bigint NOT NULL DEFAULT 0,
    -- Intents passed while a cancel of theirs was in progress (their row locked by
    -- relay.cancel), and the later ones of their groups: read again at every read until free.
    deferred   bigint[] NOT NULL DEFAULT '{}'
);
INSERT INTO relay.intake_reader (tick_from, tick_to, after_id) VALUES (0, NULL, 0);

-- Intake rows that could not become an effect: their key already names another effect.
CREATE TABLE relay.intake_refused (
    id            bigint PRIMARY KEY,
    operation_key text NOT NULL,
    effect_type   text NOT NULL,
    enqueued_by   text NOT NULL,
    reason        text NOT NULL,
    refused_at    timestamptz NOT NULL DEFAULT now()
);

-- Ordering groups and the login each belongs to; the row is the group's ordering lock.
CREATE TABLE relay.ordering_group (
    name       text PRIMARY KEY,
    owner      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON relay.intake_reader, relay.intake_refused, relay.ordering_group FROM PUBLIC;

-- A claim of ungrouped intents read from the intake, one row per batch (issue 19, the design's
-- bookkeeping per batch): its intents have no effect row until their outcome is recorded, and
-- the row is the attempt recorded before the publish. The marker writes each effect row once, in
-- its outcome's state, and deletes the batch; a batch whose lease ran out has its effects
-- written UNKNOWN (relay/sql/dispatch.sql, expire_batches).
CREATE TABLE relay.dispatch_batch (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner       text NOT NULL,
    owner_epoch bigint NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL,
    ids         bigint[] NOT NULL,
    -- The intents whose status events ride in the batch's Kafka transaction (status events on,
    -- a transactional relay, a type that awaits no result): decided at the claim, before the
    -- publish, so that whoever records the batch's end knows which events may be visible.
    status_ids  bigint[] NOT NULL DEFAULT '{}'
);
REVOKE ALL ON relay.dispatch_batch FROM PUBLIC;
-- A batch's arrays are stored out of line without compression (migration 0024): compressing
-- them at each claim and each mark cost about 4 us of PostgreSQL CPU an effect, to save
-- space in a row that lives for one publish (published_batch keeps 20 bytes an effect, not 5).
ALTER TABLE relay.dispatch_batch ALTER COLUMN ids SET STORAGE EXTERNAL,
    ALTER COLUMN status_ids SET STORAGE EXTERNAL;

-- The incarnations of replicas that write a receipt into each Kafka transaction they commit
-- (migration 0028; relay/dispatch/receipts.py): for their batches left without an outcome, the
-- absence of a receipt after fencing is proof that the transaction did not commit.
CREATE TABLE relay.receipt_writer (
    replica_id text NOT NULL,
    epoch      bigint NOT NULL,
    topic      text NOT NULL,
    install    text NOT NULL,
    -- The latest it sends a receipt after its batch's claim (seconds): a settler reads that far.
    window_s   double precision NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_id, epoch)
);
REVOKE ALL ON relay.receipt_writer FROM PUBLIC;

-- Effects whose status events rode in a Kafka transaction that ended without an answer (or
-- whose replica died): visible if and only if the record is. Their transitions wait here until
-- the record is looked for: found, the events in Kafka told the story and the log's are not
-- published; absent (or the effect left UNKNOWN another way), the log's are published.
CREATE TABLE relay.status_held (
    effect_id bigint PRIMARY KEY REFERENCES relay.effect (id) ON DELETE CASCADE,
    batch_id  bigint NOT NULL,
    held_at   timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON relay.status_held FROM PUBLIC;

-- Intents of a batch published and acknowledged that need nothing more: their type awaits no
-- downstream result and status events are off (issue 19, bookkeeping per batch). One row per
-- batch and type holds what an effect row would (who claimed them and when, where each record
-- lies in Kafka); they get no effect, attempt or transition row. relay.published_intent finds an
-- id's row through the id span; `relay purge` removes the row and the intake's payloads.
CREATE TABLE relay.published_batch (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id     bigint NOT NULL,
    effect_type  text NOT NULL,
    owner        text NOT NULL,
    owner_epoch  bigint NOT NULL,
    claimed_at   timestamptz NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    first_id     bigint NOT NULL,
    last_id      bigint NOT NULL,
    n            integer NOT NULL,
    -- Parallel arrays, in id order.
    ids          bigint[] NOT NULL,
    partitions   integer[] NOT NULL,
    offsets      bigint[] NOT NULL
);
-- Spans of batches overlap (a late commit is read after later ids): a range index, not a b-tree.
CREATE INDEX published_batch_span_idx ON relay.published_batch
    USING gist (int8range(first_id, last_id, '[]'));
CREATE INDEX published_batch_at_idx ON relay.published_batch (published_at, id);
REVOKE ALL ON relay.published_batch FROM PUBLIC;
ALTER TABLE relay.published_batch ALTER COLUMN ids SET STORAGE EXTERNAL,
    ALTER COLUMN partitions SET STORAGE EXTERNAL, ALTER COLUMN offsets SET STORAGE EXTERNAL;

-- Published batches whose intents were emptied at retention (relay.purge_batch): their intake
-- rows keep the keys until the dedupe window ends, then go by these ids, a batch at a time
-- (relay.purge_forgotten_keys), with no per-intent row written in between.
CREATE TABLE relay.emptied_batch (
    id         bigint PRIMARY KEY,
    ids        bigint[] NOT NULL,
    emptied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE relay.emptied_batch ALTER COLUMN ids SET STORAGE EXTERNAL;
CREATE INDEX emptied_batch_at_idx ON relay.emptied_batch (emptied_at, id);
REVOKE ALL ON relay.emptied_batch FROM PUBLIC;

-- The published batch an intent without an effect row lies in, and where its record is; nothing
-- when it lies in none. Inlined into its callers (a probe of the span index, then the id's place
-- in the batch).
CREATE FUNCTION relay.published_intent(p_id bigint)
RETURNS TABLE (published_batch bigint, effect_type text, owner text, owner_epoch bigint,
               claimed_at timestamptz, published_at timestamptz, "partition" integer,
               "offset" bigint)
LANGUAGE sql STABLE
AS $fn$
SELECT p.id, p.effect_type, p.owner, p.owner_epoch, p.claimed_at, p.published_at,
       p.partitions[k.i], p.offsets[k.i]
FROM relay.published_batch p
CROSS JOIN LATERAL (SELECT array_position(p.ids, p_id) AS i) k
WHERE int8range(p.first_id, p.last_id, '[]') @> p_id AND k.i IS NOT NULL
$fn$;

-- Views --------------------------------------------------------------------------------------

-- The whole transitions log in order (transition_id, part): part 0 the implied enqueue, 1 the
-- implied claim, 2 the row itself.
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

-- Intents claimed in a batch not recorded yet: DISPATCHING, with no effect row (few rows: a
-- batch lives from its claim to its outcome).
CREATE VIEW relay.batch_effect AS
SELECT i.id, i.operation_key, i.effect_type::text AS effect_type, i.traceparent,
       i.enqueued_at, b.id AS batch_id, b.owner, b.owner_epoch, b.claimed_at, b.lease_until
FROM relay.dispatch_batch b
CROSS JOIN LATERAL unnest(b.ids) AS x(id)
JOIN relay.intake i ON i.id = x.id
WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = x.id)
  AND NOT EXISTS (SELECT 1 FROM relay.published_intent(x.id));

-- Every intent of the published batches, as the effect row it does not have would show it (for
-- whole-outbox readers such as the fault suite's checker; by id, relay.published_intent).
CREATE VIEW relay.published_effect AS
SELECT x.id, i.operation_key, p.effect_type, x."partition", x."offset", i.business_key,
       i.traceparent, i.enqueued_at AS created_at, p.owner, p.owner_epoch, p.claimed_at,
       p.published_at, p.id AS published_batch
FROM relay.published_batch p
CROSS JOIN LATERAL unnest(p.ids, p.partitions, p.offsets) AS x(id, "partition", "offset")
JOIN relay.intake i ON i.id = x.id;

-- What a transition row the relay writes with an outcome needs to know: whether status events
-- are on, and since when a first attempt's row implies the enqueue (migration 0004).
CREATE VIEW relay.transition_context AS
SELECT c.status_events AS status,
       coalesce((SELECT v.applied_at FROM relay.schema_migration v WHERE v.version = 4),
                '-infinity') AS lean_since
FROM relay.reconciler_config c;

-- Functions ----------------------------------------------------------------------------------

-- A business key from its template, each field's value escaped so distinct values give
-- distinct keys.
CREATE FUNCTION relay.business_key(p_template text, p_payload jsonb, p_operation_key text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_literal text := regexp_replace(p_template, '\{[A-Za-z0-9_]+\}', '', 'g') || '%';
    v_out     text := '';
    v_part    text[];
    v_value   text;
BEGIN
    FOR v_part IN SELECT regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}|([^{]+|\{)', 'g') LOOP
        IF v_part[1] IS NULL THEN
            v_out := v_out || v_part[2];
            CONTINUE;
        END IF;
        v_value := p_payload ->> v_part[1];
        IF v_value IS NULL THEN
            RAISE EXCEPTION 'payload of % lacks field % needed by the business key %',
                p_operation_key, quote_literal(v_part[1]), quote_literal(p_template)
                USING ERRCODE = 'RL002';
        END IF;
        IF translate(v_value, v_literal, '') <> v_value THEN
            SELECT string_agg(
                       CASE WHEN strpos(v_literal, s.c) > 0
                            THEN (SELECT string_agg('%' || lpad(upper(to_hex(get_byte(b.v, i))), 2, '0'), ''
                                                    ORDER BY i)
                                  FROM (SELECT convert_to(s.c, 'UTF8') AS v) b,
                                       generate_series(0, length(b.v) - 1) AS i)
                            ELSE s.c END,
                       '' ORDER BY s.n)
            INTO v_value
            FROM regexp_split_to_table(v_value, '') WITH ORDINALITY AS s(c, n);
        END IF;
        v_out := v_out || v_value;
    END LOOP;
    RETURN v_out;
END
$fn$;

-- The regular expression of every key a template can make (relay.business_key's rule: its literal
-- text as written, and each field's value with the template's own characters and '%' as %XX).
CREATE FUNCTION relay.business_key_pattern(p_template text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_literal text := regexp_replace(p_template, '\{[A-Za-z0-9_]+\}', '', 'g') || '%';
    v_field   text;
    v_out     text := '^';
    v_part    text[];
BEGIN
    v_field := '(?:[^' || regexp_replace(v_literal, '([^A-Za-z0-9])', '\\\1', 'g')
               || ']|%[0-9A-F]{2})*';
    FOR v_part IN SELECT regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}|([^{]+|\{)', 'g') LOOP
        IF v_part[1] IS NULL THEN
            v_out := v_out || regexp_replace(v_part[2], '([^A-Za-z0-9])', '\\\1', 'g');
        ELSE
            v_out := v_out || v_field;
        END IF;
    END LOOP;
    RETURN v_out || '$';
END
$fn$;

-- Another effect type whose template could make this key (NULL when none): an explicit key must
-- not be one that the relay computes for another type's effects, or an application could give
-- its intent the key of another's effect (an observer searching the downstream by that key would
-- find the wrong one; issue 18 item 8b). `relay migrate` keeps templates of distinct types apart
-- (relay/business_keys.py), so a computed key is never another template's.
CREATE FUNCTION relay.business_key_maker(p_effect_type text, p_key text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT min(t.name) FROM relay.effect_type t
WHERE t.business_key IS NOT NULL AND t.name IS DISTINCT FROM p_effect_type
  AND p_key ~ relay.business_key_pattern(t.business_key)
$fn$;

-- The business key an intent is stored with: the type's own when it has a template (an explicit
-- one must equal it: an application must not pick another effect's key, issue 18 item 8b), else
-- the caller's, which no other type's template may be able to make. Raises RL002, as
-- relay.business_key does; the enqueue paths call it (for a type without a template, only when
-- a key is given).
CREATE FUNCTION relay.checked_business_key(p_template text, p_payload jsonb,
                                           p_operation_key text, p_given text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_key   text;
    v_maker text;
BEGIN
    IF p_template IS NULL THEN
        v_maker := CASE WHEN p_given IS NOT NULL THEN relay.business_key_maker(NULL, p_given) END;
        IF v_maker IS NOT NULL THEN
            RAISE EXCEPTION 'business key of % could be made by the template of effect type %: an explicit key must not be one another type computes',
                p_operation_key, quote_literal(v_maker) USING ERRCODE = 'RL002';
        END IF;
        RETURN p_given;
    END IF;
    v_key := relay.business_key(p_template, p_payload, p_operation_key);
    IF p_given IS NOT NULL AND p_given <> v_key THEN
        RAISE EXCEPTION 'business key of % differs from the one its type computes from the template %: a type with a template takes no other',
            p_operation_key, quote_literal(p_template) USING ERRCODE = 'RL002';
    END IF;
    RETURN v_key;
END
$fn$;

-- Why a row read from the intake cannot have its type's business key (NULL when it can): a field
-- of the template missing (relay.business_key would raise, and one row would stop every read),
-- or an explicit key other than the computed one. Inlined into the reader's statement.
CREATE FUNCTION relay.business_key_refusal(p_effect_type text, p_template text, p_payload jsonb,
                                           p_operation_key text, p_given text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT CASE
    WHEN p_template IS NULL THEN NULL
    WHEN jsonb_typeof(p_payload) <> 'object' THEN 'payload must be a JSON object'
    WHEN EXISTS (SELECT 1 FROM regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}', 'g') AS m(f)
                 WHERE p_payload ->> m.f[1] IS NULL)
        THEN format('payload lacks field %s needed by the business key %s',
                    (SELECT string_agg(quote_literal(m.f[1]), ', ')
                     FROM regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}', 'g') AS m(f)
                     WHERE p_payload ->> m.f[1] IS NULL),
                    quote_literal(p_template))
    WHEN p_given IS NOT NULL
         AND p_given <> relay.business_key(p_template, p_payload, p_operation_key)
        THEN format('business key differs from the one type %s computes from its template %s',
                    quote_literal(p_effect_type), quote_literal(p_template))
END
$fn$;

-- The one write of an enqueue, called in the application's transaction. SECURITY DEFINER: an
-- application role needs EXECUTE on it and nothing on the tables. Raises RL001..RL006.
CREATE FUNCTION relay.enqueue(
    p_operation_key  text,
    p_effect_type    text,
    p_payload        jsonb,
    p_business_key   text DEFAULT NULL,
    p_traceparent    text DEFAULT NULL,
    p_available_at   timestamptz DEFAULT NULL,
    p_ordering_group text DEFAULT NULL,
    OUT effect_id    bigint,
    OUT state        text,
    OUT created      boolean
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $fn$
#variable_conflict use_column
DECLARE
    v_topic    text;
    v_template text;
    v_by_group boolean;
    v_limit    integer;
    v_ring     boolean;
    v_purged   boolean;
    v_existing relay.effect%ROWTYPE;
    v_in       relay.intake%ROWTYPE;
    v_gone     relay.purged_key%ROWTYPE;
    v_in_enum  boolean;
    v_key      text := p_business_key;
    v_owner    text;
    v_cap      integer;
    v_held     bigint;
BEGIN
    IF p_operation_key IS NULL OR length(p_operation_key) = 0 OR length(p_operation_key) > 512 THEN
        RAISE EXCEPTION 'operation key must be 1 to 512 characters' USING ERRCODE = 'RL002';
    END IF;
    IF strpos(p_operation_key, '#compensation') > 0
       AND p_operation_key ~ '#compensation(-[0-9]+)?$' THEN
        RAISE EXCEPTION 'operation key % is reserved for the relay''s own compensations',
            quote_literal(p_operation_key) USING ERRCODE = 'RL002';
    END IF;
    IF p_ordering_group IS NOT NULL
       AND (length(p_ordering_group) = 0 OR length(p_ordering_group) > 512) THEN
        RAISE EXCEPTION 'ordering group of % must be 1 to 512 characters', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'payload of % must be a JSON object', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    -- A container at level 100 means nesting deeper than the Python API accepts (objects and
    -- arrays at levels 0 to 99): such a document cannot be decoded by the daemons' JSON parsers.
    IF jsonb_path_exists(p_payload,
                         'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'payload of % nests deeper than 100 levels', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF p_business_key IS NOT NULL
       AND (length(p_business_key) = 0 OR length(p_business_key) > 512) THEN
        RAISE EXCEPTION 'business key of % must be 1 to 512 characters', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF p_available_at IS NOT NULL AND NOT isfinite(p_available_at) THEN
        RAISE EXCEPTION 'available_at of % must be a finite time, not %', p_operation_key,
            p_available_at USING ERRCODE = 'RL002';
    END IF;
    IF p_traceparent IS NOT NULL
       AND p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        RAISE EXCEPTION 'traceparent of % is not a W3C traceparent', p_operation_key
            USING ERRCODE = 'RL002';
    END IF;
    IF starts_with(p_effect_type, 'relay.') THEN
        RAISE EXCEPTION 'effect type % is reserved for the relay', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001';
    END IF;
    -- What the database knows, in one statement: the type, the limits, the doorbell (one row
    -- each) and whether the key was purged.
    SELECT t.topic, t.business_key, t.key_by_group, l.max_payload_bytes,
           coalesce(d.armed_until > now(), false),
           EXISTS (SELECT 1 FROM relay.purged_key k WHERE k.operation_key = p_operation_key)
           OR EXISTS (SELECT 1 FROM relay.intake i
                      WHERE i.operation_key = p_operation_key AND i.purged_at IS NOT NULL),
           EXISTS (SELECT 1 FROM pg_enum n
                   WHERE n.enumtypid = 'relay.effect_type_name'::regtype
                     AND n.enumlabel = p_effect_type)
    INTO v_topic, v_template, v_by_group, v_limit, v_ring, v_purged, v_in_enum
    FROM relay.limits l
    LEFT JOIN relay.doorbell d ON true
    LEFT JOIN relay.effect_type t ON t.name = p_effect_type;
    IF v_topic IS NULL THEN
        RAISE EXCEPTION 'effect type % is not declared', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001',
                  HINT = 'declare it in the config file and run relay migrate';
    END IF;
    IF pg_column_size(p_payload) * 6 > v_limit AND octet_length(p_payload::text) > v_limit THEN
        RAISE EXCEPTION 'payload of % is % bytes of JSON, more than max_payload_bytes (%)',
            p_operation_key, octet_length(p_payload::text), v_limit USING ERRCODE = 'RL006';
    END IF;
    IF v_purged THEN
        SELECT * INTO v_gone FROM relay.purged_key k WHERE k.operation_key = p_operation_key;
        IF NOT FOUND THEN
            -- Purged in its published batch: the emptied intake row keeps the key.
            SELECT i.operation_key, i.id, i.effect_type::text, 'PUBLISHED', i.purged_at
            INTO v_gone FROM relay.intake i WHERE i.operation_key = p_operation_key;
        END IF;
        RAISE EXCEPTION 'operation key % named effect % (type %, %), purged at %: not used again within the dedupe window',
            quote_literal(p_operation_key), v_gone.effect_id, quote_literal(v_gone.effect_type),
            v_gone.final_state, v_gone.purged_at USING ERRCODE = 'RL003';
    END IF;
    v_key := relay.checked_business_key(v_template, p_payload, p_operation_key, v_key);
    IF NOT v_in_enum THEN
        RAISE EXCEPTION 'effect type % is declared but not in relay.effect_type_name',
            quote_literal(p_effect_type) USING ERRCODE = 'RL001',
            HINT = 'run relay migrate as the schema owner (type names longer than 63 bytes cannot be enqueued)';
    END IF;
    -- An effect from before the intake, or made by the relay, under this key: the same intent
    -- again returns it, another one is refused.
    SELECT * INTO v_existing FROM relay.effect e WHERE e.operation_key = p_operation_key;
    IF FOUND THEN
        IF v_existing.effect_type <> p_effect_type OR v_existing.payload <> p_payload
           OR v_existing.ordering_group IS DISTINCT FROM p_ordering_group THEN
            RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
                quote_literal(p_operation_key), v_existing.id,
                quote_literal(v_existing.effect_type) USING ERRCODE = 'RL003';
        END IF;
        effect_id := v_existing.id;
        state := v_existing.state;
        created := false;
        RETURN;
    END IF;
    IF p_ordering_group IS NOT NULL THEN
        -- A group belongs to the login that first used it: another login is refused before it
        -- waits or holds anything. The group's row is its ordering lock, taken before the id is
        -- drawn and held until this transaction ends, so ids within a group follow commit order
        -- (the order the relay reads and publishes). No role but the owner of this function can
        -- lock that row: an advisory lock would be anyone's, and two groups could share one.
        SELECT g.owner INTO v_owner FROM relay.ordering_group g WHERE g.name = p_ordering_group;
        IF v_owner IS NULL THEN
            INSERT INTO relay.ordering_group (name, owner) VALUES (p_ordering_group, session_user)
            ON CONFLICT (name) DO NOTHING;
            SELECT g.owner INTO v_owner FROM relay.ordering_group g
            WHERE g.name = p_ordering_group;
        END IF;
        IF v_owner IS DISTINCT FROM session_user THEN
            RAISE EXCEPTION 'ordering group % belongs to login %, not %',
                quote_literal(p_ordering_group), quote_literal(v_owner), quote_literal(session_user)
                USING ERRCODE = 'RL007',
                      HINT = 'an ordering group is used by one login; choose another group name';
        END IF;
        PERFORM 1 FROM relay.ordering_group g WHERE g.name = p_ordering_group FOR UPDATE;
        -- A group holds at most max_pending_per_group intents not yet published (issue 18, item
        -- 7): counted under the group's lock, from the newest back (a group's intents are read
        -- and published in id order), so the count costs at most the limit.
        IF NOT EXISTS (SELECT 1 FROM relay.intake i WHERE i.operation_key = p_operation_key) THEN
            SELECT l.max_pending_per_group INTO v_cap FROM relay.limits l;
            -- The newest rows first: a purged row (published, kept for the dedupe window) is
            -- older than any not published, and counts toward the limit's scan, not the count.
            SELECT (SELECT count(*) FROM (
                        SELECT i.purged_at FROM relay.intake i
                        WHERE i.ordering_group = p_ordering_group
                          AND i.id > coalesce((SELECT max(x.id) FROM relay.effect x
                                               WHERE x.ordering_group = p_ordering_group
                                                 AND x.state <> 'CANCELLED'), 0)
                        ORDER BY i.id DESC
                        LIMIT v_cap) unread
                    WHERE unread.purged_at IS NULL)
                 + (SELECT count(*) FROM (
                        SELECT 1 FROM relay.effect e
                        WHERE e.ordering_group = p_ordering_group AND e.state = 'PENDING'
                          AND e.id > coalesce((SELECT max(x.id) FROM relay.effect x
                                               WHERE x.ordering_group = p_ordering_group
                                                 AND x.state NOT IN ('PENDING', 'CANCELLED')), 0)
                        LIMIT v_cap) waiting)
            INTO v_held;
            IF v_held >= v_cap THEN
                RAISE EXCEPTION 'ordering group % already holds % intents not yet published '
                                '(max_pending_per_group): % was not enqueued',
                    quote_literal(p_ordering_group), v_held, quote_literal(p_operation_key)
                    USING ERRCODE = 'RL008',
                          HINT = 'retry once the group drains (relay list --group), or raise '
                                 'max_pending_per_group';
            END IF;
        END IF;
    END IF;

    INSERT INTO relay.intake AS i (operation_key, effect_type, payload, business_key,
                                   traceparent, available_at, ordering_group)
    VALUES (p_operation_key, p_effect_type::relay.effect_type_name, p_payload, v_key,
            p_traceparent, p_available_at, p_ordering_group)
    ON CONFLICT DO NOTHING
    RETURNING i.id INTO effect_id;

    IF effect_id IS NOT NULL THEN
        IF v_ring THEN
            PERFORM pg_notify('relay_doorbell', '');
        END IF;
        state := 'PENDING';
        created := true;
        RETURN;
    END IF;

    SELECT * INTO v_in FROM relay.intake i WHERE i.operation_key = p_operation_key;
    IF v_in.purged_at IS NOT NULL THEN
        -- Emptied at retention (relay.purge_batch) after the check above: its key is kept in
        -- the intake row itself.
        RAISE EXCEPTION 'operation key % named effect % (type %, %), purged at %: not used again within the dedupe window',
            quote_literal(p_operation_key), v_in.id, quote_literal(v_in.effect_type::text),
            'PUBLISHED', v_in.purged_at USING ERRCODE = 'RL003';
    END IF;
    IF v_in.effect_type::text <> p_effect_type OR v_in.payload <> p_payload
       OR v_in.ordering_group IS DISTINCT FROM p_ordering_group THEN
        RAISE EXCEPTION 'operation key % already names another intent (effect %, type %)',
            quote_literal(p_operation_key), v_in.id, quote_literal(v_in.effect_type::text)
            USING ERRCODE = 'RL003';
    END IF;
    effect_id := v_in.id;
    state := coalesce((SELECT e.state FROM relay.effect e WHERE e.id = v_in.id),
                      (SELECT 'REJECTED' FROM relay.intake_refused f WHERE f.id = v_in.id),
                      (SELECT 'DISPATCHING' FROM relay.dispatch_batch b
                       WHERE v_in.id = ANY (b.ids) LIMIT 1),
                      (SELECT 'PUBLISHED' FROM relay.published_intent(v_in.id)),
                      'PENDING');
    created := false;
END
$fn$;

-- Withdraw an intent no attempt has touched yet.
CREATE FUNCTION relay.cancel(p_operation_key text, p_reason text DEFAULT 'cancelled',
                                        p_actor text DEFAULT 'application')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_effect   relay.effect%ROWTYPE;
    v_in       relay.intake%ROWTYPE;
    v_status   boolean := (SELECT c.status_events FROM relay.reconciler_config c);
    -- Operators, daemons and the owner may change any effect; applications may not.
    v_operator boolean := has_table_privilege(session_user, 'relay.effect', 'UPDATE');
    v_actor    text := format('%s [login %s]', p_actor, session_user);
    v_taken    text;
BEGIN
    SELECT * INTO v_effect FROM relay.effect e WHERE e.operation_key = p_operation_key FOR UPDATE;
    IF NOT FOUND THEN
        -- No effect row: an intent not read yet, or claimed in a batch whose outcome is not
        -- recorded. Only the intent's own login (or an operator) goes further, before anything
        -- is locked: a refused call must hold nothing, even in a transaction left open.
        SELECT * INTO v_in FROM relay.intake i
        WHERE i.operation_key = p_operation_key
          AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id);
        IF FOUND THEN
            IF NOT v_operator AND v_in.enqueued_by IS DISTINCT FROM session_user THEN
                RAISE EXCEPTION 'effect % was not enqueued by login %: an application cancels only its own effects',
                    quote_literal(p_operation_key), session_user USING ERRCODE = 'RL007';
            END IF;
            -- Told apart under this intent's own row lock, held to the end of the caller's
            -- transaction: a reader passes a locked row by (relay.promote_intake defers it, and
            -- the later ones of its group), so a cancel left open holds back this intent only,
            -- never the read. Then a read already in flight is waited for (its lock on the
            -- reader's row, taken and let go in a subtransaction), so that what it wrote is
            -- seen below. Under REPEATABLE READ a read since the caller's snapshot fails this
            -- with a serialization error (40001), to be retried.
            PERFORM 1 FROM relay.intake i WHERE i.id = v_in.id FOR UPDATE;
            BEGIN
                PERFORM 1 FROM relay.intake_reader r FOR SHARE;
                RAISE EXCEPTION USING ERRCODE = 'RL900';
            EXCEPTION WHEN SQLSTATE 'RL900' THEN
                NULL;
            END;
            SELECT * INTO v_effect FROM relay.effect e
            WHERE e.operation_key = p_operation_key FOR UPDATE;
        END IF;
    END IF;
    IF v_effect.id IS NULL AND v_in.id IS NOT NULL THEN
        -- An intent the relay has not read yet: its effect row is written now (as the reader
        -- would write it), so that the reader skips it and the cancel below has a row to move.
        -- One statement: a batch's outcome moves it from one table to the other at once.
        SELECT CASE
                   -- Purged past retention (its key kept for the dedupe window): never again.
                   -- Read again: a purge may have committed while this waited for the row.
                   WHEN EXISTS (SELECT 1 FROM relay.intake i
                                WHERE i.id = v_in.id AND i.purged_at IS NOT NULL)
                        OR EXISTS (SELECT 1 FROM relay.purged_key k
                                   WHERE k.operation_key = v_in.operation_key
                                     AND k.effect_id = v_in.id)
                       THEN 'purged'
                   WHEN EXISTS (SELECT 1 FROM relay.dispatch_batch b
                                WHERE v_in.id = ANY (b.ids)) THEN 'DISPATCHING'
                   WHEN EXISTS (SELECT 1 FROM relay.published_intent(v_in.id))
                       THEN 'PUBLISHED' END
        INTO v_taken;
        IF v_taken IS NOT NULL THEN
            RAISE EXCEPTION 'effect % is %, only a PENDING effect can be cancelled',
                quote_literal(p_operation_key), v_taken USING ERRCODE = 'RL005';
        END IF;
        INSERT INTO relay.effect (id, operation_key, effect_type, topic, payload, business_key,
                                  traceparent, available_at, created_at, ordering_group,
                                  message_key, enqueued_by)
        SELECT v_in.id, v_in.operation_key, t.name, t.topic, v_in.payload,
               coalesce(v_in.business_key,
                        CASE WHEN t.business_key IS NOT NULL
                             THEN relay.business_key(t.business_key, v_in.payload,
                                                     v_in.operation_key) END),
               v_in.traceparent,
               greatest(coalesce(v_in.available_at, v_in.enqueued_at), v_in.enqueued_at),
               v_in.enqueued_at, v_in.ordering_group,
               CASE WHEN t.key_by_group THEN v_in.ordering_group END, v_in.enqueued_by
        FROM relay.effect_type t WHERE t.name = v_in.effect_type::text
        ON CONFLICT DO NOTHING;
        SELECT * INTO v_effect FROM relay.effect e
        WHERE e.operation_key = p_operation_key FOR UPDATE;
    END IF;
    IF v_effect.id IS NULL THEN
        RAISE EXCEPTION 'no effect has operation key %', quote_literal(p_operation_key)
            USING ERRCODE = 'RL004';
    END IF;
    IF NOT v_operator AND (v_effect.parent_effect_id IS NOT NULL
                           OR starts_with(v_effect.effect_type, 'relay.')) THEN
        RAISE EXCEPTION 'effect % was made by the relay: only an operator can cancel it',
            quote_literal(p_operation_key) USING ERRCODE = 'RL007';
    END IF;
    IF NOT v_operator AND v_effect.enqueued_by IS DISTINCT FROM session_user THEN
        RAISE EXCEPTION 'effect % was not enqueued by login %: an application cancels only its own effects',
            quote_literal(p_operation_key), session_user USING ERRCODE = 'RL007';
    END IF;
    IF v_effect.state <> 'PENDING' THEN
        RAISE EXCEPTION 'effect % is %, only a PENDING effect can be cancelled',
            quote_literal(p_operation_key), v_effect.state USING ERRCODE = 'RL005';
    END IF;
    UPDATE relay.effect SET state = 'CANCELLED', reason = p_reason, updated_at = now()
    WHERE id = v_effect.id;
    IF v_effect.attempts = 0 AND v_effect.parent_effect_id IS NULL
       AND v_effect.created_at >= (SELECT m.applied_at FROM relay.schema_migration m
                                   WHERE m.version = 4) THEN
        INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                      at, status_pending)
        VALUES (v_effect.id, NULL, 'PENDING', 'enqueued', 'application', 0,
                v_effect.created_at, v_status);
    END IF;
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                  status_pending)
    VALUES (v_effect.id, 'PENDING', 'CANCELLED', p_reason, v_actor, v_effect.attempts, v_status);
    RETURN 'CANCELLED';
END
$fn$;

-- A compensation of an effect (reconciler or operator), keyed KEY#compensation[-N].
CREATE FUNCTION relay.enqueue_compensation(
    p_parent_id   bigint,
    p_index       integer,
    p_effect_type text,
    p_payload     jsonb,
    p_reason      text,
    p_actor       text
) RETURNS TABLE (effect_id bigint, operation_key text, created boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    v_suffix   text := CASE WHEN p_index = 0 THEN '#compensation'
                            ELSE '#compensation-' || (p_index + 1) END;
    v_key      text;
    v_type     relay.effect_type%ROWTYPE;
    v_parent   relay.effect%ROWTYPE;
    v_id       bigint;
BEGIN
    SELECT * INTO v_parent FROM relay.effect e WHERE e.id = p_parent_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no effect has id %', p_parent_id USING ERRCODE = 'RL004';
    END IF;
    v_key := v_parent.operation_key || v_suffix;
    IF length(v_key) > 512 THEN
        -- Cut to fit, with a digest of the whole parent key: distinct parents, distinct keys.
        v_key := left(v_parent.operation_key, 512 - length(v_suffix) - 17) || '~'
                 || left(md5(v_parent.operation_key), 16) || v_suffix;
    END IF;
    SELECT * INTO v_type FROM relay.effect_type t WHERE t.name = p_effect_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'effect type % is not declared', quote_literal(p_effect_type)
            USING ERRCODE = 'RL001';
    END IF;
    INSERT INTO relay.effect AS e (operation_key, effect_type, topic, payload, business_key,
                                   traceparent, parent_effect_id)
    VALUES (v_key, p_effect_type, v_type.topic, p_payload,
            CASE WHEN v_type.business_key IS NOT NULL
                 THEN relay.business_key(v_type.business_key, p_payload, v_key) END,
            v_parent.traceparent, p_parent_id)
    ON CONFLICT ON CONSTRAINT effect_operation_key_unique DO NOTHING
    RETURNING e.id INTO v_id;
    IF v_id IS NULL THEN
        SELECT e.id INTO v_id FROM relay.effect e
        WHERE e.operation_key = v_key AND e.parent_effect_id = p_parent_id
          AND e.effect_type = p_effect_type;
        IF v_id IS NULL THEN
            RAISE EXCEPTION 'operation key % already names another intent', quote_literal(v_key)
                USING ERRCODE = 'RL003';
        END IF;
        RETURN QUERY SELECT v_id, v_key, false;
        RETURN;
    END IF;
    INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                  status_pending)
    SELECT v_id, NULL, 'PENDING', p_reason, p_actor, 0, c.status_events
    FROM relay.reconciler_config c;
    IF (SELECT d.armed_until > now() FROM relay.doorbell d) THEN
        PERFORM pg_notify('relay_doorbell', '');
    END IF;
    RETURN QUERY SELECT v_id, v_key, true;
END
$fn$;
REVOKE ALL ON FUNCTION relay.enqueue_compensation(bigint, integer, text, jsonb, text, text)
    FROM PUBLIC;

-- The database, not the writer, names the login that recorded a piece of evidence.
CREATE FUNCTION relay.evidence_login() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    NEW.db_role := session_user;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER evidence_login BEFORE INSERT ON relay.evidence
    FOR EACH ROW EXECUTE FUNCTION relay.evidence_login();

-- Intents committed to the intake that the relay has not read yet: those its reader's tick does
-- not see (a range of the txid index, plus the xids that tick saw running), less those it read
-- in a split pair (claimed in a batch, or written as effects), any a cancel wrote, and those set
-- aside; plus those the reader deferred. What `relay stats` and the metrics count as PENDING
-- beside the effect rows.
CREATE VIEW relay.intake_unread AS
SELECT i.id, i.operation_key, i.effect_type::text AS effect_type, i.enqueued_at,
       greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at) AS due
FROM relay.intake_reader r
JOIN relay.tick t ON t.id = r.tick_from
LEFT JOIN relay.tick t2 ON t2.id = r.tick_to
JOIN relay.intake i
  ON (i.txid >= pg_snapshot_xmax(t.snap) OR i.txid = ANY (ARRAY(SELECT pg_snapshot_xip(t.snap))))
 AND NOT pg_visible_in_snapshot(i.txid, t.snap)
WHERE NOT (t2.id IS NOT NULL AND i.id <= r.after_id AND pg_visible_in_snapshot(i.txid, t2.snap))
  AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id)
UNION ALL
-- Passed while a cancel of theirs was in progress: read again once it ends.
SELECT i.id, i.operation_key, i.effect_type::text, i.enqueued_at,
       greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at)
FROM relay.intake_reader r
CROSS JOIN LATERAL unnest(r.deferred) AS d(id)
JOIN relay.intake i ON i.id = d.id
WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id);

-- An intake row as the effect row written for it (the columns the intake holds, the type's topic
-- and business key); the marker and the lease expiry of a batch write these, joined by id (a
-- function taking the ids was planned as a loop over them for each row: 50 us an effect).
CREATE VIEW relay.intake_as_effect AS
SELECT i.id, i.operation_key, i.effect_type::text AS effect_type, coalesce(t.topic, '') AS topic,
       i.payload,
       CASE WHEN i.business_key IS NOT NULL THEN i.business_key
            WHEN t.business_key IS NOT NULL
                THEN relay.business_key(t.business_key, i.payload, i.operation_key) END
           AS business_key,
       i.traceparent, greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at)
           AS available_at,
       i.enqueued_at AS created_at, i.enqueued_by
FROM relay.intake i
LEFT JOIN relay.effect_type t ON t.name = i.effect_type::text;

-- The checks the intake does not make, as one expression per row: NULL when the row is fine,
-- else why it is refused. Shared by promote_intake; the same limits relay.enqueue applies.
-- Inlined into the reader's statement (a call cost 7 us a row): no SET clause (it runs with its
-- caller's search_path, and every caller is a function that sets its own), and STABLE, not
-- IMMUTABLE (format() of a time is stable; an IMMUTABLE body with a stable call is not inlined).
CREATE FUNCTION relay.intake_refusal(
    p_operation_key text, p_effect_type text, p_payload jsonb, p_business_key text,
    p_traceparent text, p_available_at timestamptz, p_ordering_group text, p_topic text,
    p_max_payload_bytes integer
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT CASE
    WHEN length(p_operation_key) NOT BETWEEN 1 AND 512
        THEN 'operation key must be 1 to 512 characters'
    WHEN strpos(p_operation_key, '#compensation') > 0
         AND p_operation_key ~ '#compensation(-[0-9]+)?$'
        THEN 'operation key is reserved for the relay''s own compensations'
    WHEN p_topic IS NULL
        THEN format('effect type %s is not declared', quote_literal(p_effect_type))
    WHEN jsonb_typeof(p_payload) <> 'object' THEN 'payload must be a JSON object'
    WHEN jsonb_path_exists(p_payload,
                           'strict $.**{100} ? (@.type() == "object" || @.type() == "array")')
        THEN 'payload nests deeper than 100 levels'
    WHEN pg_column_size(p_payload) * 6 > p_max_payload_bytes
         AND octet_length(p_payload::text) > p_max_payload_bytes
        THEN format('payload is %s bytes of JSON, more than max_payload_bytes (%s)',
                    octet_length(p_payload::text), p_max_payload_bytes)
    WHEN p_business_key IS NOT NULL AND length(p_business_key) NOT BETWEEN 1 AND 512
        THEN 'business key must be 1 to 512 characters'
    WHEN p_business_key IS NOT NULL
         AND relay.business_key_maker(p_effect_type, p_business_key) IS NOT NULL
        THEN format('business key could be made by the template of effect type %s: an explicit key must not be one another type computes',
                    quote_literal(relay.business_key_maker(p_effect_type, p_business_key)))
    WHEN p_available_at IS NOT NULL AND NOT isfinite(p_available_at)
        THEN format('available_at must be a finite time, not %s', p_available_at)
    WHEN p_traceparent IS NOT NULL
         AND p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        THEN 'traceparent is not a W3C traceparent'
    WHEN p_ordering_group IS NOT NULL AND length(p_ordering_group) NOT BETWEEN 1 AND 512
        THEN 'ordering group must be 1 to 512 characters'
END
$fn$;

-- Whether an effect lets the next one of its group go (claim_batch's rule, in one place): settled
-- (CONFIRMED, or PUBLISHED by a type that awaits no result) or released by an operator.
-- Cancelled effects are skipped by the callers, not judged here. (Not inlined: its sub-select
-- keeps the planner from it; about 2.6 us a call.)
CREATE FUNCTION relay.lets_group_go(p_state text, p_effect_type text,
                                    p_released_at timestamptz)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT p_released_at IS NOT NULL OR p_state = 'CONFIRMED'
       OR (p_state = 'PUBLISHED' AND NOT EXISTS (
               SELECT 1 FROM relay.effect_type t
               WHERE t.name = p_effect_type AND t.result_topic IS NOT NULL))
$fn$;

-- The first effect after p_after in its group (cancelled ones aside) stops waiting behind the
-- head when the one before it lets it go, or when that cannot be known without waiting. Called
-- by a trigger when an effect of the group settles, is cancelled or released, and by the reader
-- for the first effect of each group it writes. Idempotent; never waits on a lock.
--
-- behind_head is a hint that keeps an effect out of the claim's index; the claim still checks
-- the group itself. So a wrong false costs only a look at the effect per claim, while a wrong
-- true would stall the group: it is set true only under a FOR SHARE lock on the effect before,
-- seen unsettled. That effect cannot settle before this transaction commits, and the trigger of
-- its settling, run after, finds the waiting effect and lets it go. If the effect before is
-- locked by a change in flight (SKIP LOCKED), the answer is false.
CREATE FUNCTION relay.release_next_in_group(p_group text, p_after bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_next bigint;
    v_prev bigint;
    v_row  relay.effect%ROWTYPE;
BEGIN
    SELECT w.id INTO v_next FROM relay.effect w
    WHERE w.ordering_group = p_group AND w.id > p_after AND w.state <> 'CANCELLED'
    ORDER BY w.id LIMIT 1;
    IF v_next IS NULL THEN
        RETURN;
    END IF;
    SELECT p.id INTO v_prev FROM relay.effect p
    WHERE p.ordering_group = p_group AND p.id < v_next AND p.state <> 'CANCELLED'
    ORDER BY p.id DESC LIMIT 1;
    IF v_prev IS NOT NULL THEN
        SELECT p.* INTO v_row FROM relay.effect p WHERE p.id = v_prev FOR SHARE SKIP LOCKED;
        IF v_row.id IS NOT NULL AND v_row.state <> 'CANCELLED'
           AND NOT relay.lets_group_go(v_row.state, v_row.effect_type, v_row.group_released_at)
        THEN
            RETURN;  -- still the head, unsettled, and locked until this transaction ends
        END IF;
    END IF;
    UPDATE relay.effect SET behind_head = false WHERE id = v_next AND behind_head;
END
$fn$;
REVOKE ALL ON FUNCTION relay.release_next_in_group(text, bigint) FROM PUBLIC;

CREATE FUNCTION relay.effect_group_moved() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM relay.release_next_in_group(NEW.ordering_group, NEW.id);
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION relay.effect_group_moved() FROM PUBLIC;

-- An effect of a group that settles, is cancelled or released lets the next one go.
CREATE TRIGGER effect_group_moved AFTER UPDATE OF state, group_released_at ON relay.effect
    FOR EACH ROW
    WHEN (NEW.ordering_group IS NOT NULL
          AND ((NEW.state IN ('CONFIRMED', 'PUBLISHED', 'CANCELLED')
                AND NEW.state IS DISTINCT FROM OLD.state)
               OR (NEW.group_released_at IS NOT NULL AND OLD.group_released_at IS NULL)))
    EXECUTE FUNCTION relay.effect_group_moved();

-- The relay's read of the intake: the next batch between two ticks (relay/sql/intake.sql's
-- read_intake_batch, the same statement), written as effect rows in one INSERT, and the reader's
-- position moved, in the caller's transaction. Returns nothing when another replica is reading.
-- With an owner and p_claim > 0, due ungrouped rows (up to p_claim rows and p_max_bytes of
-- payload, at least one) are written already claimed by that owner (DISPATCHING, attempt 1, a
-- lease), as relay/sql/dispatch.sql's claim_batch would claim them, and returned first: the happy
-- path writes its effect row once, not once and again at the claim. Then one summary row (id
-- NULL) with the counts and the position.
CREATE FUNCTION relay.promote_intake(
    p_limit integer, p_max_ticks integer, p_owner text DEFAULT NULL, p_epoch bigint DEFAULT NULL,
    p_lease_s double precision DEFAULT NULL, p_claim integer DEFAULT 0,
    p_max_bytes bigint DEFAULT NULL, p_status_in_txn boolean DEFAULT false)
RETURNS TABLE (id bigint, operation_key text, message_key text, effect_type text, topic text,
               payload text, business_key text, traceparent text, attempts integer,
               created_at timestamptz, ordering_group text, batch_id bigint, promoted integer,
               claimed integer, rejected integer, refused integer, tick_from bigint,
               tick_to bigint, more boolean, last_id bigint, status_in_txn boolean,
               claimed_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
-- Plans kept for the session (until the statistics of a table they read change), with no
-- sequential scan, so that a plan made while the intake was small never scans it whole once it
-- has grown; the read of the rows chooses its plan by the batch (below).
SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = on
SET enable_mergejoin = on
SET enable_bitmapscan = on
SET enable_seqscan = off
SET enable_sort = on
AS $fn$
#variable_conflict use_column
DECLARE
    v_pos     relay.intake_reader%ROWTYPE;
    v_to      bigint;
    v_read    integer;
    v_last    bigint;
    v_status  boolean;
    v_limit   integer;
    v_claim   integer := 0;
    v_batch   bigint[];
    v_grouped boolean;
    v_first   record;
    v_touched bigint[];
    v_free    bigint[];
    v_defer   bigint[] := '{}';
    v_work    bigint[];
    v_fast    boolean := false;
    v_more    boolean;
    v_first_grouped bigint;
    v_bytes   bigint;
    v_keep    integer;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50000 OR p_max_ticks IS NULL
       OR p_max_ticks < 1 THEN
        RAISE EXCEPTION 'a promotion reads 1 to 50000 rows over at least one tick'
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_claim, 0) > 0 THEN
        IF p_owner IS NULL OR p_epoch IS NULL OR p_lease_s IS NULL OR p_lease_s <= 0
           OR p_max_bytes IS NULL OR p_max_bytes < 1 THEN
            RAISE EXCEPTION 'a claim needs an owner, its epoch, a lease and a byte cap'
                USING ERRCODE = '22023';
        END IF;
        -- A fenced incarnation still reads (that publishes nothing) but claims nothing.
        IF EXISTS (SELECT 1 FROM relay.replica r
                   WHERE r.replica_id = p_owner AND r.epoch = p_epoch) THEN
            v_claim := p_claim;
        END IF;
    END IF;
    SELECT * INTO v_pos FROM relay.intake_reader r FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT c.status_events INTO v_status FROM relay.reconciler_config c;
    SELECT l.max_payload_bytes INTO v_limit FROM relay.limits l;

    -- The batch's ids, with the tick pair, in one statement: its snapshot is taken after tick b
    -- committed, so it sees every row tick b saw (never part of a batch). The set of rows
    -- between two stored snapshots is fixed, so the rows themselves are then read by id.
    IF v_pos.tick_to IS NULL THEN
        -- A new pair: the rows as relay/sql/intake.sql reads them (an index range for the
        -- transactions that began after tick a, exact probes for those tick a saw in progress).
        WITH pair AS MATERIALIZED (
            SELECT a.id AS tick_from, b.id AS tick_to, a.snap AS sa, b.snap AS sb
            FROM relay.tick a
            CROSS JOIN LATERAL (
                SELECT t.id, t.snap FROM relay.tick t
                WHERE t.id > a.id AND t.id <= a.id + p_max_ticks
                ORDER BY t.id DESC
                LIMIT 1
            ) b
            WHERE a.id = v_pos.tick_from
        ), candidates AS (
            -- touched: the row's xmax is set (a cancel may hold it; see below).
            -- size: the payload as stored (no detoasting), for the claim's byte cap.
            SELECT i.id, i.txid, i.ordering_group IS NOT NULL AS grouped,
                   i.xmax <> '0'::xid AS touched, pg_column_size(i.payload) AS size
            FROM relay.intake i
            WHERE i.txid >= (SELECT pg_snapshot_xmax(p.sa) FROM pair p)
              AND i.txid < (SELECT pg_snapshot_xmax(p.sb) FROM pair p)
            UNION ALL
            SELECT i.id, i.txid, i.ordering_group IS NOT NULL, i.xmax <> '0'::xid,
                   pg_column_size(i.payload)
            FROM relay.intake i
            WHERE i.txid = ANY (ARRAY(
                SELECT x FROM pair p, pg_snapshot_xip(p.sa) AS x
                WHERE pg_visible_in_snapshot(x, p.sb)))
        )
        SELECT p.tick_to, s.ids, s.grouped, s.touched, s.first_grouped, s.bytes
        INTO v_to, v_batch, v_grouped, v_touched, v_first_grouped, v_bytes
        FROM pair p
        CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(c.id ORDER BY c.id), '{}') AS ids,
                   coalesce(bool_or(c.grouped), false) AS grouped,
                   coalesce(array_agg(c.id) FILTER (WHERE c.touched), '{}') AS touched,
                   min(c.id) FILTER (WHERE c.grouped) AS first_grouped,
                   coalesce(sum(c.size), 0)::bigint AS bytes
            FROM (SELECT c.id, c.grouped, c.touched, c.size FROM candidates c
                  WHERE pg_visible_in_snapshot(c.txid, p.sb)
                    AND NOT pg_visible_in_snapshot(c.txid, p.sa)
                  ORDER BY c.id
                  LIMIT p_limit) c
        ) s;
    ELSE
        -- The rest of a split pair, in id order after the last id read: every row of the pair
        -- drew its id before tick b, so no later than the sequence's value stored with it. An
        -- index range bounded by both ends (reading the pair's candidates again at every part
        -- cost the whole pair per part: 40 parts of a 20,000-row backlog read 400,000 rows).
        -- Read in the index's order and stopped at the limit, whatever the statistics: planned
        -- for fewer rows than the pair has (a burst before the next ANALYZE), the range was read
        -- in full by a bitmap scan and sorted at every part. The function's SET clause restores
        -- these settings.
        PERFORM set_config('enable_bitmapscan', 'off', true);
        PERFORM set_config('enable_sort', 'off', true);
        SELECT b.id, s.ids, s.grouped, s.touched, s.first_grouped, s.bytes
        INTO v_to, v_batch, v_grouped, v_touched, v_first_grouped, v_bytes
        FROM relay.tick a, relay.tick b
        CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(r.id ORDER BY r.id), '{}') AS ids,
                   coalesce(bool_or(r.grouped), false) AS grouped,
                   coalesce(array_agg(r.id) FILTER (WHERE r.touched), '{}') AS touched,
                   min(r.id) FILTER (WHERE r.grouped) AS first_grouped,
                   coalesce(sum(r.size), 0)::bigint AS bytes
            FROM (SELECT i.id, i.ordering_group IS NOT NULL AS grouped,
                         i.xmax <> '0'::xid AS touched, pg_column_size(i.payload) AS size
                  FROM relay.intake i
                  WHERE i.id > v_pos.after_id AND i.id <= b.intake_seq
                    AND pg_visible_in_snapshot(i.txid, b.snap)
                    AND NOT pg_visible_in_snapshot(i.txid, a.snap)
                  ORDER BY i.id
                  LIMIT p_limit) r
        ) s
        WHERE a.id = v_pos.tick_from AND b.id = v_pos.tick_to;
        PERFORM set_config('enable_bitmapscan', 'on', true);
        PERFORM set_config('enable_sort', 'on', true);
    END IF;
    IF v_to IS NULL THEN
        RETURN;  -- no tick after tick_from yet
    END IF;
    v_read := cardinality(v_batch);
    v_more := v_read >= p_limit;
    -- Where the read ends (the rest of the pair is read next, as a pair cut at the limit is):
    -- - With ordering groups, after 500 rows: a large read writes a group's later effects
    --   behind their head, and each must then be let go by an update when the head settles
    --   (6,000 groups of 10, reads of 5,000: 1,946-2,147 effects/s and 391-416 us of PostgreSQL
    --   CPU an effect, against 3,795-3,849/s and 182-192 us in reads of 500). When more than
    --   500 ungrouped rows come first, the read ends before the first grouped one instead: one
    --   clean batch.
    -- - When claiming, where the rows before a row hold the claim's byte cap (as stored): the
    --   rows past it would be written to the pool as effect rows, claimed and marked one by one
    --   (a read of 5,000 passes 16 MiB from about 3.4 KB a payload).
    -- An ungrouped read under the cap takes the whole limit (one Kafka transaction: larger
    -- ones drain faster).
    v_keep := v_read;
    IF v_first_grouped IS NOT NULL THEN
        v_keep := array_position(v_batch, v_first_grouped) - 1;
        IF v_keep <= 500 THEN
            v_keep := least(v_read, 500);
        END IF;
    END IF;
    IF v_claim > 0 AND v_bytes >= p_max_bytes AND v_keep > 1 THEN
        SELECT greatest(1, count(*)) INTO v_keep
        FROM (SELECT sum(pg_column_size(i.payload)) OVER (ORDER BY x.n)
                     - pg_column_size(i.payload) AS before
              FROM unnest(v_batch[1:v_keep]) WITH ORDINALITY AS x(id, n)
              JOIN relay.intake i ON i.id = x.id) w
        WHERE w.before < p_max_bytes;
    END IF;
    IF v_keep < v_read THEN
        v_batch := v_batch[1:v_keep];
        v_read := v_keep;
        v_more := true;
        v_touched := ARRAY(SELECT x FROM unnest(v_touched) AS x WHERE x <= v_batch[v_keep]);
        v_grouped := coalesce(v_first_grouped <= v_batch[v_keep], false);
    END IF;
    v_last := v_batch[v_read];
    -- A cancel locks its intent's row while it decides, to the end of its caller's transaction
    -- (relay.cancel): such a row is passed by for now, with the later ones of its group, and
    -- read again at every read until it is free (intake_reader.deferred), so that a cancel
    -- left open holds back its own intent only. Rows never locked (xmax unset, read for free
    -- with the ids) skip all of this; the others are locked for this read, or found held.
    v_work := v_batch;
    v_touched := v_touched || v_pos.deferred;
    IF cardinality(v_touched) > 0 THEN
        v_work := ARRAY(SELECT DISTINCT x FROM unnest(v_batch || v_pos.deferred) AS x ORDER BY x);
        v_free := ARRAY(SELECT i.id FROM relay.intake i WHERE i.id = ANY (v_touched)
                        FOR KEY SHARE SKIP LOCKED);
        v_defer := ARRAY(
            SELECT w.id FROM unnest(v_work) AS w(id)
            JOIN relay.intake i ON i.id = w.id
            WHERE (w.id = ANY (v_touched) AND NOT w.id = ANY (v_free))
               OR (i.ordering_group IS NOT NULL AND EXISTS (
                       SELECT 1 FROM relay.intake l
                       WHERE l.id = ANY (v_touched) AND NOT l.id = ANY (v_free)
                         AND l.ordering_group = i.ordering_group AND l.id < i.id))
            ORDER BY w.id);
        IF cardinality(v_defer) > 0 THEN
            v_work := ARRAY(SELECT x FROM unnest(v_work) AS x
                            WHERE NOT x = ANY (v_defer) ORDER BY x);
        END IF;
        v_grouped := v_grouped OR EXISTS (SELECT 1 FROM relay.intake i
                                          WHERE i.id = ANY (v_work)
                                            AND i.ordering_group IS NOT NULL);
    END IF;
    -- The plan of the read below, by its size and its groups. A custom plan costs about 2.5 ms to
    -- make at every call (5 us an effect of a batch of 500), most of a small read's cost (the
    -- live load: 5 rows, 3.1 ms in all against 0.6 ms with the generic plan). The generic plan
    -- probes by index for every row, as fast per row as the custom one at any size when no row
    -- has a group (500 rows: 7.5 against 10.5 ms, 2,000: 28 against 30); with groups it loops
    -- over the group rules for every row (2,000 grouped rows: 290 against 60-77 ms), so a large
    -- read with a grouped row is planned for its values. The function's SET clause restores the
    -- setting when it returns.
    --
    -- The generic plan is made once a session, with the statistics of that moment: made while
    -- the intake was small, it hashed the whole intake at every read once a backlog had come in
    -- before the next ANALYZE (a relay started on an empty outbox, then a burst). Made without
    -- hash or merge joins, every row of the batch is looked up by id whatever the statistics
    -- said (a LATERAL lookup per row instead cost 4 us a row more). The function's SET clause
    -- restores these settings too.
    IF v_read < 200 OR NOT v_grouped THEN
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
        PERFORM set_config('enable_hashjoin', 'off', true);
        PERFORM set_config('enable_mergejoin', 'off', true);
    ELSE
        PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
    END IF;

    -- The common case in one pass (a drain's every batch): nothing read was ever locked or
    -- deferred, no row has a group, and the claim can take them all. Then if every row is due
    -- and passes every check below (those of the full statement that follows, in the same
    -- order), one batch row claims them all and they are returned; nothing else is written.
    -- Otherwise this returns no row, writes nothing, and the full statement decides row by
    -- row. The full statement's stages (set aside, checked, the claim's window, the effect
    -- rows) cost about 6 us a row more than this one (a read of 500 rows, 256-byte payloads:
    -- 20.5 against 14.5 us of the backend's CPU a row).
    IF NOT v_grouped AND cardinality(v_touched) = 0 AND v_claim >= v_read AND v_read > 0 THEN
        RETURN QUERY
        WITH rows AS MATERIALIZED (
            SELECT r.id, r.operation_key, r.effect_type::text AS effect_type, r.payload,
                   r.business_key, r.traceparent, r.enqueued_at,
                   t.topic AS type_topic, t.business_key AS template,
                   v_status AND p_status_in_txn AND t.name IS NOT NULL AND t.result_topic IS NULL
                       AS status_in_txn,
                   pg_column_size(r.payload) AS size,
                   greatest(coalesce(r.available_at, r.enqueued_at), r.enqueued_at) <= now()
                   AND length(r.operation_key) BETWEEN 1 AND 512
                   -- No effect row holds its key, nor its id (a cancel's).
                   AND NOT EXISTS (SELECT 1 FROM relay.effect e
                                   WHERE e.operation_key = r.operation_key)
                   AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = r.id)
                   AND NOT EXISTS (SELECT 1 FROM relay.purged_key k
                                   WHERE k.operation_key = r.operation_key)
                   AND relay.intake_refusal(r.operation_key, r.effect_type::text, r.payload,
                                            r.business_key, r.traceparent, r.available_at,
                                            r.ordering_group, t.topic, v_limit) IS NULL
                   AND (t.business_key IS NULL
                        OR relay.business_key_refusal(r.effect_type::text, t.business_key,
                                                      r.payload, r.operation_key,
                                                      r.business_key) IS NULL) AS clean
            FROM unnest(v_work) AS x(id)
            JOIN relay.intake r ON r.id = x.id
            LEFT JOIN relay.effect_type t ON t.name = r.effect_type::text
        ), batched AS (
            -- The claim's byte cap, as the window below applies it: a row is claimed when the
            -- rows before it hold less than p_max_bytes, so all are when all but the last do.
            INSERT INTO relay.dispatch_batch AS d (owner, owner_epoch, lease_until, ids,
                                                   status_ids)
            SELECT p_owner, p_epoch, now() + make_interval(secs => p_lease_s),
                   array_agg(k.id ORDER BY k.id),
                   coalesce(array_agg(k.id ORDER BY k.id) FILTER (WHERE k.status_in_txn), '{}')
            FROM rows k
            HAVING bool_and(k.clean)
               AND sum(k.size) - (array_agg(k.size ORDER BY k.id DESC))[1] < p_max_bytes
            RETURNING d.id
        )
        SELECT c.id, c.operation_key, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
               c.payload::text,
               CASE WHEN c.business_key IS NOT NULL THEN c.business_key
                    WHEN c.template IS NOT NULL
                        THEN relay.business_key(c.template, c.payload, c.operation_key) END,
               c.traceparent, 1, c.enqueued_at, NULL::text, d.id, NULL::integer, NULL::integer,
               NULL::integer, NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean,
               NULL::bigint, c.status_in_txn, now()
        FROM batched d CROSS JOIN rows c
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, v_read,
               0, 0, v_pos.tick_from, v_to, v_more, v_last, NULL::boolean,
               NULL::timestamptz
        FROM batched d
        ORDER BY 1 NULLS LAST;
        v_fast := FOUND;
    END IF;

    IF NOT v_fast THEN
        RETURN QUERY
        WITH batch AS MATERIALIZED (
            SELECT r.id, r.operation_key, r.effect_type::text AS effect_type, r.payload,
                   r.business_key, r.traceparent, r.available_at, r.ordering_group, r.enqueued_by,
                   r.enqueued_at
            -- Joined to the ids, not filtered by = ANY: the planner estimates an ANY over an array
            -- constant element by element (about 1 ms of planning at every call for 500 ids).
            FROM unnest(v_work) AS x(id)
            JOIN relay.intake r ON r.id = x.id
        ), taken AS MATERIALIZED (
            -- A key already naming another effect (a key the relay reserves, written by hand, or an
            -- effect from before the intake), or one no effect row can hold: set aside, never
            -- published, never a second effect.
            SELECT b.id, format('operation key %s already names effect %s',
                                quote_literal(b.operation_key), e.id) AS why
            FROM batch b
            -- A probe of the unique key per row (a join the planner may hash reads every effect).
            CROSS JOIN LATERAL (
                SELECT e.id FROM relay.effect e
                WHERE e.operation_key = b.operation_key AND e.id <> b.id
                LIMIT 1
            ) e
            UNION ALL
            SELECT b.id, format('operation key of %s characters (1 to 512 allowed)',
                                length(b.operation_key))
            FROM batch b
            WHERE length(b.operation_key) NOT BETWEEN 1 AND 512
        ), set_aside AS (
            INSERT INTO relay.intake_refused (id, operation_key, effect_type, enqueued_by, reason)
            SELECT b.id, left(b.operation_key, 512), b.effect_type, b.enqueued_by, x.why
            FROM batch b JOIN taken x ON x.id = b.id
            ON CONFLICT ON CONSTRAINT intake_refused_pkey DO NOTHING
            RETURNING 1
        ), checked AS MATERIALIZED (
            -- Each row's checks once (a lateral expression referenced in several places is copied
            -- into each of them by the planner: the checks ran seven times a row).
            SELECT b.*, t.topic AS type_topic, t.business_key AS template,
                   coalesce(t.key_by_group, false) AS key_by_group,
                   -- Its status events may ride in its batch's Kafka transaction (status_ids).
                   v_status AND p_status_in_txn AND t.name IS NOT NULL AND t.result_topic IS NULL
                       AS status_in_txn,
                   greatest(coalesce(b.available_at, b.enqueued_at), b.enqueued_at) AS due_at,
                   coalesce(
                       (SELECT format('operation key %s named effect %s (type %s, %s), purged at %s: not used again within the dedupe window',
                                      quote_literal(k.operation_key), k.effect_id,
                                      quote_literal(k.effect_type), k.final_state, k.purged_at)
                        FROM relay.purged_key k WHERE k.operation_key = b.operation_key),
                       relay.intake_refusal(b.operation_key, b.effect_type, b.payload,
                                            b.business_key, b.traceparent, b.available_at,
                                            b.ordering_group, t.topic, v_limit),
                       CASE WHEN t.business_key IS NOT NULL
                            THEN relay.business_key_refusal(b.effect_type, t.business_key,
                                                            b.payload, b.operation_key,
                                                            b.business_key) END) AS why,
                   -- Written already: by a cancel before this read (the reader skips it).
                   EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = b.id) AS written
            FROM batch b
            LEFT JOIN relay.effect_type t ON t.name = b.effect_type
            WHERE NOT EXISTS (SELECT 1 FROM taken x WHERE x.id = b.id)
        ), firsts AS MATERIALIZED (
            -- The first effect of each group written here (an effect row already there, written by
            -- a cancel before this read, is not written again) and the group's effect before it.
            SELECT f.id, f.ordering_group,
                   (SELECT p.id FROM relay.effect p
                    WHERE p.ordering_group = f.ordering_group AND p.id < f.id
                      AND p.state <> 'CANCELLED'
                    ORDER BY p.id DESC LIMIT 1) AS prev_id
            FROM (SELECT DISTINCT ON (c.ordering_group) c.id, c.ordering_group
                  FROM checked c
                  WHERE c.why IS NULL AND c.ordering_group IS NOT NULL AND NOT c.written
                  ORDER BY c.ordering_group, c.id) f
        ), held AS MATERIALIZED (
            -- Those effects before, locked FOR SHARE (never waiting: one locked by a change in flight
            -- is skipped, and the effect after it is then not held back; see
            -- relay.release_next_in_group for why a wrong "not behind" is harmless and a wrong
            -- "behind" is not). Locked and unsettled: it cannot settle before this transaction
            -- commits, and its settling then lets the effect written here go. With the first
            -- effect after it (joined here, by an index probe each, not later to firsts).
            SELECT p.id, f.id AS first_id
            FROM firsts f
            JOIN relay.effect p ON p.id = f.prev_id
            WHERE p.state <> 'CANCELLED'
              AND NOT relay.lets_group_go(p.state, p.effect_type, p.group_released_at)
            FOR SHARE OF p SKIP LOCKED
        ), claims AS MATERIALIZED (
            -- What claim_batch would take of these at once, by its rules: due, and ungrouped or the
            -- first of its group here with the effect before it settled (settled never comes undone,
            -- so this snapshot's word is final); capped by count and by bytes. With the columns the
            -- batch's rows are returned with (joined back to checked, the estimates of these CTEs
            -- made the planner loop over one for each row of the other: 450 ms for 2,000).
            SELECT d.id, d.operation_key, d.effect_type, d.type_topic, d.payload, d.business_key,
                   d.template, d.traceparent, d.enqueued_at, d.ordering_group, d.status_in_txn
            FROM (
                SELECT c.id, c.operation_key, c.effect_type, c.type_topic, c.payload,
                       c.business_key, c.template, c.traceparent, c.enqueued_at, c.ordering_group,
                       c.status_in_txn,
                       pg_column_size(c.payload) AS size,
                       sum(pg_column_size(c.payload)) OVER (ORDER BY c.id) AS running,
                       row_number() OVER (ORDER BY c.id) AS n
                FROM checked c
                WHERE v_claim > 0 AND c.why IS NULL AND NOT c.written AND c.due_at <= now()
                  -- Uncorrelated IN (hashed once), not EXISTS per row: the planner took firsts for a
                  -- few rows and scanned it for every row read (2,000 groups in a read of 2,000:
                  -- 146 us an effect).
                  AND (c.ordering_group IS NULL OR c.id IN (
                      SELECT f.id FROM firsts f
                      LEFT JOIN relay.effect p ON p.id = f.prev_id
                      WHERE f.prev_id IS NULL
                         OR relay.lets_group_go(p.state, p.effect_type, p.group_released_at)))
            ) d
            WHERE d.n <= v_claim AND d.running - d.size < p_max_bytes
        ), batched AS (
            -- The claimed ungrouped rows: one batch row is their claim, committed before any
            -- publish. Their effect rows are written once, with their outcome (mark_batch_outcomes
            -- in relay/sql/dispatch.sql; expire_batches if the lease runs out). Grouped ones are
            -- written DISPATCHING below: the group rules read the effect before in relay.effect.
            -- With status events on and a transactional caller, the status events of an intent
            -- whose type awaits no result ride in the batch's Kafka transaction (status_ids).
            INSERT INTO relay.dispatch_batch AS d (owner, owner_epoch, lease_until, ids, status_ids)
            SELECT p_owner, p_epoch, now() + make_interval(secs => p_lease_s),
                   array_agg(k.id ORDER BY k.id),
                   coalesce(array_agg(k.id ORDER BY k.id) FILTER (WHERE k.status_in_txn), '{}')
            FROM claims k
            WHERE k.ordering_group IS NULL
            HAVING count(*) > 0
            RETURNING d.id, d.ids
        ), made AS (
            INSERT INTO relay.effect AS e (id, operation_key, effect_type, topic, payload,
                                           business_key, traceparent, available_at, created_at,
                                           updated_at, ordering_group, message_key, enqueued_by,
                                           state, reason, attempts, owner, owner_epoch, lease_until,
                                           claimed_at, behind_head)
            -- A refused row keeps its payload only as bounded text (it may be no object, or
            -- nest deeper than anything that reads effects should decode), and no group.
            SELECT c.id, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
                   CASE WHEN c.why IS NULL THEN c.payload
                        ELSE jsonb_build_object('refused_payload', left(c.payload::text, 4096)) END,
                   CASE WHEN c.why IS NOT NULL THEN NULL
                        WHEN c.business_key IS NOT NULL THEN c.business_key
                        WHEN c.template IS NOT NULL
                            THEN relay.business_key(c.template, c.payload, c.operation_key) END,
                   CASE WHEN c.why IS NULL THEN c.traceparent END,
                   CASE WHEN c.why IS NULL THEN c.due_at ELSE c.enqueued_at END,
                   c.enqueued_at, now(), CASE WHEN c.why IS NULL THEN c.ordering_group END,
                   CASE WHEN c.key_by_group AND c.why IS NULL THEN c.ordering_group END,
                   c.enqueued_by,
                   CASE WHEN c.why IS NOT NULL THEN 'REJECTED'
                        WHEN k.id IS NOT NULL THEN 'DISPATCHING' ELSE 'PENDING' END,
                   CASE WHEN c.why IS NOT NULL THEN 'refused when read: ' || c.why END,
                   CASE WHEN k.id IS NOT NULL THEN 1 ELSE 0 END,
                   CASE WHEN k.id IS NOT NULL THEN p_owner END,
                   CASE WHEN k.id IS NOT NULL THEN p_epoch END,
                   CASE WHEN k.id IS NOT NULL THEN now() + make_interval(secs => p_lease_s) END,
                   CASE WHEN k.id IS NOT NULL THEN now() END,
                   -- Behind its group's head: a grouped effect after another one written here, or
                   -- the first one here when the effect before it is held unsettled.
                   c.why IS NULL AND c.ordering_group IS NOT NULL
                   AND (c.id NOT IN (SELECT f.id FROM firsts f)
                        OR c.id IN (SELECT h.first_id FROM held h))
            -- Only grouped rows need to know whether they were claimed; the ungrouped claimed ones
            -- are the batch's (a join of every row to the claims was sorted and merged: 1 ms of 500).
            FROM checked c
            LEFT JOIN claims k ON k.id = c.id AND c.ordering_group IS NOT NULL
            WHERE c.ordering_group IS NOT NULL OR c.id NOT IN (SELECT b.id FROM claims b)
            ORDER BY c.id
            ON CONFLICT DO NOTHING
            RETURNING e.id, e.state, e.reason, e.created_at, e.operation_key, e.message_key,
                      e.effect_type, e.topic, e.payload, e.business_key, e.traceparent, e.attempts,
                      e.ordering_group
        ), noted AS (
            -- A refused intent's story: enqueued, then REJECTED (the happy path's transitions are
            -- implied, as before).
            INSERT INTO relay.transition (effect_id, from_state, to_state, reason, actor, attempt,
                                          at, status_pending)
            SELECT m.id, s.from_state, s.to_state, s.reason, s.actor, 0, s.at, v_status
            FROM made m
            CROSS JOIN LATERAL (VALUES (NULL, 'PENDING', 'enqueued', 'application', m.created_at),
                                       ('PENDING', 'REJECTED', m.reason, 'relay', now()))
                AS s(from_state, to_state, reason, actor, at)
            WHERE m.state = 'REJECTED'
        )
        -- The claimed rows as claim_batch returns them (those of the batch with its id), then the
        -- summary (id NULL).
        SELECT m.id, m.operation_key, coalesce(m.message_key, m.operation_key), m.effect_type,
               m.topic, m.payload::text, m.business_key, m.traceparent, m.attempts, m.created_at,
               m.ordering_group, NULL::bigint, NULL::integer, NULL::integer, NULL::integer,
               NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint, false, now()
        FROM made m
        WHERE m.state = 'DISPATCHING'
        UNION ALL
        SELECT c.id, c.operation_key, c.operation_key, c.effect_type, coalesce(c.type_topic, ''),
               c.payload::text,
               CASE WHEN c.business_key IS NOT NULL THEN c.business_key
                    WHEN c.template IS NOT NULL
                        THEN relay.business_key(c.template, c.payload, c.operation_key) END,
               c.traceparent, 1, c.enqueued_at, NULL::text, d.id, NULL::integer, NULL::integer,
               NULL::integer, NULL::integer, NULL::bigint, NULL::bigint, NULL::boolean, NULL::bigint,
               c.status_in_txn, now()
        FROM claims c CROSS JOIN batched d
        WHERE c.ordering_group IS NULL
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               (SELECT count(*) FILTER (WHERE m.state = 'PENDING') FROM made m)::integer,
               ((SELECT count(*) FILTER (WHERE m.state = 'DISPATCHING') FROM made m)
                + coalesce((SELECT sum(cardinality(d.ids)) FROM batched d), 0))::integer,
               (SELECT count(*) FILTER (WHERE m.state = 'REJECTED') FROM made m)::integer,
               (SELECT count(*) FROM set_aside)::integer,
               v_pos.tick_from, v_to, v_more, v_last, NULL::boolean, NULL::timestamptz
        ORDER BY 1 NULLS LAST;
    END IF;

    -- An effect of the batch a cancel wrote first (an intent cancelled before this read): the
    -- effect after it in its group may have been written behind it above; let it go if the one
    -- before lets it (rare: relay.release_next_in_group never waits on a lock).
    -- (Over the batch's id span, a superset of its ids: release_next_in_group is idempotent, and
    -- the span costs the planner nothing, where = ANY (v_batch) cost 1 ms a call.)
    FOR v_first IN
        SELECT e.ordering_group, e.id FROM relay.effect e
        WHERE e.id BETWEEN v_work[1] AND v_work[cardinality(v_work)] AND e.state = 'CANCELLED'
          AND e.ordering_group IS NOT NULL
        ORDER BY e.id
    LOOP
        PERFORM relay.release_next_in_group(v_first.ordering_group, v_first.id);
    END LOOP;

    -- The reader's position, after the rows it passes are written.
    IF v_more THEN
        UPDATE relay.intake_reader
        SET tick_to = v_to, after_id = v_last, read_at = now(),
            promoted = relay.intake_reader.promoted + v_read, deferred = v_defer;
    ELSE
        UPDATE relay.intake_reader
        SET tick_from = v_to, tick_to = NULL, after_id = 0, read_at = now(),
            promoted = relay.intake_reader.promoted + v_read, deferred = v_defer;
        -- Ticks before the one the reader stands on are needed by no one (tick 0 stays).
        IF v_to % 64 = 0 THEN
            DELETE FROM relay.tick t WHERE t.id > 0 AND t.id < v_to;
        END IF;
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION relay.promote_intake(integer, integer, text, bigint, double precision,
                                            integer, bigint, boolean) FROM PUBLIC;

-- An intent without an effect row, as get_effect shows it, for any login that reads effects:
-- PENDING (not read yet), DISPATCHING (claimed in a batch, its outcome not recorded yet) or
-- PUBLISHED (in a published batch: relay.published_batch).
CREATE FUNCTION relay.intake_effect(p_operation_key text)
RETURNS TABLE (id bigint, operation_key text, effect_type text, topic text, payload jsonb,
               business_key text, traceparent text, available_at timestamptz,
               created_at timestamptz, ordering_group text, state text,
               claimed_at timestamptz, published_partition integer, published_offset bigint,
               published_at timestamptz)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT i.id, i.operation_key, i.effect_type::text, coalesce(t.topic, ''), i.payload,
       CASE WHEN i.business_key IS NOT NULL OR t.business_key IS NULL THEN i.business_key
            WHEN relay.business_key_refusal(i.effect_type::text, t.business_key, i.payload,
                                            i.operation_key, NULL) IS NULL
                THEN relay.business_key(t.business_key, i.payload, i.operation_key) END,
       i.traceparent,
       greatest(coalesce(i.available_at, i.enqueued_at), i.enqueued_at), i.enqueued_at,
       i.ordering_group,
       CASE WHEN p.published_batch IS NOT NULL THEN 'PUBLISHED'
            WHEN b.id IS NOT NULL THEN 'DISPATCHING' ELSE 'PENDING' END,
       coalesce(p.claimed_at, b.claimed_at), p."partition", p."offset", p.published_at
FROM relay.intake i
LEFT JOIN relay.effect_type t ON t.name = i.effect_type::text
LEFT JOIN LATERAL (
    SELECT d.id, d.claimed_at FROM relay.dispatch_batch d WHERE i.id = ANY (d.ids) LIMIT 1
) b ON true
LEFT JOIN LATERAL relay.published_intent(i.id) p ON true
WHERE i.operation_key = p_operation_key
  AND NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.intake_refused f WHERE f.id = i.id)
  AND NOT EXISTS (SELECT 1 FROM relay.purged_key k
                  WHERE k.operation_key = i.operation_key AND k.effect_id = i.id)
  AND i.purged_at IS NULL
$fn$;
REVOKE ALL ON FUNCTION relay.intake_effect(text) FROM PUBLIC;


-- The purge (`relay purge`): SECURITY DEFINER, so the operator role purges without any right to
-- delete rows; one batch per call, granted by `relay roles` to the operator role.
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
    ), emptied AS (
        -- The intent's key stays in the intake until the dedupe window ends (its unique key
        -- refuses the key's reuse at enqueue); its content goes now.
        UPDATE relay.intake i SET payload = '{}'::jsonb, business_key = NULL, traceparent = NULL,
                                  purged_at = now()
        WHERE i.id IN (SELECT g.id FROM gone g)
    ), remembered AS (
        INSERT INTO relay.purged_key AS k (operation_key, effect_id, effect_type, final_state)
        SELECT g.operation_key, g.id, g.effect_type, g.state FROM gone g
        ON CONFLICT (operation_key) DO UPDATE
            SET effect_id = excluded.effect_id, effect_type = excluded.effect_type,
                final_state = excluded.final_state, purged_at = now()
    )
    SELECT g.id FROM gone g;

    -- Published batches past retention (their intents have no effect row): about p_limit
    -- intents, whole batches, oldest first. Each intent's content goes in place, a heap-only
    -- update (the intake keeps room on its pages), and its key stays in that row, marked
    -- purged, until the dedupe window ends; the batch's ids move to relay.emptied_batch, by
    -- which relay.purge_forgotten_keys deletes the rows then. Nothing else is written per intent.
    RETURN QUERY
    WITH old AS MATERIALIZED (
        SELECT p.id, p.ids FROM relay.published_batch p
        WHERE p.id IN (
            SELECT o.id FROM (
                SELECT q.id, q.n, sum(q.n) OVER (ORDER BY q.published_at, q.id) AS running
                FROM relay.published_batch q
                WHERE q.published_at < now() - make_interval(secs => p_retention_s)
            ) o
            WHERE o.running - o.n < p_limit)
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM relay.published_batch p USING old o WHERE p.id = o.id
    ), kept AS (
        INSERT INTO relay.emptied_batch (id, ids) SELECT o.id, o.ids FROM old o
    ), emptied AS (
        UPDATE relay.intake i SET payload = '{}'::jsonb, business_key = NULL, traceparent = NULL,
                                  purged_at = now()
        WHERE i.id = ANY (ARRAY(SELECT x.id FROM old o CROSS JOIN LATERAL unnest(o.ids) AS x(id)))
        RETURNING i.id
    )
    SELECT e.id FROM emptied e;
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
    ), gone AS (
        DELETE FROM relay.purged_key k USING old WHERE k.operation_key = old.operation_key
        RETURNING k.operation_key, k.effect_id
    ), gone_intake AS (
        DELETE FROM relay.intake i USING gone g
        WHERE i.id = g.effect_id AND i.operation_key = g.operation_key
    )
    SELECT g.operation_key FROM gone g;

    -- Intents emptied in their published batch (relay.purge_batch): whole batches, oldest
    -- first, about p_limit intents; their intake rows go by the batch's ids.
    RETURN QUERY
    WITH old AS MATERIALIZED (
        SELECT b.id, b.ids FROM relay.emptied_batch b
        WHERE b.id IN (
            SELECT o.id FROM (
                SELECT q.id, q.n, sum(q.n) OVER (ORDER BY q.emptied_at, q.id) AS running
                FROM (SELECT e.id, e.emptied_at, cardinality(e.ids) AS n
                      FROM relay.emptied_batch e
                      WHERE e.emptied_at < now() - make_interval(secs => p_dedupe_window_s)
                      ORDER BY e.emptied_at, e.id
                      LIMIT p_limit) q
            ) o
            WHERE o.running - o.n < p_limit)
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM relay.emptied_batch b USING old o WHERE b.id = o.id
    ), gone_intake AS (
        DELETE FROM relay.intake i
        WHERE i.id = ANY (ARRAY(SELECT x.id FROM old o CROSS JOIN LATERAL unnest(o.ids) AS x(id)))
          AND i.purged_at IS NOT NULL
        RETURNING i.operation_key
    )
    SELECT g.operation_key FROM gone_intake g;
END
$fn$;

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

REVOKE ALL ON FUNCTION relay.purge_batch(double precision, integer),
    relay.purge_unattached_evidence(double precision, integer),
    relay.purge_forgotten_keys(double precision, integer) FROM PUBLIC;

-- The console's audit is append-only, and the database names the login that wrote each row.
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

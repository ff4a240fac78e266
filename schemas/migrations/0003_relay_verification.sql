-- 0003: the relay verifies its own ambiguous publishes (transactions, fencing, read_committed).
-- Additive only: safe to apply while older relays run.

ALTER TABLE relay.effect
    ADD COLUMN verify_at    timestamptz,
    ADD COLUMN verify_tries integer NOT NULL DEFAULT 0;

ALTER TABLE relay.attempt
    ADD COLUMN verification text,
    ADD COLUMN verified_at  timestamptz;

-- 'aborted': the attempt's Kafka transaction was aborted, so no read_committed reader sees it.
ALTER TABLE relay.attempt DROP CONSTRAINT attempt_outcome_valid;
ALTER TABLE relay.attempt ADD CONSTRAINT attempt_outcome_valid
    CHECK (outcome IN ('acked', 'rejected', 'unknown', 'not_sent', 'released', 'aborted'));

-- The relay's own UNKNOWN effects (never acknowledged by Kafka) awaiting a check.
CREATE INDEX effect_verify_idx ON relay.effect (verify_at)
    WHERE state = 'UNKNOWN' AND published_offset IS NULL;

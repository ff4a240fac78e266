-- 0028: a receipt in each Kafka transaction (issue 19, item 4). An incarnation of a replica
-- listed here writes one more record into every Kafka transaction it commits: a receipt naming
-- the transaction's batches and, for each record, its effect, attempt, topic, partition and
-- offset, on `topic` with the replica's transactional id as key. A batch it left without an
-- outcome (it died, or its commit went unanswered) is then settled with one read of that topic
-- after fencing its producer: a receipt names the batch, it committed and its intents are
-- PUBLISHED where the receipt says; none does, it was aborted and its intents go again. No
-- per-effect UNKNOWN row and no search of the dispatch topics. The row is written when the
-- incarnation registers, before it publishes anything, and deleted before it publishes a
-- transaction without a receipt (the topic unavailable): only then is the absence of a receipt
-- proof that a transaction did not commit. `install` tells two installations apart that share a
-- Kafka cluster and a receipts topic.
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

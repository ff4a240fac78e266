-- 0024: a batch's arrays (its ids, and a published batch's partitions and offsets) are stored out
-- of line without compression. pglz compressed each batch's arrays at the claim and again at the
-- mark: about 4 us of PostgreSQL CPU an effect (a batch of 500: 9.3 against 5.3 us an effect for
-- the claim's and the mark's inserts), to keep a published batch's arrays in about 5 bytes an
-- effect instead of 20 until retention. Rows written before keep their compressed arrays; both
-- read the same.

ALTER TABLE relay.dispatch_batch ALTER COLUMN ids SET STORAGE EXTERNAL,
    ALTER COLUMN status_ids SET STORAGE EXTERNAL;
ALTER TABLE relay.published_batch ALTER COLUMN ids SET STORAGE EXTERNAL,
    ALTER COLUMN partitions SET STORAGE EXTERNAL, ALTER COLUMN offsets SET STORAGE EXTERNAL;

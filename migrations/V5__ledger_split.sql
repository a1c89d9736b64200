-- V5: a batch the database refused for a data reason is delivered as two
-- halves (recursively, until the offending rows are alone), and so is a batch
-- with more rows than BATCH_MAX_ROWS. Before the halves are written, the
-- parent's id goes into the ledger with split = true, so a later attempt at
-- the whole batch (a replay after a crash) is sent to its halves again, whose
-- own ids make each of them exactly-once, instead of writing every row twice.
ALTER TABLE ingest_batches ADD COLUMN IF NOT EXISTS split BOOLEAN NOT NULL DEFAULT false;

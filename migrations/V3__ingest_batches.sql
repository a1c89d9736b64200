-- V3: the exactly-once ledger. Every batch inserts its id here in the same
-- transaction as its rows and aggregates; a batch whose id is already present
-- committed before (its acknowledgement was lost, or it was replayed from the
-- spool), so the writer rolls back and changes nothing.

CREATE TABLE IF NOT EXISTS ingest_batches (
    id UUID PRIMARY KEY,
    events INTEGER NOT NULL,
    committed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

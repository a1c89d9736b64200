-- V8: idempotent events. A client may send an `event_id` (a UUID) with an
-- event; the same id again within DEDUP_WINDOW_HOURS is the same event,
-- stored and counted once, across replicas, restarts and spool replay.
--
-- The arbiter is event_ids: the writer inserts a batch's ids there in the
-- batch's own transaction (ON CONFLICT DO NOTHING … RETURNING), and rows whose
-- id was already there (or earlier in the same batch) are left out of events
-- and out of metrics_hourly. The key is event_id alone, so it is unique across
-- accounts, partitions and nodes: with Citus the table is distributed on
-- event_id (deploy/citus/setup.sql), and the claim commits with the rows in
-- one distributed transaction. digest is a stable hash of what the client
-- sent (kind, ad unit, campaign, creative, page URL): a repeat with another
-- digest is the same id with a different payload (counted as
-- conflicting_event_id; the first one stays). first_seen drives retention
-- (the maintenance loop deletes ids older than the window in chunks); BRIN
-- because ids arrive in first_seen order, so the index costs next to nothing.
CREATE TABLE IF NOT EXISTS event_ids (
    event_id   UUID PRIMARY KEY,
    digest     BIGINT NOT NULL,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS event_ids_first_seen ON event_ids USING brin (first_seen);

-- The id is kept with the event (NULL when the client sent none): an auditor
-- can find the row a client's id became. Catalog-only changes.
ALTER TABLE events ADD COLUMN IF NOT EXISTS event_id UUID;
ALTER TABLE rejected_events ADD COLUMN IF NOT EXISTS event_id UUID;

-- V6: the schema at scale.
--
-- 1. `events` is range-partitioned on `timestamp` when it can be created so:
--    a new database (or one whose `events` is still empty and nothing depends
--    on it) gets the partitioned table at once, with a DEFAULT partition as a
--    safety net; the service then keeps partitions ahead of time (or hands
--    them to pg_partman). A database whose `events` already holds rows keeps
--    it as it is: the service writes to either layout, and
--    `ingest migrate --partition-events` converts it live.
--    The primary key becomes (account_id, timestamp, id): partitioning needs
--    `timestamp` in it and Citus needs `account_id`; `id` still comes from
--    the same sequence, so it stays unique.
-- 2. `metrics_hourly`'s primary key becomes (account_id, id) for the same
--    reason (its unique key already starts with account_id). The index is
--    built first, then swapped in.
-- 3. Retention indexes: `rejected_events.received_at` and
--    `ingest_batches.committed_at`, which are pruned by time.

DO $$
DECLARE
    kind "char";
BEGIN
    SELECT c.relkind INTO kind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = 'events' AND n.nspname = current_schema();
    IF kind = 'r' AND NOT EXISTS (SELECT 1 FROM events LIMIT 1) THEN
        BEGIN
            DROP TABLE events;
            kind := NULL;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'events is empty but other objects depend on it: kept unpartitioned (ingest migrate --partition-events converts it)';
        END;
    END IF;
    IF kind IS NULL THEN
        CREATE SEQUENCE IF NOT EXISTS events_id_seq;
        CREATE TABLE events (
            id BIGINT NOT NULL DEFAULT nextval('events_id_seq'),
            event_type VARCHAR(20) NOT NULL,
            ad_unit_id UUID NOT NULL,
            campaign_id UUID NOT NULL,
            creative_id UUID NOT NULL,
            account_id UUID NOT NULL,
            page_url TEXT NOT NULL,
            user_agent TEXT,
            timestamp TIMESTAMP NOT NULL,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            PRIMARY KEY (account_id, timestamp, id)
        ) PARTITION BY RANGE (timestamp);
        ALTER SEQUENCE events_id_seq OWNED BY events.id;
        CREATE TABLE events_default PARTITION OF events DEFAULT;
    END IF;
END $$;

DO $$
DECLARE
    pk_cols TEXT;
BEGIN
    SELECT string_agg(a.attname, ',' ORDER BY k.ord) INTO pk_cols
      FROM pg_constraint con
      JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) ON true
      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
     WHERE con.conrelid = 'metrics_hourly'::regclass AND con.contype = 'p';
    IF pk_cols IS DISTINCT FROM 'account_id,id' THEN
        CREATE UNIQUE INDEX IF NOT EXISTS metrics_hourly_account_id_id ON metrics_hourly (account_id, id);
        IF pk_cols IS NOT NULL THEN
            EXECUTE format('ALTER TABLE metrics_hourly DROP CONSTRAINT %I',
                (SELECT conname FROM pg_constraint WHERE conrelid = 'metrics_hourly'::regclass AND contype = 'p'));
        END IF;
        ALTER TABLE metrics_hourly ADD CONSTRAINT metrics_hourly_pkey PRIMARY KEY USING INDEX metrics_hourly_account_id_id;
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS rejected_events_received_at_idx ON rejected_events (received_at);
CREATE INDEX IF NOT EXISTS ingest_batches_committed_at_idx ON ingest_batches (committed_at);

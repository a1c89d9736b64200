-- deploy/citus/setup.sql — what a Citus operator runs, once, on the coordinator,
-- after `ingest migrate` created the schema there (run `ingest migrate` with
-- DATABASE_URL pointing at the coordinator; the service writes through it too).
--
-- Distribution: account_id. Every table the service writes either is
-- distributed on account_id, with account_id in every primary and unique key,
-- or is a reference table (a full copy on every node):
--
--   events           distributed (account_id); partitioned by timestamp
--   metrics_hourly   distributed (account_id), co-located with events, so a
--                    rollup INSERT … SELECT … FROM events … ON CONFLICT runs on
--                    each node without moving rows
--   event_ids        distributed (event_id): the idempotency arbiter. Its only
--                    key is event_id, so an id is unique over every account and
--                    node; the writer claims ids in the batch's transaction,
--                    which Citus commits on every node involved (2PC)
--   rejected_events  reference: few rows, and many have no account (unknown campaign)
--   ingest_batches   reference: one row per batch, written in the batch's transaction
--   campaigns        reference: read by every writer to resolve accounts
--
-- tests/citus.rs checks these rules against the schema the migrations build
-- (every unique key of a distributed table contains its distribution column; every other
-- table the service writes is listed below as a reference table). Citus itself
-- cannot be installed on the development machines: this file was not run
-- against a Citus cluster.

CREATE EXTENSION IF NOT EXISTS citus;

SELECT create_reference_table('campaigns');
SELECT create_reference_table('ingest_batches');
SELECT create_reference_table('rejected_events');
SELECT create_distributed_table('events', 'account_id');
SELECT create_distributed_table('metrics_hourly', 'account_id', colocate_with => 'events');
SELECT create_distributed_table('event_ids', 'event_id');

//! Partition maintenance and retention: the write side's housekeeping.
//!
//! Every `MAINTENANCE_INTERVAL_MS` (and once at start, before the first
//! write), one replica at a time (a session advisory lock; the others skip
//! the round):
//! - keeps an `events` partition for every interval of the accepted window,
//!   from `MAX_EVENT_AGE_MS` back to `EVENTS_PREMAKE` intervals ahead, so a
//!   late or early event never lands in the DEFAULT partition; rows that did
//!   land there are moved into a partition when it is created;
//! - or, when the pg_partman extension is installed (and `PARTMAN=auto`),
//!   hands the table to it once and runs its maintenance instead;
//! - drops `events` partitions whose every row is older than
//!   `EVENTS_RETENTION_DAYS` (detached, then dropped; the detach holds an
//!   exclusive lock on `events` for an instant and waits at most 500 ms for
//!   it, so writers never queue behind it for longer);
//! - deletes `rejected_events` rows older than `REJECTED_RETENTION_DAYS` and
//!   ledger entries older than `LEDGER_RETENTION_DAYS`, in small chunks.
//!
//! DDL runs with a short `lock_timeout`: a maintenance step that cannot get
//! its lock gives up and waits for the next round rather than queue writers
//! behind it. A database whose `events` is not partitioned (the Node
//! service's layout, before `ingest migrate --partition-events`) gets only the
//! row-level retention.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;

use crate::config::{Config, PartitionInterval};
use crate::db::{self, Conn, DbError};
use crate::stats::{Counter, Stats};

/// The advisory lock one maintenance round holds ("ingest" + 1).
const MAINTENANCE_LOCK: i64 = 0x696e_6765_7374 + 1;
/// DDL waits at most this long for its lock.
const LOCK_TIMEOUT: &str = "2s";
/// Detaching a partition waits at most this long for its exclusive lock.
const DETACH_LOCK_TIMEOUT: &str = "500ms";
/// Rows deleted per statement by row-level retention.
const CHUNK: i64 = 10_000;

/// What maintenance is told to do.
#[derive(Debug, Clone)]
pub struct Policy {
    pub interval: PartitionInterval,
    pub premake: u32,
    /// How far back events are accepted (`MAX_EVENT_AGE_MS`).
    pub max_age: Duration,
    /// How far ahead events are accepted (`MAX_EVENT_FUTURE_MS`).
    pub max_future: Duration,
    pub events_retention_days: u32,
    pub rejected_retention_days: u32,
    pub ledger_retention_days: u32,
    /// `event_ids` older than this are deleted (`DEDUP_WINDOW_HOURS`).
    pub dedup_window_hours: u32,
    pub partman: bool,
}

impl Policy {
    pub fn from_config(c: &Config) -> Policy {
        Policy {
            interval: c.partition_interval,
            premake: c.partition_premake,
            max_age: c.max_age,
            max_future: c.max_future,
            events_retention_days: c.events_retention_days,
            rejected_retention_days: c.rejected_retention_days,
            ledger_retention_days: c.ledger_retention_days,
            dedup_window_hours: (c.dedup_window.as_secs() / 3600) as u32,
            partman: c.partman,
        }
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// False when another replica held the lock.
    pub ran: bool,
    pub layout: Layout,
    pub partitions_created: u64,
    pub partitions_dropped: u64,
    /// Rows moved out of the DEFAULT partition into new partitions.
    pub rows_moved: u64,
    pub rejected_deleted: u64,
    pub ledger_pruned: u64,
    pub event_ids_deleted: u64,
}

/// How `events` is laid out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One plain table (the Node service's).
    #[default]
    Plain,
    /// Partitioned, partitions kept by the service.
    Partitioned,
    /// Partitioned, partitions kept by pg_partman.
    Partman,
}

/// One partition of `events`, as the catalog describes it.
#[derive(Debug, Clone)]
struct Part {
    name: String,
    /// `None`: MINVALUE.
    lo: Option<SystemTime>,
    /// `None`: MAXVALUE.
    hi: Option<SystemTime>,
    default: bool,
    detach_pending: bool,
}

impl Part {
    fn overlaps(&self, lo: SystemTime, hi: SystemTime) -> bool {
        !self.default && self.lo.is_none_or(|l| l < hi) && self.hi.is_none_or(|h| h > lo)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs one round on a connection of `pool`. `creation_only` skips retention
/// (the pass before the first write at start).
pub async fn run_once(pool: &Pool, policy: &Policy, creation_only: bool) -> Result<Round, DbError> {
    let conn = Conn::get(pool).await?;
    let locked: bool = conn
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTENANCE_LOCK])
        .await?
        .get(0);
    if !locked {
        conn.release();
        return Ok(Round::default());
    }
    let result = round(&conn, policy, creation_only).await;
    // The lock goes with the session if the unlock fails (the connection is then closed).
    let unlocked = conn
        .execute("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK])
        .await;
    if result.is_ok() && unlocked.is_ok() {
        conn.release();
    }
    result
}

async fn round(conn: &Conn, policy: &Policy, creation_only: bool) -> Result<Round, DbError> {
    let mut r = Round {
        ran: true,
        layout: layout(conn).await?,
        ..Round::default()
    };
    if r.layout == Layout::Partitioned && policy.partman && partman_schema(conn).await?.is_some() {
        hand_to_partman(conn, policy, &mut r).await?;
    }
    match r.layout {
        Layout::Partitioned => {
            create_partitions(conn, policy, &mut r).await?;
            if !creation_only && policy.events_retention_days > 0 {
                drop_old_partitions(conn, policy, &mut r).await?;
            }
        }
        Layout::Partman => {
            if let Some(schema) = partman_schema(conn).await? {
                configure_partman(conn, &schema, policy).await?;
                conn.batch_execute(&format!(
                    "SELECT \"{schema}\".run_maintenance(p_parent_table := current_schema() || '.events', p_jobmon := false)"
                ))
                .await?;
            }
        }
        Layout::Plain => {}
    }
    if !creation_only {
        if policy.rejected_retention_days > 0 {
            r.rejected_deleted = delete_chunked(
                conn,
                "DELETE FROM rejected_events WHERE id IN (SELECT id FROM rejected_events \
                 WHERE received_at < (now() AT TIME ZONE 'UTC') - make_interval(days => $1) LIMIT $2)",
                policy.rejected_retention_days as i32,
            )
            .await?;
        }
        r.ledger_pruned = delete_chunked(
            conn,
            "DELETE FROM ingest_batches WHERE id IN (SELECT id FROM ingest_batches \
             WHERE committed_at < (now() AT TIME ZONE 'UTC') - make_interval(days => $1) LIMIT $2)",
            policy.ledger_retention_days as i32,
        )
        .await?;
        if policy.dedup_window_hours > 0 {
            r.event_ids_deleted = delete_chunked(
                conn,
                "DELETE FROM event_ids WHERE event_id IN (SELECT event_id FROM event_ids \
                 WHERE first_seen < now() - make_interval(hours => $1) LIMIT $2)",
                policy.dedup_window_hours as i32,
            )
            .await?;
        }
    }
    Ok(r)
}

async fn layout(conn: &Conn) -> Result<Layout, DbError> {
    let row = conn
        .query_one(
            "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('events')), false)",
            &[],
        )
        .await?;
    let partitioned: bool = row.get(0);
    if !partitioned {
        return Ok(Layout::Plain);
    }
    if let Some(schema) = partman_schema(conn).await? {
        let managed: bool = conn
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM \"{schema}\".part_config WHERE parent_table = current_schema() || '.events')"
                ),
                &[],
            )
            .await?
            .get(0);
        if managed {
            return Ok(Layout::Partman);
        }
    }
    Ok(Layout::Partitioned)
}

/// The schema pg_partman is installed in, if it is.
async fn partman_schema(conn: &Conn) -> Result<Option<String>, DbError> {
    Ok(conn
        .query_opt(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'pg_partman'",
            &[],
        )
        .await?
        .map(|r| r.get(0)))
}

async fn partitions(conn: &Conn) -> Result<Vec<Part>, DbError> {
    let rows = conn
        .query(
            "SELECT c.relname::text, \
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\)'))[1]::timestamp, \
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1]::timestamp, \
                    pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT', \
                    i.inhdetachpending \
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
              WHERE i.inhparent = to_regclass('events')",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Part {
            name: r.get(0),
            lo: r.get(1),
            hi: r.get(2),
            default: r.get(3),
            detach_pending: r.get(4),
        })
        .collect())
}

/// The partition ranges the accepted window needs.
async fn wanted(
    conn: &Conn,
    policy: &Policy,
) -> Result<Vec<(SystemTime, SystemTime, String)>, DbError> {
    let unit = policy.interval.unit();
    let rows = conn
        .query(
            &format!(
                "SELECT s, s + interval '1 {unit}', to_char(s, 'YYYYMMDD') \
                   FROM generate_series( \
                        date_trunc('{unit}', (now() AT TIME ZONE 'UTC') - make_interval(secs => $1)), \
                        date_trunc('{unit}', (now() AT TIME ZONE 'UTC') + make_interval(secs => $2)) \
                          + $3 * interval '1 {unit}', \
                        interval '1 {unit}') AS s"
            ),
            &[&secs(policy.max_age), &secs(policy.max_future), &f64::from(policy.premake)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

async fn create_partitions(conn: &Conn, policy: &Policy, r: &mut Round) -> Result<(), DbError> {
    let parts = partitions(conn).await?;
    let default = parts.iter().find(|p| p.default).map(|p| p.name.clone());
    for (lo, hi, stamp) in wanted(conn, policy).await? {
        if parts.iter().any(|p| p.overlaps(lo, hi)) {
            continue;
        }
        let name = format!("events_p{stamp}");
        // One transaction: the new table, the rows the DEFAULT partition holds
        // for its range, the attach (SHARE UPDATE EXCLUSIVE on `events`: the
        // writers go on).
        conn.batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
             CREATE TABLE \"{name}\" (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)"
        ))
        .await?;
        let moved = match &default {
            Some(d) => conn
                .execute(
                    &format!(
                        "WITH moved AS (DELETE FROM \"{d}\" WHERE timestamp >= $1 AND timestamp < $2 RETURNING *) \
                         INSERT INTO \"{name}\" SELECT * FROM moved"
                    ),
                    &[&lo, &hi],
                )
                .await,
            None => Ok(0),
        };
        let attached = match moved {
            Ok(n) => conn
                .batch_execute(&format!(
                    "ALTER TABLE events ATTACH PARTITION \"{name}\" FOR VALUES FROM ('{}') TO ('{}'); COMMIT",
                    pg_ts(lo),
                    pg_ts(hi)
                ))
                .await
                .map(|_| n),
            Err(e) => Err(e),
        };
        match attached {
            Ok(n) => {
                r.partitions_created += 1;
                r.rows_moved += n;
                tracing::info!(partition = %name, rows_moved = n, "events partition created");
            }
            Err(e) => {
                let _ = conn.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        }
    }
    Ok(())
}

async fn drop_old_partitions(conn: &Conn, policy: &Policy, r: &mut Round) -> Result<(), DbError> {
    let cutoff: SystemTime = conn
        .query_one(
            "SELECT (now() AT TIME ZONE 'UTC') - make_interval(days => $1)",
            &[&(policy.events_retention_days as i32)],
        )
        .await?
        .get(0);
    for p in partitions(conn).await? {
        let old = !p.default && p.hi.is_some_and(|h| h <= cutoff);
        if !old {
            continue;
        }
        let name = &p.name;
        // DETACH … CONCURRENTLY is not allowed beside a DEFAULT partition, so
        // the detach takes its ACCESS EXCLUSIVE lock on `events` for an
        // instant; a short lock_timeout keeps writers from queueing behind it
        // for longer than that (the round is retried next time).
        let finalize = if p.detach_pending { " FINALIZE" } else { "" };
        if let Err(e) = conn
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{DETACH_LOCK_TIMEOUT}'; \
                 ALTER TABLE events DETACH PARTITION \"{name}\"{finalize}; COMMIT"
            ))
            .await
        {
            let _ = conn.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
        conn.batch_execute(&format!("DROP TABLE \"{name}\""))
            .await?;
        r.partitions_dropped += 1;
        tracing::info!(partition = %name, "events partition past retention dropped");
    }
    Ok(())
}

/// Registers `events` with pg_partman, once: its own DEFAULT partition
/// replaces ours (rows in ours are moved over), existing partitions stay.
async fn hand_to_partman(conn: &Conn, policy: &Policy, r: &mut Round) -> Result<(), DbError> {
    let Some(schema) = partman_schema(conn).await? else {
        return Ok(());
    };
    let start: String = conn
        .query_one(
            &format!(
                "SELECT to_char(date_trunc('{}', (now() AT TIME ZONE 'UTC') - make_interval(secs => $1)), 'YYYY-MM-DD HH24:MI:SS')",
                policy.interval.unit()
            ),
            &[&secs(policy.max_age)],
        )
        .await?
        .get(0);
    let parts = partitions(conn).await?;
    let default = parts.iter().find(|p| p.default).map(|p| p.name.clone());
    let mut sql = format!("BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; ");
    if let Some(d) = &default {
        sql.push_str(&format!(
            "ALTER TABLE events DETACH PARTITION \"{d}\"; ALTER TABLE \"{d}\" RENAME TO ingest_default_handover; "
        ));
    }
    sql.push_str(&format!(
        "SELECT \"{schema}\".create_parent(p_parent_table := current_schema() || '.events', \
             p_control := 'timestamp', p_type := 'native', p_interval := '{}', \
             p_premake := {}, p_start_partition := '{start}', p_jobmon := false); ",
        policy.interval.partman(),
        policy.premake
    ));
    if default.is_some() {
        sql.push_str(
            "INSERT INTO events SELECT * FROM ingest_default_handover; DROP TABLE ingest_default_handover; ",
        );
    }
    // Registered and configured together, or neither.
    sql.push_str(&partman_config_sql(&schema, policy));
    sql.push_str("; COMMIT");
    if let Err(e) = conn.batch_execute(&sql).await {
        let _ = conn.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    r.layout = Layout::Partman;
    tracing::info!(schema = %schema, "events partitions handed to pg_partman");
    Ok(())
}

/// Premake and retention in pg_partman's terms (numbers from the settings only).
fn partman_config_sql(schema: &str, policy: &Policy) -> String {
    let retention = match policy.events_retention_days {
        0 => "NULL".to_string(),
        d => format!("'{d} days'"),
    };
    format!(
        "UPDATE \"{schema}\".part_config SET premake = {}, infinite_time_partitions = true, \
                retention = {retention}, retention_keep_table = false \
          WHERE parent_table = current_schema() || '.events'",
        policy.premake
    )
}

async fn configure_partman(conn: &Conn, schema: &str, policy: &Policy) -> Result<(), DbError> {
    conn.batch_execute(&partman_config_sql(schema, policy))
        .await?;
    Ok(())
}

/// Runs `sql` (with `$1` = `age` in its unit, `$2` = the chunk size) until a
/// chunk deletes fewer than [`CHUNK`] rows.
async fn delete_chunked(conn: &Conn, sql: &str, age: i32) -> Result<u64, DbError> {
    let mut total = 0u64;
    loop {
        let n = conn.execute(sql, &[&age, &CHUNK]).await?;
        total += n;
        if n < CHUNK as u64 {
            return Ok(total);
        }
    }
}

/// A timestamp literal PostgreSQL reads back exactly.
fn pg_ts(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t)
        .to_string()
        .trim_end_matches('Z')
        .replace('T', " ")
}

/// Runs maintenance every `every` until the task is aborted; each round is
/// logged, counted, and bounded by `deadline`.
pub async fn run(
    pool: Pool,
    policy: Policy,
    stats: Arc<Stats>,
    every: Duration,
    deadline: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let round = db::within(
            deadline,
            "partition maintenance",
            run_once(&pool, &policy, false),
        )
        .await;
        record(&stats, round);
    }
}

/// Counts and logs a round.
pub fn record(stats: &Stats, round: Result<Round, DbError>) {
    match round {
        Ok(r) if r.ran => {
            stats.add(Counter::MaintenanceRuns, 1);
            stats.add(Counter::PartitionsCreated, r.partitions_created);
            stats.add(Counter::PartitionsDropped, r.partitions_dropped);
            stats.add(Counter::RejectedPruned, r.rejected_deleted);
            stats.add(Counter::LedgerPruned, r.ledger_pruned);
            stats.add(Counter::EventIdsPruned, r.event_ids_deleted);
            tracing::info!(
                layout = ?r.layout,
                partitions_created = r.partitions_created,
                partitions_dropped = r.partitions_dropped,
                rows_moved_from_default = r.rows_moved,
                rejected_deleted = r.rejected_deleted,
                ledger_pruned = r.ledger_pruned,
                event_ids_deleted = r.event_ids_deleted,
                "maintenance round"
            );
        }
        Ok(_) => tracing::debug!("maintenance round skipped: another replica holds the lock"),
        Err(e) => {
            stats.add(Counter::MaintenanceFailures, 1);
            tracing::warn!(error = %e, "maintenance round failed; retried next round");
        }
    }
}

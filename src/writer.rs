//! `PgWriter`: lands batches in PostgreSQL, one transaction per batch.
//!
//! For each batch: resolve campaign → account (one query for cache misses),
//! then in a single transaction binary-COPY the rows into `events`, upsert the
//! merged aggregates into `metrics_hourly` with one set-based statement whose
//! input is sorted by the conflict key (so replicas writing at once always
//! lock rows in the same order and cannot deadlock), and COPY the events of
//! unknown campaigns into `rejected_events`. Rows and aggregates commit
//! together or not at all.
//!
//! A failed batch is kept and retried with capped exponential backoff; an
//! error the database will keep raising for this data (a data or constraint
//! error, three times in a row) moves the batch to `rejected_events` instead
//! of blocking the pipeline forever. This side never reaches back into
//! request handling: it sees only `Batch`.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Pool, Transaction};
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch, OnceCell, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::accounts::AccountCache;
use crate::batch::Batch;
use crate::db::{self, DbError};
use crate::pgcopy::CopyEncoder;
use crate::shard::HOUR_MS;
use crate::stats::Stats;

const COPY_EVENTS: &str =
    "COPY events (event_type, ad_unit_id, campaign_id, creative_id, account_id, \
     page_url, user_agent, timestamp) FROM STDIN (FORMAT binary)";
const COPY_REJECTED: &str =
    "COPY rejected_events (reason, event_type, ad_unit_id, campaign_id, creative_id, \
     page_url, user_agent, timestamp, received_at, batch_id) FROM STDIN (FORMAT binary)";
const UPSERT_AGGREGATES: &str = "INSERT INTO metrics_hourly AS m \
       (account_id, ad_unit_id, campaign_id, hour_timestamp, impressions, clicks) \
     SELECT a, u, c, to_timestamp(h * 3600) AT TIME ZONE 'UTC', i, k \
       FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int8[], $5::int4[], $6::int4[]) AS t(a, u, c, h, i, k) \
      ORDER BY a, u, c, h \
     ON CONFLICT (account_id, ad_unit_id, campaign_id, hour_timestamp) DO UPDATE \
        SET impressions = COALESCE(m.impressions, 0) + EXCLUDED.impressions, \
            clicks = COALESCE(m.clicks, 0) + EXCLUDED.clicks, \
            updated_at = now()";

/// Streamed to the server in pieces of about this size.
const COPY_CHUNK_BYTES: usize = 1 << 20;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// A data/constraint error seen this many times in a row dead-letters the batch.
const PERMANENT_ATTEMPTS: u32 = 3;

/// What one committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    pub written: u64,
    pub unknown_campaign: u64,
    pub dead_lettered: u64,
}

/// Why a write attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl WriteError {
    /// True when retrying the same batch cannot help (the data itself is refused).
    fn is_permanent(&self) -> bool {
        let code = match self {
            WriteError::Query(e) | WriteError::Db(DbError::Query(e)) => e.code(),
            _ => None,
        };
        match code.map(|c| c.code()) {
            // 22: data exception, 23: integrity constraint violation.
            Some(c) => c.starts_with("22") || c.starts_with("23"),
            None => false,
        }
    }
}

/// Writes batches through a pooled connection; owns the schema bootstrap.
pub struct PgWriter {
    pool: Pool,
    accounts: Arc<AccountCache>,
    stats: Arc<Stats>,
    ready: OnceCell<()>,
}

impl PgWriter {
    pub fn new(pool: Pool, accounts: Arc<AccountCache>, stats: Arc<Stats>) -> Self {
        PgWriter {
            pool,
            accounts,
            stats,
            ready: OnceCell::new(),
        }
    }

    /// Runs the migrations and loads the account cache, once per process.
    pub async fn ensure_ready(&self) -> Result<(), DbError> {
        self.ready
            .get_or_try_init(|| async {
                let applied = db::migrate(&self.pool).await?;
                if !applied.is_empty() {
                    tracing::info!(versions = ?applied, "applied migrations");
                }
                self.stats.migrated.store(true, Relaxed);
                let client = self.pool.get().await?;
                let n = self.accounts.reload(&**client).await?;
                tracing::info!(campaigns = n, "campaign cache loaded");
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// One attempt at writing `batch` in one transaction.
    pub async fn write(&self, batch: &Batch) -> Result<WriteSummary, WriteError> {
        self.ensure_ready().await?;
        let mut client = self.pool.get().await?;
        let accounts = self.accounts.resolve(&**client, &batch.campaigns()).await?;
        let tx = client.transaction().await?;
        let (written, unknown) = copy_events(&tx, batch, &accounts).await?;
        upsert_aggregates(&tx, batch, &accounts).await?;
        if unknown > 0 {
            copy_rejected(
                &tx,
                batch,
                |row_campaign| !accounts.contains_key(row_campaign),
                "unknown_campaign",
            )
            .await?;
        }
        tx.commit().await?;
        Ok(WriteSummary {
            written,
            unknown_campaign: unknown,
            dead_lettered: 0,
        })
    }

    /// Stores every event of `batch` in `rejected_events` with `reason`.
    async fn dead_letter(&self, batch: &Batch, reason: &str) -> Result<WriteSummary, WriteError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let n = copy_rejected(&tx, batch, |_| true, reason).await?;
        tx.commit().await?;
        Ok(WriteSummary {
            dead_lettered: n,
            ..WriteSummary::default()
        })
    }

    /// Writes `batch` until it commits, or until `abort` turns true.
    /// Returns `None` if aborted with the batch unwritten.
    pub async fn write_with_retry(
        &self,
        batch: &Batch,
        abort: &mut watch::Receiver<bool>,
    ) -> Option<WriteSummary> {
        let mut attempt: u32 = 0;
        let mut permanent_in_a_row: u32 = 0;
        loop {
            if *abort.borrow() {
                return None;
            }
            let started = Instant::now();
            let result = tokio::select! {
                r = self.write(batch) => r,
                _ = abort.wait_for(|a| *a) => return None,
            };
            match result {
                Ok(summary) => {
                    self.stats.db_up.store(true, Relaxed);
                    self.record_commit(batch, summary, started.elapsed());
                    return Some(summary);
                }
                Err(e) => {
                    attempt += 1;
                    self.stats.write_failures.fetch_add(1, Relaxed);
                    permanent_in_a_row = if e.is_permanent() {
                        permanent_in_a_row + 1
                    } else {
                        0
                    };
                    if !e.is_permanent() {
                        self.stats.db_up.store(false, Relaxed);
                    }
                    tracing::warn!(batch = %batch.id, events = batch.len(), attempt, error = %e, "batch write failed");
                    if permanent_in_a_row >= PERMANENT_ATTEMPTS {
                        let reason = format!("write_failed: {e}");
                        match self.dead_letter(batch, &reason).await {
                            Ok(summary) => {
                                tracing::error!(batch = %batch.id, events = batch.len(), error = %e, "batch refused by the database; moved to rejected_events");
                                self.record_commit(batch, summary, started.elapsed());
                                return Some(summary);
                            }
                            Err(e2) => {
                                tracing::warn!(batch = %batch.id, error = %e2, "dead-lettering failed")
                            }
                        }
                    }
                    let delay = backoff(attempt, batch.id);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abort.wait_for(|a| *a) => return None,
                    }
                }
            }
        }
    }

    fn record_commit(&self, batch: &Batch, s: WriteSummary, took: Duration) {
        let st = &self.stats;
        st.written.fetch_add(s.written, Relaxed);
        st.rejected_unknown_campaign
            .fetch_add(s.unknown_campaign, Relaxed);
        st.dead_lettered.fetch_add(s.dead_lettered, Relaxed);
        st.flushes.fetch_add(1, Relaxed);
        st.in_writer.fetch_sub(batch.len() as u64, Relaxed);
        st.last_flush_duration_us
            .store(took.as_micros() as u64, Relaxed);
        st.last_flush_events.store(batch.len() as u64, Relaxed);
        st.last_flush_age_ms.store(
            (unix_ms_now() - batch.oldest_received_ms).max(0) as u64,
            Relaxed,
        );
        tracing::info!(
            batch = %batch.id,
            events = s.written,
            unknown_campaign = s.unknown_campaign,
            dead_lettered = s.dead_lettered,
            aggregates = batch.aggregates.len(),
            took_ms = took.as_millis() as u64,
            "flushed"
        );
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn accounts(&self) -> &AccountCache {
        &self.accounts
    }
}

fn backoff(attempt: u32, id: Uuid) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1u32 << attempt.min(16).saturating_sub(1));
    let base = exp.min(BACKOFF_CAP);
    // Up to 20% jitter, derived from the batch id so replicas spread out.
    let jitter = (id.as_u128() as u64 ^ u64::from(attempt)) % 200;
    (base + base.mul_f64(jitter as f64 / 1000.0)).min(BACKOFF_CAP)
}

pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn copy_events(
    tx: &Transaction<'_>,
    batch: &Batch,
    accounts: &HashMap<Uuid, Uuid>,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(COPY_EVENTS).await?;
    let sink = tx.copy_in::<_, bytes::Bytes>(&stmt).await?;
    futures_util::pin_mut!(sink);
    let mut enc = CopyEncoder::new(COPY_CHUNK_BYTES + 8192);
    let (mut written, mut unknown) = (0u64, 0u64);
    for (part, row) in batch.rows() {
        let Some(account) = accounts.get(&row.campaign_id) else {
            unknown += 1;
            continue;
        };
        enc.row(8);
        enc.text(row.kind.as_str());
        enc.uuid(&row.ad_unit_id);
        enc.uuid(&row.campaign_id);
        enc.uuid(&row.creative_id);
        enc.uuid(account);
        enc.text(part.page_url(row));
        enc.opt_text(part.user_agent(row));
        enc.timestamp_ms(row.timestamp_ms);
        written += 1;
        if enc.len() >= COPY_CHUNK_BYTES {
            sink.send(enc.take()).await?;
        }
    }
    sink.send(enc.finish()).await?;
    sink.finish().await?;
    Ok((written, unknown))
}

async fn copy_rejected(
    tx: &Transaction<'_>,
    batch: &Batch,
    include: impl Fn(&Uuid) -> bool,
    reason: &str,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(COPY_REJECTED).await?;
    let sink = tx.copy_in::<_, bytes::Bytes>(&stmt).await?;
    futures_util::pin_mut!(sink);
    let mut enc = CopyEncoder::new(64 * 1024);
    let mut n = 0u64;
    for (part, row) in batch.rows().filter(|(_, r)| include(&r.campaign_id)) {
        enc.row(10);
        enc.text(reason);
        enc.text(row.kind.as_str());
        enc.uuid(&row.ad_unit_id);
        enc.uuid(&row.campaign_id);
        enc.uuid(&row.creative_id);
        enc.text(part.page_url(row));
        enc.opt_text(part.user_agent(row));
        enc.timestamp_ms(row.timestamp_ms);
        enc.timestamp_ms(row.received_ms);
        enc.uuid(&batch.id);
        n += 1;
        if enc.len() >= COPY_CHUNK_BYTES {
            sink.send(enc.take()).await?;
        }
    }
    sink.send(enc.finish()).await?;
    sink.finish().await?;
    Ok(n)
}

async fn upsert_aggregates(
    tx: &Transaction<'_>,
    batch: &Batch,
    accounts: &HashMap<Uuid, Uuid>,
) -> Result<(), tokio_postgres::Error> {
    // (account, ad unit, campaign, hour) sorted: the same lock order in every writer.
    let mut keys: Vec<(Uuid, Uuid, Uuid, i64, i32, i32)> = batch
        .aggregates
        .iter()
        .filter_map(|(k, c)| {
            let account = accounts.get(&k.campaign_id)?;
            Some((
                *account,
                k.ad_unit_id,
                k.campaign_id,
                k.hour,
                i32::try_from(c.impressions).unwrap_or(i32::MAX),
                i32::try_from(c.clicks).unwrap_or(i32::MAX),
            ))
        })
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort_unstable_by_key(|k| (k.0, k.1, k.2, k.3));
    debug_assert!(keys.iter().all(|k| k.3.checked_mul(HOUR_MS).is_some()));
    let a: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let u: Vec<Uuid> = keys.iter().map(|k| k.1).collect();
    let c: Vec<Uuid> = keys.iter().map(|k| k.2).collect();
    let h: Vec<i64> = keys.iter().map(|k| k.3).collect();
    let i: Vec<i32> = keys.iter().map(|k| k.4).collect();
    let k: Vec<i32> = keys.iter().map(|k| k.5).collect();
    let stmt = tx.prepare_cached(UPSERT_AGGREGATES).await?;
    tx.execute(&stmt, &[&a, &u, &c, &h, &i, &k]).await?;
    Ok(())
}

/// What the writer loop left behind when it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterReport {
    /// Events committed (to `events`, `rejected_events` or dead-lettered).
    pub stored: u64,
    /// Events still unwritten when the loop was aborted.
    pub unwritten: u64,
}

/// Receives batches and writes up to `concurrency` of them at once, each
/// retried until it commits or `abort` turns true. Ends when the channel is
/// closed and every batch is done.
pub async fn run(
    writer: Arc<PgWriter>,
    mut batches: mpsc::Receiver<Batch>,
    concurrency: usize,
    abort: watch::Receiver<bool>,
) -> WriterReport {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks: JoinSet<(u64, u64)> = JoinSet::new();
    let mut report = WriterReport::default();
    let absorb = |r: Result<(u64, u64), tokio::task::JoinError>, report: &mut WriterReport| match r
    {
        Ok((stored, unwritten)) => {
            report.stored += stored;
            report.unwritten += unwritten;
        }
        Err(e) => tracing::error!(error = %e, "writer task failed"),
    };
    while let Some(batch) = batches.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let writer = writer.clone();
        let mut abort = abort.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let n = batch.len() as u64;
            match writer.write_with_retry(&batch, &mut abort).await {
                Some(_) => (n, 0),
                None => (0, n),
            }
        });
        while let Some(r) = tasks.try_join_next() {
            absorb(r, &mut report);
        }
    }
    while let Some(r) = tasks.join_next().await {
        absorb(r, &mut report);
    }
    report
}

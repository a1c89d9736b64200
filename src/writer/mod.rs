//! `PgWriter`: lands batches in PostgreSQL, one transaction per batch.
//!
//! For each batch: resolve campaign → account (one query for cache misses),
//! then in a single transaction: claim the batch id in the `ingest_batches`
//! ledger (if it is already there the batch committed before, and nothing is
//! changed), binary-COPY the rows into `events`, upsert the merged aggregates
//! into `metrics_hourly` with one set-based statement whose input is sorted by
//! the conflict key (so replicas writing at once lock rows in the same order
//! and cannot deadlock), and COPY the events of unknown campaigns into
//! `rejected_events`. Rows, aggregates and the ledger entry commit together or
//! not at all.
//!
//! [`deliver`] runs live batches (retry, then the spool); [`replay`] feeds the
//! spool back. This side never reaches back into request handling: it sees
//! only `Batch`.

pub mod deliver;
pub mod replay;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Pool, Transaction};
use futures_util::SinkExt;
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::accounts::AccountCache;
use crate::batch::Batch;
use crate::db::{self, DbError};
use crate::pgcopy::CopyEncoder;
use crate::shard::{RawEvent, ShardData, HOUR_MS};
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
const CLAIM_BATCH: &str =
    "INSERT INTO ingest_batches (id, events) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";

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
    /// The ledger already had this batch: it committed before; nothing changed.
    pub duplicate: bool,
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
    #[error("write did not finish within {0:?}")]
    Timeout(Duration),
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
        if !claim(&tx, batch).await? {
            tx.rollback().await?;
            return Ok(WriteSummary {
                duplicate: true,
                ..WriteSummary::default()
            });
        }
        let (written, unknown) = copy_events(&tx, batch, &accounts).await?;
        upsert_aggregates(&tx, batch, &accounts).await?;
        if unknown > 0 {
            copy_rejected(
                &tx,
                batch,
                |c| !accounts.contains_key(c),
                "unknown_campaign",
            )
            .await?;
        }
        tx.commit().await?;
        Ok(WriteSummary {
            written,
            unknown_campaign: unknown,
            ..WriteSummary::default()
        })
    }

    /// Stores every event of `batch` in `rejected_events` with `reason`
    /// (claiming the batch id, so a replay of it is a no-op too).
    async fn dead_letter(&self, batch: &Batch, reason: &str) -> Result<WriteSummary, WriteError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if !claim(&tx, batch).await? {
            tx.rollback().await?;
            return Ok(WriteSummary {
                duplicate: true,
                ..WriteSummary::default()
            });
        }
        let n = copy_rejected(&tx, batch, |_| true, reason).await?;
        tx.commit().await?;
        Ok(WriteSummary {
            dead_lettered: n,
            ..WriteSummary::default()
        })
    }

    /// One bounded attempt: `write` within `timeout`. Counts permanent errors
    /// in `permanent_streak`; at [`PERMANENT_ATTEMPTS`] in a row the batch is
    /// dead-lettered instead. Updates the database-up flag and failure count.
    pub async fn attempt(
        &self,
        batch: &Batch,
        timeout: Duration,
        permanent_streak: &mut u32,
    ) -> Result<WriteSummary, WriteError> {
        let result = match tokio::time::timeout(timeout, self.write(batch)).await {
            Ok(r) => r,
            Err(_) => Err(WriteError::Timeout(timeout)),
        };
        let e = match result {
            Ok(s) => {
                self.stats.db_up.store(true, Relaxed);
                return Ok(s);
            }
            Err(e) => e,
        };
        self.stats.write_failures.fetch_add(1, Relaxed);
        if !e.is_permanent() {
            *permanent_streak = 0;
            if !matches!(e, WriteError::Timeout(_)) {
                self.stats.db_up.store(false, Relaxed);
            }
            return Err(e);
        }
        *permanent_streak += 1;
        if *permanent_streak < PERMANENT_ATTEMPTS {
            return Err(e);
        }
        let reason = format!("write_failed: {e}");
        let summary = self.dead_letter(batch, &reason).await?;
        tracing::error!(batch = %batch.id, events = batch.len(), error = %e, "batch refused by the database; moved to rejected_events");
        Ok(summary)
    }

    /// Counts a committed batch and logs one line for it.
    pub fn record_commit(&self, batch: &Batch, s: WriteSummary, took: Duration, replayed: bool) {
        let st = &self.stats;
        st.written.fetch_add(s.written, Relaxed);
        st.rejected_unknown_campaign
            .fetch_add(s.unknown_campaign, Relaxed);
        st.dead_lettered.fetch_add(s.dead_lettered, Relaxed);
        if s.duplicate {
            st.duplicate_batches.fetch_add(1, Relaxed);
        } else {
            let now = unix_ms_now();
            st.record_flush(
                took,
                batch.len() as u64,
                batch
                    .rows()
                    .map(|(_, r)| (now - r.received_ms).max(0) as u64),
            );
            st.flushes.fetch_add(1, Relaxed);
            st.last_flush_duration_us
                .store(took.as_micros() as u64, Relaxed);
            st.last_flush_events.store(batch.len() as u64, Relaxed);
            st.last_flush_age_ms.store(
                (unix_ms_now() - batch.oldest_received_ms).max(0) as u64,
                Relaxed,
            );
        }
        if replayed {
            st.replayed_events
                .fetch_add(s.written + s.unknown_campaign + s.dead_lettered, Relaxed);
        }
        tracing::info!(
            batch = %batch.id,
            events = s.written,
            unknown_campaign = s.unknown_campaign,
            dead_lettered = s.dead_lettered,
            duplicate = s.duplicate,
            replayed,
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

/// Claims `batch.id` in the ledger; false if it was already there.
async fn claim(tx: &Transaction<'_>, batch: &Batch) -> Result<bool, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(CLAIM_BATCH).await?;
    let events = i32::try_from(batch.len()).unwrap_or(i32::MAX);
    Ok(tx.execute(&stmt, &[&batch.id, &events]).await? == 1)
}

/// Delay before retry number `attempt` (1-based): 100 ms doubling, capped at 5 s, with jitter.
pub fn backoff(attempt: u32, id: Uuid) -> Duration {
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
        encode_event(&mut enc, part, row, account);
        written += 1;
        if enc.len() >= COPY_CHUNK_BYTES {
            sink.send(enc.take()).await?;
        }
    }
    sink.send(enc.finish()).await?;
    sink.finish().await?;
    Ok((written, unknown))
}

/// Encodes one `events` row (the column order of `COPY_EVENTS`).
pub fn encode_event(enc: &mut CopyEncoder, part: &ShardData, row: &RawEvent, account: &Uuid) {
    enc.row(8);
    enc.text(row.kind.as_str());
    enc.uuid(&row.ad_unit_id);
    enc.uuid(&row.campaign_id);
    enc.uuid(&row.creative_id);
    enc.uuid(account);
    enc.text(part.page_url(row));
    enc.opt_text(part.user_agent(row));
    enc.timestamp_ms(row.timestamp_ms);
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

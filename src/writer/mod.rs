//! `PgWriter`: the PostgreSQL [`Sink`], one transaction per batch.
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
//! [`retry`] is the one path batches take to get here, used by [`live`]
//! delivery (with the spool as fallback) and by [`replay`] of the spool.
//! This side sees only [`Batch`]; it never reaches back into request handling.

pub mod live;
pub mod pace;
pub mod quarantine;
pub mod replay;
pub mod retry;
pub mod sink;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Pool, Transaction};
use futures_util::SinkExt;
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::accounts::AccountCache;
use crate::batch::{AggKey, Batch, Counts, Row};
use crate::db::{self, Conn, DbError};
use crate::pgcopy::CopyEncoder;
use crate::stats::Stats;
use pace::{CopyPace, Pacing};
pub use sink::{ErrorClass, Sink, WriteError, WriteSummary};

const COPY_EVENTS: &str =
    "COPY events (event_type, ad_unit_id, campaign_id, creative_id, account_id, \
     page_url, user_agent, timestamp, invalid_reason, event_id) FROM STDIN (FORMAT binary)";
const COPY_REJECTED: &str =
    "COPY rejected_events (reason, event_type, ad_unit_id, campaign_id, creative_id, \
     page_url, user_agent, timestamp, received_at, batch_id, invalid_reason, event_id) \
     FROM STDIN (FORMAT binary)";
/// Claims a batch's event ids (distinct, sorted: replicas claiming the same
/// ids lock them in the same order), when none of them was claimed before:
/// the common case, and a plain insert costs PostgreSQL about 40% less than
/// one with ON CONFLICT (speculative insertion). A unique violation means a
/// repeat is among them: the claim is rolled back to its savepoint and made
/// again with [`CLAIM_EVENT_IDS_SOME_OLD`].
const CLAIM_EVENT_IDS_ALL_NEW: &str = "INSERT INTO event_ids (event_id, digest) \
     SELECT i, d FROM unnest($1::uuid[], $2::int8[]) AS t(i, d) ORDER BY i";
/// The claim when some ids were claimed before: the ids returned are new;
/// the others were claimed before, and their rows are left out.
const CLAIM_EVENT_IDS_SOME_OLD: &str = "INSERT INTO event_ids (event_id, digest) \
     SELECT i, d FROM unnest($1::uuid[], $2::int8[]) AS t(i, d) ORDER BY i \
     ON CONFLICT (event_id) DO NOTHING RETURNING event_id";
const CLAIMED_DIGESTS: &str = "SELECT event_id, digest FROM event_ids WHERE event_id = ANY($1)";
const UPSERT_AGGREGATES: &str = "INSERT INTO metrics_hourly AS m \
       (account_id, ad_unit_id, campaign_id, hour_timestamp, impressions, clicks, \
        invalid_impressions, invalid_clicks) \
     SELECT a, u, c, to_timestamp(h * 3600) AT TIME ZONE 'UTC', i, k, ii, ik \
       FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int8[], $5::int4[], $6::int4[], \
                   $7::int4[], $8::int4[]) AS t(a, u, c, h, i, k, ii, ik) \
      ORDER BY a, u, c, h \
     ON CONFLICT (account_id, ad_unit_id, campaign_id, hour_timestamp) DO UPDATE \
        SET impressions = COALESCE(m.impressions, 0) + EXCLUDED.impressions, \
            clicks = COALESCE(m.clicks, 0) + EXCLUDED.clicks, \
            invalid_impressions = COALESCE(m.invalid_impressions, 0) + EXCLUDED.invalid_impressions, \
            invalid_clicks = COALESCE(m.invalid_clicks, 0) + EXCLUDED.invalid_clicks, \
            updated_at = now()";

const CLAIM_BATCH: &str =
    "INSERT INTO ingest_batches (id, events) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";
const LEDGER_SPLIT: &str = "SELECT split FROM ingest_batches WHERE id = $1";
const MARK_SPLIT: &str = "INSERT INTO ingest_batches (id, events, split) VALUES ($1, $2, true) \
     ON CONFLICT (id) DO NOTHING";

/// COPY data is streamed to the server in pieces of about this size.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Aggregate keys per upsert statement (about 2 ms of backend work each).
const UPSERT_CHUNK_KEYS: usize = 256;

/// Deadlines for the calls the writer makes besides batch transactions
/// (those are bounded by the retry policy).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Campaign lookups, cache reloads, the probe.
    pub query: Duration,
    /// The migrations at start.
    pub migration: Duration,
}

/// Writes batches through a pooled connection; owns the schema bootstrap.
pub struct PgWriter {
    pool: Pool,
    accounts: Arc<AccountCache>,
    stats: Arc<Stats>,
    deadlines: Deadlines,
    pacing: Pacing,
    ready: OnceCell<()>,
}

/// What the ledger says about a batch id.
enum Claim {
    /// Not seen before: claimed now, in this transaction.
    New,
    /// Committed before: nothing to do.
    Committed,
    /// Split before (poison isolation, or too many rows): deliver its halves.
    Split,
}

/// Returns the connection to the pool when the server answered (success or a
/// refused statement), closes it otherwise (lost, or stuck past a deadline).
fn settle<T>(conn: Conn, r: &Result<T, WriteError>) {
    match r {
        Ok(_) | Err(WriteError::Refused { .. }) => conn.release(),
        Err(_) => drop(conn),
    }
}

impl PgWriter {
    pub fn new(
        pool: Pool,
        accounts: Arc<AccountCache>,
        stats: Arc<Stats>,
        deadlines: Deadlines,
    ) -> Self {
        PgWriter {
            pool,
            accounts,
            stats,
            deadlines,
            pacing: Pacing::OFF,
            ready: OnceCell::new(),
        }
    }

    /// Spreads live batches' COPY over time ([`pace`]); off by default.
    pub fn with_pacing(mut self, pacing: Pacing) -> Self {
        self.pacing = pacing;
        self
    }

    /// Runs the migrations and loads the account cache, once per process;
    /// each step within its deadline.
    pub async fn ensure_ready(&self) -> Result<(), DbError> {
        self.ready
            .get_or_try_init(|| async {
                let applied = db::within(
                    self.deadlines.migration,
                    "migrations",
                    db::migrate(&self.pool),
                )
                .await?;
                if !applied.is_empty() {
                    tracing::info!(versions = ?applied, "applied migrations");
                }
                self.stats.migrated.store(true, Relaxed);
                let n = self.reload_accounts().await?;
                tracing::info!(campaigns = n, "campaign cache loaded");
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Reloads the whole campaign → account cache, within the query deadline.
    pub async fn reload_accounts(&self) -> Result<usize, DbError> {
        db::within(self.deadlines.query, "campaign cache reload", async {
            let conn = Conn::get(&self.pool).await?;
            let n = self.accounts.reload(&**conn).await?;
            conn.release();
            Ok(n)
        })
        .await
    }

    /// `SELECT 1` within the query deadline: is the database answering?
    pub async fn probe(&self) -> Result<(), DbError> {
        db::within(self.deadlines.query, "database probe", async {
            let conn = Conn::get(&self.pool).await?;
            conn.simple_query("SELECT 1").await?;
            conn.release();
            Ok(())
        })
        .await
    }

    /// One attempt at writing `batch` in one transaction.
    async fn write_batch(&self, batch: &Batch) -> Result<WriteSummary, WriteError> {
        self.ensure_ready().await?;
        let mut conn = Conn::get(&self.pool).await?;
        let accounts = db::within(self.deadlines.query, "campaign lookup", async {
            Ok(self.accounts.resolve(&**conn, &batch.campaigns()).await?)
        })
        .await;
        let age = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_millis(
                batch.oldest_received_ms().max(0) as u64
            ));
        let pace = CopyPace::new(self.pacing.budget(age), batch.len());
        let r = match accounts {
            Ok(accounts) => write_on(&mut conn, batch, &accounts, &pace).await,
            Err(e) => Err(e.into()),
        };
        settle(conn, &r);
        r
    }

    /// Stores every event of `batch` in `rejected_events` with `reason`
    /// (claiming the batch id, so a replay of it is a no-op too).
    async fn dead_letter_batch(
        &self,
        batch: &Batch,
        reason: &str,
    ) -> Result<WriteSummary, WriteError> {
        let mut conn = Conn::get(&self.pool).await?;
        let r = dead_letter_on(&mut conn, batch, reason).await;
        settle(conn, &r);
        r
    }

    /// Records in the ledger that `batch` is delivered as two halves.
    async fn mark_split_batch(&self, batch: &Batch) -> Result<(), WriteError> {
        let conn = Conn::get(&self.pool).await?;
        let events = i32::try_from(batch.len()).unwrap_or(i32::MAX);
        let r = conn
            .execute(MARK_SPLIT, &[&batch.id, &events])
            .await
            .map(|_| ())
            .map_err(WriteError::from);
        settle(conn, &r);
        r
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn accounts(&self) -> &AccountCache {
        &self.accounts
    }
}

/// What the ledger already knew, as a summary with nothing written.
fn seen_before(claim: Claim) -> WriteSummary {
    WriteSummary {
        duplicate: matches!(claim, Claim::Committed),
        split: matches!(claim, Claim::Split),
        ..WriteSummary::default()
    }
}

async fn write_on(
    conn: &mut Conn,
    batch: &Batch,
    accounts: &HashMap<Uuid, Uuid>,
    pace: &CopyPace,
) -> Result<WriteSummary, WriteError> {
    let tx = conn.transaction().await?;
    match claim(&tx, batch).await? {
        Claim::New => {}
        seen => {
            tx.rollback().await?;
            return Ok(seen_before(seen));
        }
    }
    let repeats = claim_event_ids(&tx, batch).await?;
    let (written, unknown) = copy_events(&tx, batch, &repeats.rows, accounts, pace).await?;
    upsert_aggregates(&tx, batch, &repeats.rows, accounts).await?;
    if unknown > 0 {
        copy_rejected(
            &tx,
            batch,
            &repeats.rows,
            |c| !accounts.contains_key(c),
            "unknown_campaign",
        )
        .await?;
    }
    tx.commit().await?;
    Ok(WriteSummary {
        written,
        unknown_campaign: unknown,
        repeated_event_ids: repeats.rows.len() as u64,
        conflicting_event_ids: repeats.conflicting,
        ..WriteSummary::default()
    })
}

async fn dead_letter_on(
    conn: &mut Conn,
    batch: &Batch,
    reason: &str,
) -> Result<WriteSummary, WriteError> {
    let tx = conn.transaction().await?;
    match claim(&tx, batch).await? {
        Claim::New => {}
        seen => {
            tx.rollback().await?;
            return Ok(seen_before(seen));
        }
    }
    let n = copy_rejected(&tx, batch, &[], |_| true, reason).await?;
    tx.commit().await?;
    Ok(WriteSummary {
        dead_lettered: n,
        ..WriteSummary::default()
    })
}

impl Sink for PgWriter {
    async fn write(&self, batch: &Batch) -> Result<WriteSummary, WriteError> {
        self.write_batch(batch).await
    }

    async fn dead_letter(&self, batch: &Batch, reason: &str) -> Result<WriteSummary, WriteError> {
        self.dead_letter_batch(batch, reason).await
    }

    async fn mark_split(&self, batch: &Batch) -> Result<(), WriteError> {
        self.mark_split_batch(batch).await
    }
}

/// Claims `batch.id` in the ledger, or says what the ledger already knows.
async fn claim(tx: &Transaction<'_>, batch: &Batch) -> Result<Claim, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(CLAIM_BATCH).await?;
    let events = i32::try_from(batch.len()).unwrap_or(i32::MAX);
    if tx.execute(&stmt, &[&batch.id, &events]).await? == 1 {
        return Ok(Claim::New);
    }
    let stmt = tx.prepare_cached(LEDGER_SPLIT).await?;
    let split: bool = tx.query_one(&stmt, &[&batch.id]).await?.get(0);
    Ok(if split {
        Claim::Split
    } else {
        Claim::Committed
    })
}

/// Now, in unix milliseconds.
pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Rows of a batch whose `event_id` was claimed before.
#[derive(Debug, Default)]
struct Repeats {
    /// Their positions in `Batch::rows` order, sorted.
    rows: Vec<usize>,
    /// How many of them carry a payload other than the first one's.
    conflicting: u64,
}

/// A stable 64-bit hash of what the client sent (kind, ad unit, campaign,
/// creative and page URL): the same in every replica and version, so a
/// repeat can be compared with a first sighting stored long ago. Two CRC32s
/// (hardware-accelerated, a few nanoseconds per event) with different
/// starting values; it only tells payloads apart, it guards nothing.
/// Server-side fields (receipt time, a timestamp the server filled in, the
/// User-Agent) are left out: a retry differs in those.
pub fn payload_digest(row: &Row<'_>) -> i64 {
    let crc = |init: u32| {
        let mut h = crc32fast::Hasher::new_with_initial(init);
        h.update(&[row.kind as u8]);
        h.update(row.ad_unit_id.as_bytes());
        h.update(row.campaign_id.as_bytes());
        h.update(row.creative_id.as_bytes());
        h.update(row.page_url.as_bytes());
        u64::from(h.finalize())
    };
    (crc(0) << 32 | crc(0x9e37_79b9)) as i64
}

/// Claims the batch's event ids in `event_ids`, in the batch's transaction:
/// the rows whose id was claimed before (by any replica, an earlier run, a
/// replay, or an earlier row of this batch) are the repeats to leave out.
async fn claim_event_ids(
    tx: &Transaction<'_>,
    batch: &Batch,
) -> Result<Repeats, tokio_postgres::Error> {
    // (id, position, digest), sorted: the first row of each id comes first.
    let mut with_id: Vec<(Uuid, usize, i64)> = batch
        .rows()
        .enumerate()
        .filter_map(|(i, r)| Some((r.event_id?, i, payload_digest(&r))))
        .collect();
    if with_id.is_empty() {
        return Ok(Repeats::default());
    }
    with_id.sort_unstable();
    let mut ids: Vec<Uuid> = Vec::with_capacity(with_id.len());
    let mut digests: Vec<i64> = Vec::with_capacity(with_id.len());
    for (id, _, digest) in &with_id {
        if ids.last() != Some(id) {
            ids.push(*id);
            digests.push(*digest);
        }
    }
    tx.batch_execute("SAVEPOINT claim_event_ids").await?;
    let stmt = tx.prepare_cached(CLAIM_EVENT_IDS_ALL_NEW).await?;
    // `None`: every id is new (the common case: no set to build).
    let new: Option<HashSet<Uuid>> = match tx.execute(&stmt, &[&ids, &digests]).await {
        Ok(_) => {
            tx.batch_execute("RELEASE SAVEPOINT claim_event_ids")
                .await?;
            if ids.len() == with_id.len() {
                return Ok(Repeats::default());
            }
            None
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT claim_event_ids")
                .await?;
            let stmt = tx.prepare_cached(CLAIM_EVENT_IDS_SOME_OLD).await?;
            Some(
                tx.query(&stmt, &[&ids, &digests])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            )
        }
        Err(e) => return Err(e),
    };
    let is_new = |id: &Uuid| new.as_ref().is_none_or(|n| n.contains(id));
    // The first sightings' digests of the ids claimed before this batch.
    let mut before: HashMap<Uuid, i64> = HashMap::new();
    if new.as_ref().is_some_and(|n| n.len() < ids.len()) {
        let old: Vec<Uuid> = ids.iter().filter(|i| !is_new(i)).copied().collect();
        let stmt = tx.prepare_cached(CLAIMED_DIGESTS).await?;
        for r in tx.query(&stmt, &[&old]).await? {
            before.insert(r.get(0), r.get(1));
        }
    }
    // An id claimed now is claimed by its first row in the batch; every other
    // row with a claimed id is a repeat, compared with the first sighting.
    let mut repeats = Repeats::default();
    let mut first: Option<(Uuid, i64)> = None;
    for (id, pos, digest) in &with_id {
        let original = match first {
            Some((f, d)) if f == *id => d,
            _ => {
                first = Some((*id, *digest));
                if is_new(id) {
                    continue;
                }
                // Claimed before: compare with the stored digest (if the row
                // was pruned meanwhile, with itself: no conflict).
                before.get(id).copied().unwrap_or(*digest)
            }
        };
        let original = before.get(id).copied().unwrap_or(original);
        repeats.rows.push(*pos);
        if original != *digest {
            repeats.conflicting += 1;
        }
    }
    repeats.rows.sort_unstable();
    Ok(repeats)
}

async fn copy_events(
    tx: &Transaction<'_>,
    batch: &Batch,
    skip: &[usize],
    accounts: &HashMap<Uuid, Uuid>,
    pace: &CopyPace,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(COPY_EVENTS).await?;
    let sink = tx.copy_in::<_, bytes::Bytes>(&stmt).await?;
    futures_util::pin_mut!(sink);
    let chunk = pace.chunk_bytes(COPY_CHUNK_BYTES);
    let mut enc = CopyEncoder::new(chunk + 8192);
    let (mut written, mut unknown) = (0u64, 0u64);
    for (i, row) in kept_rows(batch, skip).enumerate() {
        let Some(account) = accounts.get(&row.campaign_id) else {
            unknown += 1;
            continue;
        };
        encode_event(&mut enc, &row, account);
        written += 1;
        if enc.len() >= chunk {
            sink.send(enc.take()).await?;
            pace.wait(i + 1).await;
        }
    }
    sink.send(enc.finish()).await?;
    sink.finish().await?;
    Ok((written, unknown))
}

/// Encodes one `events` row (the column order of `COPY_EVENTS`).
pub fn encode_event(enc: &mut CopyEncoder, row: &Row<'_>, account: &Uuid) {
    enc.row(10);
    enc.text(row.kind.as_str());
    enc.uuid(&row.ad_unit_id);
    enc.uuid(&row.campaign_id);
    enc.uuid(&row.creative_id);
    enc.uuid(account);
    enc.text(row.page_url);
    enc.opt_text(row.user_agent);
    enc.timestamp_ms(row.timestamp_ms);
    enc.opt_text(row.invalid.map(|r| r.as_str()));
    enc.opt_uuid(row.event_id.as_ref());
}

/// The rows of `batch` whose positions are not in `skip` (sorted).
fn kept_rows<'b>(batch: &'b Batch, skip: &'b [usize]) -> impl Iterator<Item = Row<'b>> + 'b {
    let mut skip = skip.iter().copied().peekable();
    batch
        .rows()
        .enumerate()
        .filter(move |(i, _)| skip.next_if_eq(i).is_none())
        .map(|(_, r)| r)
}

async fn copy_rejected(
    tx: &Transaction<'_>,
    batch: &Batch,
    skip: &[usize],
    include: impl Fn(&Uuid) -> bool,
    reason: &str,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(COPY_REJECTED).await?;
    let sink = tx.copy_in::<_, bytes::Bytes>(&stmt).await?;
    futures_util::pin_mut!(sink);
    let mut enc = CopyEncoder::new(64 * 1024);
    let mut n = 0u64;
    for row in kept_rows(batch, skip).filter(|r| include(&r.campaign_id)) {
        enc.row(12);
        enc.text(reason);
        enc.text(row.kind.as_str());
        enc.uuid(&row.ad_unit_id);
        enc.uuid(&row.campaign_id);
        enc.uuid(&row.creative_id);
        enc.text(row.page_url);
        enc.opt_text(row.user_agent);
        enc.timestamp_ms(row.timestamp_ms);
        enc.timestamp_ms(row.received_ms);
        enc.uuid(&batch.id);
        enc.opt_text(row.invalid.map(|r| r.as_str()));
        enc.opt_uuid(row.event_id.as_ref());
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
    skip: &[usize],
    accounts: &HashMap<Uuid, Uuid>,
) -> Result<(), tokio_postgres::Error> {
    // Repeats are rare: only then are the counters recomputed without them.
    let without;
    let aggregates: Box<dyn Iterator<Item = (&AggKey, &Counts)>> = if skip.is_empty() {
        Box::new(batch.aggregates())
    } else {
        without = batch.aggregates_without(skip);
        Box::new(without.iter())
    };
    // (account, ad unit, campaign, hour) sorted: the same lock order in every writer.
    let mut keys: Vec<(Uuid, &AggKey, &Counts)> = aggregates
        .filter_map(|(k, c)| Some((*accounts.get(&k.campaign_id)?, k, c)))
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort_unstable_by_key(|(a, k, _)| (*a, k.ad_unit_id, k.campaign_id, k.hour));
    let n = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
    let stmt = tx.prepare_cached(UPSERT_AGGREGATES).await?;
    // In pieces, in key order (the lock order holds across pieces): each
    // statement is a short burst of work for the backend, not one long one.
    for keys in keys.chunks(UPSERT_CHUNK_KEYS) {
        let a: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
        let u: Vec<Uuid> = keys.iter().map(|k| k.1.ad_unit_id).collect();
        let c: Vec<Uuid> = keys.iter().map(|k| k.1.campaign_id).collect();
        let h: Vec<i64> = keys.iter().map(|k| k.1.hour).collect();
        let i: Vec<i32> = keys.iter().map(|k| n(k.2.impressions)).collect();
        let k: Vec<i32> = keys.iter().map(|k| n(k.2.clicks)).collect();
        let ii: Vec<i32> = keys.iter().map(|k| n(k.2.invalid_impressions)).collect();
        let ik: Vec<i32> = keys.iter().map(|k| n(k.2.invalid_clicks)).collect();
        tx.execute(&stmt, &[&a, &u, &c, &h, &i, &k, &ii, &ik])
            .await?;
    }
    Ok(())
}

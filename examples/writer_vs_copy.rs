//! The writer against a raw binary COPY of the same rows, on the same database.
//!
//!   DATABASE_URL=postgres://... cargo run --release --example writer_vs_copy [EVENTS] [BATCH] [PAIRS]
//!
//! Builds EVENTS (default 400,000) events from the shared bench fixtures (by
//! default the wrk load's key mix: 500 campaigns x 2,000 ad units, so nearly
//! every event is its own aggregate key; PAIRS limits the distinct
//! (ad unit, campaign) pairs, as real traffic concentrates), then in batches
//! of BATCH (default 20,000):
//! 1. raw, plain: `COPY` of the rows alone into a scratch table shaped like
//!    `events` (same columns and primary key) but not partitioned;
//! 2. raw, into `events` itself (partitioned by day when the migrations made
//!    it so: the partition routing is the difference from 1);
//! 3. writer: `PgWriter::write`, i.e. ledger claim + COPY into `events` +
//!    sorted upsert into `metrics_hourly` + commit, exactly as the service does.
//!
//! Prints rows/s of each and the ratios. Uses the campaigns in the database
//! (load ../shared/bench/fixtures/fixtures.sql first). Truncates `events`,
//! `metrics_hourly` and `ingest_batches` of that database: use a scratch one.

use std::sync::Arc;
use std::time::Instant;

use futures_util::SinkExt;
use ingest::accounts::AccountCache;
use ingest::batch::{Batch, Buffer, EventKind, Row};
use ingest::config::Config;
use ingest::pgcopy::CopyEncoder;
use ingest::stats::Stats;
use ingest::writer::{encode_event, PgWriter, Sink};
use uuid::Uuid;

#[path = "../benches/fixture.rs"]
mod fixture;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(400_000);
    let per_batch: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let pairs: Option<u64> = args.next().map(|a| a.parse()).transpose()?;
    let url = std::env::var("DATABASE_URL")?;
    let config = Config::with_database_url(url);
    let pool = ingest::db::pool(&config)?;
    ingest::db::migrate(&pool).await?;
    let fx = fixture::Fixture::load();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;

    let batches: Vec<Batch> = (0..events.div_ceil(per_batch))
        .map(|b| {
            let mut d = Buffer::new();
            for i in b * per_batch..((b + 1) * per_batch).min(events) {
                let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let (au, ca) = match pairs {
                    Some(p) => {
                        let k = h % p;
                        (
                            k % fx.ad_units.len() as u64,
                            (k / 7) % fx.campaigns.len() as u64,
                        )
                    }
                    None => (
                        h % fx.ad_units.len() as u64,
                        (h >> 16) % fx.campaigns.len() as u64,
                    ),
                };
                d.push(&Row {
                    kind: if i % 10 == 0 {
                        EventKind::Click
                    } else {
                        EventKind::Impression
                    },
                    ad_unit_id: fx.ad_units[au as usize],
                    campaign_id: fx.campaigns[ca as usize].0,
                    creative_id: fx.creatives[((h >> 32) % fx.creatives.len() as u64) as usize],
                    timestamp_ms: now,
                    received_ms: now,
                    page_url: "https://news.example.com/articles/2030/summer-fix-fix-travel",
                    user_agent: Some("Mozilla/5.0 (X11; Linux x86_64) bench"),
                    invalid: None,
                    filtered: true,
                    event_id: None,
                })
                .map_err(|e| e.to_string())?;
            }
            Ok(Batch::from_parts(vec![d]))
        })
        .collect::<Result<_, String>>()?;

    let client = pool.get().await?;
    let partitioned: bool = client
        .query_one(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = 'events'::regclass",
            &[],
        )
        .await?
        .get(0);
    client
        .batch_execute(
            "TRUNCATE events, metrics_hourly, ingest_batches;
             DROP TABLE IF EXISTS copy_baseline;
             CREATE TABLE copy_baseline (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);",
        )
        .await?;
    let accounts = AccountCache::new();
    let map = accounts
        .resolve(
            &**client,
            &fx.campaigns.iter().map(|c| c.0).collect::<Vec<Uuid>>(),
        )
        .await?;
    if map.is_empty() {
        return Err(
            "no campaigns in the database: load ../shared/bench/fixtures/fixtures.sql".into(),
        );
    }

    // 1. raw COPY into a plain table, then 2. into `events` itself.
    let mut rates = Vec::new();
    let mut raw_rows = 0usize;
    for table in ["copy_baseline", "events"] {
        let t = Instant::now();
        raw_rows = 0;
        let mut c2 = pool.get().await?;
        for batch in &batches {
            let tx = c2.transaction().await?;
            let sink = tx
                .copy_in::<_, bytes::Bytes>(&format!(
                    "COPY {table} (event_type, ad_unit_id, campaign_id, creative_id, account_id, page_url, user_agent, timestamp) FROM STDIN (FORMAT binary)"
                ))
                .await?;
            futures_util::pin_mut!(sink);
            let mut enc = CopyEncoder::new(1 << 20);
            for row in batch.rows() {
                if let Some(a) = map.get(&row.campaign_id) {
                    encode_event(&mut enc, &row, a);
                    raw_rows += 1;
                }
                if enc.len() >= 1 << 20 {
                    sink.send(enc.take()).await?;
                }
            }
            sink.send(enc.finish()).await?;
            sink.finish().await?;
            tx.commit().await?;
        }
        rates.push(raw_rows as f64 / t.elapsed().as_secs_f64());
    }
    client.batch_execute("TRUNCATE events").await?;
    let (raw_rate, part_rate) = (rates[0], rates[1]);

    // 2. the writer, exactly as the service runs it.
    let writer = PgWriter::new(
        pool.clone(),
        Arc::new(AccountCache::new()),
        Arc::new(Stats::new()),
        ingest::writer::Deadlines {
            query: config.db_query_timeout,
            migration: config.db_migration_timeout,
        },
    );
    writer.ensure_ready().await?;
    let t = Instant::now();
    let mut written = 0u64;
    for batch in &batches {
        written += writer.write(batch).await?.written;
    }
    let w = t.elapsed();

    let w_rate = written as f64 / w.as_secs_f64();
    let keys: i64 = client
        .query_one("SELECT count(*) FROM metrics_hourly", &[])
        .await?
        .get(0);
    println!("raw binary COPY into a plain table: {raw_rows} rows, {raw_rate:.0} rows/s");
    println!(
        "raw binary COPY into events ({}): {part_rate:.0} rows/s = {:.2} x plain",
        if partitioned { "partitioned" } else { "plain" },
        part_rate / raw_rate
    );
    println!("writer (ledger + COPY + upsert): {written} rows in {:.2} s = {w_rate:.0} rows/s ({keys} aggregate keys)", w.as_secs_f64());
    println!("writer / raw COPY = {:.2}", w_rate / raw_rate);
    client.batch_execute("DROP TABLE copy_baseline").await?;
    Ok(())
}

//! **ingest**: ad impression and click events from tracking pixels into
//! PostgreSQL, as a drop-in replacement for the Node `analytics-ingest` service.
//!
//! Data flows one way:
//!
//! ```text
//!  request side                          │  write side (its own thread)
//!                                        │
//!  socket → server (accept, drain)       │
//!         → http (route, CORS, limits,   │
//!           refusals, operator views) ◄──┼── WriteSideStatus (spool, cache, pool: numbers only)
//!         → event (parse + validate)     │
//!         → shard (this thread's Buffer) │
//!              │ coordinator: swap every FLUSH_INTERVAL_MS, on size, at shutdown
//!              ▼                         │
//!         ═══ batch::Batch (the one hand-off type: Rows + hourly counters) ═══►
//!                                        │  writer::live ─┐   writer::replay ◄── spool
//!                                        │                ▼          ▼
//!                                        │     writer::retry (one retry path, RetryPolicy)
//!                                        │                ▼
//!                                        │     writer::PgWriter (a Sink): COPY + upsert + ledger
//!                                        │                ▼
//!                                        │            PostgreSQL  (or the spool while it is down)
//! ```
//!
//! | module | side | owns |
//! |---|---|---|
//! | [`config`] | shared | every setting, declared once, with the Node service's names and defaults |
//! | [`batch`] | shared | [`batch::Batch`], [`batch::Row`] (the event as stored), [`batch::Buffer`] |
//! | [`stats`] | shared | counters (one table), histograms, the [`stats::Snapshot`] the views render |
//! | [`telemetry`] | shared | log setup |
//! | [`server`] | request | the accept loop and connection draining |
//! | [`http`] | request | routing, CORS, the pixel GIF, [`http::Rejection`], `/health`, `/metrics`, probes |
//! | [`event`] | request | query parsing and validation → [`event::Event`] or a [`event::ParamError`] |
//! | [`ivt`] | request | invalid traffic: bots, prefetches, excluded addresses, duplicate clicks |
//! | [`journal`] | request | `ACK_MODE=durable`: the fsynced group-commit log events wait on before their 2xx |
//! | [`event_ids`] | request | recently accepted `event_id`s: repeats answered without recording |
//! | [`recent`] | shared | [`recent::Recent`]: keys seen within a window, in bounded memory |
//! | [`ipset`] | shared | address ranges (CIDRs) |
//! | [`shard`] | request | per-thread shards and the lock-free swap |
//! | [`admission`] | request | memory caps: per-shard budgets, load shedding |
//! | [`coordinator`] | request → batch | the flush loop: swap shards into a batch, hand it over |
//! | [`writer`] | write | [`writer::PgWriter`], the retry path, live delivery, spool replay |
//! | [`spool`] | write | the on-disk spool for batches the database would not take |
//! | [`accounts`] | write | campaign → account cache, batched miss lookups |
//! | [`pgcopy`] | write | binary COPY encoding |
//! | [`db`] | write | the connection pool and the embedded migrations |
//! | [`maintenance`] | write | `events` partitions (or pg_partman), retention, ledger pruning |
//! | [`tls`] | write | TLS to PostgreSQL with libpq's `sslmode` meanings |
//! | [`write_side`] | wiring | the write side's thread and runtime; its status handle |
//! | [`cli`] | commands | `migrate`, `quarantine list/retry` (and the next commands), one file each |
//!
//! The request side imports nothing from the write side, and the write side
//! sees only batches; `scripts/check-layers.sh` (run by the test script)
//! fails on a `use` that breaks this. [`serve`] wires the two together.

pub mod accounts;
pub mod admission;
pub mod batch;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod db;
pub mod event;
pub mod event_ids;
pub mod http;
pub mod ipset;
pub mod ivt;
pub mod journal;
pub mod maintenance;
pub mod pgcopy;
pub mod recent;
pub mod server;
pub mod shard;
pub mod spool;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod write_side;
pub mod writer;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::accounts::AccountCache;
use crate::config::Config;
use crate::event::Limits;
use crate::http::AppState;
use crate::shard::ShardSet;
use crate::spool::Spool;
use crate::stats::{Counter, RateLimitedLog, Stats};
use crate::write_side::{WriteSide, WriteSideHandle};
use crate::writer::live::DeliveryReport;
use crate::writer::PgWriter;

/// What shutdown achieved; logged by the binary and returned to tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Events accepted over the whole run.
    pub accepted: u64,
    /// Events of this run committed (to `events` or `rejected_events`) after shutdown began.
    pub written_at_shutdown: u64,
    /// Events spooled to disk after shutdown began (replayed at the next start).
    pub spooled_at_shutdown: u64,
    /// Events accepted and neither committed nor spooled (0 unless the
    /// deadline hit with the database down and the spool unusable).
    pub unwritten: u64,
    /// Event requests answered 503 because they came after the shards closed.
    pub refused_at_shutdown: u64,
    /// Client connections still open when the connection drain ended.
    pub connections_left: usize,
    /// Time from closing the listener to the end of the drain.
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot open the spool in {dir}: {source} (set SPOOL_DIR to a writable directory of this process's own)")]
    Spool {
        dir: String,
        source: spool::OpenError,
    },
    #[error("cannot start the writer thread: {0}")]
    WriteSide(std::io::Error),
    #[error("cannot listen on ADMIN_PORT ({0}): {1}")]
    Admin(String, std::io::Error),
    #[error("{0}")]
    Setting(String),
    #[error(
        "cannot open the journal in {dir}: {source} (ACK_MODE=durable needs SPOOL_DIR writable)"
    )]
    Journal { dir: String, source: std::io::Error },
}

/// The invalid-traffic checks from the settings; the files are read now, and
/// an unreadable or malformed one stops the start naming its variable.
fn classifier(config: &Config) -> Result<ivt::Classifier, ServeError> {
    let read =
        |var: &str, path: &Option<std::path::PathBuf>| -> Result<Option<String>, ServeError> {
            path.as_ref()
                .map(|p| {
                    std::fs::read_to_string(p).map_err(|e| {
                        ServeError::Setting(format!("{var}: cannot read {}: {e}", p.display()))
                    })
                })
                .transpose()
        };
    let bots = read("BOT_UA_FILE", &config.bot_ua_file)?;
    if let Some(text) = &bots {
        // Checked here: the bot list would otherwise panic on a bad pattern.
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        for (i, line) in lines.iter().enumerate() {
            regex::Regex::new(line).map_err(|e| {
                ServeError::Setting(format!(
                    "BOT_UA_FILE: pattern {} ({line:?}) is not a regular expression: {e}",
                    i + 1
                ))
            })?;
        }
        regex::Regex::new(&lines.join("|")).map_err(|e| {
            ServeError::Setting(format!(
                "BOT_UA_FILE: the patterns together are too large: {e}"
            ))
        })?;
    }
    let excluded = read("IP_EXCLUDE_FILE", &config.ip_exclude_file)?
        .map(|t| ipset::IpSet::parse(&t))
        .transpose()
        .map_err(|e| ServeError::Setting(format!("IP_EXCLUDE_FILE: {e}")))?
        .unwrap_or_default();
    let trusted = ipset::IpSet::parse(&config.trusted_proxies)
        .map_err(|e| ServeError::Setting(format!("TRUSTED_PROXIES: {e}")))?;
    let dedup = ivt::ClickDedup::new(
        config.click_dedup_window.as_millis() as i64,
        config.click_dedup_max,
    );
    Ok(ivt::Classifier::new(
        bots.as_deref(),
        excluded,
        trusted,
        dedup,
    ))
}

/// `ACK_MODE=durable`: opens the journal in `SPOOL_DIR/journal` (the spool's
/// lock makes it this process's own), starts its writer, and readies what an
/// earlier run left there for delivery (its files are deleted once that is
/// durable; `event_ids` makes it exactly-once).
fn open_journal(
    config: &Config,
    spool: &Spool,
    stats: &Arc<Stats>,
) -> Result<(Arc<journal::Journal>, Vec<batch::Batch>), ServeError> {
    let dir = spool.dir().join("journal");
    let failed = |e: std::io::Error| ServeError::Journal {
        dir: dir.display().to_string(),
        source: e,
    };
    let (journal, recovered) = journal::Journal::open(
        &dir,
        config.journal_flush,
        config.journal_flush_events,
        config.batch_max_rows,
        stats.clone(),
    )
    .map_err(failed)?;
    journal.start().map_err(failed)?;
    let journal::Recovered {
        mut batches,
        events,
        files,
        torn_bytes,
    } = recovered;
    if !files.is_empty() {
        tracing::warn!(
            events,
            segments = files.len(),
            torn_bytes,
            "journal from an earlier run found; its events will be delivered (each once, by event_id)"
        );
    }
    stats.add(Counter::JournalRecovered, events as u64);
    let remove = move || {
        for f in files {
            if let Err(e) = std::fs::remove_file(&f) {
                tracing::warn!(path = %f.display(), error = %e, "cannot delete a replayed journal segment");
            }
        }
    };
    if batches.is_empty() {
        remove();
    } else {
        let settle = batch::Settle::new(batches.len(), remove);
        for b in &mut batches {
            b.set_settle(settle.clone());
        }
    }
    Ok((journal, batches))
}

/// Runs the service on `listener` until `shutdown` resolves, then drains:
/// serve through `SHUTDOWN_GRACE_MS`, stop accepting, let in-flight requests
/// finish (half of `SHUTDOWN_TIMEOUT_MS` at most), close the shards and flush
/// them, and wait for the commits (or the spool) until the timeout. Every
/// wait is bounded.
///
/// The database does not have to be up at start: events are accepted at once
/// and spooled; migrations, the account cache, the writes and the replay of
/// the spool (including one left by an earlier run) proceed when it is.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<DrainReport, ServeError> {
    // The settings that name files are checked before anything starts.
    let classifier = classifier(&config)?;
    let pool = db::pool(&config)?;
    let spool = Spool::open(&config.spool_dir, config.spool_max_bytes).map_err(|source| {
        ServeError::Spool {
            dir: config.spool_dir.display().to_string(),
            source,
        }
    })?;
    let spool = Arc::new(spool);
    if !spool.is_empty() {
        tracing::warn!(dir = %spool.dir().display(), bytes = spool.bytes(), "spool from an earlier run found; it will be replayed");
    }
    let stats = Arc::new(Stats::new());
    let accounts = Arc::new(AccountCache::new());
    let shards = Arc::new(ShardSet::with_cap(
        config.flush_max_events,
        config.max_buffered_events,
    ));
    let deadlines = writer::Deadlines {
        query: config.db_query_timeout,
        migration: config.db_migration_timeout,
    };
    let writer = Arc::new(
        PgWriter::new(pool.clone(), accounts.clone(), stats.clone(), deadlines).with_pacing(
            writer::pace::Pacing {
                // Well inside the write deadline, whatever it is set to.
                max: config.write_pace_max.min(config.write_timeout / 4),
                fraction: 0.5,
                live_within: config.flush_interval * 2,
            },
        ),
    );
    let status = Arc::new(write_side::Status {
        spool: spool.clone(),
        accounts,
        pool,
    });
    let journal = match config.ack_mode {
        config::AckMode::Fast => None,
        config::AckMode::Durable => Some(open_journal(&config, &spool, &stats)?),
    };
    let durable = journal.as_ref().map(|(j, _)| j.clone());
    let write_side = WriteSide {
        config: config.clone(),
        shards: shards.clone(),
        stats: stats.clone(),
        spool: spool.clone(),
        writer,
        journal,
    }
    .start()
    .map_err(ServeError::WriteSide)?;

    let admin = match config.admin_port {
        0 => None,
        port => {
            let addr = format!("{}:{port}", config.host);
            Some(
                TcpListener::bind(&addr)
                    .await
                    .map_err(|e| ServeError::Admin(addr, e))?,
            )
        }
    };
    let state = Arc::new(AppState {
        shards: shards.clone(),
        stats: stats.clone(),
        write_side: status,
        origins: config.allowed_origins.clone(),
        limits: Limits {
            max_future_ms: config.max_future.as_millis() as i64,
            max_age_ms: config.max_age.as_millis() as i64,
        },
        body_read_timeout: config.body_read_timeout,
        shutting_down: AtomicBool::new(false),
        dropped_log: RateLimitedLog::new(Duration::from_secs(1)),
        views: http::ViewCache::new(config.view_cache),
        admin_port: admin.is_some(),
        classifier,
        ivt_filter: config.ivt_filter,
        batch_max_events: config.batch_max_events,
        journal: durable.clone(),
        event_ids: event_ids::EventIdFilter::new(
            config.dedup_window.as_millis() as i64,
            config.event_id_memory_max,
        ),
    });

    // Phase 1: serve until told to stop, then through the grace period
    // (readiness already 503, so load balancers move traffic away).
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let flag = state.clone();
    let grace = config.shutdown_grace;
    let stop_serving = async move {
        shutdown.await;
        flag.shutting_down.store(true, Relaxed);
        if !grace.is_zero() {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutdown: /readyz now 503; serving through the grace period"
            );
            tokio::time::sleep(grace).await;
        }
        let _ = closing_tx.send(true);
    };
    let limits = server::Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
    };
    // Connections get the first half of SHUTDOWN_TIMEOUT_MS to finish their
    // requests; the final flush and the writes get the rest.
    let drain_for = config.shutdown_timeout / 2;
    let admin_task = admin.map(|listener| {
        let (state, mut closing) = (state.clone(), closing_rx.clone());
        tokio::spawn(server::run(
            listener,
            state,
            http::Listener::Admin,
            async move {
                let _ = closing.wait_for(|c| *c).await;
            },
            drain_for,
            limits,
        ))
    });
    // Phase 2: stop accepting, let in-flight requests finish (bounded).
    let connections_left = server::run(
        listener,
        state.clone(),
        http::Listener::Main,
        stop_serving,
        drain_for,
        limits,
    )
    .await;
    let closed_at = Instant::now();
    let deadline = tokio::time::Instant::from_std(closed_at + config.shutdown_timeout);
    let stored_before = stored(&stats);
    let spooled_before = stats.get(Counter::SpooledEvents);
    tracing::info!(
        buffered = shards.pending(),
        in_writer = stats.in_writer.load(Relaxed),
        connections_left,
        "shutting down: closing the shards and flushing buffered events"
    );

    // Phase 3: the final flush closes every shard first, so a request still
    // running from here on gets 503, never a 2xx for an event nobody writes.
    // Replay stops (the spool keeps what is left); the writer has until the
    // deadline, then every batch still in memory goes to the spool.
    let WriteSideHandle {
        stop,
        abort,
        mut done,
    } = write_side;
    let _ = stop.send(true);
    let report = tokio::select! {
        r = &mut done => r.ok(),
        _ = tokio::time::sleep_until(deadline) => None,
    };
    let report = match report {
        Some(r) => r,
        None => {
            tracing::warn!("shutdown deadline reached: spooling what is left");
            let _ = abort.send(true);
            match tokio::time::timeout(ABORT_GRACE, done).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => {
                    let left = stats.in_writer.load(Relaxed);
                    tracing::error!(
                        unwritten = left,
                        "the write side did not finish after the deadline; giving up on what it holds"
                    );
                    DeliveryReport {
                        unwritten: left,
                        ..DeliveryReport::default()
                    }
                }
            }
        }
    };
    if let Some(t) = admin_task {
        t.abort();
    }
    if let Some(j) = &durable {
        // Everything was answered; what is still unsettled stays for the next start.
        j.close();
    }

    let drain = DrainReport {
        accepted: shards.recorded(),
        written_at_shutdown: stored(&stats).saturating_sub(stored_before),
        spooled_at_shutdown: stats.get(Counter::SpooledEvents) - spooled_before,
        unwritten: report.unwritten,
        refused_at_shutdown: stats.get(Counter::RefusedShuttingDown),
        connections_left,
        took: closed_at.elapsed(),
    };
    tracing::info!(
        accepted = drain.accepted,
        written_at_shutdown = drain.written_at_shutdown,
        spooled_at_shutdown = drain.spooled_at_shutdown,
        unwritten = drain.unwritten,
        refused_at_shutdown = drain.refused_at_shutdown,
        connections_left = drain.connections_left,
        spool_bytes = spool.bytes(),
        took_ms = drain.took.as_millis() as u64,
        "drain report"
    );
    Ok(drain)
}

/// After the shutdown deadline, the write side gets this long to spool what
/// it holds before the process gives up on it.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Events committed to either table since start (live or replayed).
fn stored(stats: &Stats) -> u64 {
    stats.get(Counter::Written)
        + stats.get(Counter::UnknownCampaign)
        + stats.get(Counter::DeadLettered)
}

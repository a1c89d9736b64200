//! The write side's own thread: coordinator, writer, spool replay and the
//! database housekeeping run on a dedicated OS thread with its own tokio
//! runtime, never on the request workers.
//!
//! Merging a batch, encoding it for COPY and sorting its aggregate keys take
//! milliseconds of CPU per flush. On a shared runtime that work would hold a
//! request worker for that long (tokio tasks yield only at `.await`), showing
//! up as client latency spikes at every flush. On its own thread the kernel
//! interleaves it with request handling at fine grain, and on a machine with
//! a spare core it simply runs there. The two sides meet only through the
//! shards (swap), the batch channel, atomics in `Stats`, and watch channels.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::accounts::AccountCache;
use crate::admission::Admission;
use crate::batch::Batch;
use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::db;
use crate::journal::Journal;
use crate::maintenance;
use crate::shard::ShardSet;
use crate::spool::Spool;
use crate::stats::{PoolStatus, Stats, WriteSideStatus, WriteStatus};
use crate::writer::live::{self, DeliveryReport, SpoolFallback};
use crate::writer::quarantine::SpoolQuarantine;
use crate::writer::retry::{Delivery, KeepRetrying, RetryPolicy};
use crate::writer::{replay, PgWriter};

/// How often the background probe checks the database for `/health`.
const DB_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Handles to steer the write side from the request side.
pub struct WriteSideHandle {
    /// Tells the coordinator to do its final flush and stop (closing the batch channel).
    pub stop: watch::Sender<bool>,
    /// Shutdown deadline: every batch still in memory goes to the spool.
    pub abort: watch::Sender<bool>,
    /// The delivery report once the write side has finished.
    pub done: oneshot::Receiver<DeliveryReport>,
}

/// Everything the write side owns.
pub struct WriteSide {
    pub config: Config,
    pub shards: Arc<ShardSet>,
    pub stats: Arc<Stats>,
    pub spool: Arc<Spool>,
    pub writer: Arc<PgWriter>,
    /// `ACK_MODE=durable`: the journal and what an earlier run left in it.
    pub journal: Option<(Arc<Journal>, Vec<Batch>)>,
}

impl WriteSide {
    /// Starts the write side on its own thread.
    pub fn start(self) -> std::io::Result<WriteSideHandle> {
        let (stop, stop_rx) = watch::channel(false);
        let (abort, abort_rx) = watch::channel(false);
        let (done_tx, done) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                let report = runtime.block_on(self.run(stop_rx, abort_rx));
                let _ = done_tx.send(report);
            })?;
        Ok(WriteSideHandle { stop, abort, done })
    }

    async fn run(
        mut self,
        stop: watch::Receiver<bool>,
        abort: watch::Receiver<bool>,
    ) -> DeliveryReport {
        let c = &self.config;
        let background = spawn_background(c, self.writer.clone(), self.stats.clone());
        let admission = Admission {
            shards: self.shards.clone(),
            stats: self.stats.clone(),
            max_events: c.max_buffered_events,
            max_bytes: c.max_buffered_bytes,
        };
        let admission_task = tokio::spawn(admission.run());
        // The write runtime's heartbeat: stops if anything blocks this thread.
        let beat_stats = self.stats.clone();
        let beat_task = tokio::spawn(async move {
            loop {
                beat_stats
                    .writer_beat_ms
                    .store(beat_stats.now_ms(), Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let policy = RetryPolicy::new(c.write_timeout, c.batch_max_rows);
        let quarantine = || SpoolQuarantine {
            dir: self.spool.dir().to_path_buf(),
        };
        let (stop_replay, replay_stop) = watch::channel(false);
        let replayer = Delivery::new(
            self.writer.clone(),
            KeepRetrying,
            quarantine(),
            policy,
            self.stats.clone(),
            true,
        );
        let max_replay_age =
            Duration::from_secs(u64::from(c.ledger_retention_days.saturating_sub(1)) * 86_400);
        let replay_task = tokio::spawn(replay::run(
            Arc::new(replayer),
            self.spool.clone(),
            max_replay_age,
            replay_stop,
        ));
        let (batch_tx, batch_rx) = mpsc::channel(c.writer_concurrency * 2);
        let delivery = Arc::new(Delivery::new(
            self.writer.clone(),
            SpoolFallback::new(self.spool.clone(), self.stats.clone()),
            quarantine(),
            policy,
            self.stats.clone(),
            false,
        ));
        let delivery_task =
            tokio::spawn(live::run(delivery, batch_rx, c.writer_concurrency, abort));
        let mut coordinator = Coordinator::new(
            self.shards.clone(),
            self.stats.clone(),
            batch_tx,
            c.flush_interval,
            c.batch_max_rows,
        );
        if let Some((journal, recovered)) = self.journal.take() {
            coordinator = coordinator.with_journal(journal, recovered);
        }
        let mut coordinator_stop = stop.clone();
        let coordinator_task = tokio::spawn(coordinator.run(stop));

        // Replay stops as soon as shutdown begins (the spool keeps what is left).
        let _ = coordinator_stop.wait_for(|s| *s).await;
        let _ = stop_replay.send(true);
        let report = delivery_task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "delivery task failed");
            DeliveryReport::default()
        });
        let _ = coordinator_task.await;
        let _ = replay_task.await;
        admission_task.abort();
        beat_task.abort();
        background.abort();
        self.writer.pool().close();
        report
    }
}

/// The write side as `/health`, `/metrics` and `/readyz` see it.
pub struct Status {
    pub spool: Arc<Spool>,
    pub accounts: Arc<AccountCache>,
    pub pool: deadpool_postgres::Pool,
}

impl WriteSideStatus for Status {
    fn status(&self) -> WriteStatus {
        let pool = self.pool.status();
        WriteStatus {
            spool_bytes: self.spool.bytes(),
            spool_max_bytes: self.spool.max_bytes(),
            spool_accepting: self.spool.accepting(),
            campaigns_cached: self.accounts.len() as u64,
            campaign_cache_loaded: self.accounts.loaded.load(Relaxed),
            campaign_cache_hits: self.accounts.hits.load(Relaxed),
            campaign_cache_misses: self.accounts.misses.load(Relaxed),
            pool: PoolStatus {
                size: pool.size as u64,
                idle: pool.available as u64,
                waiting: pool.waiting as u64,
                max: pool.max_size as u64,
            },
        }
    }
}

/// Aborts the background loops when dropped or when `abort` is called.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Schema bootstrap, database probe, idle-connection reaper, cache refresh.
fn spawn_background(config: &Config, writer: Arc<PgWriter>, stats: Arc<Stats>) -> Background {
    let mut tasks = Vec::new();

    // Migrations and the campaign cache, then the partitions the accepted
    // window needs, then maintenance every MAINTENANCE_INTERVAL_MS.
    let (w, st) = (writer.clone(), stats.clone());
    let policy = maintenance::Policy::from_config(config);
    let (every, deadline) = (config.maintenance_interval, config.db_migration_timeout);
    tasks.push(tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        loop {
            match w.ensure_ready().await {
                Ok(()) => {
                    let first = db::within(
                        deadline,
                        "partition maintenance",
                        maintenance::run_once(w.pool(), &policy, true),
                    )
                    .await;
                    maintenance::record(&st, first);
                    st.maintained.store(true, Relaxed);
                    maintenance::run(w.pool().clone(), policy, st, every, deadline).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not ready");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }));

    let w = writer.clone();
    let idle = config.pool_idle_timeout;
    tasks.push(tokio::spawn(async move {
        loop {
            let up = w.probe().await.is_ok();
            if stats.db_up.swap(up, Relaxed) != up {
                if up {
                    tracing::info!("database reachable");
                } else {
                    tracing::warn!("database unreachable; events are buffered");
                }
            }
            db::reap_idle(w.pool(), idle);
            tokio::time::sleep(DB_PROBE_INTERVAL).await;
        }
    }));

    let w = writer;
    let every = config.accounts_refresh;
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if w.ensure_ready().await.is_err() {
                continue;
            }
            if let Err(e) = w.reload_accounts().await {
                tracing::warn!(error = %e, "campaign cache refresh failed");
            }
        }
    }));

    Background(tasks)
}

//! Live delivery: every batch from the coordinator ends in exactly one of
//! three places: committed to PostgreSQL, fsynced into the spool, or (only
//! when the shutdown deadline hits while both are impossible) reported as
//! unwritten in the drain report.
//!
//! A batch that fails to write (database down, too slow, refusing) goes to the
//! spool at once, so memory is freed as soon as the data is safe on disk.
//! While the database is known to be down, batches skip the doomed attempt
//! and go straight to the spool. If the spool cannot take a batch (full or
//! failing), the batch stays in memory and is retried with backoff; the
//! memory cap then makes the request side shed load.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::{backoff, PgWriter};
use crate::batch::Batch;
use crate::spool::Spool;
use crate::stats::{RateLimitedLog, Stats};

/// Events by outcome, for the drain report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    pub committed: u64,
    pub spooled: u64,
    pub unwritten: u64,
}

enum Outcome {
    Committed,
    Spooled,
    Unwritten,
}

enum Spooling {
    Done,
    Refused(Batch),
    Lost,
}

/// What live delivery needs.
pub struct Delivery {
    pub writer: Arc<PgWriter>,
    pub spool: Arc<Spool>,
    pub stats: Arc<Stats>,
    pub write_timeout: Duration,
    spool_failures: RateLimitedLog,
    spooled_log: RateLimitedLog,
    failure_log: RateLimitedLog,
}

impl Delivery {
    pub fn new(
        writer: Arc<PgWriter>,
        spool: Arc<Spool>,
        stats: Arc<Stats>,
        write_timeout: Duration,
    ) -> Self {
        Delivery {
            writer,
            spool,
            stats,
            write_timeout,
            spool_failures: RateLimitedLog::new(Duration::from_secs(5)),
            spooled_log: RateLimitedLog::new(Duration::from_secs(5)),
            failure_log: RateLimitedLog::new(Duration::from_secs(5)),
        }
    }

    /// Appends to the spool on a blocking thread; gives the batch back on failure.
    async fn spool(&self, batch: Batch) -> Spooling {
        let spool = self.spool.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let r = spool.append(&batch);
            (batch, r)
        })
        .await;
        match joined {
            Ok((batch, Ok(_))) => {
                self.stats
                    .spooled_events
                    .fetch_add(batch.len() as u64, Relaxed);
                self.stats.spooled_batches.fetch_add(1, Relaxed);
                if self.spooled_log.allow() {
                    tracing::warn!(
                        batch = %batch.id,
                        events = batch.len(),
                        spooled_events_total = self.stats.spooled_events.load(Relaxed),
                        spool_bytes = self.spool.bytes(),
                        "batches going to the spool (logged every 5 s at most)"
                    );
                }
                Spooling::Done
            }
            Ok((batch, Err(e))) => {
                self.stats.spool_failures.fetch_add(1, Relaxed);
                if self.spool_failures.allow() {
                    tracing::error!(batch = %batch.id, events = batch.len(), error = %e, "cannot spool batch; keeping it in memory");
                }
                Spooling::Refused(batch)
            }
            Err(join) => {
                // Only if the blocking task panicked; the batch went with it.
                tracing::error!(error = %join, "spool task failed; batch lost");
                Spooling::Lost
            }
        }
    }

    async fn deliver(&self, mut batch: Batch, abort: &mut watch::Receiver<bool>) -> Outcome {
        let mut attempt: u32 = 0;
        let mut streak: u32 = 0;
        loop {
            let aborted = *abort.borrow();
            let db_down = !self.stats.db_up.load(Relaxed);
            if aborted || (attempt == 0 && db_down) {
                match self.spool(batch).await {
                    Spooling::Done => return Outcome::Spooled,
                    Spooling::Lost => return Outcome::Unwritten,
                    Spooling::Refused(b) if aborted => {
                        tracing::error!(batch = %b.id, events = b.len(), "shutdown deadline: batch neither written nor spooled");
                        return Outcome::Unwritten;
                    }
                    Spooling::Refused(b) => batch = b,
                }
            }
            let started = Instant::now();
            let result = tokio::select! {
                r = self.writer.attempt(&batch, self.write_timeout, &mut streak) => Some(r),
                _ = abort.wait_for(|a| *a) => None,
            };
            attempt += 1;
            match result {
                None => continue, // deadline: spool it at the top of the loop
                Some(Ok(summary)) => {
                    self.writer
                        .record_commit(&batch, summary, started.elapsed(), false);
                    return Outcome::Committed;
                }
                Some(Err(e)) => {
                    if self.failure_log.allow() {
                        tracing::warn!(
                            batch = %batch.id,
                            events = batch.len(),
                            attempt,
                            failures_total = self.stats.write_failures.load(Relaxed),
                            error = %e,
                            "batch write failed (logged every 5 s at most)"
                        );
                    }
                    if !e.is_permanent() {
                        match self.spool(batch).await {
                            Spooling::Done => return Outcome::Spooled,
                            Spooling::Lost => return Outcome::Unwritten,
                            Spooling::Refused(b) => batch = b,
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt, batch.id)) => {}
                _ = abort.wait_for(|a| *a) => {}
            }
        }
    }
}

/// Receives batches and delivers up to `concurrency` at once. Ends when the
/// channel is closed and every batch has an outcome; `abort` (the shutdown
/// deadline) turns every remaining write into a spool attempt.
pub async fn run(
    delivery: Arc<Delivery>,
    mut batches: mpsc::Receiver<Batch>,
    concurrency: usize,
    abort: watch::Receiver<bool>,
) -> DeliveryReport {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks: JoinSet<(Outcome, u64)> = JoinSet::new();
    let mut report = DeliveryReport::default();
    let absorb = |r: Result<(Outcome, u64), tokio::task::JoinError>,
                  report: &mut DeliveryReport| match r {
        Ok((Outcome::Committed, n)) => report.committed += n,
        Ok((Outcome::Spooled, n)) => report.spooled += n,
        Ok((Outcome::Unwritten, n)) => report.unwritten += n,
        Err(e) => tracing::error!(error = %e, "delivery task failed"),
    };
    while let Some(batch) = batches.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let d = delivery.clone();
        let mut abort = abort.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let (n, bytes) = (batch.len() as u64, batch.counted_bytes());
            let outcome = d.deliver(batch, &mut abort).await;
            d.stats.in_writer.fetch_sub(n, Relaxed);
            d.stats.in_writer_bytes.fetch_sub(bytes, Relaxed);
            (outcome, n)
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

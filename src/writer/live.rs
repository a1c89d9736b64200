//! Live delivery: every batch from the coordinator ends in exactly one of
//! three places: committed to PostgreSQL, fsynced into the spool, or (only
//! when the shutdown deadline hits while both are impossible) reported as
//! unwritten in the drain report.
//!
//! Each batch goes through the one retry path ([`super::retry`]) with the
//! spool as its fallback: a batch that fails to write goes to the spool at
//! once, so memory is freed as soon as the data is safe on disk. If the spool
//! cannot take it (full or failing), the batch stays in memory and is retried
//! with backoff; the memory cap then makes the request side shed load. A
//! batch that finds every writer busy for [`QUEUE_WAIT`] (writes hanging on a
//! frozen database) goes to the spool too, instead of waiting in memory.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::quarantine::SpoolQuarantine;
use super::retry::{Delivery, Fallback};
use super::PgWriter;
use crate::batch::Batch;
use crate::spool::Spool;
use crate::stats::{Counter, RateLimitedLog, Stats};

/// A batch that finds every writer busy for this long goes to the spool.
pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Events by outcome, for the drain report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    pub committed: u64,
    pub spooled: u64,
    pub quarantined: u64,
    pub unwritten: u64,
}

/// The live path: PostgreSQL, with the spool as fallback and quarantine.
pub type LiveDelivery = Delivery<PgWriter, SpoolFallback, SpoolQuarantine>;

/// The spool as the live path's fallback: appends on a blocking thread.
pub struct SpoolFallback {
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    /// One append at a time: the others wait here as tasks, not as blocked
    /// threads (a slow disk would otherwise pile up the blocking pool).
    turn: Semaphore,
    spooled_log: RateLimitedLog,
    failure_log: RateLimitedLog,
}

impl SpoolFallback {
    pub fn new(spool: Arc<Spool>, stats: Arc<Stats>) -> Self {
        SpoolFallback {
            spool,
            stats,
            turn: Semaphore::new(1),
            spooled_log: RateLimitedLog::new(Duration::from_secs(5)),
            failure_log: RateLimitedLog::new(Duration::from_secs(5)),
        }
    }
}

impl Fallback for SpoolFallback {
    async fn hand_off(&self, batch: Batch) -> Result<(), Batch> {
        let Ok(_turn) = self.turn.acquire().await else {
            return Err(batch);
        };
        // Shared with the blocking task, so the batch comes back whatever
        // happens there (even a panic, which drops the task's reference).
        let batch = Arc::new(batch);
        let (spool, shared) = (self.spool.clone(), batch.clone());
        let appended = tokio::task::spawn_blocking(move || spool.append(&shared))
            .await
            .unwrap_or_else(|join| {
                Err(crate::spool::SpoolError::Io(std::io::Error::other(
                    join.to_string(),
                )))
            });
        let batch = match Arc::try_unwrap(batch) {
            Ok(b) => b,
            // The task has ended, so its reference is gone; were it not,
            // the append's result still stands.
            Err(still_shared) => {
                tracing::error!(batch = %still_shared.id, "spool task kept its batch");
                return appended
                    .map(|_| ())
                    .map_err(|_| Batch::from_parts(Vec::new()));
            }
        };
        match appended {
            Ok(_) => {
                self.stats.add(Counter::SpooledEvents, batch.len() as u64);
                self.stats.add(Counter::SpooledBatches, 1);
                if self.spooled_log.allow() {
                    tracing::warn!(
                        batch = %batch.id,
                        events = batch.len(),
                        spooled_events_total = self.stats.get(Counter::SpooledEvents),
                        spool_bytes = self.spool.bytes(),
                        "batches going to the spool (logged every 5 s at most)"
                    );
                }
                Ok(())
            }
            Err(e) => {
                self.stats.add(Counter::SpoolFailures, 1);
                if self.failure_log.allow() {
                    tracing::error!(batch = %batch.id, events = batch.len(), error = %e, "cannot spool batch; keeping it in memory");
                }
                Err(batch)
            }
        }
    }
}

/// Receives batches and delivers up to `concurrency` at once. Ends when the
/// channel is closed and every batch has an outcome; `abort` (the shutdown
/// deadline) turns every remaining write into a spool attempt.
pub async fn run(
    delivery: Arc<LiveDelivery>,
    mut batches: mpsc::Receiver<Batch>,
    concurrency: usize,
    abort: watch::Receiver<bool>,
) -> DeliveryReport {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks: JoinSet<super::retry::Outcome> = JoinSet::new();
    let mut report = DeliveryReport::default();
    let absorb = |r: Result<super::retry::Outcome, tokio::task::JoinError>,
                  report: &mut DeliveryReport| match r {
        Ok(o) => {
            report.committed += o.committed;
            report.spooled += o.handed_off;
            report.quarantined += o.quarantined;
            report.unwritten += o.unwritten();
            for b in &o.returned {
                tracing::error!(batch = %b.id, events = b.len(), "shutdown deadline: batch neither written nor spooled");
            }
        }
        Err(e) => tracing::error!(error = %e, "delivery task failed"),
    };
    while let Some(batch) = batches.recv().await {
        // Every writer busy for a while (a database that hangs): the batch
        // goes to the spool rather than wait in memory; replay writes it
        // later, and the ledger makes it exactly-once either way.
        let permit = tokio::time::timeout(QUEUE_WAIT, permits.clone().acquire_owned()).await;
        let permit = match permit {
            Ok(Ok(p)) => Some(p),
            Ok(Err(_)) => break,
            Err(_) => None,
        };
        let (d, permits) = (delivery.clone(), permits.clone());
        let mut abort = abort.clone();
        let mut batch = batch;
        let settle = batch.take_settle();
        tasks.spawn(async move {
            let (n, bytes) = (batch.len() as u64, batch.counted_bytes());
            let outcome = match permit {
                Some(p) => {
                    let _permit = p;
                    d.deliver(batch, &mut abort).await
                }
                None => match d.fallback.hand_off(batch).await {
                    Ok(()) => super::retry::Outcome {
                        handed_off: n,
                        ..Default::default()
                    },
                    Err(batch) => {
                        let _permit = permits.acquire_owned().await;
                        d.deliver(batch, &mut abort).await
                    }
                },
            };
            d.stats.in_writer.fetch_sub(n, Relaxed);
            d.stats.in_writer_bytes.fetch_sub(bytes, Relaxed);
            if outcome.unwritten() == 0 {
                if let Some(s) = settle {
                    s.done();
                }
            }
            outcome
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

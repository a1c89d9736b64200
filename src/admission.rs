//! Admission control: keeps the events held in memory under their caps.
//!
//! Every few milliseconds it adds up what the shards hold and what the writer
//! holds (batches not yet committed or spooled), and hands each shard a budget:
//! its share of the room left under `MAX_BUFFERED_EVENTS` and
//! `MAX_BUFFERED_BYTES`. A shard's owner refuses events past its budget (one
//! relaxed load per event, no shared counter), so the caps hold however late
//! the next check runs; a late check only means refusing a little early.
//! Memory only reaches a cap when the spool cannot take batches either (full
//! or failing) or cannot keep up; while it can, failed batches leave memory as
//! soon as they are on disk.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use crate::shard::ShardSet;
use crate::stats::Stats;

/// How often the totals are checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(5);

/// The caps and the sources to add up.
pub struct Admission {
    pub shards: Arc<ShardSet>,
    pub stats: Arc<Stats>,
    pub max_events: u64,
    pub max_bytes: u64,
}

impl Admission {
    /// Re-computes every shard's budget once; logs when shedding starts or stops.
    pub fn check(&self) {
        let was = self.shards.is_shedding();
        let stats = &self.stats;
        let (events, bytes) = self.shards.budget(self.max_events, self.max_bytes, || {
            (
                stats.in_writer.load(SeqCst),
                stats.in_writer_bytes.load(SeqCst),
            )
        });
        match (was, self.shards.is_shedding()) {
            (false, true) => {
                tracing::warn!(
                    events,
                    bytes,
                    "memory cap reached: shedding load (POST 503, GET pixels dropped)"
                )
            }
            (true, false) => tracing::info!(
                events,
                bytes,
                "room under the memory cap again: accepting events"
            ),
            _ => {}
        }
    }

    /// Checks every [`CHECK_EVERY`] until the task is aborted.
    pub async fn run(self) {
        loop {
            self.check();
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}

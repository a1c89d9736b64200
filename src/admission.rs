//! Admission control: keeps the events held in memory under their caps.
//!
//! Every few milliseconds it adds up what the shards hold and what the writer
//! holds (batches not yet committed or spooled) and turns load shedding on at
//! either cap (`MAX_BUFFERED_EVENTS`, `MAX_BUFFERED_BYTES`), off again below
//! 90% of both. Memory only reaches a cap when the spool cannot take batches
//! either (full or failing) or cannot keep up; while it can, failed batches
//! leave memory as soon as they are on disk. Between two checks a burst can
//! overshoot a cap by at most one check interval of traffic.

use std::sync::atomic::Ordering::Relaxed;
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
    /// Events and bytes held in memory now.
    pub fn held(&self) -> (u64, u64) {
        let events = self.shards.pending() + self.stats.in_writer.load(Relaxed);
        let bytes = self.shards.pending_bytes() + self.stats.in_writer_bytes.load(Relaxed);
        (events, bytes)
    }

    /// Re-evaluates the shedding flag once.
    pub fn check(&self) {
        let (events, bytes) = self.held();
        let shedding = self.shards.is_shedding();
        let over = events >= self.max_events || bytes >= self.max_bytes;
        let well_under = events * 10 < self.max_events * 9 && bytes * 10 < self.max_bytes * 9;
        if !shedding && over {
            self.shards.set_shedding(true);
            tracing::warn!(
                events,
                bytes,
                "memory cap reached: shedding load (POST 503, GET pixels dropped)"
            );
        } else if shedding && well_under {
            self.shards.set_shedding(false);
            tracing::info!(
                events,
                bytes,
                "below the memory cap again: accepting events"
            );
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

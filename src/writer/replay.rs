//! Spool replay: feeds spooled batches back to the writer, oldest segment
//! first, whenever the database is reachable, alongside live traffic.
//!
//! A segment is deleted only after every batch read from it has committed
//! (or was found already committed in the ledger), so a crash mid-replay
//! replays part of a segment twice, which the ledger turns into no-ops.
//! Damaged records (torn tail, bad checksum) are reported and skipped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{backoff, PgWriter};
use crate::spool::{read_segment, Spool};
use crate::stats::Stats;

const IDLE_POLL: Duration = Duration::from_millis(250);

/// Replays until `stop` turns true. Batches not yet replayed stay on disk.
pub async fn run(
    writer: Arc<PgWriter>,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    write_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let failure_log = crate::stats::RateLimitedLog::new(Duration::from_secs(5));
    loop {
        if *stop.borrow() {
            return;
        }
        let next = if stats.db_up.load(Relaxed) {
            spool.oldest()
        } else {
            None
        };
        let Some(seg) = next else {
            tokio::select! {
                _ = tokio::time::sleep(IDLE_POLL) => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
        };
        let path = seg.path.clone();
        let contents = match tokio::task::spawn_blocking(move || read_segment(&path)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!(segment = %seg.path.display(), error = %e, "cannot read spool segment; will retry");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "spool read task failed");
                continue;
            }
        };
        if let Some(d) = &contents.damage {
            stats.spool_damaged_records.fetch_add(1, Relaxed);
            stats
                .spool_damaged_bytes
                .fetch_add(d.skipped_bytes, Relaxed);
            tracing::error!(
                segment = %seg.path.display(),
                offset = d.offset,
                skipped_bytes = d.skipped_bytes,
                reason = d.reason,
                good_batches = contents.batches.len(),
                "damaged spool record: skipped from here to the end of the segment"
            );
        }
        let events: u64 = contents.batches.iter().map(|b| b.len() as u64).sum();
        for batch in &contents.batches {
            let mut attempt = 0u32;
            let mut streak = 0u32;
            loop {
                if *stop.borrow() {
                    return;
                }
                let started = Instant::now();
                match writer.attempt(batch, write_timeout, &mut streak).await {
                    Ok(summary) => {
                        stats.replayed_batches.fetch_add(1, Relaxed);
                        writer.record_commit(batch, summary, started.elapsed(), true);
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        if failure_log.allow() {
                            tracing::warn!(batch = %batch.id, attempt, error = %e, "spool replay write failed (logged every 5 s at most)");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff(attempt, batch.id)) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                    }
                }
            }
        }
        if let Err(e) = spool.remove(&seg, events) {
            tracing::error!(segment = %seg.path.display(), error = %e, "cannot delete replayed segment");
        } else {
            tracing::info!(segment = %seg.path.display(), batches = contents.batches.len(), events, "spool segment replayed");
        }
    }
}

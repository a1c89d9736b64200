//! Spool replay: feeds spooled batches back through the one retry path,
//! oldest segment first, whenever the database is reachable, alongside live
//! traffic.
//!
//! A segment is deleted only after every batch read from it has committed
//! (or was found already committed in the ledger), so a crash mid-replay
//! replays part of a segment twice, which the ledger turns into no-ops.
//! Damaged records (torn tail, bad checksum) are reported and skipped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::retry::{Delivery, KeepRetrying, Outcome};
use super::PgWriter;
use crate::spool::{read_segment, Spool};
use crate::stats::Counter;

const IDLE_POLL: Duration = Duration::from_millis(250);

/// Replays until `stop` turns true. Batches not yet replayed stay on disk.
pub async fn run(
    delivery: Arc<Delivery<PgWriter, KeepRetrying>>,
    spool: Arc<Spool>,
    mut stop: watch::Receiver<bool>,
) {
    let stats = delivery.stats.clone();
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
            stats.add(Counter::SpoolDamagedRecords, 1);
            stats.add(Counter::SpoolDamagedBytes, d.skipped_bytes);
            tracing::error!(
                segment = %seg.path.display(),
                offset = d.offset,
                skipped_bytes = d.skipped_bytes,
                reason = d.reason,
                good_batches = contents.batches.len(),
                "damaged spool record: skipped from here to the end of the segment"
            );
        }
        let (batches, events) = (
            contents.batches.len(),
            contents.batches.iter().map(|b| b.len()).sum::<usize>(),
        );
        for batch in contents.batches {
            match delivery.deliver(batch, &mut stop).await {
                Outcome::Committed(_) => {}
                // No fallback: only a stop ends delivery without a commit.
                Outcome::HandedOff | Outcome::Stopped(_) => return,
            }
        }
        if let Err(e) = spool.remove(&seg) {
            tracing::error!(segment = %seg.path.display(), error = %e, "cannot delete replayed segment");
        } else {
            tracing::info!(segment = %seg.path.display(), batches, events, "spool segment replayed");
        }
    }
}

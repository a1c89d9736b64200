//! Spool replay: feeds spooled batches back through the one retry path,
//! oldest segment first, whenever the database is reachable, alongside live
//! traffic.
//!
//! A segment is deleted only after every batch read from it has committed
//! (or was found already committed in the ledger), so a crash mid-replay
//! replays part of a segment twice, which the ledger turns into no-ops.
//! Damaged records (torn tail, bad checksum) are reported, counted and
//! skipped, the records after them replayed, and the segment moved to the
//! quarantine instead of deleted. File system calls run on blocking threads.

/// Replay: PostgreSQL, no fallback (the batches are on disk), with quarantine.
pub type ReplayDelivery = Delivery<PgWriter, KeepRetrying, SpoolQuarantine>;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::quarantine::SpoolQuarantine;
use super::retry::{Delivery, KeepRetrying, Quarantine};
use super::PgWriter;
use crate::spool::{read_segment, Spool};
use crate::stats::Counter;

const IDLE_POLL: Duration = Duration::from_millis(250);

/// Replays until `stop` turns true. Batches not yet replayed stay on disk.
///
/// A batch whose oldest event was received more than `max_age` ago is
/// quarantined instead: the ledger entry that would make its replay a no-op
/// may have been pruned (`LEDGER_RETENTION_DAYS`), so replaying it could count
/// it twice. `max_age` is the ledger's retention minus a day.
pub async fn run(
    delivery: Arc<ReplayDelivery>,
    spool: Arc<Spool>,
    max_age: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let stats = delivery.stats.clone();
    loop {
        if super::retry::is_stopped(&stop) {
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
        for d in &contents.damage {
            stats.add(Counter::SpoolDamagedRecords, 1);
            stats.add(Counter::SpoolDamagedBytes, d.skipped_bytes);
            tracing::error!(
                segment = %seg.path.display(),
                offset = d.offset,
                skipped_bytes = d.skipped_bytes,
                reason = d.reason,
                "damaged spool record skipped; the records after it are replayed"
            );
        }
        let damage: Vec<String> = contents
            .damage
            .iter()
            .map(|d| {
                format!(
                    "{} at offset {} ({} bytes skipped)",
                    d.reason, d.offset, d.skipped_bytes
                )
            })
            .collect();
        let (batches, events) = (
            contents.batches.len(),
            contents.batches.iter().map(|b| b.len()).sum::<usize>(),
        );
        for batch in contents.batches {
            let age_ms = super::unix_ms_now() - batch.oldest_received_ms();
            if age_ms > max_age.as_millis() as i64 {
                let why = format!(
                    "received {} h ago, longer than the ledger keeps batch ids; replaying it could count it twice",
                    age_ms / 3_600_000
                );
                match delivery.quarantine.keep(&batch, &why).await {
                    Ok(()) => {
                        stats.add(Counter::TooOldToReplay, batch.len() as u64);
                        tracing::error!(batch = %batch.id, events = batch.len(), "spooled batch too old to replay exactly once; quarantined");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(batch = %batch.id, error = %e, "cannot quarantine a batch too old to replay; keeping the segment");
                        return;
                    }
                }
            }
            let outcome = delivery.deliver(batch, &mut stop).await;
            if !outcome.returned.is_empty() {
                return; // stopped: the segment stays for the next run
            }
        }
        let (s2, seg2) = (spool.clone(), seg.clone());
        let done = tokio::task::spawn_blocking(move || {
            if damage.is_empty() {
                s2.remove(&seg2).map(|_| None)
            } else {
                s2.quarantine_segment(&seg2, &damage.join("; ")).map(Some)
            }
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match done {
            Ok(None) => {
                tracing::info!(segment = %seg.path.display(), batches, events, "spool segment replayed")
            }
            Ok(Some(to)) => {
                tracing::warn!(segment = %seg.path.display(), quarantined_as = %to.display(), batches, events, "spool segment replayed except its damaged records; moved to the quarantine")
            }
            Err(e) => {
                tracing::error!(segment = %seg.path.display(), error = %e, "cannot remove a replayed segment; retrying shortly");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

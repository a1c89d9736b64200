//! The `Coordinator`: turns shard contents into batches for the writer.
//!
//! It wakes every flush interval, as soon as a shard reaches its size
//! trigger, and once more when told to stop; each time it swaps every shard's
//! buffer out, merges them into one [`Batch`] and queues it for the writer.
//! When it stops, it drops its sender, which tells the writer no more
//! batches will come. It never touches the database.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::batch::{Batch, Settle};
use crate::journal::Journal;
use crate::shard::ShardSet;
use crate::stats::Stats;

/// Heartbeat period (see `/livez`).
const BEAT: Duration = Duration::from_secs(1);

pub struct Coordinator {
    shards: Arc<ShardSet>,
    stats: Arc<Stats>,
    batches: mpsc::Sender<Batch>,
    interval: Duration,
    /// Rows per batch at most (`BATCH_MAX_ROWS`).
    max_rows: usize,
    /// `ACK_MODE=durable`: rotated before each take, settled by the write side.
    journal: Option<Arc<Journal>>,
    /// Batches read back from an earlier run's journal, sent first.
    recovered: Vec<Batch>,
}

impl Coordinator {
    pub fn new(
        shards: Arc<ShardSet>,
        stats: Arc<Stats>,
        batches: mpsc::Sender<Batch>,
        interval: Duration,
        max_rows: usize,
    ) -> Self {
        Coordinator {
            shards,
            stats,
            batches,
            interval,
            max_rows,
            journal: None,
            recovered: Vec::new(),
        }
    }

    /// Durable mode: rotates `journal` at each flush and hands the batches
    /// what settles it; `recovered` (an earlier run's journal) goes first.
    pub fn with_journal(mut self, journal: Arc<Journal>, recovered: Vec<Batch>) -> Self {
        self.journal = Some(journal);
        self.recovered = recovered;
        self
    }

    /// Runs until `stop` turns true, then closes the shards (a request still
    /// running is refused from here on, never acknowledged into a buffer
    /// nobody flushes), flushes what is left and returns. Beats every second
    /// (see `/livez`).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        for batch in std::mem::take(&mut self.recovered) {
            self.stats.in_writer.fetch_add(batch.len() as u64, SeqCst);
            self.stats
                .in_writer_bytes
                .fetch_add(batch.counted_bytes(), SeqCst);
            self.send(batch).await;
        }
        let mut next = tokio::time::Instant::now() + self.interval;
        loop {
            self.beat();
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.shards.wait_full() => {}
                _ = tokio::time::sleep(BEAT) => continue,
                _ = stop.wait_for(|s| *s) => break,
            }
            self.flush(false).await;
            next = tokio::time::Instant::now() + self.interval;
        }
        self.flush(true).await;
    }

    fn beat(&self) {
        self.stats
            .coordinator_beat_ms
            .store(self.stats.now_ms(), Relaxed);
    }

    /// Swaps all shards out (closing them when `last`) and queues their
    /// contents as batches of at most `max_rows` rows.
    pub async fn flush(&self, last: bool) {
        let stats = &self.stats;
        // Counted as the writer's as each shard is taken (before the shard
        // stops counting it), and handed back by the writer when done.
        let count = |events, bytes| {
            stats.in_writer.fetch_add(events, SeqCst);
            stats.in_writer_bytes.fetch_add(bytes, SeqCst);
        };
        // Rotate first, then take: an event is recorded before it is
        // journaled, so every event in the segments up to the cut is in
        // this flush's batches (or an earlier one's).
        let cut = self.journal.as_ref().map(|j| j.rotate());
        let parts = if last {
            self.shards.close_and_take_all(count).await
        } else {
            self.shards.take_all(count).await
        };
        let batch = Batch::from_parts(parts);
        let settle = match (&self.journal, cut) {
            (Some(journal), Some(cut)) if batch.is_empty() => {
                journal.settle(cut);
                return;
            }
            (Some(journal), Some(cut)) => {
                let journal = journal.clone();
                Some((journal, cut))
            }
            _ => None,
        };
        if batch.is_empty() {
            return;
        }
        let chunks = batch.into_chunks(self.max_rows);
        let settle =
            settle.map(|(journal, cut)| Settle::new(chunks.len(), move || journal.settle(cut)));
        for mut batch in chunks {
            if let Some(s) = &settle {
                batch.set_settle(s.clone());
            }
            self.send(batch).await;
        }
    }

    /// Queues one batch for the writer, beating while it waits.
    async fn send(&self, batch: Batch) {
        let (n, bytes) = (batch.len() as u64, batch.counted_bytes());
        // Waiting for the writer (back-pressure) is alive, not stuck: keep beating.
        let send = self.batches.send(batch);
        tokio::pin!(send);
        let sent = loop {
            tokio::select! {
                r = &mut send => break r,
                _ = tokio::time::sleep(BEAT) => self.beat(),
            }
        };
        if let Err(lost) = sent {
            // Only possible if the writer task is gone, which ends the service.
            self.stats.in_writer.fetch_sub(n, Relaxed);
            self.stats.in_writer_bytes.fetch_sub(bytes, Relaxed);
            tracing::error!(
                events = lost.0.len(),
                "writer is gone; batch cannot be written"
            );
        }
    }
}

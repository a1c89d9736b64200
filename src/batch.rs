//! `Batch`: the one hand-off type between the request side and the write side.
//!
//! The coordinator builds a batch from the buffers it swapped out of the
//! shards: the raw rows stay where they are (moved, not copied) and the
//! per-shard aggregates are merged into one table. The writer consumes
//! batches; it never sees a shard, and the request side never sees a batch.

use std::collections::HashMap;

use uuid::Uuid;

use crate::shard::{AggKey, Counts, KeyHasher, RawEvent, ShardData};

/// Events taken from all shards at one flush, ready to be written.
#[derive(Debug)]
pub struct Batch {
    /// Unique per batch; later the exactly-once ledger key.
    pub id: Uuid,
    parts: Vec<ShardData>,
    /// Merged aggregates of every row in `parts`.
    pub aggregates: HashMap<AggKey, Counts, KeyHasher>,
    events: usize,
    /// Receipt time (unix ms) of the oldest event in the batch.
    pub oldest_received_ms: i64,
}

impl Batch {
    /// Merges shard buffers into one batch. Buffers without rows are dropped.
    pub fn from_parts(parts: Vec<ShardData>) -> Batch {
        Batch::restore(Uuid::new_v4(), parts)
    }

    /// Rebuilds a batch under its original id (spool replay: the id is what
    /// makes a second commit of the same events a no-op).
    pub fn restore(id: Uuid, mut parts: Vec<ShardData>) -> Batch {
        parts.retain(|p| !p.rows.is_empty());
        let events = parts.iter().map(|p| p.rows.len()).sum();
        let oldest_received_ms = parts.iter().map(|p| p.first_received_ms).min().unwrap_or(0);
        // Start from the largest table and fold the others into it.
        let largest = parts
            .iter()
            .enumerate()
            .max_by_key(|(_, p)| p.aggregates.len())
            .map(|(i, _)| i);
        let mut aggregates = match largest {
            Some(i) => std::mem::take(&mut parts[i].aggregates),
            None => HashMap::with_hasher(KeyHasher::default()),
        };
        for part in parts.iter_mut() {
            for (k, c) in std::mem::take(&mut part.aggregates) {
                aggregates.entry(k).or_default().add(c);
            }
        }
        Batch {
            id,
            parts,
            aggregates,
            events,
            oldest_received_ms,
        }
    }

    /// Number of raw events in the batch.
    pub fn len(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Every row with the buffer that holds its strings.
    pub fn rows(&self) -> impl Iterator<Item = (&ShardData, &RawEvent)> {
        self.parts
            .iter()
            .flat_map(|p| p.rows.iter().map(move |r| (p, r)))
    }

    /// Distinct campaigns in the batch.
    pub fn campaigns(&self) -> Vec<Uuid> {
        let mut v: Vec<Uuid> = self.aggregates.keys().map(|k| k.campaign_id).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The memory-cap estimate of the batch's events (what admission counts).
    pub fn counted_bytes(&self) -> u64 {
        self.parts.iter().map(ShardData::counted_bytes).sum()
    }

    /// Approximate memory held by the batch.
    pub fn approx_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(ShardData::approx_bytes)
            .sum::<usize>()
            + self.aggregates.capacity() * (std::mem::size_of::<(AggKey, Counts)>() + 8)
    }
}

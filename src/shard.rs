//! Per-worker shards: where accepted events wait for the next flush.
//!
//! Every thread that records events owns exactly one [`Shard`] per
//! [`ShardSet`]. A shard fills a [`Buffer`] (rows with their strings in one
//! arena, and hourly counters keyed by (ad unit, campaign, hour), updated in
//! place; the layout is `batch`'s business). The account is not part of
//! the key here: it is a function of the campaign and is resolved by the
//! writer, so the hot path never needs the account cache.
//!
//! Ownership and hand-off (no lock on the hot path):
//! - the live buffer of a shard is an `Arc<ShardCell>` behind an `ArcSwap`;
//!   only the owning thread ever loads it and mutates it, never re-entrantly;
//! - the coordinator swaps a fresh cell in, then waits until it holds the
//!   only reference to the old one (`Arc::try_unwrap`). arc-swap pays every
//!   outstanding reader's debt during `swap`, so a recorder still inside
//!   `record` keeps the count above one; once it returns, the coordinator
//!   owns the old buffer outright and moves it into a batch without copying.
//!
//! Counters are plain integers rather than atomics because no other thread
//! can see a cell while it is being written: the one atomic step per event is
//! arc-swap's load. This file never touches the database.

use std::cell::{RefCell, UnsafeCell};
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::batch::{ArenaFull, Buffer, Row};
use crate::stats::ShardTotals;

/// Why an event was not recorded. The caller turns it into a 503 (POST) or
/// a dropped-and-counted pixel (GET).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShardFull {
    /// The memory cap is reached (the database and the spool are not keeping up).
    #[error("event buffers are at their memory cap")]
    Shedding,
    /// This shard's string arena is at its 4 GiB addressing limit.
    #[error("shard buffer is full")]
    Arena,
    /// The final flush has begun: nothing recorded now would be written.
    #[error("the service is shutting down")]
    Closed,
}

impl From<ArenaFull> for ShardFull {
    fn from(_: ArenaFull) -> Self {
        ShardFull::Arena
    }
}

/// A shard's live buffer. Only the owning thread mutates it, and only while
/// it holds a guard from the shard's `ArcSwap` (see the module docs). A
/// closed cell (swapped in by the final flush) takes nothing.
struct ShardCell {
    data: UnsafeCell<Buffer>,
    closed: bool,
}

impl ShardCell {
    fn new(data: Buffer, closed: bool) -> Arc<ShardCell> {
        Arc::new(ShardCell {
            data: UnsafeCell::new(data),
            closed,
        })
    }
}

// SAFETY: the data inside is reached in exactly two ways: (1) by the one
// thread that owns the shard, inside `Shard::record`, which is synchronous
// and not re-entrant; (2) by the coordinator after `Arc::try_unwrap` proved
// that no other reference (hence no recorder) exists. These never overlap.
unsafe impl Sync for ShardCell {}

/// One worker thread's shard.
pub struct Shard {
    cell: ArcSwap<ShardCell>,
    /// Events recorded into this shard since start. Written by the owner only.
    recorded: AtomicU64,
    /// Events taken out of this shard by the coordinator. Written by it only.
    taken: AtomicU64,
    /// Approximate bytes recorded / taken, for the memory cap.
    recorded_bytes: AtomicU64,
    taken_bytes: AtomicU64,
    /// The owner refuses events once `recorded` reaches this. Set by admission
    /// control only (its budget for this shard); the owner only reads it.
    limit: AtomicU64,
    /// Events this shard refused for lack of budget. Written by the owner only.
    refused: AtomicU64,
}

impl Shard {
    fn new(limit: u64, closed: bool) -> Self {
        Shard {
            cell: ArcSwap::new(ShardCell::new(Buffer::new(), closed)),
            recorded: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            recorded_bytes: AtomicU64::new(0),
            taken_bytes: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            refused: AtomicU64::new(0),
        }
    }

    /// Appends one event; returns the number of rows now buffered.
    fn record(&self, row: &Row<'_>) -> Result<usize, ShardFull> {
        if self.recorded.load(Relaxed) >= self.limit.load(Relaxed) {
            self.refused.store(self.refused.load(Relaxed) + 1, Relaxed);
            return Err(ShardFull::Shedding);
        }
        let guard = self.cell.load();
        if guard.closed {
            return Err(ShardFull::Closed);
        }
        // SAFETY: see `ShardCell`: we are the owning thread and not re-entrant.
        let data = unsafe { &mut *guard.data.get() };
        data.push(row)?;
        let len = data.len();
        drop(guard);
        // Single writer: a plain load + store, no locked instruction.
        self.recorded
            .store(self.recorded.load(Relaxed) + 1, Relaxed);
        let bytes = row.cost();
        self.recorded_bytes
            .store(self.recorded_bytes.load(Relaxed) + bytes, Relaxed);
        Ok(len)
    }

    /// Swaps an empty buffer in (a closed one when `close`) and returns the
    /// old one once no recorder uses it.
    async fn take(
        &self,
        rows_hint: usize,
        keys_hint: usize,
        close: bool,
        on_take: &impl Fn(u64, u64),
    ) -> Buffer {
        let fresh = if close {
            ShardCell::new(Buffer::new(), true)
        } else {
            ShardCell::new(Buffer::with_capacity(rows_hint, keys_hint), false)
        };
        let mut old = self.cell.swap(fresh);
        let mut spins = 0u32;
        let data = loop {
            match Arc::try_unwrap(old) {
                Ok(cell) => break cell.data.into_inner(),
                Err(still_shared) => {
                    // A recorder is inside `record` (nanoseconds) or was
                    // preempted there; give it the CPU back.
                    old = still_shared;
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            }
        };
        // Count the events where they go before uncounting them here, so that
        // admission (which reads shards first, then the writer) never misses them.
        let (events, bytes) = (data.len() as u64, data.counted_bytes());
        on_take(events, bytes);
        self.taken_bytes
            .store(self.taken_bytes.load(Relaxed) + bytes, SeqCst);
        self.taken.store(self.taken.load(Relaxed) + events, SeqCst);
        data
    }
}

static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's shard in each live `ShardSet` (normally exactly one).
    static LOCAL: RefCell<Vec<(u64, Arc<Shard>)>> = const { RefCell::new(Vec::new()) };
}

/// All shards of one running service, plus the size signal to the coordinator.
pub struct ShardSet {
    id: u64,
    shards: Mutex<Vec<Arc<Shard>>>,
    max_events: usize,
    full: Notify,
    shedding: AtomicBool,
    /// Set by the final flush: new shards are created closed.
    closed: AtomicBool,
    /// The room reserved for shards created after the last admission check:
    /// each new shard takes half of what is left, so together they never
    /// take more than the reserve.
    new_shard_budget: AtomicU64,
    /// Refusals summed over the shards at the last admission check.
    refused_seen: AtomicU64,
    /// When a check last saw new refusals (ms since `epoch`).
    last_refusal_ms: AtomicU64,
    epoch: std::time::Instant,
}

impl ShardSet {
    /// `max_events`: a shard reaching this many rows wakes the coordinator.
    /// No memory cap until admission control sets budgets.
    pub fn new(max_events: usize) -> Self {
        Self::with_cap(max_events, u64::MAX)
    }

    /// Like `new`, with `cap` events at most before the first admission check.
    pub fn with_cap(max_events: usize, cap: u64) -> Self {
        ShardSet {
            id: NEXT_SET_ID.fetch_add(1, Relaxed),
            shards: Mutex::new(Vec::new()),
            max_events: max_events.max(1),
            full: Notify::new(),
            shedding: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            new_shard_budget: AtomicU64::new(cap),
            refused_seen: AtomicU64::new(0),
            last_refusal_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// Records one validated event into the calling thread's shard.
    ///
    /// Never blocks: the first call on a thread registers its shard (one
    /// short lock, once per thread); every later call is lock-free.
    pub fn record(&self, row: &Row<'_>) -> Result<(), ShardFull> {
        let len = LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            // Common case: this thread's shard is found and used by reference
            // (no reference-count traffic on the hot path).
            if let Some((_, shard)) = local.iter().find(|(id, _)| *id == self.id) {
                return shard.record(row);
            }
            let shard = {
                let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
                let budget = self
                    .new_shard_budget
                    .fetch_update(Relaxed, Relaxed, |b| Some(b / 2))
                    .map_or(0, |b| b - b / 2);
                let shard = Arc::new(Shard::new(budget, self.closed.load(SeqCst)));
                shards.push(shard.clone());
                shard
            };
            local.retain(|(_, s)| Arc::strong_count(s) > 1); // drop shards of stopped sets
            local.push((self.id, shard.clone()));
            shard.record(row)
        })?;
        if len == self.max_events {
            self.full.notify_one();
        }
        Ok(())
    }

    /// Resolves when some shard reached `max_events` since the last call.
    pub async fn wait_full(&self) {
        self.full.notified().await
    }

    /// Takes every shard's buffer, leaving empty ones sized like the last.
    /// `on_take(events, bytes)` runs for each buffer before the shard stops
    /// counting it, so the receiver can count it first (see `budget`).
    pub async fn take_all(&self, on_take: impl Fn(u64, u64)) -> Vec<Buffer> {
        self.take_every(false, on_take).await
    }

    /// The final take: every shard gets a closed buffer, and shards created
    /// from now on are closed too, so no event can be recorded (and
    /// acknowledged) after this into a buffer nobody will flush. A recorder
    /// already inside `record` finishes first: its event is in what is taken.
    pub async fn close_and_take_all(&self, on_take: impl Fn(u64, u64)) -> Vec<Buffer> {
        self.take_every(true, on_take).await
    }

    /// True once `close_and_take_all` has run.
    pub fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    async fn take_every(&self, close: bool, on_take: impl Fn(u64, u64)) -> Vec<Buffer> {
        let shards: Vec<Arc<Shard>> = {
            let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            if close {
                self.closed.store(true, SeqCst);
            }
            shards.clone()
        };
        let mut out = Vec::with_capacity(shards.len());
        for shard in shards {
            let recorded = shard.recorded.load(Relaxed);
            let pending = recorded.saturating_sub(shard.taken.load(Relaxed)) as usize;
            let hint = pending.clamp(64, self.max_events.saturating_add(1024));
            let data = shard.take(hint, hint, close, &on_take).await;
            if !data.is_empty() {
                out.push(data);
            }
        }
        out
    }

    /// Hands out the room left under the memory caps as per-shard budgets.
    ///
    /// `outside_events`/`outside_bytes` are held elsewhere (the writer). From
    /// one snapshot of every shard's counters it computes what is held, the
    /// room left (events, and bytes at the current average event size), and
    /// gives each shard `recorded + room / shards` as its limit. A shard that
    /// reaches its limit refuses events until the next call, so the total held
    /// cannot pass the caps by more than the batches in transit between the
    /// coordinator and the writer during the snapshot. Returns (events, bytes) held.
    pub fn budget(
        &self,
        max_events: u64,
        max_bytes: u64,
        outside: impl Fn() -> (u64, u64),
    ) -> (u64, u64) {
        let shards: Vec<Arc<Shard>> = self
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let snap: Vec<(u64, u64)> = shards
            .iter()
            .map(|s| {
                let recorded = s.recorded.load(Relaxed);
                let bytes = s
                    .recorded_bytes
                    .load(Relaxed)
                    .saturating_sub(s.taken_bytes.load(SeqCst));
                (recorded, bytes)
            })
            .collect();
        let pending: u64 = shards
            .iter()
            .zip(&snap)
            .map(|(s, (recorded, _))| recorded.saturating_sub(s.taken.load(SeqCst)))
            .sum();
        // Downstream last: a buffer moving out of a shard is counted at least once.
        let (outside_events, outside_bytes) = outside();
        let events = pending + outside_events;
        let bytes = snap.iter().map(|(_, b)| b).sum::<u64>() + outside_bytes;
        let avg = bytes.checked_div(events).map_or(256, |a| a.max(64));
        let room = max_events
            .saturating_sub(events)
            .min(max_bytes.saturating_sub(bytes) / avg);
        let share = room / (shards.len() as u64 + 1);
        for (s, (recorded, _)) in shards.iter().zip(&snap) {
            s.limit.store(recorded.saturating_add(share), Relaxed);
        }
        self.new_shard_budget.store(share, Relaxed);
        let refused: u64 = shards.iter().map(|s| s.refused.load(Relaxed)).sum();
        let refused_since = refused - self.refused_seen.swap(refused, Relaxed).min(refused);
        // "Shedding" while there is no room, or while shards refused events
        // within the last second.
        let now_ms = self.epoch.elapsed().as_millis() as u64 + 1000;
        if refused_since > 0 {
            self.last_refusal_ms.store(now_ms, Relaxed);
        }
        let recent = now_ms < self.last_refusal_ms.load(Relaxed) + 1000;
        self.shedding.store(room == 0 || recent, Relaxed);
        (events, bytes)
    }

    /// True when the last admission check found no room under the caps, or
    /// shards refused events within the last second.
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Relaxed)
    }

    /// Recorded, pending and shedding, read under one lock.
    pub fn totals(&self) -> ShardTotals {
        let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let (mut recorded, mut taken) = (0u64, 0u64);
        for s in shards.iter() {
            // Taken first: a batch in transit is never missing from "pending".
            taken += s.taken.load(SeqCst);
            recorded += s.recorded.load(Relaxed);
        }
        ShardTotals {
            recorded,
            pending: recorded.saturating_sub(taken),
            shedding: self.is_shedding(),
        }
    }

    /// Events recorded since start, over all shards.
    pub fn recorded(&self) -> u64 {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.recorded.load(Relaxed))
            .sum()
    }

    /// Events recorded and not yet taken by the coordinator.
    pub fn pending(&self) -> u64 {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| {
                s.recorded
                    .load(Relaxed)
                    .saturating_sub(s.taken.load(Relaxed))
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{AggKey, Counts, EventKind, InvalidReason};
    use crate::event::Event;
    use uuid::Uuid;

    fn ev(kind: EventKind, campaign: u128, ts: i64) -> Event<'static> {
        Event {
            kind,
            ad_unit_id: Uuid::from_u128(7),
            campaign_id: Uuid::from_u128(campaign),
            creative_id: Uuid::from_u128(9),
            page_url: "https://example.com/",
            timestamp_ms: ts,
            event_id: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_from_many_threads_and_takes_everything() {
        let set = Arc::new(ShardSet::new(1_000_000));
        let mut handles = Vec::new();
        for t in 0..4u128 {
            let set = set.clone();
            handles.push(std::thread::spawn(move || {
                for i in 0..10_000i64 {
                    let kind = if i % 10 == 0 {
                        EventKind::Click
                    } else {
                        EventKind::Impression
                    };
                    // Every 8th event is a bot's: counted apart, not billed.
                    let invalid = (i % 8 == 0).then_some(InvalidReason::BotUa);
                    set.record(&ev(kind, t, i * 1000).stored(1, Some("ua"), invalid, true))
                        .expect("room");
                }
            }));
        }
        // Take concurrently with the recorders, then once more after they finish.
        let mut taken = Vec::new();
        for _ in 0..20 {
            taken.extend(set.take_all(|_, _| {}).await);
            tokio::task::yield_now().await;
        }
        for h in handles {
            h.join().expect("recorder thread");
        }
        taken.extend(set.take_all(|_, _| {}).await);
        let rows: usize = taken.iter().map(Buffer::len).sum();
        assert_eq!(rows, 40_000);
        let mut total = Counts::default();
        for d in &taken {
            for row in d.rows() {
                assert_eq!(row.page_url, "https://example.com/");
                assert_eq!(row.user_agent, Some("ua"));
            }
            for (_, c) in d.aggregates() {
                total.add(*c);
            }
        }
        assert_eq!(
            total,
            Counts {
                impressions: 36_000 - 4 * 1000,
                clicks: 4_000 - 4 * 250,
                invalid_impressions: 4 * 1000,
                invalid_clicks: 4 * 250,
            }
        );
        assert_eq!(set.recorded(), 40_000);
        assert_eq!(set.pending(), 0);
    }

    #[tokio::test]
    async fn reaching_the_size_limit_wakes_the_coordinator() {
        let set = ShardSet::new(3);
        for _ in 0..3 {
            set.record(&ev(EventKind::Impression, 1, 0).stored(1, None, None, true))
                .expect("room");
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), set.wait_full())
            .await
            .expect("size signal");
        let data = set.take_all(|_, _| {}).await;
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].len(), 3);
        assert_eq!(data[0].rows().next().map(|r| r.user_agent), Some(None));
        let key = AggKey {
            campaign_id: Uuid::from_u128(1),
            ad_unit_id: Uuid::from_u128(7),
            hour: 0,
        };
        let counts: Vec<(&AggKey, &Counts)> = data[0].aggregates().collect();
        assert_eq!(
            counts,
            vec![(
                &key,
                &Counts {
                    impressions: 3,
                    ..Counts::default()
                }
            )]
        );
    }

    #[test]
    fn shards_registering_before_any_admission_check_stay_under_the_cap() {
        let set = Arc::new(ShardSet::with_cap(usize::MAX, 1000));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let set = set.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while set
                        .record(&ev(EventKind::Impression, t, 0).stored(1, None, None, true))
                        .is_ok()
                    {
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|h| h.join().expect("thread")).sum();
        assert!(total <= 1000, "{total} recorded under a cap of 1000");
        assert!(total >= 990, "the cap is handed out, not lost: {total}");
        assert_eq!(set.recorded(), total);
    }

    #[tokio::test]
    async fn after_the_final_take_nothing_is_recorded_anywhere() {
        let set = Arc::new(ShardSet::new(1_000_000));
        set.record(&ev(EventKind::Click, 1, 0).stored(1, None, None, true))
            .expect("open");
        let taken = set.close_and_take_all(|_, _| {}).await;
        assert_eq!(taken.iter().map(Buffer::len).sum::<usize>(), 1);
        assert!(set.is_closed());
        assert_eq!(
            set.record(&ev(EventKind::Click, 1, 0).stored(1, None, None, true)),
            Err(ShardFull::Closed),
            "this thread's shard is closed"
        );
        let other = set.clone();
        let fresh_thread = std::thread::spawn(move || {
            other.record(&ev(EventKind::Click, 1, 0).stored(1, None, None, true))
        })
        .join()
        .expect("thread");
        assert_eq!(
            fresh_thread,
            Err(ShardFull::Closed),
            "a shard created after the close is closed too"
        );
        assert_eq!(set.recorded(), 1);
        assert!(set.take_all(|_, _| {}).await.is_empty());
    }
}

//! Counters and histograms, read by `/health` and `/metrics` through one
//! [`Snapshot`].
//!
//! Pipeline counters are declared once, in the [`Counter`] table below: its
//! line says where `/health` shows the counter and which `/metrics` family
//! carries it, so a new counter is one line plus the code that bumps it.
//! Request statistics (latency per route since start and over the last
//! minute, response counts per route and status, rejections per reason) are
//! kept per thread: each thread locks only its own set (uncontended), and
//! readers merge the sets when asked. Pipeline counters are atomics bumped
//! once per flush or per refused request, never once per accepted event (the
//! shards count those). Write-side histograms (flush duration, batch size,
//! event freshness) live behind one mutex the write side alone updates.
//! Nothing here touches the database.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::batch::InvalidReason;

/// The routes whose requests are counted and timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    PostImpression,
    PostClick,
    GetImpression,
    GetClick,
    PostBatch,
    HeadEvent,
    OptionsEvent,
    Health,
    Metrics,
    Probe,
    Other,
}

impl Route {
    pub const ALL: [Route; 11] = [
        Route::PostImpression,
        Route::PostClick,
        Route::GetImpression,
        Route::GetClick,
        Route::PostBatch,
        Route::HeadEvent,
        Route::OptionsEvent,
        Route::Health,
        Route::Metrics,
        Route::Probe,
        Route::Other,
    ];

    /// The key in `/health`'s `latency_us`.
    pub fn label(self) -> &'static str {
        match self {
            Route::PostImpression => "POST /event/impression",
            Route::PostClick => "POST /event/click",
            Route::GetImpression => "GET /event/impression",
            Route::GetClick => "GET /event/click",
            Route::PostBatch => "POST /events",
            Route::HeadEvent => "HEAD /event/*",
            Route::OptionsEvent => "OPTIONS /event/*",
            Route::Health => "GET /health",
            Route::Metrics => "GET /metrics",
            Route::Probe => "GET /livez|/readyz",
            Route::Other => "other",
        }
    }

    /// The `route` label in `/metrics`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Route::PostImpression => "post_impression",
            Route::PostClick => "post_click",
            Route::GetImpression => "get_impression",
            Route::GetClick => "get_click",
            Route::PostBatch => "post_events",
            Route::HeadEvent => "head_event",
            Route::OptionsEvent => "options_event",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Probe => "probe",
            Route::Other => "other",
        }
    }
}

const N_ROUTES: usize = Route::ALL.len();
/// One histogram per [`Route`], indexed by `route as usize`.
pub type RouteHistograms = [Histogram<u64>; N_ROUTES];

/// 1 ns .. 60 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

fn new_histograms() -> RouteHistograms {
    std::array::from_fn(|_| new_histogram())
}

/// Statuses counted in a fixed array (no hashing per request).
const COMMON_STATUSES: [u16; 12] = [200, 204, 400, 403, 404, 405, 408, 413, 414, 431, 500, 503];

fn status_index(status: u16) -> Option<usize> {
    COMMON_STATUSES.iter().position(|&s| s == status)
}

/// The recent-latency window: two 30 s slots, so "the last minute" is the
/// current slot plus the one before.
const WINDOW_SLOT: Duration = Duration::from_secs(30);

/// One thread's request statistics.
struct ThreadStats {
    since_start: RouteHistograms,
    /// Slot number (`epoch / WINDOW_SLOT`) of `current`.
    slot: u64,
    current: RouteHistograms,
    previous: RouteHistograms,
    /// Responses per route and common status (see `status_index`).
    responses: [[u64; COMMON_STATUSES.len()]; N_ROUTES],
    /// Responses with any other status (rare).
    other_responses: HashMap<(Route, u16), u64>,
    rejected: HashMap<&'static str, u64>,
    /// Events recorded as invalid traffic, by [`InvalidReason::index`].
    invalid: [u64; InvalidReason::ALL.len()],
}

impl ThreadStats {
    fn new(slot: u64) -> Self {
        ThreadStats {
            since_start: new_histograms(),
            slot,
            current: new_histograms(),
            previous: new_histograms(),
            responses: [[0; COMMON_STATUSES.len()]; N_ROUTES],
            other_responses: HashMap::new(),
            rejected: HashMap::new(),
            invalid: [0; InvalidReason::ALL.len()],
        }
    }

    /// Moves the window forward to `slot`.
    fn rotate(&mut self, slot: u64) {
        if slot == self.slot {
            return;
        }
        if slot == self.slot + 1 {
            std::mem::swap(&mut self.previous, &mut self.current);
        } else {
            self.previous.iter_mut().for_each(Histogram::reset);
        }
        self.current.iter_mut().for_each(Histogram::reset);
        self.slot = slot;
    }
}

static NEXT_STATS_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static LOCAL: RefCell<Vec<(u64, Arc<Mutex<ThreadStats>>)>> = const { RefCell::new(Vec::new()) };
}

/// Responses per (route, status).
pub type ResponseCounts = HashMap<(Route, u16), u64>;

/// Histograms the write side records into.
#[derive(Clone)]
pub struct WriteHistograms {
    /// Batch write (commit) duration, microseconds.
    pub flush_us: Histogram<u64>,
    /// Events per committed batch.
    pub batch_events: Histogram<u64>,
    /// Receipt → commit per event, milliseconds.
    pub freshness_ms: Histogram<u64>,
}

/// What one [`Counter`] is called where it is shown.
#[derive(Clone, Copy, Debug)]
pub struct CounterInfo {
    /// Its place in `/health`: dot-separated keys (`pipeline.written`).
    pub health: &'static str,
    /// Its family in `/metrics` (without `_total`); empty when another
    /// family already carries the number.
    pub family: &'static str,
    /// The family's label for this counter, when the family has several.
    pub label: Option<(&'static str, &'static str)>,
    /// The family's help text.
    pub help: &'static str,
}

macro_rules! counters {
    ($( #[doc = $help:literal] $name:ident => $health:literal, $family:literal $(, $lk:literal = $lv:literal)?; )*) => {
        /// The pipeline's event and batch counters. Each line declares one:
        /// where `/health` shows it and which `/metrics` family carries it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $( #[doc = $help] $name, )* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name),*];
            pub const COUNT: usize = Counter::ALL.len();

            pub fn info(self) -> CounterInfo {
                match self {
                    $(Counter::$name => CounterInfo {
                        health: $health,
                        family: $family,
                        label: counters!(@label $($lk = $lv)?),
                        help: $help.trim_start(),
                    },)*
                }
            }
        }
    };
    (@label) => { None };
    (@label $k:literal = $v:literal) => { Some(($k, $v)) };
}

counters! {
    /// Event requests refused with a 4xx (nothing buffered); by reason in ingest_events_rejected
    RejectedInvalid => "pipeline.rejected", "";
    /// Events refused with 503 at the memory cap; in ingest_events_rejected as overloaded
    Shed => "pipeline.shed", "";
    /// GET pixel events answered but not kept, by reason
    DroppedBufferFull => "pipeline.dropped.buffer_full", "ingest_events_dropped", "reason" = "buffer_full";
    /// Events committed to the events table
    Written => "pipeline.written", "ingest_events_written";
    /// Events refused, by reason; unknown_campaign counts events stored in rejected_events
    UnknownCampaign => "pipeline.unknown_campaign", "ingest_events_rejected", "reason" = "unknown_campaign";
    /// Events moved to rejected_events because the database refused their batch
    DeadLettered => "pipeline.dead_lettered", "ingest_events_dead_lettered";
    /// Batches committed
    Flushes => "pipeline.flushes", "ingest_flushes";
    /// Events refused by both events and rejected_events, kept in the quarantine (ingest quarantine list)
    Quarantined => "pipeline.quarantined", "ingest_events_quarantined";
    /// Batch write attempts that failed
    WriteFailures => "pipeline.write_failures", "ingest_write_failures";
    /// Batches found already committed in the ledger (lost acknowledgements, replays)
    DuplicateBatches => "pipeline.duplicate_batches", "ingest_duplicate_batches";
    /// Events written to the spool
    SpooledEvents => "spool.spooled_events", "ingest_spooled_events";
    /// Batches written to the spool
    SpooledBatches => "spool.spooled_batches", "ingest_spooled_batches";
    /// Batches the spool could not take (full or failing)
    SpoolFailures => "spool.failures", "ingest_spool_failures";
    /// Spooled events committed by replay
    ReplayedEvents => "spool.replayed_events", "ingest_replayed_events";
    /// Spooled batches committed by replay
    ReplayedBatches => "spool.replayed_batches", "ingest_replayed_batches";
    /// Damaged spool records reported and skipped
    SpoolDamagedRecords => "spool.damaged_records", "ingest_spool_damaged_records";
    /// Bytes of damaged spool records skipped
    SpoolDamagedBytes => "spool.damaged_bytes", "ingest_spool_damaged_bytes";
    /// Event requests refused with 503 because the final flush had begun; in ingest_events_rejected as shutting_down
    RefusedShuttingDown => "pipeline.refused_shutting_down", "";
    /// Partition maintenance and retention rounds this replica ran
    MaintenanceRuns => "maintenance.runs", "ingest_maintenance_runs";
    /// Maintenance rounds that failed (retried next round)
    MaintenanceFailures => "maintenance.failures", "ingest_maintenance_failures";
    /// events partitions created
    PartitionsCreated => "maintenance.partitions_created", "ingest_partitions_created";
    /// events partitions dropped by retention
    PartitionsDropped => "maintenance.partitions_dropped", "ingest_partitions_dropped";
    /// rejected_events rows deleted by retention
    RejectedPruned => "maintenance.rejected_deleted", "ingest_rejected_events_deleted";
    /// ingest_batches ledger entries pruned
    LedgerPruned => "maintenance.ledger_pruned", "ingest_ledger_pruned";
    /// Spooled batches older than the ledger's retention, quarantined instead of replayed
    TooOldToReplay => "spool.too_old_to_replay", "ingest_spool_too_old_to_replay";
    /// Events sent again with an event_id this replica had accepted within the window: answered, not stored again
    RepeatedEventIdsMemory => "event_ids.repeated_in_memory", "ingest_event_id_repeats", "found" = "memory";
    /// Events left out at write time because event_ids already held their id (another replica, a restart, a replay)
    RepeatedEventIdsDb => "event_ids.repeated_in_database", "ingest_event_id_repeats", "found" = "database";
    /// Repeated event_ids whose payload differed from the first event's (the first is kept)
    ConflictingEventIds => "event_ids.conflicting", "ingest_conflicting_event_ids";
    /// event_ids entries older than DEDUP_WINDOW_HOURS deleted
    EventIdsPruned => "maintenance.event_ids_deleted", "ingest_event_ids_deleted";
    /// ACK_MODE=durable: journal writes (each one fsync for every event waiting)
    JournalSyncs => "journal.syncs", "ingest_journal_syncs";
    /// ACK_MODE=durable: events made durable in the journal
    JournalEvents => "journal.events", "ingest_journal_events";
    /// ACK_MODE=durable: journal writes that failed (their events were answered 503)
    JournalFailures => "journal.failures", "ingest_journal_failures";
    /// ACK_MODE=durable: events read back from an earlier run's journal at start
    JournalRecovered => "journal.recovered_events", "ingest_journal_recovered_events";
    /// Snapshots rendered for /health and /metrics (at most one per VIEW_CACHE_MS)
    ViewRenders => "views.renders", "ingest_view_renders";
}

/// Totals of the request side's shards at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardTotals {
    /// Events recorded (acknowledged) since start.
    pub recorded: u64,
    /// Events recorded and not yet taken by the coordinator.
    pub pending: u64,
    /// True while the memory cap makes shards refuse events.
    pub shedding: bool,
}

/// The database pool's state.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PoolStatus {
    pub size: u64,
    pub idle: u64,
    pub waiting: u64,
    pub max: u64,
}

/// What the request side may know about the write side (spool, campaign
/// cache, pool), read when a snapshot is taken.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteStatus {
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    /// False for a moment after the spool's disk was found full.
    pub spool_accepting: bool,
    pub campaigns_cached: u64,
    pub campaign_cache_loaded: bool,
    pub campaign_cache_hits: u64,
    pub campaign_cache_misses: u64,
    pub pool: PoolStatus,
}

/// The write side's status handle: implemented where the spool, the cache
/// and the pool live, handed to the request side as a trait object by `serve`.
pub trait WriteSideStatus: Send + Sync {
    fn status(&self) -> WriteStatus;
}

/// Everything `/health` and `/metrics` show, read once: both render the same
/// numbers from one of these.
pub struct Snapshot {
    pub at: std::time::SystemTime,
    pub uptime: Duration,
    counters: [u64; Counter::COUNT],
    /// Latency per route since start, and over the last minute.
    pub latency: RouteHistograms,
    pub latency_recent: RouteHistograms,
    pub responses: ResponseCounts,
    /// Refusals per `error` code.
    pub rejected: Vec<(&'static str, u64)>,
    /// Events recorded as invalid traffic, by [`InvalidReason::index`].
    pub invalid: [u64; InvalidReason::ALL.len()],
    /// Clicks remembered for deduplication, and early evictions at its cap
    /// (filled in by the request side, which owns the table).
    pub clicks_tracked: u64,
    pub click_evictions: u64,
    /// Event ids remembered by this replica's filter (filled in by the request side).
    pub event_ids_tracked: u64,
    pub write: WriteHistograms,
    pub in_writer: u64,
    pub in_writer_bytes: u64,
    pub last_flush_duration_us: u64,
    pub last_flush_events: u64,
    pub last_flush_age_ms: u64,
    pub db_up: bool,
    pub migrated: bool,
    /// The first partition-maintenance round has run (since start).
    pub maintained: bool,
    pub shutting_down: bool,
    pub shards: ShardTotals,
    pub write_side: WriteStatus,
}

impl Snapshot {
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters[c as usize]
    }

    /// Events committed to either table since start (live or replayed).
    pub fn stored(&self) -> u64 {
        self.counter(Counter::Written)
            + self.counter(Counter::UnknownCampaign)
            + self.counter(Counter::DeadLettered)
    }

    /// Events accepted and not yet committed (in memory or in the spool).
    pub fn pending(&self) -> u64 {
        self.shards.recorded.saturating_sub(self.stored())
    }

    /// Events held in memory: in shards or in the writer.
    pub fn in_memory(&self) -> u64 {
        self.shards.pending + self.in_writer
    }

    /// `healthy`, `degraded` (database unreachable) or `shutting_down`.
    pub fn status(&self) -> &'static str {
        if self.shutting_down {
            "shutting_down"
        } else if self.db_up {
            "healthy"
        } else {
            "degraded"
        }
    }
}

/// Counters, gauges and histograms of one running service.
pub struct Stats {
    id: u64,
    pub started: Instant,
    threads: Mutex<Vec<Arc<Mutex<ThreadStats>>>>,
    counters: [AtomicU64; Counter::COUNT],
    /// Flush, batch-size and freshness histograms (write side only).
    write: Mutex<WriteHistograms>,
    /// Coordinator and write-runtime heartbeats, ms since `started`.
    pub coordinator_beat_ms: AtomicU64,
    pub writer_beat_ms: AtomicU64,
    pub last_flush_duration_us: AtomicU64,
    pub last_flush_events: AtomicU64,
    /// Receipt → commit of the oldest event of the last batch.
    pub last_flush_age_ms: AtomicU64,
    /// Events handed to the writer and not yet committed, rejected or spooled.
    pub in_writer: AtomicU64,
    pub in_writer_bytes: AtomicU64,
    pub db_up: AtomicBool,
    pub migrated: AtomicBool,
    /// Set once the first partition-maintenance round has run.
    pub maintained: AtomicBool,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            id: NEXT_STATS_ID.fetch_add(1, Relaxed),
            started: Instant::now(),
            threads: Mutex::new(Vec::new()),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            write: Mutex::new(WriteHistograms {
                flush_us: new_histogram(),
                batch_events: new_histogram(),
                freshness_ms: new_histogram(),
            }),
            coordinator_beat_ms: AtomicU64::new(0),
            writer_beat_ms: AtomicU64::new(0),
            last_flush_duration_us: AtomicU64::new(0),
            last_flush_events: AtomicU64::new(0),
            last_flush_age_ms: AtomicU64::new(0),
            in_writer: AtomicU64::new(0),
            in_writer_bytes: AtomicU64::new(0),
            db_up: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
            maintained: AtomicBool::new(false),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(&self, c: Counter, n: u64) {
        self.counters[c as usize].fetch_add(n, Relaxed);
    }

    /// The current value of a counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Relaxed)
    }

    /// Reads everything once. `shards` and `write_side` come from the two
    /// sides' own handles; see [`Snapshot`].
    pub fn snapshot(
        &self,
        shards: ShardTotals,
        write_side: WriteStatus,
        shutting_down: bool,
    ) -> Snapshot {
        let (latency, latency_recent) = self.latency_histograms();
        let (responses, rejected, invalid) = self.responses();
        let mut rejected: Vec<(&'static str, u64)> = rejected.into_iter().collect();
        rejected.sort();
        Snapshot {
            at: std::time::SystemTime::now(),
            uptime: self.started.elapsed(),
            counters: std::array::from_fn(|i| self.counters[i].load(Relaxed)),
            latency,
            latency_recent,
            responses,
            rejected,
            invalid,
            clicks_tracked: 0,
            event_ids_tracked: 0,
            click_evictions: 0,
            write: self.write.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            in_writer: self.in_writer.load(Relaxed),
            in_writer_bytes: self.in_writer_bytes.load(Relaxed),
            last_flush_duration_us: self.last_flush_duration_us.load(Relaxed),
            last_flush_events: self.last_flush_events.load(Relaxed),
            last_flush_age_ms: self.last_flush_age_ms.load(Relaxed),
            db_up: self.db_up.load(Relaxed),
            migrated: self.migrated.load(Relaxed),
            maintained: self.maintained.load(Relaxed),
            shutting_down,
            shards,
            write_side,
        }
    }

    fn slot(&self) -> u64 {
        self.started.elapsed().as_secs() / WINDOW_SLOT.as_secs()
    }

    /// Milliseconds since start (for heartbeats).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records one answered request: its route, status, server-side latency
    /// (from `started` to now), and why it was refused, if it was.
    pub fn record_request(
        &self,
        route: Route,
        status: u16,
        started: Instant,
        rejected: &[&'static str],
        invalid: &[InvalidReason],
    ) {
        let now = Instant::now();
        let nanos = u64::try_from(now.saturating_duration_since(started).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let slot = now.saturating_duration_since(self.started).as_secs() / WINDOW_SLOT.as_secs();
        let apply = |t: &Mutex<ThreadStats>| {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.rotate(slot);
            let i = route as usize;
            t.since_start[i].saturating_record(nanos);
            t.current[i].saturating_record(nanos);
            match status_index(status) {
                Some(s) => t.responses[i][s] += 1,
                None => *t.other_responses.entry((route, status)).or_insert(0) += 1,
            }
            for reason in rejected {
                *t.rejected.entry(reason).or_insert(0) += 1;
            }
            for reason in invalid {
                t.invalid[reason.index()] += 1;
            }
        };
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            // Common case: this thread's set, used by reference (no refcount traffic).
            if let Some((_, t)) = local.iter().find(|(id, _)| *id == self.id) {
                return apply(t);
            }
            let t = Arc::new(Mutex::new(ThreadStats::new(slot)));
            self.threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t.clone());
            local.retain(|(_, t)| Arc::strong_count(t) > 1);
            local.push((self.id, t.clone()));
            apply(&t)
        });
    }

    /// Latency per route merged over threads: since start, and over the last minute.
    fn latency_histograms(&self) -> (RouteHistograms, RouteHistograms) {
        let mut all = new_histograms();
        let mut recent = new_histograms();
        let slot = self.slot();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            for (m, one) in all.iter_mut().zip(t.since_start.iter()) {
                // Same bounds on both sides, so `add` cannot fail.
                let _ = m.add(one);
            }
            // A thread idle for a while holds old slots: count only recent ones.
            let take_current = t.slot == slot || t.slot + 1 == slot;
            let take_previous = t.slot == slot;
            for ((r, cur), prev) in recent
                .iter_mut()
                .zip(t.current.iter())
                .zip(t.previous.iter())
            {
                if take_current {
                    let _ = r.add(cur);
                }
                if take_previous {
                    let _ = r.add(prev);
                }
            }
        }
        (all, recent)
    }

    /// Responses per (route, status) and refusals per reason, merged over threads.
    fn responses(
        &self,
    ) -> (
        ResponseCounts,
        HashMap<&'static str, u64>,
        [u64; InvalidReason::ALL.len()],
    ) {
        let mut responses = HashMap::new();
        let mut rejected = HashMap::new();
        let mut invalid = [0u64; InvalidReason::ALL.len()];
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            for (r, row) in Route::ALL.iter().zip(t.responses.iter()) {
                for (status, n) in COMMON_STATUSES.iter().zip(row.iter()) {
                    if *n > 0 {
                        *responses.entry((*r, *status)).or_insert(0) += n;
                    }
                }
            }
            for (k, v) in &t.other_responses {
                *responses.entry(*k).or_insert(0) += v;
            }
            for (k, v) in &t.rejected {
                *rejected.entry(*k).or_insert(0) += v;
            }
            for (sum, n) in invalid.iter_mut().zip(t.invalid.iter()) {
                *sum += n;
            }
        }
        (responses, rejected, invalid)
    }

    /// Records a committed batch into the write-side histograms.
    pub fn record_flush(
        &self,
        took: Duration,
        events: u64,
        freshness_ms: impl Iterator<Item = u64>,
    ) {
        let mut w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        w.flush_us
            .saturating_record((took.as_micros() as u64).max(1));
        w.batch_events.saturating_record(events.max(1));
        for f in freshness_ms {
            w.freshness_ms.saturating_record(f.max(1));
        }
    }
}

/// Percentiles of one route, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        LatencySummary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p95_us: us(h.value_at_quantile(0.95)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Lets one log line through per `every`; the others are only counted.
pub struct RateLimitedLog {
    every_ms: u64,
    last_ms: AtomicU64,
    epoch: Instant,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> Self {
        RateLimitedLog {
            every_ms: every.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// True at most once per period.
    pub fn allow(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + self.every_ms;
        let last = self.last_ms.load(Relaxed);
        now >= last + self.every_ms
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

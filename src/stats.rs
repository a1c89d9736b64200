//! Counters and latency histograms, read by `/health`.
//!
//! Latency is recorded per route into a per-thread set of HDR histograms:
//! each thread locks only its own set (uncontended), and `/health` merges
//! them when asked. Pipeline counters are atomics bumped once per flush or
//! per rejected request, never once per accepted event (the shards count
//! those). Nothing here touches the database.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The routes whose latency is tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    PostImpression,
    PostClick,
    GetImpression,
    GetClick,
    Health,
}

impl Route {
    pub const ALL: [Route; 5] = [
        Route::PostImpression,
        Route::PostClick,
        Route::GetImpression,
        Route::GetClick,
        Route::Health,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Route::PostImpression => "POST /event/impression",
            Route::PostClick => "POST /event/click",
            Route::GetImpression => "GET /event/impression",
            Route::GetClick => "GET /event/click",
            Route::Health => "GET /health",
        }
    }
}

const N_ROUTES: usize = Route::ALL.len();
type RouteHistograms = [Histogram<u64>; N_ROUTES];

fn new_histograms() -> RouteHistograms {
    // 1 ns .. 60 s at 3 significant digits; constant, valid bounds.
    std::array::from_fn(|_| {
        Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .expect("constant histogram bounds are valid")
    })
}

static NEXT_STATS_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static LOCAL_LATENCY: RefCell<Vec<(u64, Arc<Mutex<RouteHistograms>>)>> = const { RefCell::new(Vec::new()) };
}

/// Everything `/health` reports about the pipeline.
pub struct Stats {
    id: u64,
    pub started: Instant,
    latency: Mutex<Vec<Arc<Mutex<RouteHistograms>>>>,
    /// Event requests answered 4xx (nothing buffered).
    pub rejected_invalid: AtomicU64,
    /// Events stored in `events`.
    pub written: AtomicU64,
    /// Events stored in `rejected_events` because their campaign does not exist.
    pub rejected_unknown_campaign: AtomicU64,
    /// Events moved to `rejected_events` because the database refused the batch for good.
    pub dead_lettered: AtomicU64,
    /// Events refused with 503 because a shard's buffer was full.
    pub shed: AtomicU64,
    /// Batches committed.
    pub flushes: AtomicU64,
    /// Batch write attempts that failed (each is retried).
    pub write_failures: AtomicU64,
    pub last_flush_duration_us: AtomicU64,
    pub last_flush_events: AtomicU64,
    /// Receipt → commit of the oldest event of the last batch.
    pub last_flush_age_ms: AtomicU64,
    /// Events handed to the writer and not yet committed, rejected or spooled.
    pub in_writer: AtomicU64,
    pub in_writer_bytes: AtomicU64,
    /// GET pixels answered while shedding load (the event was not kept).
    pub dropped_buffer_full: AtomicU64,
    pub spooled_events: AtomicU64,
    pub spooled_batches: AtomicU64,
    pub spool_failures: AtomicU64,
    pub replayed_events: AtomicU64,
    pub replayed_batches: AtomicU64,
    /// Batches found already committed in the ledger (lost acks, replays).
    pub duplicate_batches: AtomicU64,
    pub spool_damaged_records: AtomicU64,
    pub spool_damaged_bytes: AtomicU64,
    pub db_up: AtomicBool,
    pub migrated: AtomicBool,
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
            latency: Mutex::new(Vec::new()),
            rejected_invalid: AtomicU64::new(0),
            written: AtomicU64::new(0),
            rejected_unknown_campaign: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            last_flush_duration_us: AtomicU64::new(0),
            last_flush_events: AtomicU64::new(0),
            last_flush_age_ms: AtomicU64::new(0),
            in_writer: AtomicU64::new(0),
            in_writer_bytes: AtomicU64::new(0),
            dropped_buffer_full: AtomicU64::new(0),
            spooled_events: AtomicU64::new(0),
            spooled_batches: AtomicU64::new(0),
            spool_failures: AtomicU64::new(0),
            replayed_events: AtomicU64::new(0),
            replayed_batches: AtomicU64::new(0),
            duplicate_batches: AtomicU64::new(0),
            spool_damaged_records: AtomicU64::new(0),
            spool_damaged_bytes: AtomicU64::new(0),
            db_up: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
        }
    }

    /// Records a request's server-side latency into this thread's histograms.
    pub fn record_latency(&self, route: Route, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
        LOCAL_LATENCY.with(|local| {
            let mut local = local.borrow_mut();
            let hist = match local.iter().find(|(id, _)| *id == self.id) {
                Some((_, h)) => h.clone(),
                None => {
                    let h = Arc::new(Mutex::new(new_histograms()));
                    self.latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(h.clone());
                    local.retain(|(_, h)| Arc::strong_count(h) > 1);
                    local.push((self.id, h.clone()));
                    h
                }
            };
            let mut h = hist.lock().unwrap_or_else(|p| p.into_inner());
            h[route as usize].saturating_record(nanos);
        });
    }

    /// Merged latency summaries for every route, in microseconds.
    pub fn latency(&self) -> Vec<(Route, LatencySummary)> {
        let mut merged = new_histograms();
        for h in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            for (m, one) in merged.iter_mut().zip(h.iter()) {
                // Same bounds on both sides, so `add` cannot fail.
                let _ = m.add(one);
            }
        }
        Route::ALL
            .iter()
            .zip(merged.iter())
            .map(|(r, h)| (*r, LatencySummary::of(h)))
            .collect()
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
    fn of(h: &Histogram<u64>) -> LatencySummary {
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

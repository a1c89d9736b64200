//! Heap allocations per event on the parse → shard path, counted by a
//! counting global allocator, without and with the invalid-traffic checks on
//! a realistic user-agent mix. Target: 0 amortized in our code, and 0 extra
//! for the checks once their caches are warm.
//! `cargo bench --bench allocations` prints the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use hyper::header::USER_AGENT;
use ingest::event::{parse_event, user_agent, EventKind, Limits};
use ingest::ivt::{Classifier, ClickDedup, IpSet};
use ingest::shard::ShardSet;

#[path = "fixture.rs"]
mod fixture;
#[path = "traffic.rs"]
mod traffic;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed.
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        LIVE.fetch_add(l.size() as i64, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        LIVE.fetch_add(n as i64 - l.size() as i64, Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NOW: i64 = 1_717_200_000_000;

fn main() {
    let limits = Limits {
        max_future_ms: 3_600_000,
        max_age_ms: 7 * 86_400_000,
    };
    let fx = fixture::Fixture::load();
    let queries: Vec<String> = (0..8192).map(|i| fx.query(i, NOW)).collect();
    let requests = traffic::mix(8192);
    let classifier = Classifier::new(
        None,
        IpSet::default(),
        IpSet::default(),
        ClickDedup::new(30_000, 1_000_000),
    );
    let mut scratch = Vec::with_capacity(4096);
    for checks in [false, true] {
        let shards = ShardSet::new(usize::MAX);
        let mut record = |i: usize| {
            let q = &queries[i % queries.len()];
            let kind = if checks && i.is_multiple_of(10) {
                EventKind::Click
            } else {
                EventKind::Impression
            };
            // Time moves 1 ms per 10 events: the click table rotates every
            // 300,000 events.
            let now = NOW + (i / 10) as i64;
            let ev = parse_event(kind, q.as_bytes(), now, &limits, &mut scratch).expect("valid");
            if checks {
                let r = &requests[(i * 7) % requests.len()];
                let ua = r.headers.get(USER_AGENT).map(|v| user_agent(v.as_bytes()));
                let ua = ua.as_deref();
                let (invalid, _) = classifier.judge(&ev, ua, &r.headers, r.peer, now);
                shards.record(&ev.stored(now, ua, invalid, true))
            } else {
                shards.record(&ev.stored(now, Some("Mozilla/5.0 (X11; Linux x86_64)"), None, true))
            }
            .expect("room");
        };
        let label = if checks {
            "parse -> invalid-traffic checks -> shard"
        } else {
            "parse -> shard"
        };
        measure(label, &shards, &mut record);
    }
    click_table_memory();
}

/// Heap bytes the click table holds per remembered click, at the default
/// cap (1,000,000) and below it; the peak is what an operator provisions.
fn click_table_memory() {
    let query = fixture::Fixture::load().query(0, NOW);
    let mut scratch = Vec::new();
    let ev = parse_event(
        EventKind::Click,
        query.as_bytes(),
        NOW,
        &Limits {
            max_future_ms: 3_600_000,
            max_age_ms: 7 * 86_400_000,
        },
        &mut scratch,
    )
    .expect("valid");
    for (cap, clicks) in [(1_000_000usize, 100_000u32), (1_000_000, 3_000_000)] {
        let before = LIVE.load(Relaxed);
        let dedup = ClickDedup::new(30_000, cap);
        let mut peak = 0i64;
        for i in 0..clicks {
            // Distinct clients, all within one window.
            dedup.seen(&ev, std::net::IpAddr::from(i.to_be_bytes()), "ua", NOW);
            if i % 1024 == 0 {
                peak = peak.max(LIVE.load(Relaxed) - before);
            }
        }
        let held = LIVE.load(Relaxed) - before;
        peak = peak.max(held);
        let tracked = dedup.tracked();
        println!(
            "click table, CLICK_DEDUP_MAX={cap}, {clicks} distinct clicks: {tracked} remembered, \
             {:.1} MiB held = {:.1} bytes per remembered click; peak {:.1} MiB = {:.1} bytes per CLICK_DEDUP_MAX; {} early rotations",
            held as f64 / 1048576.0,
            held as f64 / tracked as f64,
            peak as f64 / 1048576.0,
            peak as f64 / cap as f64,
            dedup.evictions()
        );
    }
}

/// Warms up, then counts allocations between two swaps, and over several
/// flush cycles with the swaps.
fn measure(label: &str, shards: &ShardSet, record: &mut impl FnMut(usize)) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let flush_every = 20_000usize; // the default FLUSH_MAX_EVENTS
                                   // Warm up past two click windows: the first buffers and tables grow; the
                                   // coordinator then sizes new buffers like the last.
    let warm = 700_000usize;
    for i in 0..warm {
        record(i);
        if (i + 1) % flush_every == 0 {
            drop(rt.block_on(shards.take_all(|_, _| {})));
        }
    }
    drop(rt.block_on(shards.take_all(|_, _| {})));

    // Between two swaps: only the request path runs.
    let before = ALLOCS.load(Relaxed);
    let n = flush_every - 1000;
    for i in 0..n {
        record(warm + i);
    }
    let steady = ALLOCS.load(Relaxed) - before;
    drop(rt.block_on(shards.take_all(|_, _| {})));

    // Many full flush cycles, the swap (which allocates the next buffers)
    // and a click-table rotation included.
    let cycles = 40;
    let before = ALLOCS.load(Relaxed);
    for c in 0..cycles {
        for i in 0..flush_every {
            record(2 * warm + c * flush_every + i);
        }
        drop(rt.block_on(shards.take_all(|_, _| {})));
    }
    let amortized = ALLOCS.load(Relaxed) - before;
    println!(
        "{label}, between swaps: {steady} allocations for {n} events = {:.4} per event",
        steady as f64 / n as f64
    );
    println!(
        "{label}, with {cycles} coordinator swaps: {amortized} allocations for {} events = {:.4} per event",
        cycles * flush_every,
        amortized as f64 / (cycles * flush_every) as f64
    );
}

//! Heap allocations per event on the parse → shard path, counted by a
//! counting global allocator. Target: 0 amortized in our code.
//! `cargo bench --bench allocations` prints the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ingest::event::{parse_event, EventKind, Limits};
use ingest::shard::ShardSet;

#[path = "fixture.rs"]
mod fixture;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let shards = ShardSet::new(usize::MAX);
    let mut scratch = Vec::with_capacity(4096);
    let flush_every = 20_000usize; // the default FLUSH_MAX_EVENTS
    let mut record = |i: usize| {
        let q = &queries[i % queries.len()];
        let ev = parse_event(
            EventKind::Impression,
            q.as_bytes(),
            NOW,
            &limits,
            &mut scratch,
        )
        .expect("valid");
        shards
            .record(&ev.stored(NOW, Some("Mozilla/5.0 (X11; Linux x86_64)"), None, true))
            .expect("room");
    };

    // Warm up: the first buffers grow; the coordinator then sizes new ones like the last.
    for i in 0..flush_every {
        record(i);
    }
    drop(rt.block_on(shards.take_all(|_, _| {})));

    // Between two swaps: only the request path runs.
    let before = ALLOCS.load(Relaxed);
    let n = flush_every - 1000;
    for i in 0..n {
        record(i);
    }
    let steady = ALLOCS.load(Relaxed) - before;

    // Several full flush cycles, the swap (which allocates the next buffers) included.
    let cycles = 10;
    let before = ALLOCS.load(Relaxed);
    for c in 0..cycles {
        for i in 0..flush_every {
            record(c * flush_every + i);
        }
        drop(rt.block_on(shards.take_all(|_, _| {})));
    }
    let amortized = ALLOCS.load(Relaxed) - before;
    println!(
        "parse -> shard, between swaps: {steady} allocations for {n} events = {:.4} per event",
        steady as f64 / n as f64
    );
    println!(
        "parse -> shard, with {cycles} coordinator swaps: {amortized} allocations for {} events = {:.4} per event",
        cycles * flush_every,
        amortized as f64 / (cycles * flush_every) as f64
    );
}

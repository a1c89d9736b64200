//! Hot path: parse + validate a realistic query; parse + validate + record
//! into this thread's shard. No database. `cargo bench --bench hot_path`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingest::event::{parse_event, EventKind, Limits};
use ingest::shard::ShardSet;

#[path = "fixture.rs"]
mod fixture;

const NOW: i64 = 1_717_200_000_000;
const LIMITS: Limits = Limits {
    max_future_ms: 3_600_000,
    max_age_ms: 7 * 86_400_000,
};
const UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";

fn benches(c: &mut Criterion) {
    let fx = fixture::Fixture::load();
    let queries: Vec<String> = (0..4096).map(|i| fx.query(i, NOW)).collect();
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    let mut scratch = Vec::with_capacity(4096);

    let mut i = 0usize;
    g.bench_function("parse_validate", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let ev = parse_event(
                EventKind::Impression,
                black_box(queries[i].as_bytes()),
                NOW,
                &LIMITS,
                &mut scratch,
            );
            black_box(ev.is_ok())
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let shards = ShardSet::new(usize::MAX);
    let mut n = 0usize;
    g.bench_function("parse_validate_record", |b| {
        b.iter(|| {
            n += 1;
            let q = &queries[n & 4095];
            let ev = parse_event(
                EventKind::Impression,
                q.as_bytes(),
                NOW,
                &LIMITS,
                &mut scratch,
            )
            .expect("valid");
            shards
                .record(&ev.stored(NOW, Some(UA), None, true))
                .expect("room");
            // Swap as the coordinator would at the default size trigger.
            if n.is_multiple_of(20_000) {
                black_box(rt.block_on(shards.take_all(|_, _| {})));
            }
        })
    });
    g.finish();
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);

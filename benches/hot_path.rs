//! Hot path: parse + validate a realistic query; parse + validate + record
//! into this thread's shard; and the same with the invalid-traffic checks
//! (`ivt.rs`) on a realistic user-agent mix (`traffic.rs`), one click in ten,
//! so the difference is what classification costs per event. No database.
//! `cargo bench --bench hot_path`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hyper::header::USER_AGENT;
use ingest::event::{parse_event, user_agent, EventKind, Limits};
use ingest::ivt::{Classifier, ClickDedup, IpSet};
use ingest::shard::ShardSet;

#[path = "fixture.rs"]
mod fixture;
#[path = "traffic.rs"]
mod traffic;

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

    // The same, with the checks, as `http::record` runs them.
    let requests = traffic::mix(4096);
    let classifier = Classifier::new(
        None,
        IpSet::default(),
        IpSet::default(),
        ClickDedup::new(30_000, 1_000_000),
    );
    let shards = ShardSet::new(usize::MAX);
    let mut n = 0usize;
    g.bench_function("parse_validate_classify_record", |b| {
        b.iter(|| {
            n += 1;
            let q = &queries[n & 4095];
            let r = &requests[n.wrapping_mul(7) & 4095];
            let kind = if n.is_multiple_of(10) {
                EventKind::Click
            } else {
                EventKind::Impression
            };
            // Time moves on 1 ms per 10 events, so the click table rotates.
            let now = NOW + (n / 10) as i64;
            let ev = parse_event(kind, q.as_bytes(), now, &LIMITS, &mut scratch).expect("valid");
            let ua = r.headers.get(USER_AGENT).map(|v| user_agent(v.as_bytes()));
            let ua = ua.as_deref();
            let (invalid, _) = classifier.judge(&ev, ua, &r.headers, r.peer, now);
            shards
                .record(&ev.stored(now, ua, invalid, true))
                .expect("room");
            if n.is_multiple_of(20_000) {
                black_box(rt.block_on(shards.take_all(|_, _| {})));
            }
        })
    });

    // The checks alone: warm cache, and a user agent never seen before (the
    // bot patterns run; once per distinct agent per thread).
    let ev = parse_event(
        EventKind::Impression,
        queries[0].as_bytes(),
        NOW,
        &LIMITS,
        &mut scratch,
    )
    .expect("valid");
    let mut n = 0usize;
    g.bench_function("classify_warm", |b| {
        b.iter(|| {
            n += 1;
            let r = &requests[n & 4095];
            let ua = r.headers.get(USER_AGENT).map(|v| user_agent(v.as_bytes()));
            black_box(classifier.classify(&ev, ua.as_deref(), &r.headers, r.peer, NOW))
        })
    });
    let fresh: Vec<String> = (0..1_000_000)
        .map(|i| format!("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.{i}.0 Safari/537.36"))
        .collect();
    let mut n = 0usize;
    g.bench_function("classify_new_user_agent", |b| {
        b.iter(|| {
            n = (n + 1) % fresh.len();
            let r = &requests[0];
            black_box(classifier.classify(&ev, Some(&fresh[n]), &r.headers, r.peer, NOW))
        })
    });
    g.finish();
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);

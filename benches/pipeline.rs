//! Between the shards and PostgreSQL: the coordinator's swap + merge for
//! realistic batch sizes and key counts, and encoding a batch for binary COPY.
//! `cargo bench --bench pipeline`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ingest::batch::Batch;
use ingest::event::{Event, EventKind};
use ingest::pgcopy::CopyEncoder;
use ingest::shard::ShardSet;
use ingest::writer::encode_event;
use uuid::Uuid;

#[path = "fixture.rs"]
mod fixture;

const NOW: i64 = 1_717_200_000_000;

/// Fills `threads` shards with `events` events spread over about `keys` aggregate keys.
fn filled(events: usize, keys: usize, threads: usize, fx: &Arc<fixture::Fixture>) -> Arc<ShardSet> {
    let set = Arc::new(ShardSet::new(usize::MAX));
    let per = events / threads;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (set, fx) = (set.clone(), fx.clone());
            std::thread::spawn(move || {
                for i in 0..per {
                    let k = (t * per + i) % keys;
                    let url = "https://news.example.com/articles/2030/summer-fix-fix-travel";
                    let ev = Event {
                        kind: if i % 10 == 0 {
                            EventKind::Click
                        } else {
                            EventKind::Impression
                        },
                        ad_unit_id: fx.ad_units[k % fx.ad_units.len()],
                        campaign_id: fx.campaigns[(k / fx.ad_units.len()) % fx.campaigns.len()].0,
                        creative_id: fx.creatives[i % fx.creatives.len()],
                        page_url: url,
                        timestamp_ms: NOW,
                        event_id: None,
                    };
                    set.record(&ev.stored(NOW, Some("Mozilla/5.0"), None, true))
                        .expect("room");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("filler");
    }
    set
}

fn swap_and_merge(c: &mut Criterion) {
    let fx = Arc::new(fixture::Fixture::load());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("coordinator_swap_merge");
    g.sample_size(20);
    // (events, distinct keys): the wrk load makes nearly every key distinct;
    // real traffic concentrates on fewer.
    for (events, keys) in [
        (20_000, 20_000),
        (20_000, 500),
        (100_000, 100_000),
        (100_000, 2_000),
    ] {
        g.throughput(Throughput::Elements(events as u64));
        g.bench_with_input(
            BenchmarkId::new(format!("{keys}_keys"), events),
            &events,
            |b, &events| {
                b.iter_batched(
                    || filled(events, keys, 2, &fx),
                    |set| {
                        let parts = rt.block_on(set.take_all(|_, _| {}));
                        black_box(Batch::from_parts(parts))
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

fn copy_encoding(c: &mut Criterion) {
    let fx = Arc::new(fixture::Fixture::load());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let accounts: HashMap<Uuid, Uuid> = fx.campaigns.iter().copied().collect();
    let mut g = c.benchmark_group("copy_encode");
    g.sample_size(20);
    for events in [20_000usize, 100_000] {
        let set = filled(events, events, 2, &fx);
        let batch = Batch::from_parts(rt.block_on(set.take_all(|_, _| {})));
        g.throughput(Throughput::Elements(events as u64));
        g.bench_with_input(BenchmarkId::from_parameter(events), &batch, |b, batch| {
            b.iter(|| {
                let mut enc = CopyEncoder::new(1 << 20);
                let mut sent = 0usize;
                for row in batch.rows() {
                    if let Some(account) = accounts.get(&row.campaign_id) {
                        encode_event(&mut enc, &row, account);
                    }
                    if enc.len() >= 1 << 20 {
                        sent += enc.take().len();
                    }
                }
                black_box(sent + enc.finish().len())
            })
        });
    }
    g.finish();
}

criterion_group!(pipeline, swap_and_merge, copy_encoding);
criterion_main!(pipeline);

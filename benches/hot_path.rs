//! Hot-path micro-benchmark: parse + validate a realistic query and record the
//! event into a shard, then a coordinator swap. Prints ns per event; no
//! database involved. Run: `cargo bench --bench hot_path`.
//! (Plain timing loop for now; the criterion suite comes with the performance work.)

use std::hint::black_box;
use std::time::Instant;

use ingest::event::{parse_event, EventKind, Limits};
use ingest::shard::ShardSet;

const QUERY: &str = "ad_unit_id=1b4e28ba-2fa1-41d2-883f-0016d3cca427&campaign_id=fe5dd6f6-5d04-4969-b606-7ae6ac125000\
&creative_id=6f1a9e0c-3d2b-4c5e-9f7a-8b6c5d4e3f21&page_url=https%3A%2F%2Fnews.example.com%2Farticles%2F2030%2Fsummer-fix-fix-travel\
&timestamp=1717200000000";

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let limits = Limits {
        max_future_ms: 3_600_000,
        max_age_ms: i64::MAX / 2,
    };
    let now = 1_717_200_000_500;
    let mut scratch = Vec::with_capacity(4096);
    let n = 2_000_000u64;

    let t = Instant::now();
    for _ in 0..n {
        let ev = parse_event(
            EventKind::Impression,
            black_box(QUERY.as_bytes()),
            now,
            &limits,
            &mut scratch,
        );
        black_box(ev.is_ok());
    }
    let parse_ns = t.elapsed().as_nanos() as f64 / n as f64;

    let shards = ShardSet::new(usize::MAX);
    let t = Instant::now();
    for i in 0..n {
        let ev = parse_event(
            EventKind::Impression,
            QUERY.as_bytes(),
            now + (i as i64 % 1000),
            &limits,
            &mut scratch,
        )
        .expect("valid query");
        shards
            .record(&ev, Some("Mozilla/5.0 (X11; Linux x86_64)"), now)
            .expect("room");
        if i % 200_000 == 199_999 {
            black_box(runtime.block_on(shards.take_all(|_, _| {})));
        }
    }
    let record_ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("parse+validate: {parse_ns:.0} ns/event");
    println!("parse+validate+record (swap every 200k): {record_ns:.0} ns/event");
}

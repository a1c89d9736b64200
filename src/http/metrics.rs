//! `GET /metrics`: Prometheus exposition through `prometheus-client`.
//!
//! Nothing on the request path updates a shared metric: every family is
//! rendered from one [`Snapshot`] (the same one `/health` renders), and the
//! pipeline counters come from the [`Counter`] table, so a new counter appears
//! here without an edit. Histograms come from HDR histograms, so their
//! buckets are exact to 3 significant digits. Names are listed in the README
//! ("Metrics").

use std::sync::Arc;

use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::response::Body;
use crate::batch::InvalidReason;
use crate::stats::{Counter, Route, Snapshot};

/// Request-duration buckets, seconds: fine from 1 µs to 50 ms (and beyond).
const REQUEST_BUCKETS_S: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
];
const FLUSH_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0, 100_000.0, 500_000.0,
];
const FRESHNESS_BUCKETS_S: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 6.0, 7.5, 10.0, 30.0, 60.0, 300.0,
];

/// Encodes one snapshot.
struct SnapshotCollector {
    snap: Arc<Snapshot>,
}

impl std::fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

type E = std::fmt::Error;

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), E> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), E> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// (sum, count, per-bucket counts) of `h` in `unit`s, for `bounds` given in the same unit.
fn buckets(h: &Histogram<u64>, unit: f64, bounds: &[f64]) -> (f64, u64, Vec<(f64, u64)>) {
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut below = 0u64;
    for &b in bounds {
        let upto = (b / unit) as u64;
        let c = if h.is_empty() {
            0
        } else {
            h.count_between(0, upto)
        };
        out.push((b, c.saturating_sub(below)));
        below = c.max(below);
    }
    out.push((f64::INFINITY, h.len().saturating_sub(below)));
    let sum = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        * unit;
    (sum, h.len(), out)
}

/// A counter without labels: (family, help, value).
type Plain = (&'static str, &'static str, u64);
/// A labelled counter family: (family, (help, label key, [(label value, count)])).
type Family = (
    &'static str,
    (&'static str, &'static str, Vec<(&'static str, u64)>),
);

/// The [`Counter`] table grouped into families, in declaration order; the
/// refusals per code join `ingest_events_rejected`.
fn counter_families(s: &Snapshot) -> (Vec<Plain>, Vec<Family>) {
    let mut plain = Vec::new();
    let mut labelled: Vec<Family> = Vec::new();
    for c in Counter::ALL {
        let info = c.info();
        if info.family.is_empty() {
            continue;
        }
        match info.label {
            None => plain.push((info.family, info.help, s.counter(*c))),
            Some((key, value)) => {
                match labelled.iter_mut().find(|(name, _)| *name == info.family) {
                    Some((_, (_, _, rows))) => rows.push((value, s.counter(*c))),
                    None => {
                        labelled.push((info.family, (info.help, key, vec![(value, s.counter(*c))])))
                    }
                }
            }
        }
    }
    if let Some((_, (_, _, rows))) = labelled
        .iter_mut()
        .find(|(name, _)| *name == "ingest_events_rejected")
    {
        rows.extend(s.rejected.iter().copied());
        rows.sort();
    }
    (plain, labelled)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), E> {
        let s = &*self.snap;
        let w = &s.write_side;
        {
            let mut m = enc.encode_descriptor(
                "ingest_http_requests",
                "HTTP requests answered, by route and status",
                None,
                MetricType::Counter,
            )?;
            let mut rows: Vec<_> = s.responses.iter().collect();
            rows.sort_by_key(|((r, st), _)| (*r as usize, *st));
            for ((route, status), n) in rows {
                let labels = [
                    ("route", route.metric_label().to_string()),
                    ("status", status.to_string()),
                ];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "ingest_http_request_duration_seconds",
                "Server-side request duration, from the request head to the response",
                None,
                MetricType::Histogram,
            )?;
            for route in Route::ALL {
                let (sum, count, b) = buckets(&s.latency[route as usize], 1e-9, REQUEST_BUCKETS_S);
                m.encode_family(&[("route", route.metric_label())])?
                    .encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
            }
        }
        counter(
            &mut enc,
            "ingest_events_accepted",
            "Events accepted (acknowledged) since start",
            s.shards.recorded,
        )?;
        let (plain, labelled) = counter_families(s);
        for (name, (help, key, rows)) in labelled {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (value, n) in rows {
                m.encode_family(&[(key, value)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        for (name, help, v) in plain {
            counter(&mut enc, name, help, v)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "ingest_events_invalid",
                "Events recorded as invalid traffic (stored, not billed), by reason",
                None,
                MetricType::Counter,
            )?;
            for r in InvalidReason::ALL {
                m.encode_family(&[("reason", r.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&s.invalid[r.index()], None)?;
            }
        }
        gauge(
            &mut enc,
            "ingest_click_dedup_tracked",
            "Clicks remembered for duplicate detection",
            s.clicks_tracked as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_event_ids_remembered",
            "Event ids this replica remembers, so a repeat is answered without recording it",
            s.event_ids_tracked as i64,
        )?;
        counter(
            &mut enc,
            "ingest_click_dedup_evictions",
            "Times the click table dropped its older generation early, at CLICK_DEDUP_MAX",
            s.click_evictions,
        )?;
        gauge(
            &mut enc,
            "ingest_events_buffered",
            "Events held in memory: in shards or in the writer, not yet committed or spooled",
            s.in_memory() as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_events_pending",
            "Events accepted and not yet committed (in memory or in the spool)",
            s.pending() as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_shedding",
            "1 while refusing events at the memory cap",
            s.shards.shedding as i64,
        )?;
        for (name, help, h, unit, bounds) in [
            (
                "ingest_flush_duration_seconds",
                "Batch write time, claim to commit",
                &s.write.flush_us,
                1e-6,
                FLUSH_BUCKETS_S,
            ),
            (
                "ingest_flush_batch_events",
                "Events per committed batch",
                &s.write.batch_events,
                1.0,
                BATCH_BUCKETS,
            ),
            (
                "ingest_event_freshness_seconds",
                "Time from an event's receipt to its commit",
                &s.write.freshness_ms,
                1e-3,
                FRESHNESS_BUCKETS_S,
            ),
        ] {
            let (sum, count, b) = buckets(h, unit, bounds);
            enc.encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "ingest_db_pool_connections",
                "Database pool connections by state",
                None,
                MetricType::Gauge,
            )?;
            let in_use = w.pool.size.saturating_sub(w.pool.idle) as i64;
            m.encode_family(&[("state", "in_use")])?
                .encode_gauge(&in_use)?;
            m.encode_family(&[("state", "idle")])?
                .encode_gauge(&(w.pool.idle as i64))?;
        }
        for (name, help, v) in [
            (
                "ingest_db_pool_max",
                "Database pool size limit",
                w.pool.max as i64,
            ),
            (
                "ingest_db_pool_waiting",
                "Tasks waiting for a pool connection",
                w.pool.waiting as i64,
            ),
            (
                "ingest_database_up",
                "1 while the database answers",
                s.db_up as i64,
            ),
            (
                "ingest_campaign_cache_size",
                "Campaigns in the account cache",
                w.campaigns_cached as i64,
            ),
            (
                "ingest_spool_bytes",
                "Bytes in the on-disk spool",
                w.spool_bytes as i64,
            ),
            (
                "ingest_spool_max_bytes",
                "Spool size cap",
                w.spool_max_bytes as i64,
            ),
            (
                "ingest_uptime_seconds",
                "Seconds since start",
                s.uptime.as_secs() as i64,
            ),
        ] {
            gauge(&mut enc, name, help, v)?;
        }
        counter(
            &mut enc,
            "ingest_campaign_cache_hits",
            "Campaign lookups served by the cache",
            w.campaign_cache_hits,
        )?;
        counter(
            &mut enc,
            "ingest_campaign_cache_misses",
            "Campaign lookups that went to the database",
            w.campaign_cache_misses,
        )?;
        Ok(())
    }
}

/// The exposition text of one snapshot (`None` if encoding failed).
pub fn render(snapshot: Snapshot) -> Option<Bytes> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector {
        snap: Arc::new(snapshot),
    }));
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &registry).ok()?;
    Some(Bytes::from(text))
}

/// The `/metrics` response from rendered text.
pub fn respond(text: Option<&Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::default());
    match text {
        Some(t) => {
            *r.body_mut() = Body::new(t.clone());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
        }
        None => *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    r
}

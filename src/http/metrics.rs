//! `GET /metrics`: Prometheus exposition through `prometheus-client`.
//!
//! Nothing on the request path updates a shared metric: a collector builds
//! every family at scrape time from what the service already keeps (the
//! per-thread request statistics, the pipeline atomics, the write-side
//! histograms, the pool status). Histograms come from HDR histograms, so
//! their buckets are exact to 3 significant digits. Names are listed in the
//! README ("Metrics").

use std::sync::atomic::Ordering::Relaxed;
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
use super::AppState;
use crate::stats::Route;

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

/// Builds the text on each scrape.
struct IngestCollector {
    state: Arc<AppState>,
}

impl std::fmt::Debug for IngestCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IngestCollector")
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

impl Collector for IngestCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), E> {
        let state = &*self.state;
        let s = &state.stats;

        let (responses, rejected) = s.responses();
        {
            let mut m = enc.encode_descriptor(
                "ingest_http_requests",
                "HTTP requests answered, by route and status",
                None,
                MetricType::Counter,
            )?;
            let mut rows: Vec<_> = responses.iter().collect();
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
            let (all, _) = s.latency_histograms();
            let mut m = enc.encode_descriptor(
                "ingest_http_request_duration_seconds",
                "Server-side request duration, from the request head to the response",
                None,
                MetricType::Histogram,
            )?;
            for route in Route::ALL {
                let (sum, count, b) = buckets(&all[route as usize], 1e-9, REQUEST_BUCKETS_S);
                m.encode_family(&[("route", route.metric_label())])?
                    .encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
            }
        }
        counter(
            &mut enc,
            "ingest_events_accepted",
            "Events accepted (acknowledged) since start",
            state.shards.recorded(),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "ingest_events_rejected",
                "Requests refused with a 4xx/503, by reason; unknown_campaign counts events stored in rejected_events",
                None,
                MetricType::Counter,
            )?;
            let mut reasons: Vec<(&str, u64)> = rejected.iter().map(|(k, v)| (*k, *v)).collect();
            reasons.push((
                "unknown_campaign",
                s.rejected_unknown_campaign.load(Relaxed),
            ));
            reasons.sort();
            for (reason, n) in reasons {
                m.encode_family(&[("reason", reason)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        counter(
            &mut enc,
            "ingest_events_written",
            "Events committed to the events table",
            s.written.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "ingest_events_dead_lettered",
            "Events moved to rejected_events because the database refused their batch",
            s.dead_lettered.load(Relaxed),
        )?;
        enc.encode_descriptor(
            "ingest_events_dropped",
            "GET pixel events answered but not kept, by reason",
            None,
            MetricType::Counter,
        )?
        .encode_family(&[("reason", "buffer_full")])?
        .encode_counter::<NoLabelSet, _, u64>(&s.dropped_buffer_full.load(Relaxed), None)?;
        let accepted = state.shards.recorded();
        let stored = s.written.load(Relaxed)
            + s.rejected_unknown_campaign.load(Relaxed)
            + s.dead_lettered.load(Relaxed);
        gauge(
            &mut enc,
            "ingest_events_buffered",
            "Events held in memory: in shards or in the writer, not yet committed or spooled",
            (state.shards.pending() + s.in_writer.load(Relaxed)) as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_events_pending",
            "Events accepted and not yet committed (in memory or in the spool)",
            accepted.saturating_sub(stored) as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_shedding",
            "1 while refusing events at the memory cap",
            state.shards.is_shedding() as i64,
        )?;
        {
            let w = s.write.lock().unwrap_or_else(|p| p.into_inner());
            for (name, help, h, unit, bounds) in [
                (
                    "ingest_flush_duration_seconds",
                    "Batch write time, claim to commit",
                    &w.flush_us,
                    1e-6,
                    FLUSH_BUCKETS_S,
                ),
                (
                    "ingest_flush_batch_events",
                    "Events per committed batch",
                    &w.batch_events,
                    1.0,
                    BATCH_BUCKETS,
                ),
                (
                    "ingest_event_freshness_seconds",
                    "Time from an event's receipt to its commit",
                    &w.freshness_ms,
                    1e-3,
                    FRESHNESS_BUCKETS_S,
                ),
            ] {
                let (sum, count, b) = buckets(h, unit, bounds);
                enc.encode_descriptor(name, help, None, MetricType::Histogram)?
                    .encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
            }
        }
        counter(
            &mut enc,
            "ingest_flushes",
            "Batches committed",
            s.flushes.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "ingest_write_failures",
            "Batch write attempts that failed",
            s.write_failures.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "ingest_duplicate_batches",
            "Batches found already committed in the ledger (lost acknowledgements, replays)",
            s.duplicate_batches.load(Relaxed),
        )?;
        let pool = state.pool.status();
        {
            let mut m = enc.encode_descriptor(
                "ingest_db_pool_connections",
                "Database pool connections by state",
                None,
                MetricType::Gauge,
            )?;
            let in_use = pool.size.saturating_sub(pool.available) as i64;
            m.encode_family(&[("state", "in_use")])?
                .encode_gauge(&in_use)?;
            m.encode_family(&[("state", "idle")])?
                .encode_gauge(&(pool.available as i64))?;
        }
        gauge(
            &mut enc,
            "ingest_db_pool_max",
            "Database pool size limit",
            pool.max_size as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_db_pool_waiting",
            "Tasks waiting for a pool connection",
            pool.waiting as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_database_up",
            "1 while the database answers",
            s.db_up.load(Relaxed) as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_campaign_cache_size",
            "Campaigns in the account cache",
            state.accounts.len() as i64,
        )?;
        counter(
            &mut enc,
            "ingest_campaign_cache_hits",
            "Campaign lookups served by the cache",
            state.accounts.hits.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "ingest_campaign_cache_misses",
            "Campaign lookups that went to the database",
            state.accounts.misses.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "ingest_spool_bytes",
            "Bytes in the on-disk spool",
            state.spool.bytes() as i64,
        )?;
        gauge(
            &mut enc,
            "ingest_spool_max_bytes",
            "Spool size cap",
            state.spool.max_bytes() as i64,
        )?;
        counter(
            &mut enc,
            "ingest_spooled_events",
            "Events written to the spool",
            s.spooled_events.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "ingest_replayed_events",
            "Spooled events committed by replay",
            s.replayed_events.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "ingest_spool_damaged_records",
            "Damaged spool records reported and skipped",
            s.spool_damaged_records.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "ingest_uptime_seconds",
            "Seconds since start",
            s.started.elapsed().as_secs() as i64,
        )?;
        Ok(())
    }
}

/// The `/metrics` response.
pub fn respond(state: &Arc<AppState>) -> Response<Body> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(IngestCollector {
        state: state.clone(),
    }));
    let mut text = String::with_capacity(16 * 1024);
    let result = prometheus_client::encoding::text::encode(&mut text, &registry);
    let mut r = Response::new(Body::default());
    match result {
        Ok(()) => {
            *r.body_mut() = Body::new(Bytes::from(text));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
        }
        Err(_) => *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    r
}

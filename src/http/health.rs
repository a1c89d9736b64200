//! `GET /health`: the Node service's fields plus latency and pipeline numbers.
//!
//! Reads counters and merges the per-thread histograms; never queries the
//! database (the `database` field reflects the background probe and the last
//! write), so it stays cheap enough to poll.

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use bytes::Bytes;
use flate2::{write::GzEncoder, Compression};
use hyper::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use super::response::{json as json_response, Body};
use super::AppState;

/// Builds the `/health` document.
pub fn document(state: &AppState) -> Value {
    let s = &state.stats;
    let db_up = s.db_up.load(Relaxed);
    let status = if state.shutting_down.load(Relaxed) {
        "shutting_down"
    } else if db_up {
        "healthy"
    } else {
        "degraded"
    };
    let accepted = state.shards.recorded();
    let stored = s.written.load(Relaxed)
        + s.rejected_unknown_campaign.load(Relaxed)
        + s.dead_lettered.load(Relaxed);
    let mut latency = Map::new();
    let mut recent = Map::new();
    for (route, all, last_minute) in s.latency() {
        latency.insert(
            route.label().to_string(),
            serde_json::to_value(all).unwrap_or(Value::Null),
        );
        recent.insert(
            route.label().to_string(),
            serde_json::to_value(last_minute).unwrap_or(Value::Null),
        );
    }
    let spool = json!({
        "bytes": state.spool.bytes(),
        "max_bytes": state.spool.max_bytes(),
        "spooled_events": s.spooled_events.load(Relaxed),
        "spooled_batches": s.spooled_batches.load(Relaxed),
        "replayed_events": s.replayed_events.load(Relaxed),
        "replayed_batches": s.replayed_batches.load(Relaxed),
        "failures": s.spool_failures.load(Relaxed),
        "damaged_records": s.spool_damaged_records.load(Relaxed),
        "damaged_bytes": s.spool_damaged_bytes.load(Relaxed),
    });
    json!({
        "spool": spool,
        "status": status,
        "service": "analytics-ingest",
        "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "database": if db_up { "connected" } else { "disconnected" },
        "uptime": (s.started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        "latency_us": latency,
        "latency_us_last_60s": recent,
        "pipeline": {
            "accepted": accepted,
            "rejected": s.rejected_invalid.load(Relaxed),
            "shed": s.shed.load(Relaxed),
            "dropped": { "buffer_full": s.dropped_buffer_full.load(Relaxed) },
            "shedding": state.shards.is_shedding(),
            "buffered": accepted.saturating_sub(stored),
            "buffered_in_shards": state.shards.pending(),
            "in_writer": s.in_writer.load(Relaxed),
            "written": s.written.load(Relaxed),
            "unknown_campaign": s.rejected_unknown_campaign.load(Relaxed),
            "dead_lettered": s.dead_lettered.load(Relaxed),
            "flushes": s.flushes.load(Relaxed),
            "write_failures": s.write_failures.load(Relaxed),
            "last_flush_duration_ms": s.last_flush_duration_us.load(Relaxed) as f64 / 1000.0,
            "last_flush_events": s.last_flush_events.load(Relaxed),
            "last_flush_age_ms": s.last_flush_age_ms.load(Relaxed),
            "migrated": s.migrated.load(Relaxed),
            "duplicate_batches": s.duplicate_batches.load(Relaxed),
            "in_writer_bytes": s.in_writer_bytes.load(Relaxed),
            "campaigns_cached": state.campaigns_cached(),
        },
    })
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|item| {
                let mut parts = item.split(';');
                let coding = parts.next().unwrap_or("").trim();
                let q_zero = parts.any(|p| {
                    let p = p.trim().replace(' ', "");
                    p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
                });
                (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !q_zero
            })
        })
}

/// The `/health` response, gzipped when the client accepts it.
pub fn respond(state: &AppState, request: &HeaderMap, with_body: bool) -> Response<Body> {
    let body = document(state).to_string();
    let mut r = if accepts_gzip(request) {
        let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 3), Compression::fast());
        match enc.write_all(body.as_bytes()).and_then(|_| enc.finish()) {
            Ok(gz) => {
                let mut r = json_response(StatusCode::OK, String::new());
                *r.body_mut() = Body::new(Bytes::from(gz));
                r.headers_mut()
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            Err(_) => json_response(StatusCode::OK, body),
        }
    } else {
        json_response(StatusCode::OK, body)
    };
    r.headers_mut()
        .insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    if !with_body {
        *r.body_mut() = Body::default();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(ACCEPT_ENCODING, HeaderValue::from_static("br, gzip;q=0.8"));
        assert!(accepts_gzip(&h));
        h.insert(
            ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0, deflate"),
        );
        assert!(!accepts_gzip(&h));
    }
}

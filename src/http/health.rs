//! `GET /health`: the Node service's fields plus latency and pipeline numbers.
//!
//! Renders one [`Snapshot`] (the same one `/metrics` renders); never queries
//! the database (the `database` field reflects the background probe and the
//! last write). Every [`Counter`] appears at the place its declaration names.

use std::io::Write;

use bytes::Bytes;
use flate2::{write::GzEncoder, Compression};
use hyper::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use super::response::{json as json_response, Body};
use crate::batch::InvalidReason;
use crate::stats::{Counter, LatencySummary, Route, RouteHistograms, Snapshot};

/// Sets `doc[a][b]…` for the dotted `path`, creating objects on the way.
fn put(doc: &mut Map<String, Value>, path: &str, v: Value) {
    let mut keys = path.split('.').peekable();
    let mut at = doc;
    while let Some(k) = keys.next() {
        if keys.peek().is_none() {
            at.insert(k.to_string(), v);
            return;
        }
        let next = at
            .entry(k.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        let Value::Object(m) = next else { return };
        at = m;
    }
}

fn latency(h: &RouteHistograms) -> Value {
    let mut m = Map::new();
    for route in Route::ALL {
        m.insert(
            route.label().to_string(),
            serde_json::to_value(LatencySummary::of(&h[route as usize])).unwrap_or(Value::Null),
        );
    }
    Value::Object(m)
}

/// Events recorded as invalid, by reason, and the click table.
fn invalid_traffic(s: &Snapshot) -> Value {
    let mut m = Map::new();
    for r in InvalidReason::ALL {
        m.insert(r.as_str().to_string(), s.invalid[r.index()].into());
    }
    m.insert("clicks_tracked".into(), s.clicks_tracked.into());
    m.insert("click_dedup_evictions".into(), s.click_evictions.into());
    Value::Object(m)
}

/// Builds the `/health` document from one snapshot.
pub fn document(s: &Snapshot) -> Value {
    let w = &s.write_side;
    let mut doc = Map::new();
    let base = json!({
        "status": s.status(),
        "service": "analytics-ingest",
        "timestamp": humantime::format_rfc3339_millis(s.at).to_string(),
        "database": if s.db_up { "connected" } else { "disconnected" },
        "uptime": (s.uptime.as_secs_f64() * 100.0).round() / 100.0,
        "latency_us": latency(&s.latency),
        "latency_us_last_60s": latency(&s.latency_recent),
        "pipeline": {
            "accepted": s.shards.recorded,
            "shedding": s.shards.shedding,
            "buffered": s.pending(),
            "buffered_in_shards": s.shards.pending,
            "in_writer": s.in_writer,
            "in_writer_bytes": s.in_writer_bytes,
            "last_flush_duration_ms": s.last_flush_duration_us as f64 / 1000.0,
            "last_flush_events": s.last_flush_events,
            "last_flush_age_ms": s.last_flush_age_ms,
            "migrated": s.migrated,
            "partitions_ready": s.maintained,
            "campaigns_cached": w.campaigns_cached,
        },
        "invalid_traffic": invalid_traffic(s),
        "spool": {
            "bytes": w.spool_bytes,
            "max_bytes": w.spool_max_bytes,
            "accepting": w.spool_accepting,
        },
    });
    if let Value::Object(m) = base {
        doc = m;
    }
    for c in Counter::ALL {
        put(&mut doc, c.info().health, s.counter(*c).into());
    }
    put(&mut doc, "event_ids.remembered", s.event_ids_tracked.into());
    Value::Object(doc)
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

/// The `/health` document as JSON, and gzipped (rendered once per snapshot).
pub fn render(snapshot: &Snapshot) -> (Bytes, Option<Bytes>) {
    let body = document(snapshot).to_string();
    let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 3), Compression::fast());
    let gz = enc
        .write_all(body.as_bytes())
        .and_then(|_| enc.finish())
        .ok()
        .map(Bytes::from);
    (Bytes::from(body), gz)
}

/// The `/health` response from a rendered document, gzipped when the client accepts it.
pub fn respond(json: &Bytes, gz: Option<&Bytes>, request: &HeaderMap) -> Response<Body> {
    let mut r = json_response(StatusCode::OK, String::new());
    match gz.filter(|_| accepts_gzip(request)) {
        Some(gz) => {
            *r.body_mut() = Body::new(gz.clone());
            r.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        None => *r.body_mut() = Body::new(json.clone()),
    }
    r.headers_mut()
        .insert(VARY, HeaderValue::from_static("Accept-Encoding"));
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

//! The hyper service: routing, CORS, the pixel, `/health`, errors → statuses.
//!
//! | path | methods | does |
//! |---|---|---|
//! | `/event/impression`, `/event/click` | POST | record, `204` |
//! | | GET | record, `200` 1×1 GIF |
//! | | HEAD | `200` GIF headers, records nothing (prefetchers) |
//! | | OPTIONS | CORS preflight |
//! | `/health` | GET, HEAD | JSON status, latency, pipeline counters |
//! | `/metrics` | GET, HEAD | Prometheus / OpenMetrics text |
//! | `/livez`, `/readyz` | GET, HEAD | liveness (loops alive), readiness (ready to take traffic) |
//!
//! An event request is answered as soon as the event is in this thread's
//! shard: nothing here awaits the database or any lock the write side holds.

mod cors;
mod health;
mod metrics;
mod probes;
pub mod response;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::USER_AGENT;
use hyper::{Method, Request, Response};

use crate::accounts::AccountCache;
use crate::config::AllowedOrigins;
use crate::event::{self, EventKind, Limits};
use crate::shard::ShardSet;
use crate::spool::Spool;
use crate::stats::{RateLimitedLog, Route, Stats};
use response::Body;

/// Bodies on the event endpoints are read and discarded up to this size
/// (`sendBeacon` may attach a small payload); larger ones get `413`.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Longest accepted request target (path + query); longer gets `414`.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Request headers larger than this in total, or more numerous, get `431`
/// (hyper's own head buffer limit is not exact when a head arrives in one read).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 100;

/// What request handling needs; shared by every connection.
pub struct AppState {
    pub shards: Arc<ShardSet>,
    pub stats: Arc<Stats>,
    pub accounts: Arc<AccountCache>,
    pub origins: AllowedOrigins,
    pub limits: Limits,
    pub shutting_down: AtomicBool,
    /// The spool, read for `/health` only.
    pub spool: Arc<Spool>,
    /// One log line per second at most for pixels dropped while shedding.
    pub dropped_log: RateLimitedLog,
    /// The connection pool, read for `/metrics` gauges only.
    pub pool: deadpool_postgres::Pool,
}

impl AppState {
    fn campaigns_cached(&self) -> usize {
        self.accounts.len()
    }
}

thread_local! {
    /// Reused buffer for percent-decoding `page_url` (no allocation per event).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(4096));
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Handles one request. Never fails: every problem is a response.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let (route, response, rejected) = route(&state, req).await;
    state
        .stats
        .record_request(route, response.status().as_u16(), started, rejected);
    Ok(response)
}

/// A response, the route it is counted under, and why the request was
/// refused (the `reason` label of `ingest_events_rejected_total`), if it was.
type Routed = (Route, Response<Body>, Option<&'static str>);

async fn route(state: &Arc<AppState>, req: Request<Incoming>) -> Routed {
    let path = req.uri().path();
    let route_of_path = match path {
        "/event/impression" | "/event/click" => Route::Other,
        "/health" => Route::Health,
        "/metrics" => Route::Metrics,
        "/livez" | "/readyz" => Route::Probe,
        _ => Route::Other,
    };
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_URI_BYTES {
        return (
            route_of_path,
            response::uri_too_long(MAX_URI_BYTES),
            Some("uri_too_long"),
        );
    }
    let headers = req.headers();
    if headers.len() > MAX_HEADERS
        || headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            > MAX_HEADER_BYTES
    {
        let r = response::headers_too_large(MAX_HEADER_BYTES, MAX_HEADERS);
        return (route_of_path, r, Some("headers_too_large"));
    }
    let kind = match path {
        "/event/impression" => EventKind::Impression,
        "/event/click" => EventKind::Click,
        "/health" | "/metrics" | "/livez" | "/readyz" => {
            let with_body = match *req.method() {
                Method::GET => true,
                Method::HEAD => false,
                _ => {
                    return (
                        route_of_path,
                        response::method_not_allowed("GET, HEAD"),
                        None,
                    )
                }
            };
            let mut r = match path {
                "/health" => health::respond(state, req.headers(), with_body),
                "/metrics" => metrics::respond(state),
                "/livez" => probes::livez(state),
                _ => probes::readyz(state),
            };
            if !with_body {
                *r.body_mut() = Body::default();
            }
            return (route_of_path, r, None);
        }
        _ => return (Route::Other, response::not_found(), None),
    };
    let route = match (req.method(), kind) {
        (&Method::POST, EventKind::Impression) => Route::PostImpression,
        (&Method::POST, EventKind::Click) => Route::PostClick,
        (&Method::GET, EventKind::Impression) => Route::GetImpression,
        (&Method::GET, EventKind::Click) => Route::GetClick,
        (&Method::HEAD, _) => {
            // Answers like GET (validation included) but records nothing.
            let received = unix_ms(SystemTime::now());
            let query = req.uri().query().unwrap_or("").as_bytes();
            let valid = SCRATCH.with(|s| {
                event::parse_event(kind, query, received, &state.limits, &mut s.borrow_mut())
                    .map(|_| ())
            });
            let mut r = match valid {
                Ok(()) => response::pixel(false),
                Err(e) => response::invalid(&e),
            };
            cors::decorate(&state.origins, req.headers(), &mut r);
            return (Route::HeadEvent, r, None);
        }
        (&Method::OPTIONS, _) => {
            return (
                Route::OptionsEvent,
                cors::preflight(&state.origins, req.headers()),
                None,
            )
        }
        _ => {
            return (
                Route::Other,
                response::method_not_allowed("GET, HEAD, POST, OPTIONS"),
                None,
            )
        }
    };
    let (r, rejected) = record(state, kind, req).await;
    (route, r, rejected)
}

/// Validates and records one event; the response carries CORS headers.
async fn record(
    state: &AppState,
    kind: EventKind,
    req: Request<Incoming>,
) -> (Response<Body>, Option<&'static str>) {
    let is_get = req.method() == Method::GET;
    let (parts, body) = req.into_parts();
    let (mut r, rejected) = match drain_body(body).await {
        Err((r, reason)) => {
            state.stats.rejected_invalid.fetch_add(1, Relaxed);
            (r, Some(reason))
        }
        Ok(()) => {
            let received = unix_ms(SystemTime::now());
            let query = parts.uri.query().unwrap_or("").as_bytes();
            let ua = parts
                .headers
                .get(USER_AGENT)
                .map(|v| event::user_agent(v.as_bytes()));
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                match event::parse_event(kind, query, received, &state.limits, &mut scratch) {
                    Err(e) => {
                        state.stats.rejected_invalid.fetch_add(1, Relaxed);
                        (response::invalid(&e), Some(e.problem.code()))
                    }
                    Ok(ev) => match state.shards.record(&ev, ua.as_deref(), received) {
                        Ok(()) if is_get => (response::pixel(true), None),
                        Ok(()) => (response::accepted(), None),
                        Err(refused) if is_get => {
                            // The pixel still renders; the event is counted as dropped.
                            state.stats.dropped_buffer_full.fetch_add(1, Relaxed);
                            if state.dropped_log.allow() {
                                tracing::warn!(
                                    reason = %refused,
                                    dropped_total = state.stats.dropped_buffer_full.load(Relaxed),
                                    "dropping pixel events: buffers at their memory cap"
                                );
                            }
                            (response::pixel(true), None)
                        }
                        Err(_) => {
                            state.stats.shed.fetch_add(1, Relaxed);
                            (response::overloaded(), Some("overloaded"))
                        }
                    },
                }
            })
        }
    };
    cors::decorate(&state.origins, &parts.headers, &mut r);
    (r, rejected)
}

/// Reads and discards a request body, refusing bodies over [`MAX_BODY_BYTES`].
async fn drain_body(body: Incoming) -> Result<(), (Response<Body>, &'static str)> {
    if body.is_end_stream() {
        return Ok(());
    }
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err((response::body_too_large(MAX_BODY_BYTES), "body_too_large"));
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(_) => Ok(()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err((response::body_too_large(MAX_BODY_BYTES), "body_too_large"))
        }
        Err(_) => Err((response::bad_body(), "bad_body")),
    }
}

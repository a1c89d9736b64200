//! The hyper service: routing, CORS, the pixel, `/health`, errors → statuses.
//!
//! | path | methods | does |
//! |---|---|---|
//! | `/event/impression`, `/event/click` | POST | record, `204` |
//! | | GET | record, `200` 1×1 GIF |
//! | | HEAD | `200` GIF headers, records nothing (prefetchers) |
//! | | OPTIONS | CORS preflight |
//! | `/health` | GET, HEAD | JSON status, latency, pipeline counters |
//!
//! An event request is answered as soon as the event is in this thread's
//! shard: nothing here awaits the database or any lock the write side holds.

mod cors;
mod health;
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
    let (route, response) = route(&state, req).await;
    if let Some(route) = route {
        state.stats.record_latency(route, started.elapsed());
    }
    Ok(response)
}

async fn route(state: &AppState, req: Request<Incoming>) -> (Option<Route>, Response<Body>) {
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_URI_BYTES {
        return (None, response::uri_too_long(MAX_URI_BYTES));
    }
    let headers = req.headers();
    if headers.len() > MAX_HEADERS
        || headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            > MAX_HEADER_BYTES
    {
        return (
            None,
            response::headers_too_large(MAX_HEADER_BYTES, MAX_HEADERS),
        );
    }
    let kind = match req.uri().path() {
        "/event/impression" => EventKind::Impression,
        "/event/click" => EventKind::Click,
        "/health" => {
            return match *req.method() {
                Method::GET => (
                    Some(Route::Health),
                    health::respond(state, req.headers(), true),
                ),
                Method::HEAD => (None, health::respond(state, req.headers(), false)),
                _ => (None, response::method_not_allowed("GET, HEAD")),
            };
        }
        _ => return (None, response::not_found()),
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
            return (None, r);
        }
        (&Method::OPTIONS, _) => return (None, cors::preflight(&state.origins, req.headers())),
        _ => {
            return (
                None,
                response::method_not_allowed("GET, HEAD, POST, OPTIONS"),
            )
        }
    };
    (Some(route), record(state, kind, req).await)
}

/// Validates and records one event; the response carries CORS headers.
async fn record(state: &AppState, kind: EventKind, req: Request<Incoming>) -> Response<Body> {
    let is_get = req.method() == Method::GET;
    let (parts, body) = req.into_parts();
    let mut r = match drain_body(body).await {
        Err(r) => {
            state.stats.rejected_invalid.fetch_add(1, Relaxed);
            r
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
                        response::invalid(&e)
                    }
                    Ok(ev) => match state.shards.record(&ev, ua.as_deref(), received) {
                        Ok(()) if is_get => response::pixel(true),
                        Ok(()) => response::accepted(),
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
                            response::pixel(true)
                        }
                        Err(_) => {
                            state.stats.shed.fetch_add(1, Relaxed);
                            response::overloaded()
                        }
                    },
                }
            })
        }
    };
    cors::decorate(&state.origins, &parts.headers, &mut r);
    r
}

/// Reads and discards a request body, refusing bodies over [`MAX_BODY_BYTES`].
async fn drain_body(body: Incoming) -> Result<(), Response<Body>> {
    if body.is_end_stream() {
        return Ok(());
    }
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(response::body_too_large(MAX_BODY_BYTES));
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(_) => Ok(()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(response::body_too_large(MAX_BODY_BYTES))
        }
        Err(_) => Err(response::bad_body()),
    }
}

//! The hyper service: routing, CORS, the pixel, `/health`, refusals.
//!
//! | path | methods | does |
//! |---|---|---|
//! | `/event/impression`, `/event/click` | POST | record, `204` |
//! | `/events` | POST | record a batch ([`batch`]), `200` with per-event results |
//! | | GET | record, `200` 1×1 GIF |
//! | | HEAD | `200` GIF headers, records nothing (prefetchers) |
//! | | OPTIONS | CORS preflight |
//! | `/health` | GET, HEAD | JSON status, latency, pipeline counters |
//! | `/metrics` | GET, HEAD | Prometheus / OpenMetrics text |
//! | `/livez`, `/readyz` | GET, HEAD | liveness (loops alive), readiness (ready to take traffic) |
//!
//! An event request is answered as soon as the event is in this thread's
//! shard: nothing here awaits the database or any lock the write side holds,
//! and nothing here imports the write side; what the operator views need to
//! know about it comes through [`WriteSideStatus`]. Every refusal is a
//! [`Rejection`].

pub mod batch;
mod cors;
mod health;
mod metrics;
mod probes;
pub mod rejection;
pub mod response;
mod views;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::USER_AGENT;
use hyper::{Method, Request, Response};

use crate::batch::InvalidReason;
use crate::config::AllowedOrigins;
use crate::event::{self, EventKind, Limits};
use crate::event_ids::{EventIdFilter, Sighting};
use crate::ivt::Classifier;
use crate::journal::Journal;
use crate::shard::{ShardFull, ShardSet};
use crate::stats::{Counter, RateLimitedLog, Route, Snapshot, Stats, WriteSideStatus};
pub use batch::MAX_BATCH_BODY_BYTES;
pub use rejection::Rejection;
use response::Body;
pub use views::ViewCache;

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
    /// The spool, campaign cache and pool, as far as `/health`, `/metrics`
    /// and `/readyz` need to know.
    pub write_side: Arc<dyn WriteSideStatus>,
    pub origins: AllowedOrigins,
    pub limits: Limits,
    /// A request body must arrive within this (`BODY_READ_TIMEOUT_MS`).
    pub body_read_timeout: Duration,
    pub shutting_down: AtomicBool,
    /// One log line per second at most for pixels dropped while shedding.
    pub dropped_log: RateLimitedLog,
    /// `/health` and `/metrics`, rendered at most once per `VIEW_CACHE_MS`.
    pub views: ViewCache,
    /// True when `ADMIN_PORT` serves `/metrics`, `/livez` and `/readyz`.
    pub admin_port: bool,
    /// Invalid-traffic checks.
    pub classifier: Classifier,
    /// `IVT_FILTER`: invalid events count in the invalid columns.
    pub ivt_filter: bool,
    /// Recently accepted `event_id`s.
    pub event_ids: EventIdFilter,
    /// `BATCH_MAX_EVENTS`.
    pub batch_max_events: usize,
    /// `ACK_MODE=durable`: events are answered once they are in it.
    pub journal: Option<Arc<Journal>>,
}

/// Durable mode: the longest a request waits for the journal's fsync.
pub const JOURNAL_WAIT: Duration = Duration::from_secs(10);

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `PORT`: the events, `/health`, and the other views unless `ADMIN_PORT` is set.
    Main,
    /// `ADMIN_PORT`: the operator views only.
    Admin,
}

impl AppState {
    /// Everything the operator views show, read once.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.stats.snapshot(
            self.shards.totals(),
            self.write_side.status(),
            self.shutting_down.load(Relaxed),
        );
        s.clicks_tracked = self.classifier.dedup.tracked();
        s.event_ids_tracked = self.event_ids.tracked();
        s.click_evictions = self.classifier.dedup.evictions();
        s
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

/// What a request asks for, from its method and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// An event endpoint with an event method (GET, POST), counted under `Route`.
    Record(EventKind, Route),
    /// HEAD on an event endpoint: validated, not recorded.
    Validate(EventKind),
    /// `POST /events`.
    Batch,
    Preflight,
    /// `/health`, `/metrics`, `/livez`, `/readyz` with GET (true) or HEAD (false).
    View(&'static str, bool),
    Refused(Rejection),
}

impl Target {
    fn of(method: &Method, path: &str, on: Listener, admin_port: bool) -> (Route, Target) {
        let on_this_port = match (on, path) {
            (Listener::Admin, "/health" | "/metrics" | "/livez" | "/readyz") => true,
            (Listener::Admin, _) => false,
            (Listener::Main, "/metrics" | "/livez" | "/readyz") => !admin_port,
            (Listener::Main, _) => true,
        };
        if !on_this_port {
            return (Route::Other, Target::Refused(Rejection::NotFound));
        }
        let kind = match path {
            "/events" => {
                return match *method {
                    Method::POST => (Route::PostBatch, Target::Batch),
                    Method::OPTIONS => (Route::OptionsEvent, Target::Preflight),
                    _ => (
                        Route::Other,
                        Target::Refused(Rejection::MethodNotAllowed("POST, OPTIONS")),
                    ),
                };
            }
            "/event/impression" => EventKind::Impression,
            "/event/click" => EventKind::Click,
            "/health" | "/metrics" | "/livez" | "/readyz" => {
                let route = match path {
                    "/health" => Route::Health,
                    "/metrics" => Route::Metrics,
                    _ => Route::Probe,
                };
                let view: &'static str = match path {
                    "/health" => "/health",
                    "/metrics" => "/metrics",
                    "/livez" => "/livez",
                    _ => "/readyz",
                };
                return match *method {
                    Method::GET => (route, Target::View(view, true)),
                    Method::HEAD => (route, Target::View(view, false)),
                    _ => (
                        route,
                        Target::Refused(Rejection::MethodNotAllowed("GET, HEAD")),
                    ),
                };
            }
            _ => return (Route::Other, Target::Refused(Rejection::NotFound)),
        };
        match (method, kind) {
            (&Method::POST, EventKind::Impression) => (
                Route::PostImpression,
                Target::Record(kind, Route::PostImpression),
            ),
            (&Method::POST, EventKind::Click) => {
                (Route::PostClick, Target::Record(kind, Route::PostClick))
            }
            (&Method::GET, EventKind::Impression) => (
                Route::GetImpression,
                Target::Record(kind, Route::GetImpression),
            ),
            (&Method::GET, EventKind::Click) => {
                (Route::GetClick, Target::Record(kind, Route::GetClick))
            }
            (&Method::HEAD, _) => (Route::HeadEvent, Target::Validate(kind)),
            (&Method::OPTIONS, _) => (Route::OptionsEvent, Target::Preflight),
            _ => (
                Route::Other,
                Target::Refused(Rejection::MethodNotAllowed("GET, HEAD, POST, OPTIONS")),
            ),
        }
    }
}

/// Handles one request that came in on `on` from `peer`. Never fails: every
/// problem is a response.
pub async fn handle(
    state: Arc<AppState>,
    on: Listener,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let (route, target) = Target::of(req.method(), req.uri().path(), on, state.admin_port);
    let answer = respond(&state, target, peer, req).await;
    let count_refusal = |r: &Rejection| {
        let counter = match r {
            Rejection::Overloaded => Counter::Shed,
            Rejection::ShuttingDown => Counter::RefusedShuttingDown,
            _ => Counter::RejectedInvalid,
        };
        state.stats.add(counter, 1);
    };
    if let Some(r) = &answer.refused {
        if matches!(target, Target::Record(..) | Target::Batch) {
            count_refusal(r);
        }
    }
    let status = answer.response.status().as_u16();
    match &answer.batch {
        Some(tally) => {
            for r in &tally.refused {
                count_refusal(&r.why);
            }
            state
                .stats
                .record_request(route, status, started, &tally.rejected, &tally.invalid);
        }
        None => {
            // HEAD validates without recording: its refusals are not refused events.
            let reason = answer
                .refused
                .filter(|r| r.refuses_event() && !matches!(target, Target::Validate(_)))
                .map(|r| r.code());
            state.stats.record_request(
                route,
                status,
                started,
                reason.as_slice(),
                answer.invalid.as_slice(),
            );
        }
    }
    Ok(answer.response)
}

/// Size limits on the request head, checked before anything else.
fn check_head(req: &Request<Incoming>) -> Result<(), Rejection> {
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_URI_BYTES {
        return Err(Rejection::UriTooLong);
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(Rejection::HeadersTooLarge);
    }
    Ok(())
}

/// A response and what the stats need to know about it.
struct Answer {
    response: Response<Body>,
    /// The refusal the response carries, if it is one.
    refused: Option<Rejection>,
    /// The recorded event's invalid-traffic reason, if it is invalid.
    invalid: Option<InvalidReason>,
    /// A batch's per-event results.
    batch: Option<batch::Tally>,
}

impl Answer {
    fn plain(response: Response<Body>, refused: Option<Rejection>) -> Answer {
        Answer {
            response,
            refused,
            invalid: None,
            batch: None,
        }
    }
}

/// The response, the refusal it carries (if it is one), and the recorded
/// event's invalid-traffic reason (if it is invalid).
async fn respond(
    state: &Arc<AppState>,
    target: Target,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Answer {
    let checked = check_head(&req).and(match target {
        Target::Refused(r) => Err(r),
        _ => Ok(()),
    });
    if let Err(r) = checked {
        return Answer::plain(r.into_response(), Some(r));
    }
    let (response, refused) = match target {
        Target::Record(kind, route) => {
            let is_get = matches!(route, Route::GetImpression | Route::GetClick);
            let (parts, body) = req.into_parts();
            let mut outcome = match read_body(body, MAX_BODY_BYTES, state.body_read_timeout).await {
                Ok(_) => record(state, kind, &parts, peer, is_get),
                Err(r) => Err(r),
            };
            if let (Some(journal), Ok((_, _, Some(seq)))) = (&state.journal, &outcome) {
                if let Err(e) = journal.wait(*seq, JOURNAL_WAIT).await {
                    outcome = Err(not_durable(e));
                }
            }
            let outcome = outcome.map(|(r, invalid, _)| (r, invalid));
            let (mut response, refused, invalid) = match outcome {
                Ok((r, invalid)) => (r, None, invalid),
                Err(r) => (r.into_response(), Some(r), None),
            };
            cors::decorate(&state.origins, &parts.headers, &mut response);
            return Answer {
                response,
                refused,
                invalid,
                batch: None,
            };
        }
        Target::Batch => {
            let (parts, body) = req.into_parts();
            let outcome = match batch::format_of(&parts.headers) {
                Ok(format) => {
                    match read_body(body, MAX_BATCH_BODY_BYTES, state.body_read_timeout).await {
                        Ok(bytes) => {
                            let ua = parts
                                .headers
                                .get(USER_AGENT)
                                .map(|v| event::user_agent(v.as_bytes()));
                            let cx = batch::Context {
                                headers: &parts.headers,
                                user_agent: ua.as_deref(),
                                peer,
                                received: unix_ms(SystemTime::now()),
                            };
                            let recorded = batch::record_batch(
                                state,
                                &bytes,
                                format,
                                state.batch_max_events,
                                &cx,
                            );
                            match (recorded, &state.journal) {
                                (Ok((tally, Some(seq))), Some(j)) => {
                                    match j.wait(seq, JOURNAL_WAIT).await {
                                        Ok(()) => Ok(tally),
                                        Err(e) => Err(not_durable(e)),
                                    }
                                }
                                (Ok((tally, _)), _) => Ok(tally),
                                (Err(r), _) => Err(r),
                            }
                        }
                        Err(r) => Err(r),
                    }
                }
                Err(r) => Err(r),
            };
            let mut answer = match outcome {
                Ok(tally) => Answer {
                    response: response::json(hyper::StatusCode::OK, tally.body()),
                    refused: None,
                    invalid: None,
                    batch: Some(tally),
                },
                Err(r) => Answer::plain(r.into_response(), Some(r)),
            };
            cors::decorate(&state.origins, &parts.headers, &mut answer.response);
            return answer;
        }
        Target::Validate(kind) => {
            // Answers like GET (validation included) but records nothing.
            let received = unix_ms(SystemTime::now());
            let query = req.uri().query().unwrap_or("").as_bytes();
            let valid = SCRATCH.with(|s| {
                event::parse_event(kind, query, received, &state.limits, &mut s.borrow_mut())
                    .map(|_| ())
            });
            let (mut response, refused) = match valid {
                Ok(()) => (response::pixel(false), None),
                Err(e) => {
                    let r = Rejection::Param(e);
                    (r.into_response(), Some(r))
                }
            };
            cors::decorate(&state.origins, req.headers(), &mut response);
            (response, refused)
        }
        Target::Preflight => match cors::preflight(&state.origins, req.headers()) {
            Ok(r) => (r, None),
            Err(r) => {
                let mut response = r.into_response();
                cors::decorate(&state.origins, req.headers(), &mut response);
                (response, Some(r))
            }
        },
        Target::View(view, with_body) => {
            let mut r = match view {
                "/health" => {
                    let v = state.views.get(state);
                    health::respond(&v.health, v.health_gz.as_ref(), req.headers())
                }
                "/metrics" => metrics::respond(state.views.get(state).metrics.as_ref()),
                "/livez" => probes::livez(state),
                _ => probes::readyz(state),
            };
            if !with_body {
                *r.body_mut() = Body::default();
            }
            (r, None)
        }
        Target::Refused(r) => (r.into_response(), Some(r)),
    };
    Answer::plain(response, refused)
}

/// What became of one valid event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepted {
    /// In this thread's shard, valid or with its invalid-traffic reason.
    Recorded(Option<InvalidReason>),
    /// Its `event_id` was accepted before: answered, not recorded again.
    Repeat,
}

/// An accepted event, and in durable mode the journal record to wait for.
type Journaled = (Accepted, Option<u64>);

/// A recorded event's response, invalid-traffic reason and journal record.
type Recorded = (Response<Body>, Option<InvalidReason>, Option<u64>);

/// Classifies and records one parsed event (the single endpoints and each
/// event of a batch): a repeat `event_id` is answered without recording; a
/// click or id remembered for an event the shard then refused is forgotten,
/// so that the event counts when it is sent again.
fn accept(
    state: &AppState,
    ev: &event::Event<'_>,
    ua: Option<&str>,
    headers: &hyper::HeaderMap,
    peer: IpAddr,
    received: i64,
) -> Result<Journaled, ShardFull> {
    let id_mark = match state.event_ids.sight(ev, received) {
        Sighting::Repeat { conflicting } => {
            state.stats.add(Counter::RepeatedEventIdsMemory, 1);
            if conflicting {
                state.stats.add(Counter::ConflictingEventIds, 1);
            }
            // Durable: its first sighting may still be on its way to disk.
            let seq = state.journal.as_ref().map(|j| j.last());
            return Ok((Accepted::Repeat, seq));
        }
        Sighting::First(mark) => mark,
    };
    let (invalid, click) = state.classifier.judge(ev, ua, headers, peer, received);
    let mut row = ev.stored(received, ua, invalid, state.ivt_filter);
    if state.journal.is_some() && row.event_id.is_none() {
        // Durable: every event carries an id, so that replaying the journal
        // after a crash is exactly-once (the database's event_ids decides).
        row.event_id = Some(uuid::Uuid::new_v4());
    }
    match state.shards.record(&row) {
        // Recorded first, journaled second: see `journal` for why the order matters.
        Ok(()) => Ok((
            Accepted::Recorded(invalid),
            state.journal.as_ref().map(|j| j.append(&row)),
        )),
        Err(refused) => {
            if let Some(mark) = click {
                state.classifier.dedup.forget(mark);
            }
            if let Some(mark) = id_mark {
                state.event_ids.forget(mark);
            }
            Err(refused)
        }
    }
}

/// Validates, classifies and records one event; the response and the
/// event's invalid-traffic reason.
fn record(
    state: &AppState,
    kind: EventKind,
    parts: &hyper::http::request::Parts,
    peer: IpAddr,
    is_get: bool,
) -> Result<Recorded, Rejection> {
    let received = unix_ms(SystemTime::now());
    let query = parts.uri.query().unwrap_or("").as_bytes();
    let ua = parts
        .headers
        .get(USER_AGENT)
        .map(|v| event::user_agent(v.as_bytes()));
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let ev = event::parse_event(kind, query, received, &state.limits, &mut scratch)?;
        let recorded = accept(state, &ev, ua.as_deref(), &parts.headers, peer, received);
        let (invalid, seq) = match recorded {
            Ok((Accepted::Recorded(invalid), seq)) => (invalid, seq),
            Ok((Accepted::Repeat, seq)) => (None, seq),
            Err(_) => (None, None),
        };
        match recorded {
            Ok(_) if is_get => Ok((response::pixel(true), invalid, seq)),
            Ok(_) => Ok((response::accepted(), invalid, seq)),
            // Not stored, so never acknowledged: not even with a pixel.
            Err(ShardFull::Closed) => Err(Rejection::ShuttingDown),
            Err(refused) if is_get => {
                // The pixel still renders; the event is counted as dropped.
                state.stats.add(Counter::DroppedBufferFull, 1);
                if state.dropped_log.allow() {
                    tracing::warn!(
                        reason = %refused,
                        dropped_total = state.stats.get(Counter::DroppedBufferFull),
                        "dropping pixel events: buffers at their memory cap"
                    );
                }
                Ok((response::pixel(true), None, None))
            }
            Err(_) => Err(Rejection::Overloaded),
        }
    })
}

/// A journal that could not make an event durable: logged (rate-limited)
/// and answered 503, so the client retries.
fn not_durable(e: crate::journal::JournalError) -> Rejection {
    static LOG: std::sync::OnceLock<RateLimitedLog> = std::sync::OnceLock::new();
    if LOG
        .get_or_init(|| RateLimitedLog::new(Duration::from_secs(1)))
        .allow()
    {
        tracing::error!(error = %e, "journal: events answered 503 not_durable");
    }
    Rejection::NotDurable
}

/// A body over its limit gets its `413` at once, and the rest of it is read
/// and dropped in the background, up to this many bytes within the body
/// deadline, so that a client still sending reads the answer instead of a
/// reset connection (and may keep the connection). Past this, or past the
/// deadline, the connection is closed.
pub const DRAIN_MAX_BYTES: u64 = 1024 * 1024;

/// Reads a request body, refusing bodies over `limit` bytes or slower than
/// `deadline`.
async fn read_body(
    mut body: Incoming,
    limit: usize,
    deadline: Duration,
) -> Result<bytes::Bytes, Rejection> {
    if body.is_end_stream() {
        return Ok(bytes::Bytes::new());
    }
    let declared = body.size_hint().lower();
    if declared > limit as u64 {
        drain_later(body, declared, deadline);
        return Err(Rejection::BodyTooLarge(limit));
    }
    let read = async {
        let mut kept = bytes::BytesMut::new();
        // One frame (the usual case) is kept as it came, without copying.
        let mut first: Option<bytes::Bytes> = None;
        let mut seen: u64 = 0;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(Rejection::BadBody);
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            seen += data.len() as u64;
            if seen > limit as u64 {
                return Ok(Err(seen));
            }
            match first.take() {
                None if kept.is_empty() => first = Some(data),
                None => kept.extend_from_slice(&data),
                Some(f) => {
                    kept.extend_from_slice(&f);
                    kept.extend_from_slice(&data);
                }
            }
        }
        Ok(Ok(first.unwrap_or_else(|| kept.freeze())))
    };
    let outcome = tokio::time::timeout(deadline, read).await;
    match outcome {
        Err(_) => Err(Rejection::BodyTimeout),
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        Ok(Ok(Err(seen))) => {
            drain_later(body, seen, deadline);
            Err(Rejection::BodyTooLarge(limit))
        }
        Ok(Err(r)) => Err(r),
    }
}

/// Reads and drops the rest of a refused body in the background (see
/// [`DRAIN_MAX_BYTES`]); `seen` counts what is known of it so far.
fn drain_later(mut body: Incoming, seen: u64, deadline: Duration) {
    if seen > DRAIN_MAX_BYTES {
        return; // dropped: hyper closes the connection after the answer
    }
    tokio::spawn(async move {
        let mut seen = 0u64;
        let _ = tokio::time::timeout(deadline, async {
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DRAIN_MAX_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

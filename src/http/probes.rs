//! `/livez` and `/readyz` for orchestrators.
//!
//! Liveness: the process answers, and the write side's loops are alive: the
//! coordinator and the writer runtime each beat every second (also while
//! waiting on back-pressure); a beat older than [`STALL_MS`] means a loop is
//! stuck, and a restart is the cure. Readiness: migrations ran and the campaign
//! cache is loaded, and shutdown has not begun (readiness turns 503 at the
//! signal, before the listener closes, so the load balancer stops sending
//! traffic first; see `SHUTDOWN_GRACE_MS`).

use std::sync::atomic::Ordering::Relaxed;

use hyper::StatusCode;
use serde_json::json;

use super::response::{json as json_response, Body};
use super::AppState;

/// A heartbeat older than this fails liveness.
pub const STALL_MS: u64 = 10_000;

pub fn livez(state: &AppState) -> hyper::Response<Body> {
    let s = &state.stats;
    let now = s.now_ms();
    let coordinator = now.saturating_sub(s.coordinator_beat_ms.load(Relaxed));
    let writer = now.saturating_sub(s.writer_beat_ms.load(Relaxed));
    // Give the loops their first beat: nothing is stale during the first STALL_MS.
    let alive = now < STALL_MS || (coordinator < STALL_MS && writer < STALL_MS);
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if alive { "alive" } else { "stalled" },
        "coordinator_beat_age_ms": coordinator,
        "writer_beat_age_ms": writer,
    });
    json_response(status, body.to_string())
}

pub fn readyz(state: &AppState) -> hyper::Response<Body> {
    let s = &state.stats;
    // Migrated, and the first partition-maintenance round done (the
    // partitions for the accepted window exist, or it tried).
    let migrated = s.migrated.load(Relaxed) && s.maintained.load(Relaxed);
    let cache = state.write_side.status().campaign_cache_loaded;
    let shutting_down = state.shutting_down.load(Relaxed);
    let ready = migrated && cache && !shutting_down;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else if shutting_down { "shutting_down" } else { "starting" },
        "migrated": migrated,
        "campaign_cache_loaded": cache,
        "shutting_down": shutting_down,
    });
    json_response(status, body.to_string())
}

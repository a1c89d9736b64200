//! The operator views, rendered at most once per `VIEW_CACHE_MS`.
//!
//! `/health` and `/metrics` show one [`Snapshot`], rendered to bytes (JSON,
//! its gzip, the exposition text) and kept behind an `ArcSwap`. A request
//! within the cache period gets those bytes (a reference-count increment);
//! the first request after it renders a new snapshot, while concurrent ones
//! keep getting the previous one. So a flood of `/health` or `/metrics`
//! costs at most one merge of the per-thread statistics per period, never one
//! per request, and the request path's per-thread locks are taken at that
//! rate only.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;

use super::{health, metrics, AppState};
use crate::stats::Counter;

/// One snapshot, rendered.
pub struct Rendered {
    at: Instant,
    pub health: Bytes,
    pub health_gz: Option<Bytes>,
    pub metrics: Option<Bytes>,
}

/// The last rendering and who is making the next one.
pub struct ViewCache {
    max_age: Duration,
    last: ArcSwapOption<Rendered>,
    rendering: AtomicBool,
}

impl ViewCache {
    pub fn new(max_age: Duration) -> Self {
        ViewCache {
            max_age,
            last: ArcSwapOption::empty(),
            rendering: AtomicBool::new(false),
        }
    }

    /// The current rendering, renewed when older than the cache period.
    pub fn get(&self, state: &AppState) -> Arc<Rendered> {
        let last = self.last.load_full();
        match last {
            Some(r) if r.at.elapsed() < self.max_age => r,
            // Someone else is rendering: the previous one will do.
            Some(r) if self.rendering.swap(true, SeqCst) => r,
            _ => {
                let r = Arc::new(render(state));
                self.last.store(Some(r.clone()));
                self.rendering.store(false, SeqCst);
                r
            }
        }
    }
}

fn render(state: &AppState) -> Rendered {
    state.stats.add(Counter::ViewRenders, 1);
    let snapshot = state.snapshot();
    let (health, health_gz) = health::render(&snapshot);
    Rendered {
        at: Instant::now(),
        health,
        health_gz,
        metrics: metrics::render(snapshot),
    }
}

//! Fuzz target: the query parser and validator must never panic, and must
//! uphold the contract of what it returns, on any bytes.
#![no_main]

use ingest::event::{parse_event, user_agent, EventKind, Limits, MAX_PAGE_URL_BYTES, MAX_USER_AGENT_BYTES};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_717_200_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_future_ms: 3_600_000, max_age_ms: 7 * 86_400_000 };
    let mut scratch = Vec::new();
    if let Ok(ev) = parse_event(EventKind::Impression, data, NOW, &limits, &mut scratch) {
        assert!(!ev.page_url.is_empty() && ev.page_url.len() <= MAX_PAGE_URL_BYTES);
        assert!(!ev.page_url.contains('\0'));
        assert!(ev.timestamp_ms >= NOW - limits.max_age_ms && ev.timestamp_ms <= NOW + limits.max_future_ms);
    }
    let ua = user_agent(data);
    assert!(ua.len() <= MAX_USER_AGENT_BYTES);
});

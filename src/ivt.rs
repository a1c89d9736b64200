//! Invalid traffic: classifies every event at request time as valid or as one
//! [`InvalidReason`], the way the IAB/MRC invalid-traffic guidelines ask
//! (known bots and non-browser agents, prefetches, excluded addresses and
//! duplicate activity are measured and reported, never billed).
//!
//! A pure function of the request's user agent, a few headers and the client
//! address, plus one piece of state: the recent clicks, for duplicates. The
//! checks run in this order, and the first that applies is the reason:
//! 1. `no_user_agent`: the header is missing or empty;
//! 2. `bot_ua`: the user agent matches the bot list (the `isbot` crate's
//!    patterns, or `BOT_UA_FILE`), cached per distinct user agent per thread;
//! 3. `prefetch`: `Sec-Purpose`/`Purpose` say prefetch or prerender,
//!    `X-Moz: prefetch`, or `X-Purpose: preview|instant`;
//! 4. `ip_excluded`: the client address is in `IP_EXCLUDE_FILE` (CIDRs);
//! 5. `duplicate_click`: the same click (see [`ClickDedup`]) within
//!    `CLICK_DEDUP_WINDOW_S`.
//!
//! Once the caches are warm nothing here allocates. Nothing here touches the
//! database.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hyper::header::{HeaderMap, HeaderName};

use crate::batch::{EventKind, InvalidReason};
use crate::event::Event;
pub use crate::ipset::IpSet;
use crate::recent::Recent;

/// Distinct user agents remembered per thread; the cache is emptied when full.
const UA_CACHE_ENTRIES: usize = 16_384;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Per thread: hash of (classifier id, user agent) → is a bot.
    static UA_CACHE: RefCell<HashMap<u64, bool, NoHash>> =
        RefCell::new(HashMap::with_capacity_and_hasher(1024, NoHash));
}

/// The keys are hashes already.
#[derive(Clone, Copy, Default)]
struct NoHash;

impl BuildHasher for NoHash {
    type Hasher = NoHasher;
    fn build_hasher(&self) -> NoHasher {
        NoHasher(0)
    }
}

#[derive(Default)]
struct NoHasher(u64);

impl Hasher for NoHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The client's address: the socket's peer, or, when the peer is a trusted
/// proxy, the right-most `X-Forwarded-For` entry that is not a trusted proxy
/// (entries further left were written by the client itself and prove nothing).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &IpSet) -> IpAddr {
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for part in text.rsplit(',') {
            let part = part.trim();
            let Ok(ip) = part.parse::<IpAddr>() else {
                return client;
            };
            if !trusted.contains(ip) {
                return ip;
            }
            client = ip;
        }
    }
    client
}

/// Recent valid clicks, so that the same click again within the window is a
/// duplicate. A click is (ad unit, campaign, creative, client): the client is
/// a keyed hash of its address and user agent (SipHash with a key drawn at
/// start and never written anywhere, so the address is not stored, and the
/// keys are not comparable across processes).
///
/// Kept in a [`Recent`] table: at most `CLICK_DEDUP_MAX` clicks, the most
/// recent half of them always; the cap can only let a duplicate through,
/// never refuse a first click.
pub struct ClickDedup {
    key: std::collections::hash_map::RandomState,
    recent: Recent<u64, (), NoHash>,
}

impl ClickDedup {
    pub fn new(window_ms: i64, max_entries: usize) -> Self {
        ClickDedup {
            key: std::collections::hash_map::RandomState::new(),
            recent: Recent::new(window_ms, max_entries, NoHash),
        }
    }

    /// The key of a click.
    fn fingerprint(&self, ev: &Event<'_>, client: IpAddr, user_agent: &str) -> u64 {
        let mut h = self.key.build_hasher();
        ev.ad_unit_id.hash(&mut h);
        ev.campaign_id.hash(&mut h);
        ev.creative_id.hash(&mut h);
        client.hash(&mut h);
        user_agent.hash(&mut h);
        h.finish()
    }

    /// True if this click was seen within the window (a duplicate); else
    /// remembers it and returns false.
    pub fn seen(&self, ev: &Event<'_>, client: IpAddr, user_agent: &str, now_ms: i64) -> bool {
        self.check(self.fingerprint(ev, client, user_agent), now_ms)
    }

    /// Forgets a click remembered at `now_ms` (it was refused after all: a
    /// retry must count).
    pub fn forget(&self, mark: ClickMark) {
        self.recent
            .forget((mark.key >> 59) as usize, mark.key, mark.at_ms);
    }

    fn check(&self, key: u64, now_ms: i64) -> bool {
        self.recent
            .check((key >> 59) as usize, key, (), now_ms)
            .is_some()
    }

    /// Clicks remembered now.
    pub fn tracked(&self) -> u64 {
        self.recent.tracked()
    }

    /// Times a full table forgot its older half early.
    pub fn evictions(&self) -> u64 {
        self.recent.evictions.load(Relaxed)
    }
}

/// A click remembered by [`ClickDedup`], to forget if the event is refused.
#[derive(Debug, Clone, Copy)]
pub struct ClickMark {
    key: u64,
    at_ms: i64,
}

/// Everything the checks need; one per service.
pub struct Classifier {
    id: u64,
    bots: isbot::Bots,
    excluded: IpSet,
    trusted_proxies: IpSet,
    pub dedup: ClickDedup,
    hash: foldhash::fast::RandomState,
}

static SEC_PURPOSE: HeaderName = HeaderName::from_static("sec-purpose");
static PURPOSE: HeaderName = HeaderName::from_static("purpose");
static X_MOZ: HeaderName = HeaderName::from_static("x-moz");
static X_PURPOSE: HeaderName = HeaderName::from_static("x-purpose");

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

impl Classifier {
    /// `bot_patterns`: one regular expression per line (the `isbot` format);
    /// `None` for the built-in list.
    pub fn new(
        bot_patterns: Option<&str>,
        excluded: IpSet,
        trusted_proxies: IpSet,
        dedup: ClickDedup,
    ) -> Classifier {
        Classifier {
            id: NEXT_ID.fetch_add(1, Relaxed),
            bots: bot_patterns.map_or_else(isbot::Bots::default, isbot::Bots::new),
            excluded,
            trusted_proxies,
            dedup,
            hash: foldhash::fast::RandomState::default(),
        }
    }

    /// True if `user_agent` is a known bot (cached per distinct agent).
    pub fn is_bot(&self, user_agent: &str) -> bool {
        let key = self.hash.hash_one((self.id, user_agent));
        UA_CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(&bot) = c.get(&key) {
                return bot;
            }
            let bot = self.bots.is_bot(user_agent);
            if c.len() >= UA_CACHE_ENTRIES {
                c.clear();
            }
            c.insert(key, bot);
            bot
        })
    }

    /// The first reason that applies, or `None` for a valid event.
    pub fn classify(
        &self,
        ev: &Event<'_>,
        user_agent: Option<&str>,
        headers: &HeaderMap,
        peer: IpAddr,
        now_ms: i64,
    ) -> Option<InvalidReason> {
        self.judge(ev, user_agent, headers, peer, now_ms).0
    }

    /// As [`Self::classify`], and the click remembered for deduplication, if
    /// one was (to [`ClickDedup::forget`] it should the event be refused).
    pub fn judge(
        &self,
        ev: &Event<'_>,
        user_agent: Option<&str>,
        headers: &HeaderMap,
        peer: IpAddr,
        now_ms: i64,
    ) -> (Option<InvalidReason>, Option<ClickMark>) {
        match self.checks(user_agent, headers, peer) {
            Some(reason) => (Some(reason), None),
            None => self.dedup_click(ev, user_agent, headers, peer, now_ms),
        }
    }

    /// Clicks that passed every other check: a duplicate, or remembered now.
    fn dedup_click(
        &self,
        ev: &Event<'_>,
        user_agent: Option<&str>,
        headers: &HeaderMap,
        peer: IpAddr,
        now_ms: i64,
    ) -> (Option<InvalidReason>, Option<ClickMark>) {
        if ev.kind != EventKind::Click {
            return (None, None);
        }
        let client = client_ip(peer, headers, &self.trusted_proxies);
        let key = self
            .dedup
            .fingerprint(ev, client, user_agent.unwrap_or("").trim());
        if self.dedup.check(key, now_ms) {
            (Some(InvalidReason::DuplicateClick), None)
        } else {
            (None, Some(ClickMark { key, at_ms: now_ms }))
        }
    }

    /// Every check but the duplicate one: the first reason that applies.
    fn checks(
        &self,
        user_agent: Option<&str>,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Option<InvalidReason> {
        let ua = match user_agent.map(str::trim) {
            None | Some("") => return Some(InvalidReason::NoUserAgent),
            Some(ua) => ua,
        };
        if self.is_bot(ua) {
            return Some(InvalidReason::BotUa);
        }
        let purpose = |name: &HeaderName| {
            headers.get_all(name).iter().any(|v| {
                let v = v.as_bytes();
                contains_ignore_case(v, b"prefetch") || contains_ignore_case(v, b"prerender")
            })
        };
        let prefetch = purpose(&SEC_PURPOSE)
            || purpose(&PURPOSE)
            || headers
                .get(&X_MOZ)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"prefetch"))
            || headers.get(&X_PURPOSE).is_some_and(|v| {
                let v = v.as_bytes();
                v.eq_ignore_ascii_case(b"preview") || v.eq_ignore_ascii_case(b"instant")
            });
        if prefetch {
            return Some(InvalidReason::Prefetch);
        }
        if !self.excluded.is_empty()
            && self
                .excluded
                .contains(client_ip(peer, headers, &self.trusted_proxies))
        {
            return Some(InvalidReason::IpExcluded);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use uuid::Uuid;

    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";

    fn click() -> Event<'static> {
        Event {
            kind: EventKind::Click,
            ad_unit_id: Uuid::from_u128(1),
            campaign_id: Uuid::from_u128(2),
            creative_id: Uuid::from_u128(3),
            page_url: "https://e.x/",
            timestamp_ms: 0,
            event_id: None,
        }
    }

    fn classifier(excluded: &str, trusted: &str) -> Classifier {
        Classifier::new(
            None,
            IpSet::parse(excluded).expect("excluded"),
            IpSet::parse(trusted).expect("trusted"),
            ClickDedup::new(30_000, 1000),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn each_reason_in_order() {
        let c = classifier("203.0.113.0/24", "");
        let h = HeaderMap::new();
        let peer = ip("198.51.100.7");
        let imp = Event {
            kind: EventKind::Impression,
            ..click()
        };
        assert_eq!(
            c.classify(&imp, None, &h, peer, 0),
            Some(InvalidReason::NoUserAgent)
        );
        assert_eq!(
            c.classify(&imp, Some("  "), &h, peer, 0),
            Some(InvalidReason::NoUserAgent)
        );
        for bot in [
            "Googlebot/2.1 (+http://www.google.com/bot.html)",
            "curl/8.5.0",
            "python-requests/2.31",
        ] {
            assert_eq!(
                c.classify(&imp, Some(bot), &h, peer, 0),
                Some(InvalidReason::BotUa),
                "{bot}"
            );
        }
        assert_eq!(c.classify(&imp, Some(CHROME), &h, peer, 0), None);
        for (name, value) in [
            ("sec-purpose", "prefetch;prerender"),
            ("purpose", "prefetch"),
            ("x-moz", "prefetch"),
            ("x-purpose", "preview"),
            ("x-purpose", "Instant"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            assert_eq!(
                c.classify(&imp, Some(CHROME), &h, peer, 0),
                Some(InvalidReason::Prefetch),
                "{name}: {value}"
            );
        }
        assert_eq!(
            c.classify(&imp, Some(CHROME), &h, ip("203.0.113.9"), 0),
            Some(InvalidReason::IpExcluded)
        );
        // A bot wins over an excluded address: the first reason that applies.
        assert_eq!(
            c.classify(&imp, Some("curl/8"), &h, ip("203.0.113.9"), 0),
            Some(InvalidReason::BotUa)
        );
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_forwarded_address() {
        let trusted = IpSet::parse("10.0.0.0/8, 192.168.1.1").expect("trusted");
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.1.2.3"));
        // Through two trusted proxies: the client is the last untrusted entry, not the spoofable first.
        assert_eq!(
            client_ip(ip("192.168.1.1"), &h, &trusted),
            ip("203.0.113.9")
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.7"), &h, &trusted),
            ip("198.51.100.7")
        );
        // IPv4-mapped IPv6 peers are matched as IPv4.
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.5"), &h, &trusted),
            ip("203.0.113.9")
        );
        let mut bad = HeaderMap::new();
        bad.insert("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(client_ip(ip("10.0.0.1"), &bad, &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn a_click_again_within_the_window_is_a_duplicate_and_the_first_after_it_counts() {
        let c = classifier("", "");
        let h = HeaderMap::new();
        let peer = ip("198.51.100.7");
        assert_eq!(c.classify(&click(), Some(CHROME), &h, peer, 1_000), None);
        assert_eq!(
            c.classify(&click(), Some(CHROME), &h, peer, 30_999),
            Some(InvalidReason::DuplicateClick)
        );
        assert_eq!(
            c.classify(&click(), Some(CHROME), &h, peer, 31_000),
            None,
            "the first click after the window counts"
        );
        assert_eq!(
            c.classify(&click(), Some(CHROME), &h, peer, 31_001),
            Some(InvalidReason::DuplicateClick)
        );
        // Another client (address or agent) is another click.
        assert_eq!(
            c.classify(&click(), Some(CHROME), &h, ip("198.51.100.8"), 31_002),
            None
        );
        assert_eq!(
            c.classify(
                &click(),
                Some("Mozilla/5.0 Firefox/121.0"),
                &h,
                peer,
                31_003
            ),
            None
        );
        // Impressions are never duplicates.
        let imp = Event {
            kind: EventKind::Impression,
            ..click()
        };
        assert_eq!(c.classify(&imp, Some(CHROME), &h, peer, 31_004), None);
        assert_eq!(c.classify(&imp, Some(CHROME), &h, peer, 31_005), None);
    }

    #[test]
    fn the_dedup_table_stays_under_its_cap() {
        let d = ClickDedup::new(1_000_000, 16 * 8);
        let peer = ip("198.51.100.7");
        for i in 0..10_000u128 {
            let ev = Event {
                creative_id: Uuid::from_u128(i),
                ..click()
            };
            assert!(
                !d.seen(&ev, peer, CHROME, i as i64),
                "a first click is never refused"
            );
        }
        assert!(d.tracked() <= 16 * 8, "{}", d.tracked());
        assert!(d.evictions() > 0);
        // The latest click of each shard is always still remembered.
        let last = Event {
            creative_id: Uuid::from_u128(9_999),
            ..click()
        };
        assert!(d.seen(&last, peer, CHROME, 10_000));
    }
}

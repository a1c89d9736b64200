//! Property tests for parsing and validation: no input panics, every valid
//! event survives form-encoding exactly, and a broken parameter is always the
//! one the error names.

use ingest::event::{parse_event, EventKind, Limits, Param, ParamError, Problem};
use proptest::prelude::*;
use uuid::Uuid;

const NOW: i64 = 1_717_200_000_000;
const LIMITS: Limits = Limits {
    max_future_ms: 3_600_000,
    max_age_ms: 7 * 86_400_000,
};

/// `application/x-www-form-urlencoded` encoding, as a browser's URLSearchParams does it.
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn page_url() -> impl Strategy<Value = String> {
    // Any Unicode text without NUL, 1..=2048 bytes once UTF-8 encoded.
    proptest::string::string_regex("[^\\x00]{1,600}")
        .expect("regex")
        .prop_filter("fits 2048 bytes", |s| !s.is_empty() && s.len() <= 2048)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_input_panics(query in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let mut scratch = Vec::new();
        let _ = parse_event(EventKind::Click, &query, NOW, &LIMITS, &mut scratch);
    }

    #[test]
    fn near_valid_input_never_panics(
        noise in proptest::collection::vec(prop_oneof![Just(b'%'), Just(b'&'), Just(b'='), Just(b'+'), any::<u8>()], 0..64),
        at in 0usize..200,
    ) {
        let base = format!(
            "ad_unit_id={}&campaign_id={}&creative_id={}&page_url=https%3A%2F%2Fa.example%2F&timestamp={}",
            Uuid::nil(), Uuid::max(), Uuid::nil(), NOW
        );
        let mut q = base.into_bytes();
        let at = at.min(q.len());
        q.splice(at..at, noise);
        let mut scratch = Vec::new();
        let _ = parse_event(EventKind::Impression, &q, NOW, &LIMITS, &mut scratch);
    }

    #[test]
    fn valid_events_round_trip(
        ad in any::<u128>(), camp in any::<u128>(), cre in any::<u128>(),
        url in page_url(),
        offset in -(7 * 86_400_000i64)..=3_600_000i64,
        with_ts in any::<bool>(),
        junk in "[a-z]{1,8}",
        order in Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()),
    ) {
        let ts = NOW + offset;
        let mut pairs = vec![
            format!("ad_unit_id={}", Uuid::from_u128(ad)),
            format!("campaign_id={}", Uuid::from_u128(camp).simple()),
            format!("creative_id={}", Uuid::from_u128(cre).hyphenated().to_string().to_uppercase()),
            format!("page_url={}", form_encode(&url)),
            format!("cb_{junk}=1"),
        ];
        if with_ts {
            pairs.push(format!("timestamp={ts}"));
        }
        let n = pairs.len();
        pairs.swap(0, (order as usize) % n);
        let q = pairs.join("&");
        let mut scratch = Vec::new();
        let ev = parse_event(EventKind::Click, q.as_bytes(), NOW, &LIMITS, &mut scratch).expect("valid");
        prop_assert_eq!(ev.ad_unit_id, Uuid::from_u128(ad));
        prop_assert_eq!(ev.campaign_id, Uuid::from_u128(camp));
        prop_assert_eq!(ev.creative_id, Uuid::from_u128(cre));
        prop_assert_eq!(ev.page_url, url.as_str());
        prop_assert_eq!(ev.timestamp_ms, if with_ts { ts } else { NOW });
    }

    #[test]
    fn a_broken_uuid_is_named(which in 0usize..3, bad in "[g-z]{1,40}") {
        let mut ids = [Uuid::nil().to_string(), Uuid::nil().to_string(), Uuid::nil().to_string()];
        ids[which] = bad;
        let q = format!("ad_unit_id={}&campaign_id={}&creative_id={}&page_url=x", ids[0], ids[1], ids[2]);
        let mut scratch = Vec::new();
        let e = parse_event(EventKind::Impression, q.as_bytes(), NOW, &LIMITS, &mut scratch).map(|_| ());
        let param = [Param::AdUnitId, Param::CampaignId, Param::CreativeId][which];
        prop_assert_eq!(e, Err(ParamError { param, problem: Problem::NotUuid }));
    }

    #[test]
    fn out_of_window_timestamps_are_refused(offset in prop_oneof![3_600_001i64..i64::MAX / 4, i64::MIN / 4..-(7 * 86_400_000i64) - 1]) {
        let q = format!("ad_unit_id={0}&campaign_id={0}&creative_id={0}&page_url=x&timestamp={1}", Uuid::nil(), NOW + offset);
        let mut scratch = Vec::new();
        let e = parse_event(EventKind::Impression, q.as_bytes(), NOW, &LIMITS, &mut scratch).map(|_| ()).expect_err("refused");
        prop_assert_eq!(e.param, Param::Timestamp);
        prop_assert!(matches!(e.problem, Problem::TooFarInFuture | Problem::TooOld));
    }
}

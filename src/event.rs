//! Query-string parsing and validation for the two event endpoints.
//!
//! This is the first half of the hot path: it turns the raw query of
//! `/event/impression` or `/event/click` into an [`Event`] that borrows from the
//! request (or from a caller-owned scratch buffer when `page_url` needed
//! percent-decoding), or into a [`ParamError`] that names the parameter at fault.
//! It never allocates on the heap for a well-formed request with a reused
//! scratch buffer, never panics on any input, and imports nothing from the
//! database side.

use std::fmt;

use uuid::Uuid;

pub use crate::batch::EventKind;
use crate::batch::{InvalidReason, Row};

/// Limits applied while validating; copied out of the config once at start.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Refuse timestamps more than this far ahead of the receipt time.
    pub max_future_ms: i64,
    /// Refuse timestamps more than this far behind the receipt time.
    pub max_age_ms: i64,
}

/// Longest accepted `page_url`, in bytes after percent-decoding.
pub const MAX_PAGE_URL_BYTES: usize = 2048;
/// `User-Agent` values are cut to this many bytes (on a character boundary).
pub const MAX_USER_AGENT_BYTES: usize = 512;

/// A validated event, borrowing its strings from the request or the scratch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub kind: EventKind,
    pub ad_unit_id: Uuid,
    pub campaign_id: Uuid,
    pub creative_id: Uuid,
    pub page_url: &'a str,
    /// Event time in unix milliseconds (the client's `timestamp`, or receipt time).
    pub timestamp_ms: i64,
    /// The client's idempotency key: the same id again within
    /// `DEDUP_WINDOW_HOURS` is the same event, stored and counted once.
    pub event_id: Option<Uuid>,
}

impl<'a> Event<'a> {
    /// The event as stored: received at `received_ms` with `user_agent`, and
    /// its invalid-traffic verdict (`filtered`: counted as invalid, not billed).
    pub fn stored(
        &self,
        received_ms: i64,
        user_agent: Option<&'a str>,
        invalid: Option<InvalidReason>,
        filtered: bool,
    ) -> Row<'a> {
        Row {
            kind: self.kind,
            ad_unit_id: self.ad_unit_id,
            campaign_id: self.campaign_id,
            creative_id: self.creative_id,
            timestamp_ms: self.timestamp_ms,
            received_ms,
            page_url: self.page_url,
            user_agent,
            invalid,
            filtered,
            event_id: self.event_id,
        }
    }
}

/// The parameters the endpoints know. Anything else in the query (cache
/// busters such as `cb=123`) is ignored, as the Node service ignored it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    AdUnitId,
    CampaignId,
    CreativeId,
    PageUrl,
    Timestamp,
    EventId,
    /// `type` in a batch: `impression` or `click` (the path says it on the single endpoints).
    Type,
}

impl Param {
    pub fn name(self) -> &'static str {
        match self {
            Param::AdUnitId => "ad_unit_id",
            Param::CampaignId => "campaign_id",
            Param::CreativeId => "creative_id",
            Param::PageUrl => "page_url",
            Param::Timestamp => "timestamp",
            Param::EventId => "event_id",
            Param::Type => "type",
        }
    }

    fn from_key(key: &[u8]) -> Option<Param> {
        Some(match key {
            b"ad_unit_id" => Param::AdUnitId,
            b"campaign_id" => Param::CampaignId,
            b"creative_id" => Param::CreativeId,
            b"page_url" => Param::PageUrl,
            b"timestamp" => Param::Timestamp,
            b"event_id" => Param::EventId,
            _ => return None,
        })
    }
}

/// What is wrong with one parameter. Each maps to one fixed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    Missing,
    Duplicated,
    BadPercentEncoding,
    NotUtf8,
    ContainsNul,
    NotUuid,
    Empty,
    TooLong,
    NotInteger,
    TooFarInFuture,
    TooOld,
    NotAKind,
    NotJsonText,
}

/// A client error: which parameter, and what is wrong with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", .param.name(), .problem.message())]
pub struct ParamError {
    pub param: Param,
    pub problem: Problem,
}

impl Problem {
    /// The stable `error` code in the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            Problem::Missing => "missing_parameter",
            Problem::Duplicated => "duplicate_parameter",
            _ => "invalid_parameter",
        }
    }

    /// The human-readable `message` in the JSON body.
    pub fn message(self) -> &'static str {
        match self {
            Problem::Missing => "required parameter is missing",
            Problem::Duplicated => "parameter given more than once",
            Problem::BadPercentEncoding => "malformed percent-encoding",
            Problem::NotUtf8 => "not valid UTF-8 after percent-decoding",
            Problem::ContainsNul => "contains a NUL byte",
            Problem::NotUuid => "not a UUID",
            Problem::Empty => "must not be empty",
            Problem::TooLong => "longer than 2048 bytes",
            Problem::NotInteger => "not an integer number of unix milliseconds",
            Problem::TooFarInFuture => "timestamp is too far in the future",
            Problem::TooOld => "timestamp is too far in the past",
            Problem::NotAKind => "must be impression or click",
            Problem::NotJsonText => "must be a JSON string (or a number, for timestamp)",
        }
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn err(param: Param, problem: Problem) -> ParamError {
    ParamError { param, problem }
}

/// Parses and validates an event query string (without the leading `?`).
///
/// `now_ms` is the receipt time; `scratch` is reused across calls and only
/// written when `page_url` needs decoding. Rules:
/// - `&` separates pairs; `+` decodes to a space and `%XX` to a byte
///   (`application/x-www-form-urlencoded`, as browsers and the Node service do);
/// - a known parameter given twice is refused (`duplicate_parameter`) rather
///   than guessing which one the pixel meant; unknown parameters are ignored;
/// - an empty `timestamp=` means "not given" (templated pixels often send it so).
pub fn parse_event<'a>(
    kind: EventKind,
    query: &'a [u8],
    now_ms: i64,
    limits: &Limits,
    scratch: &'a mut Vec<u8>,
) -> Result<Event<'a>, ParamError> {
    let mut ad_unit: Option<Uuid> = None;
    let mut campaign: Option<Uuid> = None;
    let mut creative: Option<Uuid> = None;
    let mut page_url_raw: Option<&'a [u8]> = None;
    let mut timestamp_raw: Option<&'a [u8]> = None;
    let mut event_id: Option<Uuid> = None;

    for pair in query.split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let param = match Param::from_key(key) {
            Some(p) => Some(p),
            None if needs_decoding(key) => {
                let mut buf = [0u8; 16];
                decode_small(key, &mut buf).and_then(Param::from_key)
            }
            None => None,
        };
        let Some(param) = param else { continue };
        let slot_taken = match param {
            Param::AdUnitId => set_uuid(&mut ad_unit, param, value)?,
            Param::CampaignId => set_uuid(&mut campaign, param, value)?,
            Param::CreativeId => set_uuid(&mut creative, param, value)?,
            Param::PageUrl => page_url_raw.replace(value).is_some(),
            Param::Timestamp => timestamp_raw.replace(value).is_some(),
            // Optional; an empty `event_id=` means "not given", like `timestamp=`.
            Param::EventId if value.is_empty() => false,
            Param::EventId => set_uuid(&mut event_id, param, value)?,
            // Never from `from_key`: only a batch line names its kind.
            Param::Type => false,
        };
        if slot_taken {
            return Err(err(param, Problem::Duplicated));
        }
    }

    let ad_unit_id = ad_unit.ok_or(err(Param::AdUnitId, Problem::Missing))?;
    let campaign_id = campaign.ok_or(err(Param::CampaignId, Problem::Missing))?;
    let creative_id = creative.ok_or(err(Param::CreativeId, Problem::Missing))?;
    let raw_url = page_url_raw.ok_or(err(Param::PageUrl, Problem::Missing))?;
    let timestamp_ms = match timestamp_raw {
        None | Some(b"") => now_ms,
        Some(raw) => {
            // Decoded like every other value (`%2D5` is `-5`); 24 bytes hold any i64.
            let mut buf = [0u8; 24];
            let digits = if needs_decoding(raw) {
                decode_small(raw, &mut buf)
            } else {
                Some(raw)
            };
            let ts = digits
                .and_then(parse_millis)
                .ok_or(err(Param::Timestamp, Problem::NotInteger))?;
            if ts > now_ms.saturating_add(limits.max_future_ms) {
                return Err(err(Param::Timestamp, Problem::TooFarInFuture));
            }
            if ts < now_ms.saturating_sub(limits.max_age_ms) {
                return Err(err(Param::Timestamp, Problem::TooOld));
            }
            ts
        }
    };
    let page_url = decode_page_url(raw_url, scratch)?;

    Ok(Event {
        kind,
        ad_unit_id,
        campaign_id,
        creative_id,
        page_url,
        timestamp_ms,
        event_id,
    })
}

/// Sets a UUID slot; returns whether it was already set.
fn set_uuid(slot: &mut Option<Uuid>, param: Param, value: &[u8]) -> Result<bool, ParamError> {
    if slot.is_some() {
        return Ok(true);
    }
    let parsed = if needs_decoding(value) {
        // A UUID is at most 45 bytes in any accepted form ("urn:uuid:" + 36).
        let mut buf = [0u8; 48];
        let decoded = decode_small(value, &mut buf).ok_or(err(param, Problem::NotUuid))?;
        Uuid::try_parse_ascii(decoded)
    } else {
        Uuid::try_parse_ascii(value)
    };
    *slot = Some(parsed.map_err(|_| err(param, Problem::NotUuid))?);
    Ok(false)
}

fn needs_decoding(s: &[u8]) -> bool {
    s.iter().any(|&b| b == b'%' || b == b'+')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `input` into `out` (appending), copying unescaped runs in
/// bulk. Returns false on a malformed escape.
fn percent_decode_into(input: &[u8], out: &mut Vec<u8>) -> bool {
    out.reserve(input.len());
    let mut rest = input;
    while let Some(i) = rest.iter().position(|&b| b == b'%' || b == b'+') {
        out.extend_from_slice(&rest[..i]);
        if rest[i] == b'+' {
            out.push(b' ');
            rest = &rest[i + 1..];
            continue;
        }
        let (Some(h), Some(l)) = (
            rest.get(i + 1).and_then(|&b| hex(b)),
            rest.get(i + 2).and_then(|&b| hex(b)),
        ) else {
            return false;
        };
        out.push(h << 4 | l);
        rest = &rest[i + 3..];
    }
    out.extend_from_slice(rest);
    true
}

/// Decodes a short value into a fixed buffer; `None` if malformed or too long.
fn decode_small<'b>(input: &[u8], buf: &'b mut [u8]) -> Option<&'b [u8]> {
    let mut n = 0;
    let mut i = 0;
    while i < input.len() {
        let b = match input[i] {
            b'%' => {
                let h = hex(*input.get(i + 1)?)?;
                let l = hex(*input.get(i + 2)?)?;
                i += 3;
                h << 4 | l
            }
            b'+' => {
                i += 1;
                b' '
            }
            b => {
                i += 1;
                b
            }
        };
        *buf.get_mut(n)? = b;
        n += 1;
    }
    Some(&buf[..n])
}

fn decode_page_url<'a>(raw: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<&'a str, ParamError> {
    let e = |p| err(Param::PageUrl, p);
    // One scan finds the first escape; the run before it is copied as is.
    let bytes: &'a [u8] = match raw.iter().position(|&b| b == b'%' || b == b'+') {
        None => raw,
        Some(first) => {
            scratch.clear();
            scratch.extend_from_slice(&raw[..first]);
            if !percent_decode_into(&raw[first..], scratch) {
                return Err(e(Problem::BadPercentEncoding));
            }
            scratch.as_slice()
        }
    };
    if bytes.is_empty() {
        return Err(e(Problem::Empty));
    }
    if bytes.len() > MAX_PAGE_URL_BYTES {
        return Err(e(Problem::TooLong));
    }
    if bytes.contains(&0) {
        return Err(e(Problem::ContainsNul));
    }
    std::str::from_utf8(bytes).map_err(|_| e(Problem::NotUtf8))
}

/// Parses a plain decimal integer (optional leading `-`), refusing overflow.
fn parse_millis(raw: &[u8]) -> Option<i64> {
    let (neg, digits) = match raw.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, raw),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Cuts a `User-Agent` header to [`MAX_USER_AGENT_BYTES`] on a character
/// boundary. Header bytes that are not UTF-8 (obsolete latin-1 text) are
/// replaced, since `events.user_agent` is `text`; that rare case allocates.
pub fn user_agent(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    let cut = &raw[..raw.len().min(MAX_USER_AGENT_BYTES)];
    match std::str::from_utf8(cut) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(e) if e.error_len().is_none() && raw.len() > MAX_USER_AGENT_BYTES => {
            // Cut in the middle of a character: drop the partial tail.
            std::borrow::Cow::Borrowed(std::str::from_utf8(&cut[..e.valid_up_to()]).unwrap_or(""))
        }
        Err(_) => {
            let mut s = String::from_utf8_lossy(cut).replace('\0', "");
            while s.len() > MAX_USER_AGENT_BYTES {
                s.pop();
            }
            std::borrow::Cow::Owned(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_717_200_000_000;
    const LIMITS: Limits = Limits {
        max_future_ms: 3_600_000,
        max_age_ms: 7 * 86_400_000,
    };
    const AU: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
    const CA: &str = "fe5dd6f6-5d04-4969-b606-7ae6ac125000";
    const CR: &str = "6f1a9e0c-3d2b-4c5e-9f7a-8b6c5d4e3f21";

    fn parse(q: &str) -> Result<(Event<'static>, String), ParamError> {
        let scratch = Box::leak(Box::new(Vec::new()));
        let q: &'static [u8] = Box::leak(q.as_bytes().to_vec().into_boxed_slice());
        parse_event(EventKind::Impression, q, NOW, &LIMITS, scratch)
            .map(|e| (e, e.page_url.to_string()))
    }

    fn base() -> String {
        format!("ad_unit_id={AU}&campaign_id={CA}&creative_id={CR}")
    }

    #[test]
    fn parses_a_full_event_and_decodes_the_url() {
        let q = format!(
            "{}&page_url=https%3A%2F%2Fex.com%2Fa%3Fb%3Dc+d&timestamp={}",
            base(),
            NOW - 5
        );
        let (e, url) = parse(&q).expect("valid");
        assert_eq!(e.ad_unit_id.to_string(), AU);
        assert_eq!(e.campaign_id.to_string(), CA);
        assert_eq!(e.creative_id.to_string(), CR);
        assert_eq!(url, "https://ex.com/a?b=c d");
        assert_eq!(e.timestamp_ms, NOW - 5);
    }

    #[test]
    fn timestamp_defaults_to_receipt_and_empty_means_absent() {
        let (e, _) = parse(&format!("{}&page_url=x", base())).expect("valid");
        assert_eq!(e.timestamp_ms, NOW);
        let (e, _) = parse(&format!("{}&page_url=x&timestamp=", base())).expect("valid");
        assert_eq!(e.timestamp_ms, NOW);
    }

    #[test]
    fn an_encoded_timestamp_is_decoded_like_other_values() {
        // NOW - 1 = 1717199999999, its first digit written as %31.
        let (e, _) =
            parse(&format!("{}&page_url=x&timestamp=%31717199999999", base())).expect("valid");
        assert_eq!(e.timestamp_ms, NOW - 1);
        let e = parse(&format!("{}&page_url=x&timestamp=1%2B2", base())).map(|_| ());
        assert_eq!(
            e,
            Err(ParamError {
                param: Param::Timestamp,
                problem: Problem::NotInteger
            })
        );
    }

    #[test]
    fn unknown_parameters_are_ignored() {
        assert!(parse(&format!("cb=123&{}&page_url=x&&utm=%zz", base())).is_ok());
    }

    #[test]
    fn each_problem_names_its_parameter() {
        let cases: Vec<(String, Param, Problem)> = vec![
            (
                format!("campaign_id={CA}&creative_id={CR}&page_url=x"),
                Param::AdUnitId,
                Problem::Missing,
            ),
            (
                format!("{}&page_url=x&campaign_id={CA}", base()),
                Param::CampaignId,
                Problem::Duplicated,
            ),
            (
                format!("ad_unit_id=nope&campaign_id={CA}&creative_id={CR}&page_url=x"),
                Param::AdUnitId,
                Problem::NotUuid,
            ),
            (base(), Param::PageUrl, Problem::Missing),
            (
                format!("{}&page_url=", base()),
                Param::PageUrl,
                Problem::Empty,
            ),
            (
                format!("{}&page_url=%E2%28", base()),
                Param::PageUrl,
                Problem::NotUtf8,
            ),
            (
                format!("{}&page_url=a%00b", base()),
                Param::PageUrl,
                Problem::ContainsNul,
            ),
            (
                format!("{}&page_url=a%2", base()),
                Param::PageUrl,
                Problem::BadPercentEncoding,
            ),
            (
                format!("{}&page_url={}", base(), "a".repeat(2049)),
                Param::PageUrl,
                Problem::TooLong,
            ),
            (
                format!("{}&page_url=x&timestamp=12a", base()),
                Param::Timestamp,
                Problem::NotInteger,
            ),
            (
                format!("{}&page_url=x&timestamp=99999999999999999999", base()),
                Param::Timestamp,
                Problem::NotInteger,
            ),
            (
                format!("{}&page_url=x&timestamp={}", base(), NOW + 3_600_001),
                Param::Timestamp,
                Problem::TooFarInFuture,
            ),
            (
                format!("{}&page_url=x&timestamp=-5", base()),
                Param::Timestamp,
                Problem::TooOld,
            ),
        ];
        for (q, param, problem) in cases {
            assert_eq!(
                parse(&q).map(|_| ()),
                Err(ParamError { param, problem }),
                "query {q}"
            );
        }
    }

    #[test]
    fn page_url_of_exactly_the_limit_is_accepted() {
        let (_, url) = parse(&format!("{}&page_url={}", base(), "a".repeat(2048))).expect("valid");
        assert_eq!(url.len(), 2048);
    }

    #[test]
    fn encoded_keys_and_uuid_values_are_understood() {
        let q = format!(
            "ad%5Funit_id={AU}&campaign_id={}&creative_id={CR}&page_url=x",
            CA.replace('-', "%2D")
        );
        let (e, _) = parse(&q).expect("valid");
        assert_eq!(e.campaign_id.to_string(), CA);
    }

    #[test]
    fn user_agent_is_cut_on_a_char_boundary() {
        let long = "é".repeat(300); // 600 bytes
        let ua = user_agent(long.as_bytes());
        assert!(ua.len() <= MAX_USER_AGENT_BYTES && ua.len() >= MAX_USER_AGENT_BYTES - 1);
        assert_eq!(user_agent(b"curl/8"), "curl/8");
        assert_eq!(user_agent(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(
            user_agent(b"caf\xe9"),
            "caf\u{fffd}",
            "latin-1, not cut: replaced, not dropped"
        );
    }
}

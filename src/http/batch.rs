//! `POST /events`: many events in one body, for `navigator.sendBeacon` on
//! page exit and for SDKs that send in batches.
//!
//! Two body formats, chosen by `Content-Type`:
//! - `text/plain` (or no type): one event per line, each line the query
//!   string a single endpoint would take plus `type=impression|click`. A
//!   `sendBeacon` of a string is sent this way, and a CORS-simple request
//!   needs no preflight, which a page that is unloading never completes.
//! - `application/json`: an array of objects with the same fields as
//!   strings (`timestamp` may be a number).
//!
//! Each event is judged on its own, by the same parser and the same rules as
//! the single endpoints (a JSON object is turned into the equivalent query
//! string), and recorded through the same path; the answer is `200` with the
//! accepted count and, for each refused event, its index (0-based, blank
//! lines not counted) and error. Whole-body problems (too large, too many
//! events, not JSON, another media type) refuse the batch before anything
//! is recorded.

use std::net::IpAddr;

use hyper::header::CONTENT_TYPE;
use hyper::HeaderMap;
use serde_json::Value;

use super::{accept, Accepted, AppState, Rejection, SCRATCH};
use crate::batch::InvalidReason;
use crate::event::{self, EventKind, Param, ParamError, Problem};
use crate::shard::ShardFull;

/// Largest `/events` body: what `sendBeacon` may queue per page (64 KiB).
pub const MAX_BATCH_BODY_BYTES: usize = 64 * 1024;

/// How the events are written in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Lines,
    Json,
}

/// The body's format from its `Content-Type`.
pub fn format_of(headers: &HeaderMap) -> Result<Format, Rejection> {
    let Some(v) = headers.get(CONTENT_TYPE) else {
        return Ok(Format::Lines);
    };
    let essence = v
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "" | "text/plain" => Ok(Format::Lines),
        "application/json" => Ok(Format::Json),
        t if t.starts_with("application/") && t.ends_with("+json") => Ok(Format::Json),
        _ => Err(Rejection::UnsupportedMediaType),
    }
}

/// One refused event of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub index: usize,
    pub why: Rejection,
}

/// What a batch came to: the answer's content and what the stats count.
#[derive(Debug, Default)]
pub struct Tally {
    pub received: usize,
    pub accepted: usize,
    pub refused: Vec<Refused>,
    /// Invalid-traffic reasons of the recorded events.
    pub invalid: Vec<InvalidReason>,
    /// `error` codes of the refused events.
    pub rejected: Vec<&'static str>,
}

impl Tally {
    /// The `200` answer's JSON.
    pub fn body(&self) -> String {
        let refused: Vec<Value> = self
            .refused
            .iter()
            .map(|r| {
                let mut o = serde_json::Map::new();
                o.insert("index".into(), r.index.into());
                o.insert("error".into(), r.why.code().into());
                if let Some(p) = r.why.parameter() {
                    o.insert("parameter".into(), p.into());
                }
                o.insert("message".into(), r.why.message().into());
                Value::Object(o)
            })
            .collect();
        serde_json::json!({
            "received": self.received,
            "accepted": self.accepted,
            "refused": refused,
        })
        .to_string()
    }

    fn refuse(&mut self, index: usize, why: Rejection) {
        self.rejected.push(why.code());
        self.refused.push(Refused { index, why });
    }
}

/// What the request brought besides the body.
pub struct Context<'a> {
    pub headers: &'a HeaderMap,
    pub user_agent: Option<&'a str>,
    pub peer: IpAddr,
    pub received: i64,
}

/// Judges and records every event of `body`; in durable mode also the last
/// journal record to wait for. `Err` refuses the whole batch (nothing
/// recorded): a body problem, or the very first event refused for overload
/// or shutdown, answered as the single endpoints would.
pub fn record_batch(
    state: &AppState,
    body: &[u8],
    format: Format,
    max_events: usize,
    cx: &Context<'_>,
) -> Result<(Tally, Option<u64>), Rejection> {
    let mut last_seq = None;
    let tally = judge_all(state, body, format, max_events, cx, &mut last_seq)?;
    Ok((tally, last_seq))
}

fn judge_all(
    state: &AppState,
    body: &[u8],
    format: Format,
    max_events: usize,
    cx: &Context<'_>,
    last_seq: &mut Option<u64>,
) -> Result<Tally, Rejection> {
    match format {
        Format::Lines => {
            let lines: Vec<&[u8]> = body
                .split(|&b| b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .collect();
            if lines.len() > max_events {
                return Err(Rejection::TooManyEvents(max_events));
            }
            let mut tally = Tally {
                received: lines.len(),
                ..Tally::default()
            };
            for (i, line) in lines.iter().enumerate() {
                one(state, &mut tally, i, kind_of_line(line), line, cx, last_seq)?;
            }
            Ok(tally)
        }
        Format::Json => {
            let items: Vec<Value> = serde_json::from_slice(body).map_err(|_| Rejection::BadJson)?;
            if items.len() > max_events {
                return Err(Rejection::TooManyEvents(max_events));
            }
            let mut tally = Tally {
                received: items.len(),
                ..Tally::default()
            };
            for (i, item) in items.iter().enumerate() {
                let (kind, query) = match item {
                    Value::Object(o) => (kind_of_json(o.get("type")), query_of_json(o)),
                    _ => (Err(Rejection::NotAnObject), Ok(String::new())),
                };
                match query {
                    Ok(q) => one(state, &mut tally, i, kind, q.as_bytes(), cx, last_seq)?,
                    Err(e) => tally.refuse(i, e),
                }
            }
            Ok(tally)
        }
    }
}

/// Judges and records one event; `Err` only when the batch as a whole is
/// refused (the first event met overload or shutdown).
fn one(
    state: &AppState,
    tally: &mut Tally,
    index: usize,
    kind: Result<EventKind, Rejection>,
    query: &[u8],
    cx: &Context<'_>,
    last_seq: &mut Option<u64>,
) -> Result<(), Rejection> {
    let kind = match kind {
        Ok(k) => k,
        Err(e) => {
            tally.refuse(index, e);
            return Ok(());
        }
    };
    let outcome = SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let ev = event::parse_event(kind, query, cx.received, &state.limits, &mut scratch)
            .map_err(Rejection::Param)?;
        accept(state, &ev, cx.user_agent, cx.headers, cx.peer, cx.received).map_err(|full| {
            match full {
                ShardFull::Closed => Rejection::ShuttingDown,
                _ => Rejection::Overloaded,
            }
        })
    });
    if let Ok((_, Some(seq))) = outcome {
        *last_seq = Some(last_seq.map_or(seq, |s: u64| s.max(seq)));
    }
    match outcome.map(|(a, _)| a) {
        Ok(Accepted::Recorded(invalid)) => {
            tally.accepted += 1;
            tally.invalid.extend(invalid);
        }
        Ok(Accepted::Repeat) => tally.accepted += 1,
        // Nothing recorded yet: refuse the batch the way a single event is.
        Err(e @ (Rejection::Overloaded | Rejection::ShuttingDown)) if tally.accepted == 0 => {
            return Err(e)
        }
        Err(e) => tally.refuse(index, e),
    }
    Ok(())
}

fn kind_from(value: &[u8]) -> Result<EventKind, Rejection> {
    let problem = |problem| {
        Rejection::Param(ParamError {
            param: Param::Type,
            problem,
        })
    };
    match value {
        b"impression" => Ok(EventKind::Impression),
        b"click" => Ok(EventKind::Click),
        b"" => Err(problem(Problem::Missing)),
        _ => Err(problem(Problem::NotAKind)),
    }
}

/// `type` from a line's query string (given once, not percent-encoded).
fn kind_of_line(line: &[u8]) -> Result<EventKind, Rejection> {
    let mut found: Option<&[u8]> = None;
    for pair in line.split(|&b| b == b'&') {
        if let Some(v) = pair.strip_prefix(b"type=") {
            if found.replace(v).is_some() {
                return Err(Rejection::Param(ParamError {
                    param: Param::Type,
                    problem: Problem::Duplicated,
                }));
            }
        }
    }
    kind_from(found.unwrap_or(b""))
}

fn kind_of_json(v: Option<&Value>) -> Result<EventKind, Rejection> {
    match v {
        None | Some(Value::Null) => kind_from(b""),
        Some(Value::String(s)) => kind_from(s.as_bytes()),
        Some(_) => Err(Rejection::Param(ParamError {
            param: Param::Type,
            problem: Problem::NotJsonText,
        })),
    }
}

/// The fields a JSON event may carry, in query-string order.
const JSON_FIELDS: [Param; 6] = [
    Param::AdUnitId,
    Param::CampaignId,
    Param::CreativeId,
    Param::PageUrl,
    Param::Timestamp,
    Param::EventId,
];

/// A JSON event as the equivalent query string (values percent-encoded), so
/// that it meets exactly the single endpoints' rules. A field that is not a
/// string (or, for `timestamp`, a number) is refused naming it; `null` is
/// absent.
fn query_of_json(o: &serde_json::Map<String, Value>) -> Result<String, Rejection> {
    let mut q = String::with_capacity(256);
    for p in JSON_FIELDS {
        let text = match o.get(p.name()) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => std::borrow::Cow::Borrowed(s.as_str()),
            Some(Value::Number(n)) if p == Param::Timestamp => match n.as_i64() {
                Some(ms) => std::borrow::Cow::Owned(ms.to_string()),
                None => {
                    return Err(Rejection::Param(ParamError {
                        param: p,
                        problem: Problem::NotInteger,
                    }))
                }
            },
            Some(_) => {
                return Err(Rejection::Param(ParamError {
                    param: p,
                    problem: Problem::NotJsonText,
                }))
            }
        };
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str(p.name());
        q.push('=');
        percent_encode_into(&text, &mut q);
    }
    Ok(q)
}

fn percent_encode_into(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let with = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, t.parse().expect("header"));
            format_of(&h)
        };
        assert_eq!(format_of(&HeaderMap::new()), Ok(Format::Lines));
        assert_eq!(with("text/plain;charset=UTF-8"), Ok(Format::Lines));
        assert_eq!(with("Application/JSON; charset=utf-8"), Ok(Format::Json));
        assert_eq!(with("application/vnd.x+json"), Ok(Format::Json));
        assert_eq!(
            with("multipart/form-data"),
            Err(Rejection::UnsupportedMediaType)
        );
    }

    #[test]
    fn kinds_and_json_queries() {
        assert_eq!(kind_of_line(b"a=1&type=click"), Ok(EventKind::Click));
        assert!(kind_of_line(b"a=1").is_err());
        assert!(kind_of_line(b"type=view").is_err());
        assert!(kind_of_line(b"type=click&type=click").is_err());
        let o: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"type":"impression","page_url":"https://e.x/a b?c=d&e","timestamp":17,"event_id":null,"x":[1]}"#,
        )
        .expect("json");
        assert_eq!(
            query_of_json(&o).expect("query"),
            "page_url=https%3A%2F%2Fe.x%2Fa%20b%3Fc%3Dd%26e&timestamp=17"
        );
        let o: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"campaign_id":5}"#).expect("json");
        assert_eq!(
            query_of_json(&o).map_err(|r| r.parameter()),
            Err(Some("campaign_id"))
        );
    }
}

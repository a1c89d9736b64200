//! `Rejection`: every refusal a client can see, and the one way it becomes a
//! response.
//!
//! Each variant has a status, a stable `error` code, an optional `parameter`,
//! a fixed `message` and the headers the status calls for (`Allow`,
//! `Retry-After`). The body is always `{"error":…[, "parameter":…], "message":…}`.
//! [`Rejection::CATALOGUE`] lists every (status, code) pair; a test checks
//! that the README's error table lists the same. To add a refusal: add a
//! variant, its arms below, and its row in the README.

use bytes::Bytes;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::response::Body;
#[cfg(doc)]
use super::MAX_BATCH_BODY_BYTES;
use super::{MAX_BODY_BYTES, MAX_HEADERS, MAX_HEADER_BYTES, MAX_URI_BYTES};
use crate::event::ParamError;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A query parameter is missing, repeated or breaks its rule.
    #[error("{0}")]
    Param(ParamError),
    /// The request body could not be read (client reset mid-body, bad chunking).
    #[error("the request body could not be read")]
    BadBody,
    /// The request body is over its endpoint's limit ([`MAX_BODY_BYTES`],
    /// or [`MAX_BATCH_BODY_BYTES`] on `/events`).
    #[error("request body too large")]
    BodyTooLarge(usize),
    /// A batch holds more events than `BATCH_MAX_EVENTS`.
    #[error("too many events in one batch")]
    TooManyEvents(usize),
    /// A batch body that is neither `text/plain` nor `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// A JSON batch body that is not a JSON array.
    #[error("not a JSON array")]
    BadJson,
    /// One element of a JSON batch is not an object (per event, in a batch answer).
    #[error("not a JSON object")]
    NotAnObject,
    /// The request body did not arrive within `BODY_READ_TIMEOUT_MS`; the
    /// connection is closed.
    #[error("request body too slow")]
    BodyTimeout,
    /// The request target is over [`MAX_URI_BYTES`].
    #[error("request target too long")]
    UriTooLong,
    /// Headers over [`MAX_HEADER_BYTES`] in total or more than [`MAX_HEADERS`].
    #[error("request headers too large")]
    HeadersTooLarge,
    /// No such path.
    #[error("no such endpoint")]
    NotFound,
    /// The path exists, the method does not; `Allow` lists the methods.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// A CORS preflight from an origin not in `ALLOWED_ORIGINS`.
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// The memory cap is reached and the spool cannot take more.
    #[error("overloaded")]
    Overloaded,
    /// The final flush has begun: the event could not be stored, so it is
    /// not acknowledged.
    #[error("shutting down")]
    ShuttingDown,
    /// `ACK_MODE=durable`: the journal could not make the event durable in time.
    #[error("not durable")]
    NotDurable,
}

impl Rejection {
    /// Every (status, `error` code) a client can be sent; the README's error table lists the same.
    pub const CATALOGUE: &'static [(u16, &'static str)] = &[
        (400, "missing_parameter"),
        (400, "invalid_parameter"),
        (400, "duplicate_parameter"),
        (400, "bad_body"),
        (400, "bad_json"),
        (400, "invalid_event"),
        (403, "origin_not_allowed"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (408, "body_timeout"),
        (413, "body_too_large"),
        (413, "too_many_events"),
        (414, "uri_too_long"),
        (415, "unsupported_media_type"),
        (431, "headers_too_large"),
        (503, "overloaded"),
        (503, "shutting_down"),
        (503, "not_durable"),
    ];

    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::Param(_)
            | Rejection::BadBody
            | Rejection::BadJson
            | Rejection::NotAnObject => StatusCode::BAD_REQUEST,
            Rejection::TooManyEvents(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection::OriginNotAllowed => StatusCode::FORBIDDEN,
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::UriTooLong => StatusCode::URI_TOO_LONG,
            Rejection::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::Overloaded | Rejection::ShuttingDown | Rejection::NotDurable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The stable `error` code of the JSON body (and the `reason` label in `/metrics`).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Param(e) => e.problem.code(),
            Rejection::BadBody => "bad_body",
            Rejection::BodyTooLarge(_) => "body_too_large",
            Rejection::TooManyEvents(_) => "too_many_events",
            Rejection::UnsupportedMediaType => "unsupported_media_type",
            Rejection::BadJson => "bad_json",
            Rejection::NotAnObject => "invalid_event",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::UriTooLong => "uri_too_long",
            Rejection::HeadersTooLarge => "headers_too_large",
            Rejection::NotFound => "not_found",
            Rejection::MethodNotAllowed(_) => "method_not_allowed",
            Rejection::OriginNotAllowed => "origin_not_allowed",
            Rejection::Overloaded => "overloaded",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::NotDurable => "not_durable",
        }
    }

    /// The parameter at fault, when one is.
    pub fn parameter(&self) -> Option<&'static str> {
        match self {
            Rejection::Param(e) => Some(e.param.name()),
            _ => None,
        }
    }

    /// The human-readable `message`.
    pub fn message(&self) -> String {
        match self {
            Rejection::Param(e) => e.problem.message().to_string(),
            Rejection::BadBody => "the request body could not be read".into(),
            Rejection::BodyTooLarge(MAX_BODY_BYTES) => format!(
                "event endpoints take their data in the query string; bodies over {MAX_BODY_BYTES} bytes are refused"
            ),
            Rejection::BodyTooLarge(limit) => format!(
                "bodies over {limit} bytes are refused; send the events in several batches"
            ),
            Rejection::TooManyEvents(max) => format!(
                "a batch holds at most {max} events (BATCH_MAX_EVENTS); send the rest in another"
            ),
            Rejection::UnsupportedMediaType => "send text/plain (one event query string per line) or application/json (an array of event objects)".into(),
            Rejection::BadJson => "the body is not a JSON array of event objects".into(),
            Rejection::NotAnObject => "each element of the array must be a JSON object".into(),
            Rejection::BodyTimeout => {
                "the request body did not arrive in time; the connection is closed".into()
            }
            Rejection::UriTooLong => {
                format!("request target longer than {MAX_URI_BYTES} bytes")
            }
            Rejection::HeadersTooLarge => format!(
                "request headers over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} fields"
            ),
            Rejection::NotFound => "no such endpoint".into(),
            Rejection::MethodNotAllowed(allow) => format!("allowed methods: {allow}"),
            Rejection::OriginNotAllowed => "this origin is not in ALLOWED_ORIGINS".into(),
            Rejection::Overloaded => "event buffer is full, retry later".into(),
            Rejection::ShuttingDown => {
                "this instance is shutting down and did not store the event; retry".into()
            }
            Rejection::NotDurable => "the event could not be written to the journal in time (it may still be stored); retry, with an event_id to keep it once".into(),
        }
    }

    /// True when the refusal is of an event (counted in `ingest_events_rejected_total`),
    /// false for requests that were never events (unknown path, wrong method, preflight).
    pub fn refuses_event(&self) -> bool {
        !matches!(
            self,
            Rejection::NotFound | Rejection::MethodNotAllowed(_) | Rejection::OriginNotAllowed
        )
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let quoted = |s: &str| serde_json::Value::from(s).to_string();
        let parameter = self
            .parameter()
            .map(|p| format!(r#""parameter":{},"#, quoted(p)))
            .unwrap_or_default();
        format!(
            r#"{{"error":{},{parameter}"message":{}}}"#,
            quoted(self.code()),
            quoted(&self.message())
        )
    }

    /// The response: status, JSON body, `Cache-Control: no-store`, and
    /// `Allow`, `Retry-After` or `Connection: close` where the status calls
    /// for them.
    pub fn into_response(self) -> Response<Body> {
        let mut r = Response::new(Body::new(Bytes::from(self.body())));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Rejection::MethodNotAllowed(allow) => {
                h.insert(ALLOW, HeaderValue::from_static(allow));
            }
            Rejection::Overloaded | Rejection::NotDurable => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Rejection::ShuttingDown => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
                h.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Rejection::BodyTimeout => {
                h.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        r
    }
}

impl From<ParamError> for Rejection {
    fn from(e: ParamError) -> Self {
        Rejection::Param(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Param, Problem};

    #[test]
    fn every_variant_is_in_the_catalogue_with_its_status() {
        let all = [
            Rejection::Param(ParamError {
                param: Param::PageUrl,
                problem: Problem::Missing,
            }),
            Rejection::Param(ParamError {
                param: Param::PageUrl,
                problem: Problem::Duplicated,
            }),
            Rejection::Param(ParamError {
                param: Param::PageUrl,
                problem: Problem::TooLong,
            }),
            Rejection::BadBody,
            Rejection::BodyTooLarge(MAX_BODY_BYTES),
            Rejection::TooManyEvents(500),
            Rejection::UnsupportedMediaType,
            Rejection::BadJson,
            Rejection::NotAnObject,
            Rejection::BodyTimeout,
            Rejection::ShuttingDown,
            Rejection::UriTooLong,
            Rejection::HeadersTooLarge,
            Rejection::NotFound,
            Rejection::MethodNotAllowed("GET"),
            Rejection::OriginNotAllowed,
            Rejection::Overloaded,
            Rejection::NotDurable,
        ];
        let mut seen: Vec<(u16, &str)> = all
            .iter()
            .map(|r| (r.status().as_u16(), r.code()))
            .collect();
        seen.sort();
        let mut catalogue = Rejection::CATALOGUE.to_vec();
        catalogue.sort();
        assert_eq!(seen, catalogue);
    }

    #[test]
    fn bodies_and_headers() {
        let r = Rejection::Param(ParamError {
            param: Param::CampaignId,
            problem: Problem::NotUuid,
        });
        assert_eq!(
            r.body(),
            r#"{"error":"invalid_parameter","parameter":"campaign_id","message":"not a UUID"}"#
        );
        let resp = Rejection::MethodNotAllowed("GET, HEAD").into_response();
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()[ALLOW], "GET, HEAD");
        let resp = Rejection::Overloaded.into_response();
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
    }
}

//! Fixed responses: the pixel GIF, 204s, and the JSON error bodies.
//!
//! Every error a client can cause maps to exactly one of these, with a stable
//! `error` code and a fixed message.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::event::ParamError;

pub type Body = Full<Bytes>;

/// A 1×1 transparent GIF (43 bytes).
pub const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const PIXEL_CACHE: HeaderValue = HeaderValue::from_static("no-store, no-cache, must-revalidate");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

fn with_status(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// `204 No Content` for an accepted POST.
pub fn accepted() -> Response<Body> {
    let mut r = with_status(StatusCode::NO_CONTENT, Body::default());
    r.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    r
}

/// `200` with the pixel (GET), or the same headers without a body (HEAD).
pub fn pixel(with_body: bool) -> Response<Body> {
    let body = if with_body {
        Body::new(Bytes::from_static(PIXEL_GIF))
    } else {
        Body::default()
    };
    let mut r = with_status(StatusCode::OK, body);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    h.insert(CACHE_CONTROL, PIXEL_CACHE);
    if !with_body {
        h.insert(
            hyper::header::CONTENT_LENGTH,
            HeaderValue::from(PIXEL_GIF.len()),
        );
    }
    r
}

/// A JSON body `{"error": code, ...}` with the given status.
pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = with_status(status, Body::new(Bytes::from(body)));
    r.headers_mut().insert(CONTENT_TYPE, JSON);
    r.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    r
}

/// `400` naming the parameter at fault.
pub fn invalid(e: &ParamError) -> Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        format!(
            r#"{{"error":"{}","parameter":"{}","message":"{}"}}"#,
            e.problem.code(),
            e.param.name(),
            e.problem.message()
        ),
    )
}

pub fn not_found() -> Response<Body> {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":"not_found","message":"no such endpoint"}"#.into(),
    )
}

pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(r#"{{"error":"method_not_allowed","message":"allowed methods: {allow}"}}"#),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

pub fn body_too_large(limit: usize) -> Response<Body> {
    json(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            r#"{{"error":"body_too_large","message":"event endpoints take their data in the query string; bodies over {limit} bytes are refused"}}"#
        ),
    )
}

pub fn bad_body() -> Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        r#"{"error":"bad_body","message":"the request body could not be read"}"#.into(),
    )
}

/// `503` when the service cannot take more events right now.
pub fn overloaded() -> Response<Body> {
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"error":"overloaded","message":"event buffer is full, retry later"}"#.into(),
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

pub fn origin_not_allowed() -> Response<Body> {
    json(
        StatusCode::FORBIDDEN,
        r#"{"error":"origin_not_allowed","message":"this origin is not in ALLOWED_ORIGINS"}"#
            .into(),
    )
}

pub fn uri_too_long(limit: usize) -> Response<Body> {
    json(
        StatusCode::URI_TOO_LONG,
        format!(
            r#"{{"error":"uri_too_long","message":"request target longer than {limit} bytes"}}"#
        ),
    )
}

pub fn headers_too_large(bytes: usize, count: usize) -> Response<Body> {
    json(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        format!(
            r#"{{"error":"headers_too_large","message":"request headers over {bytes} bytes or {count} fields"}}"#
        ),
    )
}

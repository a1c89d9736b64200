//! Fixed success responses: the pixel GIF, 204s, and JSON documents.
//! Refusals are built in one place only: [`super::rejection`].

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

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

/// A JSON document with the given status (health, probes).
pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = with_status(status, Body::new(Bytes::from(body)));
    r.headers_mut().insert(CONTENT_TYPE, JSON);
    r.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    r
}

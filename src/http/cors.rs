//! CORS for the event endpoints, driven by `ALLOWED_ORIGINS`.
//!
//! CORS decides whether a browser lets a page *read* the response; it is not
//! authentication. As with the Node service (Express `cors`), an event from a
//! page whose origin is not allowed is still recorded when the browser sends
//! it (a plain `<img>` pixel sends no `Origin` at all); only the
//! `Access-Control-Allow-Origin` header is withheld. Preflights from origins
//! that are not allowed get `403` so the refusal is visible in the network tab.

use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ORIGIN, VARY,
};
use hyper::{Response, StatusCode};

use super::response::Body;
use super::Rejection;
use crate::config::AllowedOrigins;

const METHODS: HeaderValue = HeaderValue::from_static("GET, HEAD, POST, OPTIONS");

/// Adds `Vary: Origin` and, for an allowed `Origin`, the allow headers.
pub fn decorate(origins: &AllowedOrigins, request: &HeaderMap, response: &mut Response<Body>) {
    let h = response.headers_mut();
    h.append(VARY, HeaderValue::from_static("Origin"));
    let Some(origin) = request.get(ORIGIN).and_then(|o| o.to_str().ok()) else {
        return;
    };
    if let Some(allowed) = origins.allow(origin) {
        if let Ok(v) = HeaderValue::from_str(allowed) {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, v);
            if allowed != "*" {
                // An explicitly listed origin may send credentialed beacons.
                h.insert(
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
    }
}

/// Answers an `OPTIONS` preflight: `204` with the allow headers, or a
/// refusal for an origin that is not allowed.
pub fn preflight(
    origins: &AllowedOrigins,
    request: &HeaderMap,
) -> Result<Response<Body>, Rejection> {
    let origin = request.get(ORIGIN).and_then(|o| o.to_str().ok());
    let allowed = origin.and_then(|o| origins.allow(o));
    if origin.is_some() && allowed.is_none() {
        return Err(Rejection::OriginNotAllowed);
    }
    let mut r = Response::new(Body::default());
    *r.status_mut() = StatusCode::NO_CONTENT;
    if allowed.is_some() {
        let h = r.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, METHODS);
        let asked = request
            .get(ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static("Content-Type"));
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked);
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
        h.append(
            VARY,
            HeaderValue::from_static("Access-Control-Request-Headers"),
        );
    }
    decorate(origins, request, &mut r);
    Ok(r)
}

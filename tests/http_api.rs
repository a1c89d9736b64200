//! The HTTP contract as a client sees it: statuses, headers, bodies, and what
//! each request does (or does not) store.

mod common;

use std::io::Read;

use common::*;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_parameter_gets_a_400_naming_it_and_stores_nothing() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let c = camps[0].id;
    let ok = format!("ad_unit_id={AD_UNIT}&campaign_id={c}&creative_id={CREATIVE}");
    let now = now_ms();
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (
            format!("campaign_id={c}&creative_id={CREATIVE}&page_url=x"),
            "missing_parameter",
            "ad_unit_id",
            "required parameter is missing",
        ),
        (
            format!("ad_unit_id={AD_UNIT}&creative_id={CREATIVE}&page_url=x"),
            "missing_parameter",
            "campaign_id",
            "required parameter is missing",
        ),
        (
            format!("ad_unit_id={AD_UNIT}&campaign_id={c}&page_url=x"),
            "missing_parameter",
            "creative_id",
            "required parameter is missing",
        ),
        (
            ok.clone(),
            "missing_parameter",
            "page_url",
            "required parameter is missing",
        ),
        (
            format!("ad_unit_id=123&campaign_id={c}&creative_id={CREATIVE}&page_url=x"),
            "invalid_parameter",
            "ad_unit_id",
            "not a UUID",
        ),
        (
            format!("ad_unit_id={AD_UNIT}&campaign_id=456&creative_id={CREATIVE}&page_url=x"),
            "invalid_parameter",
            "campaign_id",
            "not a UUID",
        ),
        (
            format!("ad_unit_id={AD_UNIT}&campaign_id={c}&creative_id=789&page_url=x"),
            "invalid_parameter",
            "creative_id",
            "not a UUID",
        ),
        (
            format!("{ok}&page_url="),
            "invalid_parameter",
            "page_url",
            "must not be empty",
        ),
        (
            format!("{ok}&page_url={}", "a".repeat(2049)),
            "invalid_parameter",
            "page_url",
            "longer than 2048 bytes",
        ),
        (
            format!("{ok}&page_url=%C3%28"),
            "invalid_parameter",
            "page_url",
            "not valid UTF-8 after percent-decoding",
        ),
        (
            format!("{ok}&page_url=a%00b"),
            "invalid_parameter",
            "page_url",
            "contains a NUL byte",
        ),
        (
            format!("{ok}&page_url=%G1"),
            "invalid_parameter",
            "page_url",
            "malformed percent-encoding",
        ),
        (
            format!("{ok}&page_url=x&timestamp=yesterday"),
            "invalid_parameter",
            "timestamp",
            "not an integer number of unix milliseconds",
        ),
        (
            format!("{ok}&page_url=x&timestamp={}", now + 2 * 3_600_000),
            "invalid_parameter",
            "timestamp",
            "timestamp is too far in the future",
        ),
        (
            format!("{ok}&page_url=x&timestamp={}", now - 8 * 86_400_000),
            "invalid_parameter",
            "timestamp",
            "timestamp is too far in the past",
        ),
        (
            format!("{ok}&page_url=x&event_id=order-17"),
            "invalid_parameter",
            "event_id",
            "not a UUID",
        ),
        (
            format!("{ok}&page_url=x&event_id={c}&event_id={c}"),
            "duplicate_parameter",
            "event_id",
            "parameter given more than once",
        ),
        (
            format!("{ok}&page_url=x&campaign_id={c}"),
            "duplicate_parameter",
            "campaign_id",
            "parameter given more than once",
        ),
    ];
    for (query, error, parameter, message) in &cases {
        for path in ["/event/impression", "/event/click"] {
            let resp = app
                .http
                .post(app.url(&format!("{path}?{query}")))
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 400, "{path}?{query}");
            assert_eq!(resp.headers()["content-type"], "application/json");
            let body: serde_json::Value = resp.json().await.expect("json body");
            assert_eq!(
                body,
                serde_json::json!({"error": error, "parameter": parameter, "message": message}),
                "{path}?{query}"
            );
        }
        // GET pixels are validated the same way.
        let resp = app
            .http
            .get(app.url(&format!("/event/impression?{query}")))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400, "GET ?{query}");
    }
    let h = app.health().await.expect("health");
    assert_eq!(h["pipeline"]["rejected"], (cases.len() * 3) as u64);
    assert_eq!(h["pipeline"]["accepted"], 0);
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 0);
    assert_eq!(count(&db, "events").await, 0);
    assert_eq!(count(&db, "rejected_events").await, 0);
    assert_eq!(count(&db, "metrics_hourly").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_returns_the_pixel_and_records_head_records_nothing() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let q = event_query(camps[0].id, AD_UNIT, None);

    let resp = app
        .http
        .get(app.url(&format!("/event/impression?{q}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/gif");
    assert_eq!(
        resp.headers()["cache-control"],
        "no-store, no-cache, must-revalidate"
    );
    let gif = resp.bytes().await.expect("body");
    assert_eq!(gif.len(), 43);
    assert_eq!(&gif[..6], b"GIF89a");
    assert_eq!(&gif[6..10], &[1, 0, 1, 0], "1x1");
    assert_eq!(gif.last(), Some(&0x3b));

    let resp = app
        .http
        .get(app.url(&format!("/event/click?{q}")))
        .send()
        .await
        .expect("GET click");
    assert_eq!(resp.status(), 200);

    for path in ["/event/impression", "/event/click"] {
        let resp = app
            .http
            .head(app.url(&format!("{path}?{q}")))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "image/gif");
    }
    let resp = app
        .http
        .head(app.url("/event/click?campaign_id=nope"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), 400, "HEAD validates like GET");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 2);
    assert_eq!(count(&db, "events").await, 2);
    let kinds: Vec<String> = db
        .query("SELECT event_type FROM events ORDER BY event_type", &[])
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["click", "impression"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_listed_origins_only() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting(
            "ALLOWED_ORIGINS",
            "https://publisher.example,https://shop.example",
        )
        .start()
        .await;
    let url = app.url(&format!(
        "/event/impression?{}",
        event_query(camps[0].id, AD_UNIT, None)
    ));

    let allowed = app
        .http
        .post(&url)
        .header("Origin", "https://shop.example")
        .send()
        .await
        .expect("post");
    assert_eq!(allowed.status(), 204);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(allowed
        .headers()
        .get_all("vary")
        .iter()
        .any(|v| v == "Origin"));

    let denied = app
        .http
        .post(&url)
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("post");
    assert_eq!(
        denied.status(),
        204,
        "recorded, as a browser sends it anyway"
    );
    assert!(denied
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    assert!(denied
        .headers()
        .get_all("vary")
        .iter()
        .any(|v| v == "Origin"));

    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, &url)
        .header("Origin", "https://publisher.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(
        h["access-control-allow-origin"],
        "https://publisher.example"
    );
    assert_eq!(
        h["access-control-allow-methods"],
        "GET, HEAD, POST, OPTIONS"
    );
    assert_eq!(h["access-control-allow-headers"], "content-type");

    let refused = app
        .http
        .request(reqwest::Method::OPTIONS, &url)
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(refused.status(), 403);
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let (report, _) = app.shutdown().await;
    assert_eq!(report.accepted, 2, "preflights record nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_origins_answer_star() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("ALLOWED_ORIGINS", "*")
        .start()
        .await;
    let url = app.url(&format!(
        "/event/click?{}",
        event_query(camps[0].id, AD_UNIT, None)
    ));
    let resp = app
        .http
        .post(&url)
        .header("Origin", "https://anyone.example")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_has_the_node_fields_and_moving_histograms() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let h = app.health().await.expect("health");
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["service"], "analytics-ingest");
    assert_eq!(h["database"], "connected");
    assert!(h["uptime"].as_f64().expect("uptime") >= 0.0);
    let ts = h["timestamp"].as_str().expect("timestamp");
    assert!(
        humantime::parse_rfc3339(ts).is_ok() && ts.ends_with('Z') && ts.len() == 24,
        "{ts}"
    );
    let before = h["latency_us"]["POST /event/impression"]["count"]
        .as_u64()
        .expect("count");
    assert_eq!(before, 0);

    for _ in 0..5 {
        assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    }
    assert_eq!(app.post("/event/impression?campaign_id=bad").await, 400);
    let h = app.health().await.expect("health");
    let post = &h["latency_us"]["POST /event/impression"];
    assert_eq!(post["count"], 6);
    for k in ["p50_us", "p90_us", "p95_us", "p99_us", "p999_us", "max_us"] {
        assert!(post[k].as_f64().expect(k) > 0.0, "{k}");
    }
    assert!(post["p50_us"].as_f64() <= post["max_us"].as_f64());
    assert_eq!(h["latency_us"]["POST /event/click"]["count"], 0);
    assert!(h["latency_us"]["GET /health"]["count"].as_u64().unwrap() >= 2);
    let p = &h["pipeline"];
    assert_eq!(p["accepted"], 5);
    assert_eq!(p["rejected"], 1);
    for k in [
        "buffered",
        "written",
        "dead_lettered",
        "flushes",
        "last_flush_duration_ms",
        "unknown_campaign",
    ] {
        assert!(!p[k].is_null(), "pipeline.{k}");
    }

    // gzip when asked for
    let resp = app
        .http
        .get(app.url("/health"))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("health gz");
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let gz = resp.bytes().await.expect("body");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .expect("gunzip");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(doc["service"], "analytics-ingest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_wrong_methods_and_bodies() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let q = event_query(camps[0].id, AD_UNIT, None);

    let resp = app.http.get(app.url("/nope")).send().await.expect("404");
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<serde_json::Value>().await.expect("json")["error"],
        "not_found"
    );

    let resp = app
        .http
        .put(app.url(&format!("/event/impression?{q}")))
        .send()
        .await
        .expect("405");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD, POST, OPTIONS");
    let resp = app.http.post(app.url("/health")).send().await.expect("405");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");

    // A small body (sendBeacon payload) is read and ignored; a large one is refused.
    let resp = app
        .http
        .post(app.url(&format!("/event/click?{q}")))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 204);
    let resp = app
        .http
        .post(app.url(&format!("/event/click?{q}")))
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 413);

    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 1);
    assert_eq!(count(&db, "events").await, 1);
    let _ = Uuid::nil();
}

/// Reads one HTTP/1.1 response with a Content-Length body; its status.
async fn read_response(s: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before a full response: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().expect("length"))
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text[9..12].parse().expect("status");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_answered_413_and_the_connection_goes_on() {
    use tokio::io::AsyncWriteExt;
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    // Declared too large, and sent whole: the client reads its 413, no reset.
    let body = vec![b'x'; 200 * 1024];
    let head = format!(
        "POST /event/click?{q} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&body).await.expect("body sent whole");
    assert_eq!(read_response(&mut s).await, 413);
    // Chunked, over the limit only part way through: the same.
    let chunk = vec![b'y'; 8 * 1024];
    s.write_all(
        format!("POST /event/click?{q} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("head");
    for _ in 0..5 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .expect("size");
        s.write_all(&chunk).await.expect("chunk");
        s.write_all(b"\r\n").await.expect("crlf");
    }
    s.write_all(b"0\r\n\r\n").await.expect("last chunk");
    assert_eq!(read_response(&mut s).await, 413);
    // The connection is still good for the next event.
    s.write_all(
        format!("POST /event/impression?{q} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("next");
    assert_eq!(read_response(&mut s).await, 204);
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 1);
    assert_eq!(count(&db, "events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_events_are_accepted_spooled_and_health_is_degraded() {
    let app = TestApp::builder()
        .without_database()
        .setting("SHUTDOWN_TIMEOUT_MS", 5000)
        .start()
        .await;
    let campaign = Uuid::new_v4();
    for _ in 0..4 {
        assert_eq!(app.post_event("impression", campaign).await, 204);
    }
    let mut h = app.health().await.expect("health");
    for _ in 0..100 {
        if h["spool"]["spooled_events"] == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        h = app.health().await.expect("health");
    }
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["database"], "disconnected");
    assert_eq!(h["pipeline"]["accepted"], 4);
    assert_eq!(h["pipeline"]["written"], 0);
    assert_eq!(h["spool"]["spooled_events"], 4, "on disk, not lost: {h}");
    assert!(h["spool"]["bytes"].as_u64().unwrap() > 0);
    let report = app.shutdown_report().await;
    assert_eq!(report.accepted, 4);
    assert_eq!(report.written_at_shutdown, 0);
    assert_eq!(report.unwritten, 0, "spooled events are not unwritten");
}

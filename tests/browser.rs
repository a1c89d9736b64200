//! A real browser as the client: headless Chromium loads a demo ad page served
//! locally, which fires an `<img>` pixel (GET), a `sendBeacon` click (POST) and
//! a `fetch` that needs CORS permission. The page is served from two origins,
//! one listed in `ALLOWED_ORIGINS` and one not; the test checks what the
//! browser saw and which rows landed in PostgreSQL.
//!
//! Needs Chromium (`CHROMIUM`, default /usr/bin/chromium); scripts/test.sh
//! installs Debian's package when it is missing.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `html` at `/demo.html` to every request on `listener`.
fn serve_page(listener: tokio::net::TcpListener, html: String) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got);
                let (status, body) = if head.starts_with("GET /demo.html") {
                    ("200 OK", html)
                } else {
                    ("404 Not Found", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
}

/// Loads `url` in headless Chromium and returns the DOM after the page's work is done.
async fn chromium_dump(url: String) -> String {
    let exe = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&exe).exists(),
        "Chromium not found at {exe}: scripts/test.sh installs Debian's chromium package"
    );
    let profile = temp_dir("chromium-profile");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=10000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("Chromium finished within 60 s")
    .expect("run Chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON the page wrote into `<pre id="out">`.
fn page_results(dom: &str) -> serde_json::Value {
    let start = dom
        .find("<pre id=\"out\">")
        .map(|i| i + "<pre id=\"out\">".len())
        .expect("#out in the DOM");
    let end = dom[start..]
        .find("</pre>")
        .map(|i| start + i)
        .expect("end of #out");
    let text = dom[start..end]
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("page did not finish ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_fires_pixel_beacon_and_fetch_and_cors_is_enforced() {
    let camps = campaigns(1, 1);
    // Two page origins: same host, different ports. Only the first is allowed.
    let allowed_page = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let denied_page = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let allowed_port = allowed_page.local_addr().expect("addr").port();
    let denied_port = denied_page.local_addr().expect("addr").port();
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting(
            "ALLOWED_ORIGINS",
            format!("http://127.0.0.1:{allowed_port}"),
        )
        .start()
        .await;
    let html = std::fs::read_to_string("tests/browser/demo.html")
        .expect("demo page")
        .replace(
            "{{SERVICE}}",
            &format!("http://127.0.0.1:{}", app.addr.port()),
        )
        .replace("{{ALLOWED_PORT}}", &allowed_port.to_string())
        .replace("{{CAMPAIGN}}", &camps[0].id.to_string())
        .replace("{{AD_UNIT}}", AD_UNIT)
        .replace("{{CREATIVE}}", CREATIVE);
    serve_page(allowed_page, html.clone());
    serve_page(denied_page, html);

    let allowed =
        page_results(&chromium_dump(format!("http://127.0.0.1:{allowed_port}/demo.html")).await);
    let denied =
        page_results(&chromium_dump(format!("http://127.0.0.1:{denied_port}/demo.html")).await);

    // What the browser saw.
    assert_eq!(allowed["img"], "loaded:1x1", "{allowed}");
    assert_eq!(allowed["beacon"], "queued", "{allowed}");
    assert_eq!(
        allowed["exit"], "queued",
        "the frame's pagehide batch: {allowed}"
    );
    assert_eq!(
        denied["exit"], "queued",
        "a text/plain batch needs no preflight: {denied}"
    );
    assert_eq!(
        allowed["fetch"], "ok:204",
        "allowed origin may read the response: {allowed}"
    );
    assert_eq!(
        denied["img"], "loaded:1x1",
        "a pixel needs no CORS: {denied}"
    );
    assert_eq!(denied["beacon"], "queued", "{denied}");
    assert_eq!(
        denied["fetch"], "blocked",
        "the preflight from a disallowed origin is refused: {denied}"
    );

    // What landed.
    let rows = app.wait_rows("events", 9, Duration::from_secs(10)).await;
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    let got: Vec<(String, String, String)> = db
        .query(
            "SELECT page_url, event_type, coalesce(user_agent, '') FROM events ORDER BY page_url",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let urls: Vec<(&str, &str)> = got
        .iter()
        .map(|(u, t, _)| (u.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        urls,
        vec![
            ("https://demo.example/allowed/beacon", "click"),
            ("https://demo.example/allowed/exit0", "impression"),
            ("https://demo.example/allowed/exit1", "click"),
            ("https://demo.example/allowed/fetch", "click"),
            ("https://demo.example/allowed/img", "impression"),
            ("https://demo.example/denied/beacon", "click"),
            ("https://demo.example/denied/exit0", "impression"),
            ("https://demo.example/denied/exit1", "click"),
            ("https://demo.example/denied/img", "impression"),
        ],
        "the disallowed fetch never reached the service (its preflight was refused)"
    );
    assert_eq!(rows, 9);
    let exit_ids: i64 = db
        .query_one(
            "SELECT count(DISTINCT event_id) FROM events WHERE page_url LIKE '%/exit_'",
            &[],
        )
        .await
        .expect("ids")
        .get(0);
    assert_eq!(exit_ids, 4, "each batch line kept its event_id");
    assert!(
        got.iter().all(|(_, _, ua)| ua.contains("Chrome")),
        "the browser's User-Agent is stored: {got:?}"
    );
}

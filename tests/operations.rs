//! What on-call engineers and orchestrators read: `/metrics` in Prometheus
//! text format with counters that match the traffic exactly, `/livez` and
//! `/readyz`, and the recent-window latency in `/health`.

mod common;

use std::time::Duration;

use common::*;

fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
}

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_exactly_what_was_sent() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    for _ in 0..7 {
        assert_eq!(app.post(&format!("/event/impression?{q}")).await, 204);
    }
    for _ in 0..3 {
        assert_eq!(app.post(&format!("/event/click?{q}")).await, 204);
    }
    for _ in 0..4 {
        let r = app
            .http
            .get(app.url(&format!("/event/impression?{q}")))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
    }
    for _ in 0..5 {
        assert_eq!(app.post("/event/impression?campaign_id=nope").await, 400);
    }
    assert_eq!(
        app.post(&format!("/event/click?{q}&timestamp=1&timestamp=2"))
            .await,
        400
    );
    assert_eq!(
        app.http
            .get(app.url("/nope"))
            .send()
            .await
            .expect("404")
            .status(),
        404
    );
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(10), |h| {
        h["pipeline"]["written"] == 14
    })
    .await;
    assert_eq!(h["pipeline"]["written"], 14);

    let resp = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.expect("body");
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics terminator");
    let m = parse_metrics(&text);

    let req = |route: &str, status: &str| {
        sample(
            &m,
            "ingest_http_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(req("post_impression", "204"), Some(7.0));
    assert_eq!(req("post_click", "204"), Some(3.0));
    assert_eq!(req("get_impression", "200"), Some(4.0));
    assert_eq!(req("post_impression", "400"), Some(5.0));
    assert_eq!(req("post_click", "400"), Some(1.0));
    assert_eq!(req("other", "404"), Some(1.0));
    assert_eq!(sample(&m, "ingest_events_accepted_total", &[]), Some(14.0));
    assert_eq!(sample(&m, "ingest_events_written_total", &[]), Some(14.0));
    assert_eq!(
        sample(
            &m,
            "ingest_events_rejected_total",
            &[("reason", "invalid_parameter")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &m,
            "ingest_events_rejected_total",
            &[("reason", "duplicate_parameter")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "ingest_events_rejected_total",
            &[("reason", "unknown_campaign")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &m,
            "ingest_events_dropped_total",
            &[("reason", "buffer_full")]
        ),
        Some(0.0)
    );
    assert_eq!(sample(&m, "ingest_events_buffered", &[]), Some(0.0));
    assert_eq!(sample(&m, "ingest_database_up", &[]), Some(1.0));
    assert_eq!(sample(&m, "ingest_campaign_cache_size", &[]), Some(1.0));
    assert_eq!(sample(&m, "ingest_spool_bytes", &[]), Some(0.0));
    assert_eq!(sample(&m, "ingest_db_pool_max", &[]), Some(5.0));

    // The duration histogram: every POST impression (204 and 400) counted once, in order.
    let hist = m
        .samples
        .iter()
        .find(|s| {
            s.metric == "ingest_http_request_duration_seconds"
                && s.labels.get("route") == Some("post_impression")
        })
        .expect("duration histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram")
    };
    let les: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    for needed in [0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05] {
        assert!(
            les.iter().any(|l| (l - needed).abs() < 1e-12),
            "bucket le={needed} in {les:?}"
        );
    }
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative buckets"
    );
    assert_eq!(buckets.last().map(|b| b.count), Some(12.0));
    let count = m.samples.iter().find(|s| {
        s.metric == "ingest_http_request_duration_seconds_count"
            && s.labels.get("route") == Some("post_impression")
    });
    if let Some(c) = count {
        assert!(
            matches!(c.value, prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) if v == 12.0)
        );
    }
    // Write-side histograms saw the batches.
    assert!(text.contains("ingest_flush_duration_seconds_count"));
    assert!(text.contains("ingest_event_freshness_seconds_bucket"));
    let flushed = sample(&m, "ingest_flushes_total", &[]).expect("flushes");
    assert!(flushed >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_liveness_and_readiness_through_shutdown() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("SHUTDOWN_GRACE_MS", 1500)
        .start()
        .await;
    let live = app.http.get(app.url("/livez")).send().await.expect("livez");
    assert_eq!(live.status(), 200);
    let body: serde_json::Value = live.json().await.expect("json");
    assert_eq!(body["status"], "alive");
    assert!(body["coordinator_beat_age_ms"].as_u64().expect("age") < 5000);
    let ready = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.expect("json")["status"],
        "ready"
    );
    let head = app
        .http
        .head(app.url("/readyz"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);

    // Shutdown: /readyz turns 503 at once while the service still serves events.
    let base = app.url("");
    let http = app.http.clone();
    let q = event_query(camps[0].id, AD_UNIT, None);
    let stopping = tokio::spawn(app.shutdown_report());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz during grace");
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<serde_json::Value>().await.expect("json")["status"],
        "shutting_down"
    );
    let still = http
        .post(format!("{base}/event/impression?{q}"))
        .send()
        .await
        .expect("event during grace");
    assert_eq!(still.status(), 204, "still serving during the grace period");
    let report = stopping.await.expect("shutdown");
    assert_eq!(report.accepted, 1);
    assert_eq!(report.unwritten, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_database_and_liveness_does_not() {
    let app = TestApp::builder().without_database().start().await;
    for _ in 0..100 {
        if app.http.get(app.url("/livez")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.http
            .get(app.url("/livez"))
            .send()
            .await
            .expect("livez")
            .status(),
        200
    );
    let ready = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "starting");
    assert_eq!(body["migrated"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_last_minute_next_to_since_start() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    for _ in 0..3 {
        assert_eq!(app.post_event("click", camps[0].id).await, 204);
    }
    let h = app.health().await.expect("health");
    assert_eq!(h["latency_us"]["POST /event/click"]["count"], 3);
    assert_eq!(h["latency_us_last_60s"]["POST /event/click"]["count"], 3);
    assert!(
        h["latency_us_last_60s"]["POST /event/click"]["p99_us"]
            .as_f64()
            .expect("p99")
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_the_operator_views_and_the_main_port_keeps_health() {
    let camps = campaigns(1, 1);
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("HOST", "127.0.0.1")
        .setting("ADMIN_PORT", admin_port)
        .start()
        .await;
    let admin = format!("http://127.0.0.1:{admin_port}");
    let status = |url: String| {
        let http = app.http.clone();
        async move { http.get(url).send().await.expect("get").status().as_u16() }
    };
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(status(app.url(path)).await, 404, "main port hides {path}");
        assert_eq!(
            status(format!("{admin}{path}")).await,
            200,
            "admin port serves {path}"
        );
    }
    assert_eq!(
        status(app.url("/health")).await,
        200,
        "the seed's /health stays on the main port"
    );
    assert_eq!(status(format!("{admin}/health")).await, 200);
    assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    let on_admin = app
        .http
        .post(format!(
            "{admin}/event/impression?{}",
            event_query(camps[0].id, AD_UNIT, None)
        ))
        .send()
        .await
        .expect("post");
    assert_eq!(on_admin.status(), 404, "no events on the admin port");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 1);
    assert_eq!(count(&db, "events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_health_and_metrics_renders_one_snapshot_per_second() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("VIEW_CACHE_MS", 1000)
        .start()
        .await;
    let renders = |h: &serde_json::Value| h["views"]["renders"].as_u64().expect("renders");
    let before = renders(&app.health().await.expect("health"));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (http, base) = (app.http.clone(), app.url(""));
        tasks.push(tokio::spawn(async move {
            let path = if t % 2 == 0 { "/health" } else { "/metrics" };
            let mut n = 0u64;
            while started.elapsed() < Duration::from_millis(2500) {
                let r = http
                    .get(format!("{base}{path}"))
                    .send()
                    .await
                    .expect("view");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
                n += 1;
            }
            n
        }));
    }
    let mut asked = 0;
    for t in tasks {
        asked += t.await.expect("flood");
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = renders(&app.health().await.expect("health"));
    let rendered = after - before;
    assert!(asked > 200, "a real flood: {asked} requests");
    assert!(
        rendered <= elapsed.as_secs() + 3,
        "{asked} requests in {elapsed:?} rendered {rendered} snapshots"
    );
    // Events still land while the views are cached.
    assert_eq!(app.post_event("click", camps[0].id).await, 204);
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 1);
    assert_eq!(count(&db, "events").await, 1);
}

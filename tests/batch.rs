//! `POST /events`: batches in both formats, each event judged on its own,
//! whole-body limits refusing everything, and what lands in the database.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

async fn post_batch(app: &TestApp, content_type: &str, body: String) -> (u16, Value) {
    let resp = app
        .http
        .post(app.url("/events"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn line(kind: &str, campaign: Uuid, extra: &str) -> String {
    format!(
        "type={kind}&{}{extra}",
        event_query(campaign, AD_UNIT, None)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_batch_records_the_good_lines_and_names_each_bad_one() {
    let camps = campaigns(1, 1);
    let c = camps[0].id;
    let app = TestApp::spawn(&camps).await;
    let id = Uuid::new_v4();
    let body = [
        line("impression", c, ""),
        line("click", c, &format!("&event_id={id}")),
        String::new(), // blank lines are not events
        line("impression", c, "&campaign_id=nope"),
        format!("{}\r", event_query(c, AD_UNIT, None)), // no type; CRLF line end
        line("view", c, ""),
        line("click", c, &format!("&event_id={id}")), // the same event again
        line(
            "impression",
            c,
            &format!("&timestamp={}", now_ms() - 60_000),
        ),
    ]
    .join("\n");
    let (status, answer) = post_batch(&app, "text/plain;charset=UTF-8", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({
            "received": 7,
            "accepted": 4,
            "refused": [
                {"index": 2, "error": "duplicate_parameter", "parameter": "campaign_id",
                 "message": "parameter given more than once"},
                {"index": 3, "error": "missing_parameter", "parameter": "type",
                 "message": "required parameter is missing"},
                {"index": 4, "error": "invalid_parameter", "parameter": "type",
                 "message": "must be impression or click"},
            ]
        })
    );
    let h = app.health().await.expect("health");
    assert_eq!(h["event_ids"]["repeated_in_memory"], 1, "{h}");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(
        count(&db, "events").await,
        3,
        "the repeat is the same event"
    );
    let clicks: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'click' AND event_id = $1",
            &[&id],
        )
        .await
        .expect("clicks")
        .get(0);
    assert_eq!(clicks, 1);
    assert_eq!(aggregate_drift(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_batch_follows_the_same_rules_field_by_field() {
    let camps = campaigns(1, 1);
    let c = camps[0].id.to_string();
    let app = TestApp::spawn(&camps).await;
    let good = |kind: &str| {
        json!({"type": kind, "ad_unit_id": AD_UNIT, "campaign_id": c,
               "creative_id": CREATIVE, "page_url": "https://news.example.com/a b?x=1&y=é"})
    };
    let mut with_ts = good("impression");
    with_ts["timestamp"] = json!(now_ms() - 1_000);
    let mut numeric_campaign = good("impression");
    numeric_campaign["campaign_id"] = json!(5);
    let mut too_old = good("click");
    too_old["timestamp"] = json!(now_ms() - 30 * 86_400_000);
    let mut no_url = good("click");
    no_url["page_url"] = Value::Null;
    let body = json!([
        good("impression"),
        good("click"),
        with_ts,
        42,
        numeric_campaign,
        too_old,
        no_url,
        {"ad_unit_id": AD_UNIT}
    ]);
    let (status, answer) = post_batch(&app, "application/json", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["received"], 8);
    assert_eq!(answer["accepted"], 3);
    let refused: Vec<(u64, String, Option<String>)> = answer["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().expect("index"),
                r["error"].as_str().expect("error").to_string(),
                r["parameter"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        refused,
        vec![
            (3, "invalid_event".into(), None),
            (4, "invalid_parameter".into(), Some("campaign_id".into())),
            (5, "invalid_parameter".into(), Some("timestamp".into())),
            (6, "missing_parameter".into(), Some("page_url".into())),
            (7, "missing_parameter".into(), Some("type".into())),
        ]
    );
    let (_, db) = app.shutdown().await;
    assert_eq!(count(&db, "events").await, 3);
    let url: String = db
        .query_one("SELECT DISTINCT page_url FROM events", &[])
        .await
        .expect("one url")
        .get(0);
    assert_eq!(
        url, "https://news.example.com/a b?x=1&y=é",
        "stored as sent"
    );
    assert_eq!(aggregate_drift(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_a_limit_or_in_another_format_is_refused_whole() {
    let camps = campaigns(1, 1);
    let c = camps[0].id;
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("BATCH_MAX_EVENTS", 50)
        .start()
        .await;
    let lines = |n: usize| {
        (0..n)
            .map(|_| line("impression", c, ""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (status, answer) = post_batch(&app, "text/plain", lines(51)).await;
    assert_eq!(status, 413);
    assert_eq!(answer["error"], "too_many_events", "{answer}");
    assert_eq!(
        answer["message"],
        "a batch holds at most 50 events (BATCH_MAX_EVENTS); send the rest in another"
    );
    let padded = format!("{}\n{}", lines(1), "#".repeat(64 * 1024));
    let (status, answer) = post_batch(&app, "text/plain", padded).await;
    assert_eq!(status, 413);
    assert_eq!(answer["error"], "body_too_large", "{answer}");
    let (status, answer) = post_batch(&app, "application/x-www-form-urlencoded", lines(1)).await;
    assert_eq!(status, 415);
    assert_eq!(answer["error"], "unsupported_media_type", "{answer}");
    let (status, answer) =
        post_batch(&app, "application/json", "{\"type\":\"click\"}".into()).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "bad_json", "{answer}");
    let get = app.http.get(app.url("/events")).send().await.expect("get");
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST, OPTIONS");
    // Exactly at the limits: accepted whole.
    let (status, answer) = post_batch(&app, "text/plain", lines(50)).await;
    assert_eq!(
        (status, answer["accepted"].clone()),
        (200, json!(50)),
        "{answer}"
    );
    let (status, answer) = post_batch(&app, "text/plain", String::new()).await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"received": 0, "accepted": 0, "refused": []}));
    assert_eq!(
        app.wait_rows("events", 50, Duration::from_secs(5)).await,
        50
    );
    let m = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for family in [
        r#"ingest_events_rejected_total{reason="too_many_events"} 1"#,
        r#"ingest_events_rejected_total{reason="body_too_large"} 1"#,
        r#"ingest_events_rejected_total{reason="unsupported_media_type"} 1"#,
        r#"ingest_events_rejected_total{reason="bad_json"} 1"#,
    ] {
        assert!(m.contains(family), "{family} in\n{m}");
    }
    let (_, db) = app.shutdown().await;
    assert_eq!(
        count(&db, "events").await,
        50,
        "nothing of the refused batches"
    );
}

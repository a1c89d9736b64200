//! User stories of the pipeline: what is sent is what lands, exactly once,
//! with the right aggregates; flushes happen on size, on time and at shutdown.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use uuid::Uuid;

const HOUR: i64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_events_land_as_exact_rows_and_aggregates() {
    let camps = campaigns(3, 2);
    // Every click comes from its own visitor behind a trusted load balancer
    // (X-Forwarded-For), so none is a duplicate and all are billed.
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("TRUSTED_PROXIES", "127.0.0.1/32")
        .start()
        .await;
    let ad_units = [AD_UNIT, "0a4a4f0e-9a35-4c39-a6a1-1f8f26a0c0de"];
    // Two distinct hours, both safely inside the accepted window.
    let base = (now_ms() / HOUR) * HOUR;
    let times = [base - HOUR + 1234, base + 1];

    // (account, ad unit, campaign, hour start ms) -> (impressions, clicks)
    let mut expected: BTreeMap<(Uuid, Uuid, Uuid, i64), (i64, i64)> = BTreeMap::new();
    let mut requests = Vec::new();
    for i in 0..600usize {
        let c = camps[i % camps.len()];
        let au = ad_units[(i / 3) % 2];
        let ts = times[(i / 7) % 2];
        let click = i % 5 == 0;
        let e = expected
            .entry((c.account, au.parse().unwrap(), c.id, (ts / HOUR) * HOUR))
            .or_default();
        if click {
            e.1 += 1
        } else {
            e.0 += 1
        }
        let path = if click {
            "/event/click"
        } else {
            "/event/impression"
        };
        let visitor = format!("198.51.100.7, 203.0.113.{}", i / 5);
        requests.push((
            format!("{path}?{}", event_query(c.id, au, Some(ts))),
            visitor,
        ));
    }
    // 8 concurrent clients, so several shards and connections take part.
    let mut tasks = Vec::new();
    for chunk in requests.chunks(75) {
        let chunk = chunk.to_vec();
        let http = app.http.clone();
        let base = app.url("");
        tasks.push(tokio::spawn(async move {
            for (r, visitor) in chunk {
                let resp = http
                    .post(format!("{base}{r}"))
                    .header("User-Agent", "Mozilla/5.0 (test)")
                    .header("X-Forwarded-For", visitor)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(resp.status(), 204);
                assert_eq!(resp.headers()["cache-control"], "no-store");
                assert!(resp.bytes().await.expect("body").is_empty());
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }

    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 600);
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 600);
    assert_eq!(count(&db, "rejected_events").await, 0);

    // Every row carries the campaign's account, the decoded URL and the user agent.
    let bad = db
        .query_one(
            "SELECT count(*) FROM events e JOIN campaigns c ON c.id = e.campaign_id
              WHERE e.account_id <> c.account_id OR e.page_url <> 'https://news.example.com/a?x=1'
                 OR e.user_agent <> 'Mozilla/5.0 (test)' OR e.creative_id <> $1::uuid",
            &[&CREATIVE.parse::<Uuid>().unwrap()],
        )
        .await
        .expect("query")
        .get::<_, i64>(0);
    assert_eq!(bad, 0);
    let kinds: Vec<(String, i64)> = db
        .query(
            "SELECT event_type, count(*) FROM events GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kinds,
        vec![("click".to_string(), 120), ("impression".to_string(), 480)]
    );

    let rows = db
        .query(
            "SELECT account_id, ad_unit_id, campaign_id,
                    (extract(epoch FROM hour_timestamp) * 1000)::int8, impressions::int8, clicks::int8
               FROM metrics_hourly",
            &[],
        )
        .await
        .expect("query");
    let actual: BTreeMap<(Uuid, Uuid, Uuid, i64), (i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                (r.get(0), r.get(1), r.get(2), r.get(3)),
                (r.get(4), r.get(5)),
            )
        })
        .collect();
    assert_eq!(actual, expected);

    // And the aggregates equal the raw rows grouped the same way.
    assert_eq!(aggregate_drift(&db).await, 0);
}

// One worker thread, so all events land in one shard and the trigger is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn size_trigger_flushes_before_the_timer() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("FLUSH_INTERVAL_MS", 3_600_000)
        .setting("FLUSH_MAX_EVENTS", 25)
        .start()
        .await;
    for _ in 0..24 {
        assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.count("events").await,
        0,
        "nothing is written before a trigger"
    );
    assert_eq!(app.post_event("click", camps[0].id).await, 204);
    assert_eq!(
        app.wait_rows("events", 25, Duration::from_secs(10)).await,
        25
    );
    let sums: (i64, i64) = app
        .db
        .query_one(
            "SELECT sum(impressions)::int8, sum(clicks)::int8 FROM metrics_hourly",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("sums");
    assert_eq!(sums, (24, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_flushes_a_partial_batch() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("FLUSH_INTERVAL_MS", 300)
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    }
    assert_eq!(app.wait_rows("events", 3, Duration::from_secs(10)).await, 3);
    let h = app.health().await.expect("health");
    assert!(h["pipeline"]["flushes"].as_u64().unwrap() >= 1);
    assert_eq!(h["pipeline"]["written"], 3);
    assert_eq!(h["pipeline"]["buffered"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_every_buffered_event() {
    let camps = campaigns(2, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("FLUSH_INTERVAL_MS", 3_600_000)
        .start()
        .await;
    for i in 0..150 {
        let path = if i % 2 == 0 {
            "/event/impression"
        } else {
            "/event/click"
        };
        assert_eq!(
            app.post(&format!(
                "{path}?{}",
                event_query(camps[i % 2].id, AD_UNIT, None)
            ))
            .await,
            204
        );
    }
    assert_eq!(
        app.count("events").await,
        0,
        "the timer is an hour: nothing written yet"
    );
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 150);
    assert_eq!(report.written_at_shutdown, 150);
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 150);
    // The 75 clicks are one visitor's on one ad: billed once, 74 duplicates.
    let sums: (i64, i64, i64) = db
        .query_one(
            "SELECT sum(impressions)::int8, sum(clicks)::int8, sum(invalid_clicks)::int8
               FROM metrics_hourly",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .expect("sums");
    assert_eq!(sums, (75, 1, 74));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_campaign_goes_to_rejected_events_not_events() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let ghost = Uuid::new_v4();
    assert_eq!(app.post_event("impression", ghost).await, 204);
    assert_eq!(app.post_event("click", ghost).await, 204);
    assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 1);
    let rejected = db
        .query("SELECT reason, campaign_id, event_type, page_url FROM rejected_events ORDER BY event_type", &[])
        .await
        .expect("query");
    assert_eq!(rejected.len(), 2);
    for r in &rejected {
        assert_eq!(r.get::<_, String>(0), "unknown_campaign");
        assert_eq!(r.get::<_, Uuid>(1), ghost);
        assert_eq!(r.get::<_, String>(3), "https://news.example.com/a?x=1");
    }
    assert_eq!(rejected[0].get::<_, String>(2), "click");
    // No aggregate for the unknown campaign.
    assert_eq!(
        db.query_one(
            "SELECT count(*) FROM metrics_hourly WHERE campaign_id = $1",
            &[&ghost]
        )
        .await
        .expect("query")
        .get::<_, i64>(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_created_after_start_is_resolved() {
    let camps = campaigns(1, 1);
    let app = TestApp::spawn(&camps).await;
    let late = Campaign {
        id: Uuid::new_v4(),
        account: Uuid::new_v4(),
    };
    app.db
        .execute(
            "INSERT INTO campaigns (id, account_id) VALUES ($1, $2)",
            &[&late.id, &late.account],
        )
        .await
        .expect("insert campaign");
    assert_eq!(app.post_event("impression", late.id).await, 204);
    assert_eq!(app.wait_rows("events", 1, Duration::from_secs(10)).await, 1);
    let account: Uuid = app
        .db
        .query_one("SELECT account_id FROM events", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(account, late.account);
    assert_eq!(app.count("rejected_events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_options_in_the_url_are_kept_beside_the_services_own() {
    let camps = campaigns(1, 1);
    let db_url = fresh_database().await;
    connect(&db_url)
        .await
        .batch_execute("CREATE SCHEMA tenant")
        .await
        .expect("schema");
    // search_path from the URL's options: the tables go to `tenant`.
    let app = TestApp::builder()
        .database(format!("{db_url}?options=-c%20search_path%3Dtenant"))
        .unseeded()
        .start()
        .await;
    let db = connect(&db_url).await;
    db.execute(
        "INSERT INTO tenant.campaigns (id, account_id) VALUES ($1, $2)",
        &[&camps[0].id, &camps[0].account],
    )
    .await
    .expect("seed");
    for _ in 0..3 {
        assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    }
    let (report, _) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    let n: i64 = db
        .query_one("SELECT count(*) FROM tenant.events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3, "the operator's search_path was used");
    let public: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = 'events'",
            &[],
        )
        .await
        .expect("public")
        .get(0);
    assert_eq!(public, 0);
    // ...and TimeZone=UTC too: created_at (CURRENT_TIMESTAMP in the session's zone) is UTC.
    let skew: f64 = db
        .query_one(
            "SELECT abs(extract(epoch FROM max(created_at) - (now() AT TIME ZONE 'UTC')))::float8 FROM tenant.events",
            &[],
        )
        .await
        .expect("skew")
        .get(0);
    assert!(skew < 600.0, "created_at is UTC: {skew} s off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_larger_than_batch_max_rows_commits_as_several_ledgered_transactions() {
    let camps = campaigns(2, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("FLUSH_INTERVAL_MS", 3_600_000)
        .setting("BATCH_MAX_ROWS", 100)
        .start()
        .await;
    for i in 0..450 {
        assert_eq!(app.post_event("impression", camps[i % 2].id).await, 204);
    }
    // The final flush takes all 450 at once.
    let (report, db) = app.shutdown().await;
    assert_eq!(report.written_at_shutdown, 450);
    assert_eq!(count(&db, "events").await, 450);
    let sizes: Vec<i32> = db
        .query(
            "SELECT events FROM ingest_batches ORDER BY events DESC",
            &[],
        )
        .await
        .expect("ledger")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sizes, [100, 100, 100, 100, 50]);
    assert_eq!(aggregate_drift(&db).await, 0);
}

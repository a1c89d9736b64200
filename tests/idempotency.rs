//! Idempotent events: an `event_id` sent again, to any replica, after a
//! restart, or with another payload, is stored and counted once.

mod common;

use std::time::Duration;

use common::*;
use uuid::Uuid;

/// An impression query for `campaign` with `event_id`, on `ad_unit`.
fn with_id(campaign: Uuid, ad_unit: &str, id: Uuid) -> String {
    format!(
        "/event/impression?{}&event_id={id}",
        event_query(campaign, ad_unit, None)
    )
}

/// Billed impressions in `metrics_hourly`, over every key.
async fn billed_impressions(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT COALESCE(sum(impressions), 0)::int8 FROM metrics_hourly",
        &[],
    )
    .await
    .expect("sum")
    .get(0)
}

async fn rows_with_id(db: &tokio_postgres::Client, id: Uuid) -> i64 {
    db.query_one("SELECT count(*) FROM events WHERE event_id = $1", &[&id])
        .await
        .expect("count")
        .get(0)
}

fn counter(h: &serde_json::Value, key: &str) -> u64 {
    h["event_ids"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("event_ids.{key} in {h}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_id_three_times_across_two_replicas_and_a_restart_is_one_row_and_one_count() {
    let camps = campaigns(1, 1);
    let c = camps[0].id;
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let replica = || TestApp::builder().database(db_url.clone()).unseeded();
    let a = replica().start().await;
    let b = replica().start().await;
    let id = Uuid::new_v4();

    assert_eq!(a.post(&with_id(c, AD_UNIT, id)).await, 204);
    assert_eq!(a.wait_rows("events", 1, Duration::from_secs(5)).await, 1);
    assert_eq!(
        b.post(&with_id(c, AD_UNIT, id)).await,
        204,
        "the same answer"
    );
    // Controls: another id, and no id at all, are events of their own.
    assert_eq!(b.post(&with_id(c, AD_UNIT, Uuid::new_v4())).await, 204);
    assert_eq!(b.post_event("impression", c).await, 204);
    let b_health = until_repeats_in_database(&b, 1).await;
    assert_eq!(
        counter(&b_health, "repeated_in_memory"),
        0,
        "B never saw it"
    );
    let (report, db) = a.shutdown().await;
    assert_eq!(report.unwritten, 0);
    let (_, _) = b.shutdown().await;

    // A restart: the new process has never seen the id.
    let a2 = replica().start().await;
    assert_eq!(a2.post(&with_id(c, AD_UNIT, id)).await, 204);
    assert_eq!(a2.post(&with_id(c, AD_UNIT, id)).await, 204);
    let h = until_repeats_in_database(&a2, 1).await;
    assert_eq!(counter(&h, "repeated_in_memory"), 1, "the second one: {h}");
    assert_eq!(counter(&h, "conflicting"), 0, "{h}");
    let (_, _) = a2.shutdown().await;

    assert_eq!(rows_with_id(&db, id).await, 1, "stored once");
    assert_eq!(
        count(&db, "events").await,
        3,
        "the id's event and the two controls"
    );
    assert_eq!(billed_impressions(&db).await, 3, "counted once");
    let stored_ids: i64 = db
        .query_one("SELECT count(*) FROM event_ids", &[])
        .await
        .expect("ids")
        .get(0);
    assert_eq!(stored_ids, 2, "the two ids sent");
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
}

/// Polls `/health` until the writer has found `n` repeats in the database.
async fn until_repeats_in_database(app: &TestApp, n: u64) -> serde_json::Value {
    let mut h = serde_json::Value::Null;
    for _ in 0..200 {
        h = app.health().await.expect("health");
        if h["event_ids"]["repeated_in_database"].as_u64() >= Some(n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(counter(&h, "repeated_in_database"), n, "{h}");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_with_another_payload_keeps_the_first_and_counts_a_conflict() {
    let camps = campaigns(1, 1);
    let c = camps[0].id;
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let id = Uuid::new_v4();
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .start()
        .await;
    assert_eq!(app.post(&with_id(c, AD_UNIT, id)).await, 204);
    // Same id, another ad unit: a different event under a reused id.
    assert_eq!(app.post(&with_id(c, AD_UNIT_2, id)).await, 204);
    assert_eq!(app.wait_rows("events", 1, Duration::from_secs(5)).await, 1);
    let h = app.health().await.expect("health");
    assert_eq!(h["event_ids"]["repeated_in_memory"], 1, "{h}");
    assert_eq!(h["event_ids"]["conflicting"], 1, "{h}");
    let (_, db) = app.shutdown().await;

    // After a restart the database decides, and compares the payloads too.
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .start()
        .await;
    assert_eq!(app.post(&with_id(c, AD_UNIT_2, id)).await, 204);
    assert_eq!(
        app.post(&with_id(Uuid::new_v4(), AD_UNIT, Uuid::new_v4()))
            .await,
        204
    );
    // The unknown campaign's event lands in rejected_events: wait for it.
    let mut h = serde_json::Value::Null;
    for _ in 0..100 {
        h = app.health().await.expect("health");
        if h["event_ids"]["repeated_in_database"] == 1 && h["pipeline"]["unknown_campaign"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h["event_ids"]["repeated_in_database"], 1, "{h}");
    assert_eq!(h["event_ids"]["conflicting"], 1, "{h}");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("ingest_conflicting_event_ids_total 1"),
        "{metrics}"
    );
    let (_, _) = app.shutdown().await;

    let row = db
        .query_one("SELECT ad_unit_id FROM events WHERE event_id = $1", &[&id])
        .await
        .expect("the one row");
    assert_eq!(
        row.get::<_, Uuid>(0).to_string(),
        AD_UNIT,
        "the first payload is kept"
    );
    assert_eq!(count(&db, "events").await, 1);
    assert_eq!(
        count(&db, "rejected_events").await,
        1,
        "the unknown campaign's event, with its id"
    );
    assert_eq!(billed_impressions(&db).await, 1);
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_the_memory_forgot_are_caught_by_the_database_even_within_one_batch() {
    let camps = campaigns(2, 2);
    // 32 ids remembered at most (one per lock per generation): almost every
    // repeat below misses the memory and reaches the writer, many of them in
    // the same batch as their first sighting.
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("EVENT_ID_MEMORY_MAX", 32)
        .setting("FLUSH_INTERVAL_MS", 1000)
        .start()
        .await;
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    for round in 0..3 {
        for (i, id) in ids.iter().enumerate() {
            let c = camps[i % 2].id;
            let status = app.post(&with_id(c, AD_UNIT, *id)).await;
            assert_eq!(status, 204, "round {round}, id {i}");
        }
    }
    let h = app.health().await.expect("health");
    let memory = h["event_ids"]["repeated_in_memory"]
        .as_u64()
        .expect("memory");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 300, "each id once");
    assert_eq!(billed_impressions(&db).await, 300);
    let distinct: i64 = db
        .query_one("SELECT count(DISTINCT event_id) FROM events", &[])
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(distinct, 300);
    assert!(
        memory < 600,
        "the memory missed some: {memory} of 600 repeats"
    );
    assert_eq!(aggregate_drift(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_deep_in_a_large_batch_undoes_the_claim_and_keeps_every_new_id() {
    // The second batch's 1,200 new ids sort before its 600 repeats: the claim
    // of the whole batch meets the repeats last, must be undone and made again
    // without them, and every new id kept exactly once.
    let camps = campaigns(1, 1);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let run = || {
        TestApp::builder()
            .database(db_url.clone())
            .unseeded()
            .setting("EVENT_ID_MEMORY_MAX", 32)
            .setting("FLUSH_INTERVAL_MS", 60_000)
            .setting("FLUSH_MAX_EVENTS", 20_000)
    };
    let app = run().start().await;
    let c = camps[0].id;
    let id_with_top = |top: u8| {
        let mut b = *Uuid::new_v4().as_bytes();
        b[0] = top;
        Uuid::from_bytes(b)
    };
    let high: Vec<Uuid> = (0..600).map(|_| id_with_top(0xff)).collect();
    let low: Vec<Uuid> = (0..1_200).map(|_| id_with_top(0x00)).collect();
    for id in &high {
        assert_eq!(app.post(&with_id(c, AD_UNIT, *id)).await, 204);
    }
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 600);
    // A second run on the same database: one batch of 1,800, the 600 repeats last.
    let app = run().start().await;
    for id in low.iter().chain(&high) {
        assert_eq!(app.post(&with_id(c, AD_UNIT, *id)).await, 204);
    }
    let h = app.health().await.expect("health");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 1_800, "each id once");
    assert_eq!(billed_impressions(&db).await, 1_800);
    assert_eq!(count(&db, "event_ids").await, 1_800);
    for id in [low[0], low[1_199], high[0]] {
        assert_eq!(rows_with_id(&db, id).await, 1, "{id}");
    }
    let memory = h["event_ids"]["repeated_in_memory"].as_u64().unwrap_or(0);
    assert!(memory < 600, "the memory missed some: {memory} of 600");
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
}

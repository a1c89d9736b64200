//! At scale: `events` partitioned by time (by the service, or by pg_partman),
//! retention that drops whole partitions, the live conversion of a database
//! the Node service filled, and three replicas writing while maintenance and
//! retention run.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The partitions of `events` and the rows in each, by name.
async fn partitions(db: &tokio_postgres::Client) -> Vec<(String, i64)> {
    db.query(
        "SELECT c.relname::text, (SELECT count(*) FROM events e WHERE e.tableoid = c.oid) \
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
          WHERE i.inhparent = 'events'::regclass ORDER BY 1",
        &[],
    )
    .await
    .expect("partitions")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn utc_day(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339(t).to_string()[..10].replace('-', "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_and_early_events_land_in_their_day_partitions() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder().campaigns(&camps).start().await;
    let now = now_ms();
    let late = now - 6 * 86_400_000 - 3_600_000;
    let early = now + 50 * 60_000;
    for ts in [late, now, early] {
        let q = event_query(camps[0].id, AD_UNIT, Some(ts));
        assert_eq!(app.post(&format!("/event/impression?{q}")).await, 204);
    }
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    let parts = partitions(&db).await;
    let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
    // The accepted window: 7 days back, today, and EVENTS_PREMAKE (3) ahead.
    assert!(parts.len() >= 12, "{names:?}");
    let mut per_day = std::collections::BTreeMap::new();
    for ts in [late, now, early] {
        *per_day
            .entry(format!("events_p{}", utc_day(ts)))
            .or_insert(0i64) += 1;
    }
    for (want, n) in per_day {
        let rows = parts.iter().find(|(p, _)| *p == want).map(|(_, r)| *r);
        assert_eq!(rows, Some(n), "{want} holds its events: {parts:?}");
    }
    assert_eq!(
        parts
            .iter()
            .find(|(n, _)| n == "events_default")
            .map(|(_, r)| *r),
        Some(0)
    );
    assert_eq!(count(&db, "events").await, 3);
    assert_eq!(aggregate_drift(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_in_the_default_partition_move_when_their_partition_is_made() {
    let camps = campaigns(1, 1);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let db = connect(&db_url).await;
    // A row for 10 days ahead, beyond today's premake: the DEFAULT partition takes it.
    db.execute(
        "INSERT INTO events (event_type, ad_unit_id, campaign_id, creative_id, account_id, page_url, timestamp) \
         VALUES ('click', $1, $2, $1, $3, 'x', (now() AT TIME ZONE 'UTC') + interval '10 days')",
        &[&uuid::Uuid::new_v4(), &camps[0].id, &camps[0].account],
    )
    .await
    .expect("row in default");
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .setting("EVENTS_PREMAKE", 12)
        .start()
        .await;
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(10), |h| {
        h["maintenance"]["partitions_created"].as_u64() >= Some(20)
    })
    .await;
    assert!(
        h["maintenance"]["partitions_created"].as_u64() >= Some(20),
        "{h}"
    );
    let parts = partitions(&db).await;
    assert_eq!(
        parts
            .iter()
            .find(|(n, _)| n == "events_default")
            .map(|(_, r)| *r),
        Some(0),
        "{parts:?}"
    );
    assert_eq!(count(&db, "events").await, 1, "moved, not lost or doubled");
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_partitions_and_prunes_rejected_events_and_the_ledger() {
    let camps = campaigns(1, 1);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let db = connect(&db_url).await;
    // 40 and 30 days ago: two old partitions with rows; old rejected events and ledger entries.
    for days in [40, 30] {
        db.batch_execute(&format!(
            "DO $$ DECLARE lo timestamp := date_trunc('day', (now() AT TIME ZONE 'UTC') - interval '{days} days'); BEGIN \
               EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)', \
                   'events_p' || to_char(lo, 'YYYYMMDD'), lo, lo + interval '1 day'); END $$"
        ))
        .await
        .expect("old partition");
        db.execute(
            "INSERT INTO events (event_type, ad_unit_id, campaign_id, creative_id, account_id, page_url, timestamp) \
             SELECT 'impression', $1, $2, $1, $3, 'old', (now() AT TIME ZONE 'UTC') - make_interval(days => $4) FROM generate_series(1, 5)",
            &[&uuid::Uuid::new_v4(), &camps[0].id, &camps[0].account, &days],
        )
        .await
        .expect("old rows");
    }
    db.batch_execute(
        "INSERT INTO rejected_events (reason, event_type, ad_unit_id, campaign_id, creative_id, page_url, timestamp, received_at, batch_id) \
         SELECT 'unknown_campaign', 'click', gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'x', now(), now() - interval '20 days', gen_random_uuid() \
           FROM generate_series(1, 25000);
         INSERT INTO ingest_batches (id, events, committed_at) \
         SELECT gen_random_uuid(), 1, now() - interval '20 days' FROM generate_series(1, 7);
         INSERT INTO ingest_batches (id, events, committed_at) VALUES (gen_random_uuid(), 1, now());",
    )
    .await
    .expect("old rejected and ledger rows");
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .setting("EVENTS_RETENTION_DAYS", 10)
        .setting("REJECTED_RETENTION_DAYS", 10)
        .setting("LEDGER_RETENTION_DAYS", 10)
        .setting("MAINTENANCE_INTERVAL_MS", 1000)
        .start()
        .await;
    assert_eq!(app.post_event("impression", camps[0].id).await, 204);
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(20), |h| {
        h["maintenance"]["partitions_dropped"] == 2 && h["maintenance"]["rejected_deleted"] == 25000
    })
    .await;
    assert_eq!(h["maintenance"]["partitions_dropped"], 2, "{h}");
    assert_eq!(h["maintenance"]["rejected_deleted"], 25000, "{h}");
    assert_eq!(h["maintenance"]["ledger_pruned"], 7, "{h}");
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
        metrics.contains("ingest_partitions_dropped_total 2"),
        "{metrics}"
    );
    let (_, db) = app.shutdown().await;
    let parts = partitions(&db).await;
    assert!(
        parts.iter().all(|(_, rows)| *rows <= 1),
        "old partitions gone: {parts:?}"
    );
    assert_eq!(count(&db, "events").await, 1, "today's event stays");
    assert_eq!(count(&db, "rejected_events").await, 0);
    assert!(
        count(&db, "ingest_batches").await >= 2,
        "recent ledger entries stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_partman_takes_over_partitions_and_retention_when_installed() {
    let camps = campaigns(1, 1);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let db = connect(&db_url).await;
    db.batch_execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
        .await
        .expect("pg_partman (Debian's postgresql-15-partman; scripts/test.sh installs it)");
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .setting("EVENTS_RETENTION_DAYS", 30)
        .start()
        .await;
    let now = now_ms();
    for ts in [now - 5 * 86_400_000, now] {
        let q = event_query(camps[0].id, AD_UNIT, Some(ts));
        assert_eq!(app.post(&format!("/event/click?{q}")).await, 204);
    }
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    let cfg = db
        .query_one(
            "SELECT partition_interval, premake, retention, retention_keep_table \
               FROM partman.part_config WHERE parent_table = 'public.events'",
            &[],
        )
        .await
        .expect("events registered with pg_partman");
    assert_eq!(cfg.get::<_, String>(0), "1 day");
    assert_eq!(cfg.get::<_, i32>(1), 3);
    assert_eq!(cfg.get::<_, Option<String>>(2).as_deref(), Some("30 days"));
    assert!(!cfg.get::<_, bool>(3));
    let parts = partitions(&db).await;
    let today = format!("events_p{}", {
        let d = utc_day(now);
        format!("{}_{}_{}", &d[..4], &d[4..6], &d[6..])
    });
    assert_eq!(
        parts.iter().find(|(n, _)| *n == today).map(|(_, r)| *r),
        Some(1),
        "pg_partman's partition for today holds today's event: {parts:?}"
    );
    assert_eq!(count(&db, "events").await, 2);
    assert_eq!(
        parts
            .iter()
            .find(|(n, _)| n == "events_default")
            .map(|(_, r)| *r),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_database_of_a_million_rows_is_partitioned_under_load() {
    let camps = campaigns(2, 1);
    let db_url = fresh_database().await;
    let db = connect(&db_url).await;
    // The Node service's database: its schema, a million events.
    db.batch_execute(include_str!("../migrations/V1__seed_schema.sql"))
        .await
        .expect("seed schema");
    for c in &camps {
        db.execute(
            "INSERT INTO campaigns VALUES ($1, $2)",
            &[&c.id, &c.account],
        )
        .await
        .expect("campaign");
    }
    db.execute(
        "INSERT INTO events (event_type, ad_unit_id, campaign_id, creative_id, account_id, page_url, user_agent, timestamp) \
         SELECT 'impression', gen_random_uuid(), $1, gen_random_uuid(), $2, 'https://e.x/' || g, 'ua', \
                (now() AT TIME ZONE 'UTC') - (g % 86400) * interval '1 second' \
           FROM generate_series(1, 1000000) g",
        &[&camps[0].id, &camps[0].account],
    )
    .await
    .expect("a million rows");
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .setting("FLUSH_INTERVAL_MS", 50)
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(Load::run(app.url(""), camps.clone(), 4, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Dry run first: the plan, nothing changed.
    let out = std::process::Command::new(BIN)
        .args(["migrate", "--partition-events", "--dry-run"])
        .env("DATABASE_URL", &db_url)
        .env("LOG_LEVEL", "warn")
        .output()
        .expect("dry run");
    assert!(out.status.success());
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("ACCESS EXCLUSIVE") && plan.contains("dry run: nothing was changed"),
        "{plan}"
    );
    let kind: String = db
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = 'events'::regclass",
            &[],
        )
        .await
        .expect("kind")
        .get(0);
    assert_eq!(kind, "r");
    // The conversion, while the load goes on.
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let db_url = db_url.clone();
        move || {
            std::process::Command::new(BIN)
                .args(["migrate", "--partition-events"])
                .env("DATABASE_URL", &db_url)
                .env("LOG_LEVEL", "warn")
                .output()
                .expect("convert")
        }
    })
    .await
    .expect("join");
    let took = started.elapsed();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stall_ms: f64 = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("longest exclusive lock on events: "))
        .and_then(|l| l.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .expect("the summary states the longest lock");
    eprintln!("partitioned 1,000,000 rows under load in {took:?}; longest exclusive lock on events {stall_ms} ms\n{summary}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, SeqCst);
    let sent = sender.await.expect("load");
    assert_eq!(sent.other + sent.failed + sent.unavailable, 0, "{sent:?}");
    let h = app.health().await.expect("health");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(
        h["pipeline"]["write_failures"], 0,
        "no write failed across the swap: {h}"
    );
    let kind: String = db
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = 'events'::regclass",
            &[],
        )
        .await
        .expect("kind")
        .get(0);
    assert_eq!(kind, "p");
    assert_eq!(
        count(&db, "events").await as u64,
        1_000_000 + sent.acknowledged,
        "the old rows and every acknowledged new one, by the same SELECT"
    );
    let legacy: i64 = db
        .query_one("SELECT count(*) FROM events_legacy", &[])
        .await
        .expect("legacy")
        .get(0);
    assert!(legacy >= 1_000_000);
    assert!(
        stall_ms < 1000.0,
        "the exclusive lock was held {stall_ms} ms"
    );
    // Rows written after the swap get ids from the same sequence: still unique.
    let dup: i64 = db
        .query_one("SELECT count(*) - count(DISTINCT id) FROM events", &[])
        .await
        .expect("ids")
        .get(0);
    assert_eq!(dup, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_maintenance_and_retention_running_sum_exactly() {
    let camps = campaigns(3, 2);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let db = connect(&db_url).await;
    // Old partitions for retention to drop while the replicas write.
    for days in [60, 50, 40] {
        db.batch_execute(&format!(
            "DO $$ DECLARE lo timestamp := date_trunc('day', (now() AT TIME ZONE 'UTC') - interval '{days} days'); BEGIN \
               EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)', \
                   'events_p' || to_char(lo, 'YYYYMMDD'), lo, lo + interval '1 day'); END $$"
        ))
        .await
        .expect("old partition");
    }
    let replica = || {
        TestApp::builder()
            .database(db_url.clone())
            .unseeded()
            .setting("FLUSH_INTERVAL_MS", 30)
            .setting("FLUSH_MAX_EVENTS", 50)
            .setting("WRITER_CONCURRENCY", 3)
            .setting("MAINTENANCE_INTERVAL_MS", 1000)
            .setting("EVENTS_RETENTION_DAYS", 20)
            .setting("LEDGER_RETENTION_DAYS", 20)
    };
    let apps = [
        replica().start().await,
        replica().start().await,
        replica().start().await,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = apps
        .iter()
        .map(|a| tokio::spawn(Load::run(a.url(""), camps.clone(), 3, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, SeqCst);
    let mut sent = 0;
    for l in loads {
        let t = l.await.expect("load");
        assert_eq!(t.other + t.failed + t.unavailable, 0, "{t:?}");
        sent += t.acknowledged;
    }
    let mut runs = 0;
    let mut dropped = 0;
    for a in &apps {
        let h = a.health().await.expect("health");
        assert_eq!(
            h["pipeline"]["write_failures"], 0,
            "no deadlock, no serialization failure: {h}"
        );
        assert_eq!(h["maintenance"]["failures"], 0, "{h}");
        runs += h["maintenance"]["runs"].as_u64().expect("runs");
        dropped += h["maintenance"]["partitions_dropped"]
            .as_u64()
            .expect("dropped");
    }
    let [a, b, c] = apps;
    let accepted = a.shutdown_report().await.accepted
        + b.shutdown_report().await.accepted
        + c.shutdown_report().await.accepted;
    assert_eq!(accepted, sent);
    assert!(runs >= 3, "maintenance ran during the load: {runs} rounds");
    assert_eq!(
        dropped, 3,
        "each old partition dropped once, by one replica"
    );
    assert_eq!(count(&db, "events").await as u64, sent);
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
    let total: i64 = db
        .query_one(
            "SELECT sum(impressions + clicks + invalid_impressions + invalid_clicks)::int8 FROM metrics_hourly",
            &[],
        )
        .await
        .expect("sum")
        .get(0);
    assert_eq!(total as u64, sent);
    assert!(sent > 1000, "real load: {sent}");
}

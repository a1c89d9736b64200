//! The `ingest` binary as an operator runs it: configuration errors, the
//! `migrate` subcommand, and SIGTERM draining every buffered event.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_ingest");

#[test]
fn a_bad_setting_stops_the_process_naming_the_variable() {
    let cases = [
        ("PORT", "abc", "PORT must be a TCP port number 1-65535"),
        (
            "FLUSH_INTERVAL_MS",
            "-5",
            "FLUSH_INTERVAL_MS must be milliseconds between flushes",
        ),
        (
            "DB_POOL_MAX",
            "0",
            "DB_POOL_MAX must be maximum pool connections",
        ),
        (
            "WORKER_THREADS",
            "many",
            "WORKER_THREADS must be a thread count",
        ),
    ];
    for (var, value, message) in cases {
        let out = Command::new(BIN)
            .env("DATABASE_URL", "postgres://u@127.0.0.1:1/db")
            .env(var, value)
            .output()
            .expect("run ingest");
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(&format!("{value:?}")),
            "{var}={value}: {stderr}"
        );
    }
    let out = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run ingest");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL must be"));
}

#[test]
fn version_prints_and_exits() {
    let out = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run ingest");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ingest {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_sigterm_drains_and_exits_zero() {
    let db_url = fresh_database().await;
    let status = Command::new(BIN)
        .arg("migrate")
        .env("DATABASE_URL", &db_url)
        .status()
        .expect("run migrate");
    assert!(status.success());
    let db = connect(&db_url).await;
    let camp = campaigns(1, 1)[0];
    db.execute(
        "INSERT INTO campaigns VALUES ($1, $2)",
        &[&camp.id, &camp.account],
    )
    .await
    .expect("seed");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(BIN)
        .env("DATABASE_URL", &db_url)
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .env("FLUSH_INTERVAL_MS", "3600000")
        .env("NODE_ENV", "production")
        .env("SPOOL_DIR", temp_dir("spool"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ingest");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            let h: serde_json::Value = r.json().await.expect("json");
            if h["pipeline"]["campaigns_cached"] == 1 {
                up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "service came up");
    for _ in 0..40 {
        let r = http
            .post(format!(
                "{base}/event/impression?{}",
                event_query(camp.id, AD_UNIT, None)
            ))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 204);
    }
    assert_eq!(
        count(&db, "events").await,
        0,
        "held until shutdown: the timer is an hour"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(count(&db, "events").await, 40);
    // Production logs are JSON lines; the drain report is one of them.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "drain report")
        .unwrap_or_else(|| panic!("no JSON drain report in:\n{stderr}"));
    assert_eq!(report["accepted"], 40);
    assert_eq!(report["written_at_shutdown"], 40);
    assert_eq!(report["unwritten"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_adopt_a_database_the_node_service_already_uses() {
    let db_url = fresh_database().await;
    let db = connect(&db_url).await;
    // The seed's tables, created by hand as the Node service's deployment did, with data.
    db.batch_execute(include_str!("../migrations/V1__seed_schema.sql"))
        .await
        .expect("seed schema");
    let camp = campaigns(1, 1)[0];
    db.execute(
        "INSERT INTO campaigns VALUES ($1, $2)",
        &[&camp.id, &camp.account],
    )
    .await
    .expect("campaign");
    db.execute(
        "INSERT INTO metrics_hourly (account_id, ad_unit_id, campaign_id, hour_timestamp, impressions, clicks)
         VALUES ($1, $2, $3, date_trunc('hour', now() AT TIME ZONE 'UTC'), 10, 1)",
        &[&camp.account, &AD_UNIT.parse::<uuid::Uuid>().expect("uuid"), &camp.id],
    )
    .await
    .expect("existing aggregate");
    for _ in 0..2 {
        let status = Command::new(BIN)
            .arg("migrate")
            .env("DATABASE_URL", &db_url)
            .status()
            .expect("migrate");
        assert!(status.success(), "migrate is idempotent");
    }
    let app = TestApp::start_on(db_url.clone(), |_| {}).await;
    assert_eq!(app.post_event("impression", camp.id).await, 204);
    let (_, db) = app.shutdown().await;
    let (i, c): (i32, i32) = db
        .query_one("SELECT impressions, clicks FROM metrics_hourly", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("aggregate");
    assert_eq!(
        (i, c),
        (11, 1),
        "existing counts are added to, not replaced"
    );
    let versions: Vec<i32> = db
        .query(
            "SELECT version FROM ingest_schema_migrations ORDER BY 1",
            &[],
        )
        .await
        .expect("ledger")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
}

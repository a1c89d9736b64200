//! The `ingest` binary as an operator runs it: configuration errors, the
//! `migrate` subcommand, and SIGTERM draining every buffered event.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

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
fn unknown_commands_and_flags_are_refused_naming_them() {
    for (args, named) in [
        (&["migrate", "--anything"][..], "--anything"),
        (&["frobnicate"][..], "frobnicate"),
        (&["--verbose"][..], "--verbose"),
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env("DATABASE_URL", "postgres://u@127.0.0.1:1/db")
            .output()
            .expect("run ingest");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN).arg("--help").output().expect("help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in ingest::config::SETTINGS {
        assert!(help.contains(s.name), "--help lists {}", s.name);
    }
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

    let mut service = TestApp::builder()
        .database(db_url)
        .unseeded()
        .setting("FLUSH_INTERVAL_MS", 3_600_000)
        .setting("NODE_ENV", "production")
        .setting("LOG_LEVEL", "info")
        .start_process()
        .await;
    let h = service
        .wait_health(Duration::from_secs(5), |h| {
            h["pipeline"]["campaigns_cached"] == 1
        })
        .await;
    assert_eq!(h["pipeline"]["campaigns_cached"], 1, "service came up: {h}");
    for _ in 0..40 {
        let q = event_query(camp.id, AD_UNIT, None);
        assert_eq!(service.post(&format!("/event/impression?{q}")).await, 204);
    }
    assert_eq!(
        count(&db, "events").await,
        0,
        "held until shutdown: the timer is an hour"
    );
    assert_eq!(service.sigterm(), Some(0));
    assert_eq!(count(&db, "events").await, 40);
    // Production logs are JSON lines; the drain report is one of them.
    let stderr = service.logs();
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
    let app = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .start()
        .await;
    assert_eq!(app.post_event("impression", camp.id).await, 204);
    let (report, db) = app.shutdown().await;
    assert_eq!(
        report.unwritten + report.spooled_at_shutdown,
        0,
        "{report:?}"
    );
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
    assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8]);
}

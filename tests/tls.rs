//! TLS to PostgreSQL with libpq's `sslmode` meanings: `require` encrypts,
//! `verify-full` checks the chain and the host name, `verify-ca` the chain
//! only, and a certificate that fails its check keeps the service from
//! writing (events are spooled, `/health` says the database is disconnected).

mod common;

use std::time::Duration;

use common::pg::PgCluster;
use common::*;

async fn encrypted_ingest_connections(pg: &PgCluster) -> (i64, i64) {
    let db = connect(&pg.url()).await;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name = 'ingest'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_and_verify_full_encrypt_and_store() {
    let pg = PgCluster::start_new_with_tls();
    let camps = campaigns(1, 1);
    let ca = pg.ca_cert();
    for (mode, extra) in [
        ("require", String::new()),
        ("verify-full", format!("&sslrootcert={}", ca.display())),
    ] {
        let url = format!("{}?sslmode={mode}{extra}", pg.url());
        let builder = TestApp::builder()
            .database(url)
            .setting("FLUSH_INTERVAL_MS", 100);
        let app = if mode == "require" {
            builder.campaigns(&camps).start().await
        } else {
            builder.unseeded().start().await // same database, already seeded
        };
        let before = app.count("events").await;
        assert_eq!(app.post_event("impression", camps[0].id).await, 204);
        assert_eq!(
            app.wait_rows("events", before + 1, Duration::from_secs(10))
                .await,
            before + 1,
            "{mode}"
        );
        let (encrypted, total) = encrypted_ingest_connections(&pg).await;
        assert!(
            total > 0 && encrypted == total,
            "{mode}: {encrypted} of {total} service connections use TLS"
        );
        let report = app.shutdown_report().await;
        assert_eq!(report.unwritten, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_checks_refuse_what_libpq_would_refuse() {
    let pg = PgCluster::start_new_with_tls();
    let camps = campaigns(1, 1);
    prepare_database(&format!("{}?sslmode=require", pg.url()), &camps).await;
    let ca = pg.ca_cert();
    let by_name = pg.url().replace("127.0.0.1", "localhost");

    // verify-ca: the chain is enough, whatever name was used.
    let ok = format!("{by_name}?sslmode=verify-ca&sslrootcert={}", ca.display());
    let app = TestApp::builder().database(ok).unseeded().start().await;
    let h = app.health().await.expect("health");
    assert_eq!(h["database"], "connected");
    drop(app);

    // verify-full: the certificate names 127.0.0.1, not localhost.
    let wrong_name = format!("{by_name}?sslmode=verify-full&sslrootcert={}", ca.display());
    assert_refused(wrong_name).await;

    // verify-full against another CA: the chain does not verify.
    let other = temp_dir("other-ca");
    std::fs::create_dir_all(&other).expect("dir");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
            "-keyout",
        ])
        .arg(other.join("k"))
        .arg("-out")
        .arg(other.join("ca.crt"))
        .output()
        .expect("openssl");
    assert!(out.status.success());
    assert_refused(format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        other.join("ca.crt").display()
    ))
    .await;
}

/// The service runs but cannot connect: events are accepted and spooled, never written.
async fn assert_refused(url: String) {
    let app = TestApp::builder()
        .database(url)
        .unseeded()
        .no_wait()
        .setting("FLUSH_INTERVAL_MS", 100)
        .setting("DB_CONNECT_TIMEOUT_MS", 500)
        .setting("SHUTDOWN_TIMEOUT_MS", 3000)
        .start()
        .await;
    let (http, base) = (app.http.clone(), app.url(""));
    let h = wait_health(&http, &base, Duration::from_secs(5), |h| {
        h["database"] == "disconnected"
    })
    .await;
    assert_eq!(h["database"], "disconnected", "{h}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let h = wait_health(&http, &base, Duration::from_secs(1), |_| true).await;
    assert_eq!(
        h["database"], "disconnected",
        "a bad certificate never connects: {h}"
    );
    assert_eq!(h["pipeline"]["migrated"], false);
    let report = app.shutdown_report().await;
    assert_eq!(report.unwritten, 0);
}

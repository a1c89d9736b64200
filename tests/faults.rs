//! Faults the way production meets them: a database that stops answering
//! without closing connections and a failover behind the same address, a
//! shutdown with requests still in flight, rows the database refuses, a disk
//! that fills, slow-body clients, operator options in the URL, two processes
//! on one spool. Each ends by checking that every acknowledged event is
//! stored exactly once (or, where the test's point is a refusal, that nothing
//! refused was stored).

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn load(
    base: String,
    camps: Vec<Campaign>,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Load> {
    tokio::spawn(Load::run(base, camps, clients, stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_and_a_failover_under_load_lose_and_double_nothing() {
    // A primary with a synchronous standby: what the service saw committed
    // is on both, as in a managed database that fails over.
    let primary = PgCluster::start_new();
    let camps = campaigns(4, 2);
    prepare_database(&primary.url(), &camps).await;
    let standby = PgCluster::standby_of(&primary);
    let admin = connect(&primary.url()).await;
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .expect("sync standby");
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let app = TestApp::builder()
        .database(primary.url())
        .unseeded()
        .through_proxy()
        .setting("WRITE_TIMEOUT_MS", 1500)
        .setting("DB_QUERY_TIMEOUT_MS", 1000)
        .setting("DB_CONNECT_TIMEOUT_MS", 500)
        .setting("FLUSH_INTERVAL_MS", 100)
        .start()
        .await;
    let proxy = app.proxy.as_ref().expect("proxy");
    let stop = Arc::new(AtomicBool::new(false));
    let sender = load(app.url(""), camps.clone(), 4, stop.clone());

    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every open connection stops answering; new ones hang.
    proxy.freeze();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let h = app.health().await.expect("health while frozen");
    assert_eq!(h["status"], "degraded", "the probe notices the freeze: {h}");
    // The failover: the standby is promoted and the address now leads to it.
    standby.promote();
    let failed_over = Instant::now();
    proxy.fail_over(standby.addr());
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(30), |h| {
        h["database"] == "connected"
    })
    .await;
    let reconnected = failed_over.elapsed();
    assert_eq!(h["database"], "connected", "{h}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, SeqCst);
    let sent = sender.await.expect("load");
    assert_eq!(sent.other + sent.unavailable + sent.failed, 0, "{sent:?}");
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(60), |h| {
        h["spool"]["bytes"] == 0 && h["pipeline"]["buffered"] == 0
    })
    .await;
    let recovered = failed_over.elapsed();
    assert_eq!(h["pipeline"]["buffered"], 0, "everything landed: {h}");
    eprintln!(
        "failover: reconnected {reconnected:?} after the failover, spool replayed and memory empty after {recovered:?}; spooled {} events",
        h["spool"]["spooled_events"]
    );
    assert!(
        h["spool"]["spooled_events"].as_u64() > Some(0),
        "the freeze made the service spool: {h}"
    );
    let report = app.shutdown_report().await;
    assert_eq!(report.unwritten, 0);
    let db = connect(&standby.url()).await;
    assert_verified(&standby.url());
    assert_eq!(
        count(&db, "events").await as u64,
        sent.acknowledged,
        "every acknowledged event exactly once on the new primary"
    );
    assert_eq!(aggregate_drift(&db).await, 0);
}

/// A raw POST whose body arrives in two parts: the head and 2 of 5 body bytes
/// now, the rest when asked. Returns the stream.
async fn half_sent_post(addr: std::net::SocketAddr, query: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /event/impression?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s
}

/// The status line's code of whatever the server answered, or 0 if it closed.
async fn status_of(s: &mut tokio::net::TcpStream) -> u16 {
    let mut buf = vec![0u8; 2048];
    let mut got = 0;
    while got < 12 {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return 0,
            Ok(Ok(n)) => got += n,
        }
    }
    std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_never_acknowledges_an_event_it_does_not_store() {
    let camps = campaigns(3, 1);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let mut acknowledged = 0u64;
    for round in 0..3 {
        let app = TestApp::builder()
            .database(db_url.clone())
            .unseeded()
            .setting("SHUTDOWN_TIMEOUT_MS", 1000)
            .setting("FLUSH_INTERVAL_MS", 100)
            .start()
            .await;
        // Requests in flight at the drain deadline: their bodies are still
        // coming when the shards close.
        let q = event_query(camps[0].id, AD_UNIT, None);
        let mut slow = Vec::new();
        for _ in 0..20 {
            slow.push(half_sent_post(app.addr, &q).await);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sender = load(app.url(""), camps.clone(), 16, stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        // SIGTERM, as the binary's signal handler delivers it.
        let shutdown = tokio::spawn(app.shutdown_report());
        // Past the connection drain (half the timeout), before the deadline.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut late = Vec::new();
        for mut s in slow {
            s.write_all(b"cde").await.expect("rest of body");
            late.push(status_of(&mut s).await);
        }
        stop.store(true, SeqCst);
        let sent = sender.await.expect("load");
        let report = shutdown.await.expect("shutdown");
        assert!(
            late.iter().all(|&c| c == 503 || c == 0),
            "round {round}: a request that came after the final flush is refused, never acknowledged: {late:?}"
        );
        let late_ok = late.iter().filter(|&&c| c == 204).count() as u64;
        assert_eq!(report.unwritten, 0, "round {round}: {report:?}");
        assert!(
            report.connections_left >= 20,
            "the slow requests outlived the drain: {report:?}"
        );
        acknowledged += sent.acknowledged + late_ok;
        // Clients whose connection closed and could not reconnect (the
        // listener is gone) count as failed; no other status may appear.
        assert_eq!(sent.other, 0, "round {round}: {sent:?}");
        let db = connect(&db_url).await;
        assert_eq!(
            count(&db, "events").await as u64,
            acknowledged,
            "round {round}: every 2xx is in events, once"
        );
        assert_eq!(report.accepted, sent.acknowledged + late_ok);
    }
    assert!(acknowledged > 300, "real load: {acknowledged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_are_isolated_and_nothing_waits_behind_them() {
    let camps = campaigns(2, 1);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    // Constraints an operator added: `events` refuses URLs with "poison",
    // and `rejected_events` refuses "poison-both".
    let db = connect(&db_url).await;
    db.batch_execute(
        "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (page_url NOT LIKE '%poison%');
         ALTER TABLE rejected_events ADD CONSTRAINT no_poison_both CHECK (page_url NOT LIKE '%poison-both%');",
    )
    .await
    .expect("constraints");
    let spool_dir = temp_dir("spool-poison");

    // 1. Live: 5,000 events, 5 poison and 2 refused by both tables.
    let mut service = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .spool_dir(&spool_dir)
        .setting("FLUSH_INTERVAL_MS", 200)
        .start_process()
        .await;
    let url = |i: usize| match i {
        _ if i % 1000 == 7 => format!("https%3A%2F%2Fe.x%2F{i}%2Fpoison"),
        _ if i == 2500 || i == 4999 => format!("https%3A%2F%2Fe.x%2F{i}%2Fpoison-both"),
        _ => format!("https%3A%2F%2Fe.x%2F{i}"),
    };
    let post = |i: usize| {
        let (http, base, c) = (service.http.clone(), service.base.clone(), camps[i % 2].id);
        let u = url(i);
        async move {
            http.post(format!(
                "{base}/event/impression?ad_unit_id={AD_UNIT}&campaign_id={c}&creative_id={CREATIVE}&page_url={u}"
            ))
            .send()
            .await
            .expect("post")
            .status()
            .as_u16()
        }
    };
    for chunk in (0..5000).collect::<Vec<_>>().chunks(50) {
        let codes = futures_util::future::join_all(chunk.iter().map(|&i| post(i))).await;
        assert!(codes.iter().all(|&c| c == 204), "{codes:?}");
    }
    let h = service
        .wait_health(Duration::from_secs(30), |h| {
            h["pipeline"]["buffered"] == 0 && h["pipeline"]["quarantined"] == 2
        })
        .await;
    assert_eq!(h["pipeline"]["quarantined"], 2, "{h}");
    assert_eq!(h["pipeline"]["dead_lettered"], 5, "{h}");
    assert_eq!(h["pipeline"]["written"], 4993, "{h}");
    assert_eq!(count(&db, "events").await, 4993);
    assert_eq!(count(&db, "rejected_events").await, 5);
    let reasons: Vec<String> = db
        .query("SELECT DISTINCT reason FROM rejected_events", &[])
        .await
        .expect("reasons")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("SQLSTATE 23514") && r.contains("no_poison")),
        "{reasons:?}"
    );
    assert_eq!(
        aggregate_drift(&db).await,
        0,
        "aggregates count exactly the stored rows"
    );
    assert_verified(&db_url);
    assert_eq!(service.sigterm(), Some(0));
    let logs = service.logs();
    assert!(
        logs.contains("SQLSTATE 23514") && logs.contains("quarantined"),
        "the log names the SQLSTATE and the database's message:\n{logs}"
    );

    // 2. The operator sees them, fixes the cause, and retries them.
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("DATABASE_URL", &db_url)
            .env("SPOOL_DIR", &spool_dir)
            .env("LOG_LEVEL", "error")
            .output()
            .expect("run ingest")
    };
    let out = run(&["quarantine", "list"]);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("2 files, 2 events"), "{listed}");
    assert!(listed.contains("no_poison_both"), "{listed}");
    let out = run(&["quarantine", "retry", "--timeout-secs", "5"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "still refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    db.batch_execute("ALTER TABLE rejected_events DROP CONSTRAINT no_poison_both")
        .await
        .expect("fix");
    let out = run(&["quarantine", "retry", "--timeout-secs", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 events stored, 0 still"));
    assert_eq!(count(&db, "rejected_events").await, 7);
    let out = run(&["quarantine", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("quarantine is empty"));
    // A second retry stores nothing twice.
    let out = run(&["quarantine", "retry"]);
    assert!(out.status.success());
    assert_eq!(count(&db, "rejected_events").await, 7);
    assert_eq!(count(&db, "events").await, 4993);

    // 3. Replay: poison among spooled events is isolated the same way.
    let mut service = TestApp::builder()
        .without_database()
        .spool_dir(&spool_dir)
        .start_process()
        .await;
    for i in 10_000..10_100 {
        let u = if i == 10_050 {
            "https%3A%2F%2Fe.x%2Fpoison".to_string()
        } else {
            format!("https%3A%2F%2Fe.x%2F{i}")
        };
        let c = camps[i % 2].id;
        let code = service
            .post(&format!("/event/click?ad_unit_id={AD_UNIT}&campaign_id={c}&creative_id={CREATIVE}&page_url={u}"))
            .await;
        assert_eq!(code, 204);
    }
    let _ = service
        .wait_health(Duration::from_secs(10), |h| {
            h["spool"]["spooled_events"] == 100
        })
        .await;
    assert_eq!(service.sigterm(), Some(0));
    let mut service = TestApp::builder()
        .database(db_url.clone())
        .unseeded()
        .spool_dir(&spool_dir)
        .start_process()
        .await;
    let h = service
        .wait_health(Duration::from_secs(30), |h| {
            h["spool"]["bytes"] == 0 && h["spool"]["replayed_events"] == 100
        })
        .await;
    assert_eq!(h["spool"]["replayed_events"], 100, "{h}");
    assert_eq!(service.sigterm(), Some(0));
    assert_eq!(count(&db, "events").await, 4993 + 99);
    assert_eq!(count(&db, "rejected_events").await, 8);
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
}

/// A tmpfs of `kib` KiB mounted at a new directory, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(kib: u32) -> SmallDisk {
        let dir = temp_dir("tmpfs");
        std::fs::create_dir_all(&dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_sheds_load_and_loses_nothing_it_took() {
    let disk = SmallDisk::mount(256);
    let camps = campaigns(2, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .through_proxy()
        .spool_dir(disk.0.join("spool"))
        .setting("MAX_BUFFERED_EVENTS", 2000)
        // A batch is spooled whole or not at all (its id is its unit in the
        // ledger): keep each well under the 256 KiB disk so the disk fills
        // batch by batch instead of refusing the very first one.
        .setting("FLUSH_MAX_EVENTS", 250)
        .setting("FLUSH_INTERVAL_MS", 50)
        .setting("WRITE_TIMEOUT_MS", 500)
        .setting("DB_CONNECT_TIMEOUT_MS", 300)
        .setting("DB_QUERY_TIMEOUT_MS", 300)
        .start()
        .await;
    let proxy = app.proxy.as_ref().expect("proxy");
    proxy.freeze();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = load(app.url(""), camps.clone(), 8, stop.clone());
    // Until the disk is full and memory is at its cap: 503s.
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(30), |h| {
        h["spool"]["failures"].as_u64() > Some(0) && h["pipeline"]["shed"].as_u64() > Some(0)
    })
    .await;
    assert!(
        h["spool"]["failures"].as_u64() > Some(0),
        "the disk filled: {h}"
    );
    assert!(
        h["pipeline"]["shed"].as_u64() > Some(0),
        "load was shed: {h}"
    );
    assert!(h["spool"]["bytes"].as_u64() <= Some(256 * 1024), "{h}");
    // The database comes back: memory and the spool drain into it.
    proxy.fail_over(server_addr(&app.db_url));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, SeqCst);
    let sent = sender.await.expect("load");
    assert!(sent.unavailable > 0 && sent.acknowledged > 0, "{sent:?}");
    assert_eq!(sent.other + sent.failed, 0, "{sent:?}");
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(60), |h| {
        h["spool"]["bytes"] == 0 && h["pipeline"]["buffered"] == 0
    })
    .await;
    assert_eq!(h["pipeline"]["buffered"], 0, "{h}");
    assert!(h["spool"]["replayed_events"].as_u64() > Some(0), "{h}");
    let db_url = app.db_url.clone();
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(
        count(&db, "events").await as u64,
        sent.acknowledged,
        "every 2xx stored once; every 503 stored never"
    );
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_clients_get_408_and_do_not_slow_a_normal_client() {
    // 2,000 sockets on each side of this process.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("BODY_READ_TIMEOUT_MS", 2000)
        .start()
        .await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    let head =
        format!("POST /event/impression?{q} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nx");
    let opened = Instant::now();
    let mut slow = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut s = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        s.write_all(head.as_bytes()).await.expect("head");
        slow.push(s);
    }
    // A normal client while they hang.
    let mut took = Vec::new();
    while opened.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        assert_eq!(app.post_event("impression", camps[0].id).await, 204);
        took.push(t.elapsed());
    }
    took.sort();
    let p = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    eprintln!(
        "normal client with 2,000 slow-body sockets open: {} requests, p50 {:?}, p99 {:?}",
        took.len(),
        p(0.5),
        p(0.99)
    );
    assert!(
        took.len() >= 20,
        "the normal client was served: {} requests",
        took.len()
    );
    // Each slow socket gets 408 and is closed.
    let mut codes = std::collections::BTreeMap::new();
    for mut s in slow {
        let code = status_of(&mut s).await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .is_ok();
        *codes.entry((code, closed)).or_insert(0) += 1;
    }
    assert_eq!(codes.get(&(408, true)), Some(&2000), "{codes:?}");
    let n = took.len() as i64;
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted as i64, n);
    assert_eq!(
        count(&db, "events").await,
        n,
        "the slow ones stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_spool_refuses_to_start_naming_it() {
    let spool_dir = temp_dir("spool-shared");
    let mut first = TestApp::builder()
        .without_database()
        .spool_dir(&spool_dir)
        .start_process()
        .await;
    let code = first
        .post(&format!(
            "/event/impression?{}",
            event_query(uuid::Uuid::new_v4(), AD_UNIT, None)
        ))
        .await;
    assert_eq!(code, 204, "the first one runs");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let second = std::process::Command::new(BIN)
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("SPOOL_DIR", &spool_dir)
        .output()
        .expect("run ingest");
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!(
            "another process is using SPOOL_DIR {}",
            spool_dir.display()
        )),
        "{stderr}"
    );
    assert_eq!(first.sigterm(), Some(0));
}

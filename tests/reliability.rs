//! Nothing accepted is lost or counted twice, whatever fails: the database
//! stopping under load, the service killed with a spool on disk, a commit
//! whose acknowledgement is lost, overload with nowhere to put events,
//! hostile requests, and two replicas writing the same keys at once.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::pg::PgCluster;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends events from `clients` concurrent clients until `stop`; returns the
/// 2xx count. Any other answer fails the test: with the spool available
/// nothing is refused.
fn load(
    base: String,
    camps: Vec<Campaign>,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let tally = Load::run(base, camps, clients, stop).await;
        assert_eq!(
            tally.other + tally.failed + tally.unavailable,
            0,
            "every request acknowledged: {tally:?}"
        );
        tally.acknowledged
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_load_loses_nothing_and_doubles_nothing() {
    let pg = PgCluster::start_new();
    let camps = campaigns(4, 2);
    let app = TestApp::builder()
        .database(pg.url())
        .campaigns(&camps)
        .setting("DB_CONNECT_TIMEOUT_MS", 500)
        .setting("WRITE_TIMEOUT_MS", 2000)
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = load(app.url(""), camps.clone(), 4, stop.clone());

    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.stop_immediate();
    let down_at = tokio::time::Instant::now();
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(10), |h| {
        h["database"] == "disconnected"
    })
    .await;
    assert_eq!(h["status"], "degraded");
    tokio::time::sleep_until(down_at + Duration::from_secs(10)).await;
    let during = app.health().await.expect("health during outage");
    assert!(
        during["spool"]["spooled_events"].as_u64().unwrap() > 0,
        "outage traffic went to the spool: {during}"
    );
    pg.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, SeqCst);
    let acknowledged = sender.await.expect("load");

    // Wait until everything buffered or spooled is stored.
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(60), |h| {
        h["pipeline"]["buffered"] == 0 && h["spool"]["bytes"] == 0
    })
    .await;
    assert_eq!(h["pipeline"]["buffered"], 0, "{h}");
    assert_eq!(h["spool"]["bytes"], 0, "{h}");
    let report = app.shutdown_report().await;
    assert_eq!(report.accepted, acknowledged);
    assert_eq!(report.unwritten, 0);

    let db = connect(&pg.url()).await;
    assert_eq!(
        count(&db, "events").await as u64,
        acknowledged,
        "every 2xx exactly once"
    );
    assert_eq!(
        aggregate_drift(&db).await,
        0,
        "metrics_hourly equals events grouped"
    );
    assert_verified(&pg.url());
    assert!(
        acknowledged > 500,
        "the test sent real load: {acknowledged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_left_by_sigkill_is_replayed_at_the_next_start_exactly_once() {
    let spool_dir = temp_dir("spool-kill");
    let camps = campaigns(3, 2);

    // 1. Database unreachable: events are accepted and spooled.
    let mut service = TestApp::builder()
        .without_database()
        .spool_dir(&spool_dir)
        .start_process()
        .await;
    let n = 300u64;
    for i in 0..n as usize {
        let path = if i % 4 == 0 {
            "/event/click"
        } else {
            "/event/impression"
        };
        let q = event_query(camps[i % 3].id, AD_UNIT, None);
        assert_eq!(service.post(&format!("{path}?{q}")).await, 204);
    }
    let h = service
        .wait_health(Duration::from_secs(20), |h| {
            h["spool"]["spooled_events"] == n
        })
        .await;
    assert_eq!(h["spool"]["spooled_events"], n, "{h}");

    // 2. SIGKILL, and a torn record at the tail as a crash mid-append leaves.
    service.kill9();
    let mut segs: Vec<_> = std::fs::read_dir(&spool_dir)
        .expect("spool dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let last = segs.last().expect("a segment on disk");
    let mut torn = std::fs::read(last).expect("read segment");
    torn.extend_from_slice(&[0x53, 0x50, 0x4f, 0x4c, 0, 0, 0, 99, 1, 2, 3]);
    std::fs::write(last, torn).expect("append torn record");

    // 3. Start again with the database up: the spool is replayed.
    let mut service = TestApp::builder()
        .campaigns(&camps)
        .spool_dir(&spool_dir)
        .start_process()
        .await;
    let h = service
        .wait_health(Duration::from_secs(30), |h| {
            h["spool"]["bytes"] == 0 && h["spool"]["replayed_events"] == n
        })
        .await;
    assert_eq!(h["spool"]["replayed_events"], n, "{h}");
    assert_eq!(
        h["spool"]["damaged_records"], 1,
        "the torn record is reported: {h}"
    );
    assert_eq!(h["spool"]["bytes"], 0);
    // The segment with the torn record is kept, not deleted.
    let kept: Vec<String> = std::fs::read_dir(spool_dir.join("quarantine"))
        .expect("quarantine dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        kept.iter()
            .any(|n| n.starts_with("damaged-") && n.ends_with(".seg")),
        "{kept:?}"
    );
    assert_eq!(service.sigterm(), Some(0));
    let db_url = service.db_url.clone();
    let db = connect(&db_url).await;
    assert_eq!(count(&db, "events").await as u64, n);
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
    // 75 clicks from one client on 3 campaigns: 3 billed, 72 duplicates,
    // classified before the kill and kept through the spool.
    let clicks: (i64, i64) = db
        .query_one(
            "SELECT sum(clicks)::int8, sum(invalid_clicks)::int8 FROM metrics_hourly",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("sum");
    assert_eq!(clicks, (3, 72));

    // 4. A third start replays nothing more.
    let mut service = TestApp::builder()
        .database(db_url)
        .unseeded()
        .spool_dir(&spool_dir)
        .start_process()
        .await;
    let _ = service
        .wait_health(Duration::from_secs(10), |h| {
            h["pipeline"]["migrated"] == true
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(service.sigterm(), Some(0));
    assert_eq!(count(&db, "events").await as u64, n, "nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_acknowledgement_is_replayed_as_a_no_op() {
    let camps = campaigns(2, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .through_proxy()
        .setting("FLUSH_INTERVAL_MS", 100)
        .setting("DB_CONNECT_TIMEOUT_MS", 500)
        .start()
        .await;
    let proxy = app.proxy.as_ref().expect("proxy");
    proxy.cut_next_commit();
    for i in 0..50 {
        assert_eq!(app.post_event("impression", camps[i % 2].id).await, 204);
    }
    let h = wait_health(&app.http, &app.url(""), Duration::from_secs(30), |h| {
        h["pipeline"]["duplicate_batches"].as_u64() >= Some(1)
            && h["spool"]["bytes"] == 0
            && h["pipeline"]["buffered"] == 0
    })
    .await;
    assert_eq!(proxy.cuts(), 1, "one commit lost its acknowledgement");
    assert!(h["spool"]["replayed_batches"].as_u64() >= Some(1), "{h}");
    assert!(
        h["pipeline"]["duplicate_batches"].as_u64() >= Some(1),
        "the replay found the batch committed: {h}"
    );
    let db_url = app.db_url.clone();
    let (report, db) = app.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(count(&db, "events").await, 50, "committed once, not twice");
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
    let sum: i64 = db
        .query_one("SELECT sum(impressions)::int8 FROM metrics_hourly", &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(sum, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_nowhere_to_put_events_sheds_exactly_and_stays_under_the_cap() {
    let cap = 1000u64;
    let app = TestApp::builder()
        .without_database()
        .setting("MAX_BUFFERED_EVENTS", cap)
        .setting("FLUSH_INTERVAL_MS", 50)
        .setting("SHUTDOWN_TIMEOUT_MS", 500)
        // The spool refuses everything: "memory and spool both full".
        .config(|c| c.spool_max_bytes = 0)
        .start()
        .await;
    let campaign = uuid::Uuid::new_v4();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for _ in 0..3000 {
        let r = app
            .http
            .post(app.url(&format!(
                "/event/impression?{}",
                event_query(campaign, AD_UNIT, None)
            )))
            .send()
            .await
            .expect("post");
        match r.status().as_u16() {
            204 => accepted += 1,
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                let body: serde_json::Value = r.json().await.expect("json");
                assert_eq!(body["error"], "overloaded");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    let mut gifs = 0u64;
    for _ in 0..200 {
        let r = app
            .http
            .get(app.url(&format!(
                "/event/click?{}",
                event_query(campaign, AD_UNIT, None)
            )))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "pixels still render");
        assert_eq!(r.bytes().await.expect("gif").len(), 43);
        gifs += 1;
    }
    let h = app.health().await.expect("health");
    let p = &h["pipeline"];
    assert!(
        refused > 0 && accepted >= cap * 9 / 10,
        "most of the room is used before shedding: accepted {accepted}, refused {refused}"
    );
    assert!(
        accepted <= cap,
        "the memory cap holds exactly: accepted {accepted}"
    );
    assert_eq!(p["accepted"], accepted);
    assert_eq!(p["shed"], refused);
    assert_eq!(p["dropped"]["buffer_full"], gifs);
    assert_eq!(p["shedding"], true);
    let held = p["buffered_in_shards"].as_u64().unwrap() + p["in_writer"].as_u64().unwrap();
    assert!(held <= cap, "held in memory: {held}");
    let report = app.shutdown_report().await;
    assert_eq!(report.accepted, accepted);
    assert_eq!(
        report.unwritten, accepted,
        "nowhere to put them: reported, not hidden"
    );
}

/// Sends raw bytes and returns the status code of the response.
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_hostile_requests_gets_4xx_and_stores_nothing() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("HEADER_READ_TIMEOUT_MS", 500)
        .start()
        .await;
    let c = camps[0].id;
    let ok = format!("ad_unit_id={AD_UNIT}&campaign_id={c}&creative_id={CREATIVE}");
    let post = |target: String, extra: &str| {
        format!("POST {target} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 0\r\n\r\n")
            .into_bytes()
    };
    let mut corpus: Vec<(Vec<u8>, u16)> = vec![
        (post(format!("/event/impression?{ok}&page_url={}", "a".repeat(10_000)), ""), 414),
        (post(format!("/event/impression?{ok}&page_url={}", "a".repeat(70_000)), ""), 414),
        (post(format!("/event/impression?{ok}&page_url=x"), &format!("X-Big: {}\r\n", "b".repeat(70_000))), 431),
        (post(format!("/event/impression?{ok}&page_url=x"), &"X-H: 1\r\n".repeat(150)), 431),
        (post(format!("/event/impression?{ok}&page_url=%"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=%zz"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=a%00"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=%ff%fe"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=x&page_url=y"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=x&timestamp=-1"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=x&timestamp=1e12"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=x&timestamp=99999999999999999999999"), ""), 400),
        (post(format!("/event/impression?{ok}&page_url=x&timestamp=%2B1"), ""), 400),
        (post(format!("/event/impression?ad_unit_id=%00&campaign_id={c}&creative_id={CREATIVE}&page_url=x"), ""), 400),
        (post(format!("/event/impression?{ok}&campaign_id={}&page_url=x", "f".repeat(5000)), ""), 400),
        (post("/event/impression".into(), ""), 400),
        (post(format!("/event/../event/impression?{ok}&page_url=x"), ""), 404),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(), 400),
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (format!("POST /event/impression?{ok}&page_url=x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n").into_bytes(), 400),
        (format!("POST /event/impression?{ok}&page_url=x HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n").into_bytes(), 413),
        (format!("DELETE /event/impression?{ok}&page_url=x HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(), 405),
    ];
    let mut raw_path = format!("POST /event/impression?{ok}&page_url=").into_bytes();
    raw_path.extend_from_slice(b"\xff\xfe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    corpus.push((raw_path, 400));
    for (req, want) in &corpus {
        let got = raw_status(app.addr, req).await;
        let shown = String::from_utf8_lossy(&req[..req.len().min(120)]).to_string();
        assert_eq!(got, *want, "{shown}");
    }
    // A slow-loris client that never finishes its head is cut off, and the service stays healthy.
    let mut slow = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    slow.write_all(b"POST /event/impression?")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let cut = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue, // a 408 may come first; then the close
            }
        }
    })
    .await;
    assert_eq!(
        cut,
        Ok(true),
        "slow client disconnected by the header read timeout"
    );
    // A keep-alive client that sends a request every 100 ms keeps its connection
    // for more than twice the timeout; once it stops, the idle connection is closed.
    let mut kept = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let probe = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    for i in 0..12 {
        kept.write_all(probe)
            .await
            .expect("write on the kept connection");
        let n = tokio::time::timeout(Duration::from_secs(2), kept.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "request {i} on the kept connection: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(3), kept.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "idle keep-alive connection closed: {closed:?}"
    );
    let h = app.health().await.expect("health");
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["pipeline"]["accepted"], 0);
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 0);
    assert_eq!(count(&db, "events").await, 0);
    assert_eq!(count(&db, "rejected_events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_sum_exactly() {
    let db_url = fresh_database().await;
    let camps = campaigns(2, 1);
    let replica = |seeded: bool| {
        let b = TestApp::builder()
            .database(db_url.clone())
            .setting("FLUSH_INTERVAL_MS", 30)
            .setting("FLUSH_MAX_EVENTS", 50)
            .setting("WRITER_CONCURRENCY", 3);
        if seeded {
            b.campaigns(&camps)
        } else {
            b.unseeded()
        }
    };
    let a = replica(true).start().await;
    let b = replica(false).start().await;
    let stop = Arc::new(AtomicBool::new(false));
    // The same few keys from both replicas, so their upserts collide.
    let la = load(a.url(""), camps.clone(), 3, stop.clone());
    let lb = load(b.url(""), camps.clone(), 3, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, SeqCst);
    let sent = la.await.expect("load a") + lb.await.expect("load b");
    let (ha, hb) = (a.health().await.expect("a"), b.health().await.expect("b"));
    let ra = a.shutdown_report().await;
    let rb = b.shutdown_report().await;
    assert_eq!(ra.unwritten + rb.unwritten, 0);
    assert_eq!(ra.accepted + rb.accepted, sent);
    for h in [&ha, &hb] {
        assert_eq!(
            h["pipeline"]["write_failures"], 0,
            "no deadlock or serialization failure: {h}"
        );
    }
    let db = connect(&db_url).await;
    assert_eq!(count(&db, "events").await as u64, sent);
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
    // Gross (billed + invalid) is every event: repeated clicks from one
    // client are duplicates, counted apart.
    let total: i64 = db
        .query_one(
            "SELECT sum(impressions + clicks + invalid_impressions + invalid_clicks)::int8 FROM metrics_hourly",
            &[],
        )
        .await
        .expect("sum")
        .get(0);
    assert_eq!(total as u64, sent);
    assert!(
        count(&db, "metrics_hourly").await <= 4,
        "2 campaigns x 2 ad units x 1 hour"
    );
}

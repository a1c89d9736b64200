//! `ACK_MODE=durable`: a 2xx means the event is in the fsynced journal, so
//! `kill -9` under load loses no acknowledged event, and replaying the
//! journal stores nothing twice.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use uuid::Uuid;

/// What one client got back: the client ids acknowledged, and how many
/// events without an id were acknowledged.
#[derive(Default)]
struct Acked {
    ids: Vec<Uuid>,
    without_id: u64,
    sent: u64,
}

async fn client(
    base: String,
    camps: Vec<Campaign>,
    n: usize,
    with_ids: bool,
    stop: Arc<AtomicBool>,
) -> Acked {
    let http = browser();
    let mut acked = Acked::default();
    let mut i = n;
    while !stop.load(SeqCst) {
        let c = camps[i % camps.len()].id;
        let id = Uuid::new_v4();
        let mut url = format!("{base}/event/impression?{}", event_query(c, AD_UNIT, None));
        if with_ids {
            url.push_str(&format!("&event_id={id}"));
        }
        acked.sent += 1;
        let ok = http
            .post(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            if with_ids {
                acked.ids.push(id);
            } else {
                acked.without_id += 1;
            }
        }
        i += 16;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_in_durable_mode_loses_no_acknowledged_event() {
    let camps = campaigns(3, 2);
    let db_url = fresh_database().await;
    prepare_database(&db_url, &camps).await;
    let spool = temp_dir("durable");
    let durable = || {
        TestApp::builder()
            .database(db_url.clone())
            .unseeded()
            .spool_dir(&spool)
            .setting("ACK_MODE", "durable")
            // Long flushes: most acknowledged events are only in memory and
            // the journal when the process dies.
            .setting("FLUSH_INTERVAL_MS", 2000)
    };
    let mut service = durable().start_process().await;
    service
        .wait_health(Duration::from_secs(20), |h| h["database"] == "connected")
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|n| {
            tokio::spawn(client(
                service.base.clone(),
                camps.clone(),
                n,
                n % 2 == 0,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    service.kill9();
    stop.store(true, SeqCst);
    let mut acked = Acked::default();
    for c in clients {
        let one = c.await.expect("client");
        acked.ids.extend(one.ids);
        acked.without_id += one.without_id;
        acked.sent += one.sent;
    }
    assert!(
        acked.ids.len() > 500 && acked.without_id > 500,
        "the load ran: {} with ids, {} without",
        acked.ids.len(),
        acked.without_id
    );
    let journal_dir = spool.join("journal");
    let left = std::fs::read_dir(&journal_dir)
        .expect("journal dir")
        .count();
    assert!(left > 0, "the killed process left its journal");

    // The next start reads the journal back and delivers it.
    let mut service = durable().start_process().await;
    let h = service
        .wait_health(Duration::from_secs(30), |h| {
            let recovered = h["journal"]["recovered_events"].as_u64().unwrap_or(0);
            let settled = h["pipeline"]["written"].as_u64().unwrap_or(0)
                + h["event_ids"]["repeated_in_database"].as_u64().unwrap_or(0);
            recovered > 0 && settled >= recovered && h["spool"]["bytes"] == 0
        })
        .await;
    assert!(h["journal"]["recovered_events"].as_u64() > Some(0), "{h}");
    assert_eq!(service.sigterm(), Some(0), "{}", service.logs());
    let leftover: Vec<_> = std::fs::read_dir(&journal_dir)
        .expect("journal dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        leftover.is_empty(),
        "a clean stop settles the journal: {leftover:?}"
    );

    let db = connect(&db_url).await;
    let stored: HashSet<Uuid> = db
        .query("SELECT event_id FROM events", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get::<_, Uuid>(0))
        .collect();
    let rows = count(&db, "events").await;
    assert_eq!(rows as usize, stored.len(), "no event stored twice");
    let lost: Vec<&Uuid> = acked.ids.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let client_ids: HashSet<&Uuid> = acked.ids.iter().collect();
    let server_ids = stored.iter().filter(|id| !client_ids.contains(id)).count() as u64;
    assert!(
        server_ids >= acked.without_id,
        "every acknowledged event without an id is stored: {server_ids} rows for {} acknowledged",
        acked.without_id
    );
    assert!(
        rows as u64 <= acked.sent,
        "{rows} rows for {} sent",
        acked.sent
    );
    println!(
        "durable kill -9: {} + {} acknowledged, {rows} rows, 0 lost, 0 doubled",
        acked.ids.len(),
        acked.without_id
    );
    assert_eq!(aggregate_drift(&db).await, 0);
    assert_verified(&db_url);
}

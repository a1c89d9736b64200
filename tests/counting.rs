//! Counting rules, checked the way an auditor would: real pixel requests
//! carrying the agent or header that makes them invalid traffic; the rows in
//! `events` keep the reason, `metrics_hourly` bills only valid events and
//! counts the rest apart; duplicate clicks within the window count once; and
//! `ingest verify` / `ingest rebuild` prove and repair the totals.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use uuid::Uuid;

const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

/// One pixel request as a client sends it: `ua` None sends no User-Agent.
async fn send(
    app: &TestApp,
    kind: &str,
    query: &str,
    ua: Option<&str>,
    headers: &[(&str, &str)],
) -> u16 {
    // reqwest sends no User-Agent of its own.
    let mut req = reqwest::Client::new().post(app.url(&format!("/event/{kind}?{query}")));
    if let Some(ua) = ua {
        req = req.header("User-Agent", ua);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("request").status().as_u16()
}

/// `event_query` with its own creative.
fn query_with_creative(campaign: Uuid, creative: Uuid) -> String {
    format!(
        "ad_unit_id={AD_UNIT}&campaign_id={campaign}&creative_id={creative}&page_url=https%3A%2F%2Fnews.example.com%2F"
    )
}

/// (event_type, invalid_reason or "valid", rows), sorted.
async fn stored_reasons(db: &tokio_postgres::Client) -> Vec<(String, String, i64)> {
    db.query(
        "SELECT event_type, coalesce(invalid_reason, 'valid'), count(*)
           FROM events GROUP BY 1, 2 ORDER BY 1, 2",
        &[],
    )
    .await
    .expect("reasons")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Sums of (impressions, clicks, invalid_impressions, invalid_clicks).
async fn billed(db: &tokio_postgres::Client) -> (i64, i64, i64, i64) {
    db.query_one(
        "SELECT coalesce(sum(impressions), 0)::int8, coalesce(sum(clicks), 0)::int8,
                coalesce(sum(invalid_impressions), 0)::int8, coalesce(sum(invalid_clicks), 0)::int8
           FROM metrics_hourly",
        &[],
    )
    .await
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .expect("sums")
}

fn rows(v: &[(&str, &str, i64)]) -> Vec<(String, String, i64)> {
    v.iter()
        .map(|(a, b, n)| (a.to_string(), b.to_string(), *n))
        .collect()
}

/// Runs the binary with `args` against `db_url`; (exit code, stdout + stderr).
fn ingest(args: &[&str], db_url: &str, env: &[(&str, &str)]) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("LOG_LEVEL", "error")
        .envs(env.iter().copied())
        .output()
        .expect("run ingest");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// "YYYY-MM-DD HH:00" (UTC) `hours` from now.
fn hour_from_now(hours: i64) -> String {
    let t = if hours >= 0 {
        SystemTime::now() + Duration::from_secs(hours as u64 * 3600)
    } else {
        SystemTime::now() - Duration::from_secs((-hours) as u64 * 3600)
    };
    let s = humantime::format_rfc3339(t).to_string();
    format!("{} {}:00", &s[..10], &s[11..13])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_reason_is_stored_flagged_and_kept_out_of_billed_counts() {
    let camps = campaigns(1, 1);
    let dir = temp_dir("ivt");
    std::fs::create_dir_all(&dir).expect("dir");
    let exclude = dir.join("exclude.txt");
    std::fs::write(
        &exclude,
        "# data-center ranges\n203.0.113.0/24\n2001:db8::/32\n",
    )
    .expect("write exclude file");
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("IP_EXCLUDE_FILE", exclude.display())
        .setting("TRUSTED_PROXIES", "127.0.0.1/32")
        .start()
        .await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    let chrome = Some(BROWSER_UA);
    let mut statuses = Vec::new();
    // Valid: a browser, including one behind the trusted proxy whose
    // spoofed left-most X-Forwarded-For entry is in the excluded range.
    statuses.push(send(&app, "impression", &q, chrome, &[]).await);
    statuses.push(send(&app, "impression", &q, chrome, &[]).await);
    statuses.push(send(&app, "impression", &q, chrome, &[]).await);
    statuses.push(
        send(
            &app,
            "impression",
            &q,
            chrome,
            &[("X-Forwarded-For", "203.0.113.50, 198.51.100.1")],
        )
        .await,
    );
    // no_user_agent: missing, and empty.
    statuses.push(send(&app, "impression", &q, None, &[]).await);
    statuses.push(send(&app, "impression", &q, Some(""), &[]).await);
    // bot_ua: a crawler and two HTTP libraries.
    for bot in [GOOGLEBOT, "curl/8.5.0", "python-requests/2.31.0"] {
        statuses.push(send(&app, "impression", &q, Some(bot), &[]).await);
    }
    // prefetch: each header browsers use for it.
    for h in [
        ("Sec-Purpose", "prefetch;prerender"),
        ("Purpose", "prefetch"),
        ("X-Moz", "prefetch"),
        ("X-Purpose", "preview"),
    ] {
        statuses.push(send(&app, "impression", &q, chrome, &[h]).await);
    }
    // ip_excluded: the client address the trusted proxy reports.
    statuses.push(
        send(
            &app,
            "impression",
            &q,
            chrome,
            &[("X-Forwarded-For", "203.0.113.50")],
        )
        .await,
    );
    // Clicks: the same one three times (billed once), and a bot's.
    for _ in 0..3 {
        statuses.push(send(&app, "click", &q, chrome, &[]).await);
    }
    statuses.push(send(&app, "click", &q, Some(GOOGLEBOT), &[]).await);
    // Invalid traffic gets the same answer as valid traffic: a bot cannot
    // learn that it was spotted.
    assert!(statuses.iter().all(|s| *s == 204), "{statuses:?}");

    let h = app.health().await.expect("health");
    let ivt = &h["invalid_traffic"];
    assert_eq!(
        (
            &ivt["no_user_agent"],
            &ivt["bot_ua"],
            &ivt["prefetch"],
            &ivt["ip_excluded"],
            &ivt["duplicate_click"]
        ),
        (&2.into(), &4.into(), &4.into(), &1.into(), &2.into()),
        "{h}"
    );
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    for line in [
        "ingest_events_invalid_total{reason=\"no_user_agent\"} 2",
        "ingest_events_invalid_total{reason=\"bot_ua\"} 4",
        "ingest_events_invalid_total{reason=\"prefetch\"} 4",
        "ingest_events_invalid_total{reason=\"ip_excluded\"} 1",
        "ingest_events_invalid_total{reason=\"duplicate_click\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    let db_url = app.db_url.clone();
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, 18);
    assert_eq!(
        stored_reasons(&db).await,
        rows(&[
            ("click", "bot_ua", 1),
            ("click", "duplicate_click", 2),
            ("click", "valid", 1),
            ("impression", "bot_ua", 3),
            ("impression", "ip_excluded", 1),
            ("impression", "no_user_agent", 2),
            ("impression", "prefetch", 4),
            ("impression", "valid", 4),
        ])
    );
    // Net (billed) = valid only; gross = net + invalid = every event.
    assert_eq!(billed(&db).await, (4, 1, 10, 3));
    assert_verified(&db_url);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_again_within_the_window_counts_once_and_the_first_after_it_counts() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("CLICK_DEDUP_WINDOW_S", 1)
        .start()
        .await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    let ua = Some(BROWSER_UA);
    let first = std::time::Instant::now();
    assert_eq!(send(&app, "click", &q, ua, &[]).await, 204);
    assert_eq!(send(&app, "click", &q, ua, &[]).await, 204);
    // Another creative, another agent: other clicks, not duplicates.
    let other = query_with_creative(camps[0].id, Uuid::new_v4());
    assert_eq!(send(&app, "click", &other, ua, &[]).await, 204);
    assert_eq!(
        send(
            &app,
            "click",
            &q,
            Some("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"),
            &[]
        )
        .await,
        204
    );
    assert!(
        first.elapsed() < Duration::from_millis(900),
        "the machine is too slow for a 1 s window: {:?}",
        first.elapsed()
    );
    // The window has passed since the first click: the next one counts,
    // and opens a window of its own.
    tokio::time::sleep(Duration::from_millis(1_050).saturating_sub(first.elapsed())).await;
    assert_eq!(send(&app, "click", &q, ua, &[]).await, 204);
    assert_eq!(send(&app, "click", &q, ua, &[]).await, 204);
    let (_, db) = app.shutdown().await;
    assert_eq!(
        stored_reasons(&db).await,
        rows(&[("click", "duplicate_click", 2), ("click", "valid", 4)])
    );
    assert_eq!(billed(&db).await, (0, 4, 0, 2));
    // The two valid clicks of the first key are at least the window apart.
    let gap: f64 = db
        .query_one(
            "SELECT extract(epoch FROM max(timestamp) - min(timestamp))::float8 FROM events
              WHERE invalid_reason IS NULL AND creative_id = $1::uuid AND user_agent = $2",
            &[&CREATIVE.parse::<Uuid>().expect("uuid"), &BROWSER_UA],
        )
        .await
        .expect("gap")
        .get(0);
    assert!(gap >= 1.0, "{gap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_click_table_stays_under_its_cap_and_never_refuses_a_first_click() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("CLICK_DEDUP_MAX", 32)
        .start()
        .await;
    let ua = Some(BROWSER_UA);
    let mut last = String::new();
    for _ in 0..300 {
        last = query_with_creative(camps[0].id, Uuid::new_v4());
        assert_eq!(send(&app, "click", &last, ua, &[]).await, 204);
    }
    let h = app.health().await.expect("health");
    let tracked = h["invalid_traffic"]["clicks_tracked"]
        .as_u64()
        .expect("tracked");
    assert!(tracked <= 32, "{h}");
    assert!(
        h["invalid_traffic"]["click_dedup_evictions"].as_u64() > Some(0),
        "{h}"
    );
    // The most recent click is always remembered.
    assert_eq!(send(&app, "click", &last, ua, &[]).await, 204);
    let (_, db) = app.shutdown().await;
    assert_eq!(billed(&db).await, (0, 300, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ivt_filter_off_counts_like_the_node_service_and_still_keeps_the_reasons() {
    let camps = campaigns(1, 1);
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("IVT_FILTER", "off")
        .start()
        .await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    for (kind, ua) in [
        ("impression", Some(BROWSER_UA)),
        ("impression", Some(GOOGLEBOT)),
        ("impression", None),
        ("click", Some(BROWSER_UA)),
        ("click", Some(BROWSER_UA)),
    ] {
        assert_eq!(send(&app, kind, &q, ua, &[]).await, 204);
    }
    let db_url = app.db_url.clone();
    let (_, db) = app.shutdown().await;
    assert_eq!(
        stored_reasons(&db).await,
        rows(&[
            ("click", "duplicate_click", 1),
            ("click", "valid", 1),
            ("impression", "bot_ua", 1),
            ("impression", "no_user_agent", 1),
            ("impression", "valid", 1),
        ])
    );
    assert_eq!(billed(&db).await, (3, 2, 0, 0));
    // verify counts the way the service was told to.
    let (code, out) = ingest(&["verify"], &db_url, &[("IVT_FILTER", "off")]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = ingest(&["verify"], &db_url, &[]);
    assert_eq!(
        code, 1,
        "counted with the filter on, the totals differ: {out}"
    );
    assert!(out.contains("1 DIFFER"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_ua_file_replaces_the_built_in_list_and_a_bad_one_stops_the_start() {
    let camps = campaigns(1, 1);
    let dir = temp_dir("bots");
    std::fs::create_dir_all(&dir).expect("dir");
    let list = dir.join("bots.txt");
    std::fs::write(&list, "acme-uptime\n\n^internal-probe/\n").expect("write list");
    let app = TestApp::builder()
        .campaigns(&camps)
        .setting("BOT_UA_FILE", list.display())
        .start()
        .await;
    let q = event_query(camps[0].id, AD_UNIT, None);
    for ua in [
        "Acme-Uptime/2.0 (+https://acme.example)",
        "internal-probe/1",
        GOOGLEBOT,
    ] {
        assert_eq!(send(&app, "impression", &q, Some(ua), &[]).await, 204);
    }
    let (_, db) = app.shutdown().await;
    assert_eq!(
        stored_reasons(&db).await,
        rows(&[("impression", "bot_ua", 2), ("impression", "valid", 1)]),
        "the file replaces the list: Googlebot is no longer in it"
    );

    std::fs::write(&list, "fine\n(unclosed\n").expect("write bad list");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let (code, out) = ingest(
        &[],
        "postgres://127.0.0.1:1/none",
        &[
            ("BOT_UA_FILE", &list.display().to_string()),
            ("HOST", "127.0.0.1"),
            ("PORT", &port),
        ],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("BOT_UA_FILE: pattern 2 (\"(unclosed\")"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_damaged_row_and_rebuild_mends_it_while_ingest_runs() {
    let camps = campaigns(4, 2);
    let app = TestApp::builder().campaigns(&camps).start().await;
    let db_url = app.db_url.clone();
    let (from, to) = (hour_from_now(-2), hour_from_now(2));

    // Traffic with duplicate clicks in it, then a consistent database.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(Load::run(app.url(""), camps.clone(), 4, stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (code, out) = ingest(&["verify", "--from", &from, "--to", &to], &db_url, &[]);
    assert_eq!(code, 0, "verify while ingest runs: {out}");
    assert!(out.contains("every key matches"), "{out}");

    // Damage: a count changed, a row deleted, a row that events do not back.
    app.db
        .batch_execute(&format!(
            "UPDATE metrics_hourly SET impressions = impressions + 5
              WHERE id = (SELECT min(id) FROM metrics_hourly WHERE campaign_id = '{c0}');
             DELETE FROM metrics_hourly WHERE campaign_id = '{c1}';
             INSERT INTO metrics_hourly (account_id, ad_unit_id, campaign_id, hour_timestamp, impressions)
             VALUES ('{a}', '{AD_UNIT}', '{phantom}', date_trunc('hour', now() AT TIME ZONE 'UTC'), 7)",
            c0 = camps[0].id,
            c1 = camps[1].id,
            a = camps[2].account,
            phantom = Uuid::new_v4(),
        ))
        .await
        .expect("damage");
    let (code, out) = ingest(&["verify", "--from", &from, "--to", &to], &db_url, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&camps[0].id.to_string()), "{out}");
    assert!(out.contains(&camps[1].id.to_string()), "{out}");
    assert!(out.contains("keys differ"), "{out}");

    // Rebuild while events keep arriving, twice over, then the load stops.
    for _ in 0..2 {
        let (code, out) = ingest(&["rebuild", "--from", &from, "--to", &to], &db_url, &[]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("rows corrected"), "{out}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, SeqCst);
    let sent = load.await.expect("load");
    let (report, db) = app.shutdown().await;
    assert_eq!(report.accepted, sent.acknowledged);
    assert_eq!(count(&db, "events").await as u64, sent.acknowledged);
    assert_verified(&db_url);
    let (i, k, ii, ik) = billed(&db).await;
    assert_eq!(
        (i + k + ii + ik) as u64,
        sent.acknowledged,
        "gross is every event; the phantom row's counts are zeroed"
    );
    assert!(ik > 0, "the load repeats clicks: some are duplicates");

    // Bad input gets a clear answer, not a stack trace.
    let (code, out) = ingest(&["verify", "--from", "last tuesday"], &db_url, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--from and --to take UTC timestamps"), "{out}");
    let (code, out) = ingest(&["rebuild", "--from", &from], &db_url, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--to"), "{out}");
}

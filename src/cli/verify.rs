//! `ingest verify [--from T] [--to T]` and `ingest rebuild --from T --to T`:
//! the billed totals, proven against the raw events, and repaired from them.
//!
//! `verify` recomputes, from `events`, the net and invalid counts of every
//! (account, ad unit, campaign, hour) in the range and compares them with
//! `metrics_hourly`, one hour at a time, each in a REPEATABLE READ
//! transaction (the events and the aggregates of one snapshot: a batch
//! commits its rows and its aggregates together, so a consistent database
//! matches exactly, while ingest runs). It prints one line per hour and the
//! first differing keys, and exits 0 only when every key matches. Counting
//! follows `IVT_FILTER` (on: invalid events in the invalid columns; off: all
//! in the net ones), as the service does; a range written under both settings
//! will not match.
//!
//! `rebuild` sets, hour by hour, each key's four counts to what `events`
//! says (other columns, such as `requests` and `revenue_cents`, are left
//! alone). Each hour is one transaction that first takes a SHARE ROW
//! EXCLUSIVE lock on `metrics_hourly`: writers' upserts wait for it (for the
//! milliseconds one hour takes), a batch that committed before it is in the
//! recount, and a batch still open commits its events and adds its counts
//! after it. That is also how the open hour is handled: it is rebuilt like
//! any other and stays exact as ingest goes on.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::SystemTime;

use crate::config::Config;
use crate::db::{self, Conn, DbError};

/// How many differing keys are printed per hour.
const SHOWN: usize = 10;

const RECOUNT: &str = "
WITH e AS (
    SELECT account_id a, ad_unit_id u, campaign_id c,
           count(*) FILTER (WHERE event_type = 'impression' AND NOT inv) i,
           count(*) FILTER (WHERE event_type = 'click' AND NOT inv) k,
           count(*) FILTER (WHERE event_type = 'impression' AND inv) ii,
           count(*) FILTER (WHERE event_type = 'click' AND inv) ik
      FROM (SELECT account_id, ad_unit_id, campaign_id, event_type,
                   (invalid_reason IS NOT NULL AND $2) AS inv
              FROM events WHERE timestamp >= $1 AND timestamp < $1 + interval '1 hour') x
     GROUP BY 1, 2, 3),
m AS (
    SELECT account_id a, ad_unit_id u, campaign_id c,
           coalesce(impressions, 0)::int8 i, coalesce(clicks, 0)::int8 k,
           coalesce(invalid_impressions, 0)::int8 ii, coalesce(invalid_clicks, 0)::int8 ik
      FROM metrics_hourly WHERE hour_timestamp = $1)
SELECT coalesce(e.a, m.a), coalesce(e.u, m.u), coalesce(e.c, m.c),
       coalesce(e.i, 0), coalesce(e.k, 0), coalesce(e.ii, 0), coalesce(e.ik, 0),
       coalesce(m.i, 0), coalesce(m.k, 0), coalesce(m.ii, 0), coalesce(m.ik, 0)
  FROM e FULL JOIN m ON (e.a, e.u, e.c) = (m.a, m.u, m.c)";

/// One key's counts: from `events`, and in `metrics_hourly`.
struct Key {
    account: uuid::Uuid,
    ad_unit: Option<uuid::Uuid>,
    campaign: Option<uuid::Uuid>,
    events: [i64; 4],
    stored: [i64; 4],
}

impl Key {
    fn from_row(r: &tokio_postgres::Row) -> Key {
        Key {
            account: r.get(0),
            ad_unit: r.get(1),
            campaign: r.get(2),
            events: [r.get(3), r.get(4), r.get(5), r.get(6)],
            stored: [r.get(7), r.get(8), r.get(9), r.get(10)],
        }
    }
}

async fn recount(
    client: &tokio_postgres::Client,
    hour: SystemTime,
    filter: bool,
) -> Result<Vec<Key>, tokio_postgres::Error> {
    Ok(client
        .query(RECOUNT, &[&hour, &filter])
        .await?
        .iter()
        .map(Key::from_row)
        .collect())
}

const HOURS: &str = "
SELECT h FROM generate_series(
    date_trunc('hour', coalesce($1::text::timestamp,
        least((SELECT min(hour_timestamp) FROM metrics_hourly), (SELECT min(timestamp) FROM events)),
        now() AT TIME ZONE 'UTC')),
    date_trunc('hour', coalesce($2::text::timestamp, (now() AT TIME ZONE 'UTC') + interval '2 hours'))
        - interval '1 microsecond',
    interval '1 hour') AS g(h)";

/// The hours from `from` to `to` (defaults: the first hour in
/// `metrics_hourly` or `events`, and two hours from now); `Err((exit code, message))`.
async fn hours(
    conn: &Conn,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Vec<SystemTime>, (u8, String)> {
    match conn.query(HOURS, &[&from, &to]).await {
        Ok(rows) => Ok(rows.iter().map(|r| r.get(0)).collect()),
        // Class 22 (data exception): the text is not a timestamp.
        Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => Err((
            2,
            format!(
                "--from and --to take UTC timestamps such as 2026-12-04 or \"2026-12-04 13:00\" ({})",
                db::describe(&e)
            ),
        )),
        Err(e) => Err((1, format!("cannot list the hours: {}", db::describe(&e)))),
    }
}

fn hour_text(h: SystemTime) -> String {
    humantime::format_rfc3339(h).to_string()[..16].replace('T', " ")
}

fn show(id: Option<uuid::Uuid>) -> String {
    id.map_or_else(|| "-".into(), |u| u.to_string())
}

/// `ingest verify`.
pub async fn verify(config: &Config, from: Option<&str>, to: Option<&str>) -> ExitCode {
    let pool = match db::pool(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut conn = match Conn::get(&pool).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let hours = match hours(&conn, from, to).await {
        Ok(h) => h,
        Err((code, e)) => {
            eprintln!("{e}");
            return ExitCode::from(code);
        }
    };
    let tty = std::io::stdout().is_terminal();
    let (mut keys, mut differ, mut bad_hours) = (0usize, 0usize, 0usize);
    for (n, &hour) in hours.iter().enumerate() {
        if tty {
            print!("\r{}/{} hours checked", n, hours.len());
            let _ = std::io::stdout().flush();
        }
        let counted = async {
            let tx = conn
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let rows = tx.query(RECOUNT, &[&hour, &config.ivt_filter]).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(rows)
        }
        .await;
        let rows = match counted {
            Ok(rows) => rows,
            Err(e) => {
                eprintln!(
                    "\nverify failed at hour {}: {}",
                    hour_text(hour),
                    db::describe(&e)
                );
                return ExitCode::FAILURE;
            }
        };
        if rows.is_empty() {
            continue;
        }
        let hour_keys: Vec<Key> = rows.iter().map(Key::from_row).collect();
        let wrong: Vec<&Key> = hour_keys.iter().filter(|k| k.events != k.stored).collect();
        keys += hour_keys.len();
        differ += wrong.len();
        if tty {
            print!("\r");
        }
        println!(
            "{}  {} keys  {}",
            hour_text(hour),
            hour_keys.len(),
            if wrong.is_empty() {
                "match".to_string()
            } else {
                format!("{} DIFFER", wrong.len())
            }
        );
        if !wrong.is_empty() {
            bad_hours += 1;
            for k in wrong.iter().take(SHOWN) {
                println!(
                    "    account {} ad_unit {} campaign {}: events say impressions={} clicks={} invalid_impressions={} invalid_clicks={}; metrics_hourly has {} {} {} {}",
                    k.account,
                    show(k.ad_unit),
                    show(k.campaign),
                    k.events[0], k.events[1], k.events[2], k.events[3],
                    k.stored[0], k.stored[1], k.stored[2], k.stored[3]
                );
            }
        }
    }
    conn.release();
    println!(
        "verified {} hours, {keys} keys: {}",
        hours.len(),
        if differ == 0 {
            "every key matches".to_string()
        } else {
            format!("{differ} keys differ in {bad_hours} hours (ingest rebuild --from … --to … repairs them)")
        }
    );
    if differ == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `ingest rebuild`.
pub async fn rebuild(config: &Config, from: &str, to: &str) -> ExitCode {
    let pool = match db::pool(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let conn = match Conn::get(&pool).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let hours = match hours(&conn, Some(from), Some(to)).await {
        Ok(h) => h,
        Err((code, e)) => {
            eprintln!("{e}");
            return ExitCode::from(code);
        }
    };
    let tty = std::io::stdout().is_terminal();
    let (mut changed, mut keys) = (0u64, 0u64);
    for (n, &hour) in hours.iter().enumerate() {
        if tty {
            print!("\r{}/{} hours rebuilt", n, hours.len());
            let _ = std::io::stdout().flush();
        }
        match rebuild_hour(&conn, hour, config.ivt_filter).await {
            Ok((k, c)) => {
                keys += k;
                changed += c;
                if c > 0 {
                    if tty {
                        print!("\r");
                    }
                    println!("{}  {k} keys, {c} rows corrected", hour_text(hour));
                }
            }
            Err(e) => {
                eprintln!(
                    "\nrebuild failed at hour {}: {e} (earlier hours are done)",
                    hour_text(hour)
                );
                return ExitCode::FAILURE;
            }
        }
    }
    conn.release();
    if tty {
        println!();
    }
    println!(
        "rebuilt {} hours, {keys} keys: {changed} rows corrected",
        hours.len()
    );
    ExitCode::SUCCESS
}

/// One hour, in one transaction; (keys, rows changed).
async fn rebuild_hour(conn: &Conn, hour: SystemTime, filter: bool) -> Result<(u64, u64), DbError> {
    conn.batch_execute("BEGIN; LOCK TABLE metrics_hourly IN SHARE ROW EXCLUSIVE MODE")
        .await?;
    let result = async {
        let keys = recount(conn, hour, filter).await?;
        let mut changed = 0u64;
        for k in keys.iter().filter(|k| k.events != k.stored) {
            changed += conn
                .execute(
                    "INSERT INTO metrics_hourly AS m (account_id, ad_unit_id, campaign_id, hour_timestamp, \
                         impressions, clicks, invalid_impressions, invalid_clicks) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (account_id, ad_unit_id, campaign_id, hour_timestamp) DO UPDATE \
                        SET impressions = EXCLUDED.impressions, clicks = EXCLUDED.clicks, \
                            invalid_impressions = EXCLUDED.invalid_impressions, \
                            invalid_clicks = EXCLUDED.invalid_clicks, updated_at = now()",
                    &[
                        &k.account,
                        &k.ad_unit,
                        &k.campaign,
                        &hour,
                        &(k.events[0] as i32),
                        &(k.events[1] as i32),
                        &(k.events[2] as i32),
                        &(k.events[3] as i32),
                    ],
                )
                .await?;
        }
        Ok::<_, DbError>((keys.len() as u64, changed))
    }
    .await;
    match result {
        Ok(r) => {
            conn.batch_execute("COMMIT").await?;
            Ok(r)
        }
        Err(e) => {
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

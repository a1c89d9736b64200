//! `ingest migrate --partition-events [--dry-run]`: converts a live,
//! unpartitioned `events` (the Node service's layout) into the partitioned
//! one, without copying a row and without stopping ingest for more than an
//! instant.
//!
//! The old table becomes the partition for everything before a cutover T
//! (the start of the first interval past the accepted future window), and new
//! partitions take T onwards. Attaching it must not scan it or build an index
//! under an exclusive lock, so both are prepared beforehand, while writes go
//! on:
//!
//! | step | statement | lock on `events` | writers |
//! |---|---|---|---|
//! | 1 | `ADD CONSTRAINT … CHECK (timestamp < T) NOT VALID` | ACCESS EXCLUSIVE, an instant | wait an instant |
//! | 2 | `VALIDATE CONSTRAINT` (reads the table) | SHARE UPDATE EXCLUSIVE | go on |
//! | 3 | `CREATE UNIQUE INDEX CONCURRENTLY (account_id, timestamp, id)` | SHARE UPDATE EXCLUSIVE | go on |
//! | 4 | the new partitioned table, its partitions from T, a DEFAULT | none | go on |
//! | 5 | rename both, move the id sequence, `ATTACH … FROM (MINVALUE) TO (T)` | ACCESS EXCLUSIVE, an instant | wait an instant |
//!
//! Steps 1 and 5 run with a `lock_timeout` and are retried, so the command
//! never queues writers behind a long wait. The same `SELECT … FROM events`
//! counts old and new rows alike. Views on `events` keep pointing at the old
//! table (now `events_legacy`): the plan lists them, to be recreated.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::db::{self, Conn, DbError};

const LOCK_TIMEOUT: &str = "3s";
const ATTEMPTS: u32 = 20;

/// Progress on a terminal; plain lines otherwise.
struct Progress {
    tty: bool,
    started: Instant,
}

impl Progress {
    fn step(&self, n: usize, what: &str) {
        println!("[{n}/5] {what}");
    }

    fn tick(&self, what: &str) {
        if self.tty {
            print!(
                "\r      {what} ({:.0} s)   ",
                self.started.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
        }
    }

    fn done(&self, took: Duration) {
        if self.tty {
            println!();
        }
        println!("      done in {:.2} s", took.as_secs_f64());
    }
}

/// What the conversion found and did.
#[derive(Debug, Default)]
struct Summary {
    rows_estimate: i64,
    cutover: String,
    steps: Vec<(&'static str, Duration)>,
    longest_exclusive: Duration,
}

pub async fn run(config: &Config, dry_run: bool) -> ExitCode {
    match convert(config, dry_run).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("partition conversion failed: {e}");
            eprintln!("nothing is lost: every step is its own transaction or CONCURRENTLY; run the command again to continue");
            ExitCode::FAILURE
        }
    }
}

async fn convert(config: &Config, dry_run: bool) -> Result<ExitCode, DbError> {
    let pool = db::pool(config)?;
    db::within(
        config.db_migration_timeout,
        "migrations",
        db::migrate(&pool),
    )
    .await?;
    let conn = Conn::get(&pool).await?;
    let kind: Option<String> = conn
        .query_one(
            "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('events'))",
            &[],
        )
        .await?
        .get(0);
    match kind.as_deref() {
        Some("p") => {
            println!("events is already partitioned; nothing to do");
            return Ok(ExitCode::SUCCESS);
        }
        Some("r") => {}
        _ => {
            eprintln!("there is no table events to convert");
            return Ok(ExitCode::FAILURE);
        }
    }
    let unit = config.partition_interval.unit();
    let future_s = config.max_future.as_secs_f64();
    let row = conn
        .query_one(
            &format!(
                "SELECT to_char(date_trunc('{unit}', (now() AT TIME ZONE 'UTC') + make_interval(secs => $1)) + interval '1 {unit}', \
                                'YYYY-MM-DD HH24:MI:SS'), \
                        (SELECT reltuples::int8 FROM pg_class WHERE oid = 'events'::regclass), \
                        coalesce((SELECT string_agg(DISTINCT v.oid::regclass::text, ', ') \
                                    FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid \
                                    JOIN pg_class v ON v.oid = r.ev_class \
                                   WHERE d.refobjid = 'events'::regclass AND v.oid <> 'events'::regclass), '')"
            ),
            &[&future_s],
        )
        .await?;
    let mut summary = Summary {
        cutover: row.get(0),
        rows_estimate: row.get(1),
        ..Summary::default()
    };
    let views: String = row.get(2);
    let t = summary.cutover.clone();
    let size = match summary.rows_estimate {
        n if n > 0 => format!("about {n} rows (planner estimate)"),
        _ => "unknown size (not analyzed yet)".to_string(),
    };
    println!(
        "events: a plain table of {size}. The old rows stay where they are: the table becomes the partition events_legacy for timestamps before {t}; partitions of one {unit} take over from {t}."
    );
    let plan = [
        ("add CHECK (timestamp < cutover) NOT VALID", "ACCESS EXCLUSIVE on events for an instant (lock_timeout 3 s, retried)"),
        ("validate the CHECK (reads every row)", "SHARE UPDATE EXCLUSIVE on events: writes go on"),
        ("CREATE UNIQUE INDEX CONCURRENTLY (account_id, timestamp, id)", "SHARE UPDATE EXCLUSIVE on events: writes go on"),
        ("create the partitioned table, its partitions and a DEFAULT", "none on events"),
        ("rename, make the new index the primary key, move the id sequence, ATTACH events_legacy (no scan, no index build)", "ACCESS EXCLUSIVE on events for an instant (lock_timeout 3 s, retried)"),
    ];
    for (i, (what, lock)) in plan.iter().enumerate() {
        println!("  {}. {what}\n     locks: {lock}", i + 1);
    }
    if !views.is_empty() {
        println!(
            "  views on events, which will keep reading events_legacy until recreated: {views}"
        );
    }
    if dry_run {
        println!("dry run: nothing was changed");
        conn.release();
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress {
        tty: std::io::stdout().is_terminal(),
        started: Instant::now(),
    };
    let total = Instant::now();

    progress.step(1, plan[0].0);
    let took = exclusive(
        &conn,
        &format!(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'events'::regclass AND conname = 'events_legacy_bound') THEN \
                 ALTER TABLE events ADD CONSTRAINT events_legacy_bound CHECK (timestamp < '{t}') NOT VALID; \
               END IF; END $$"
        ),
    )
    .await?;
    summary.longest_exclusive = summary.longest_exclusive.max(took);
    summary.steps.push(("add CHECK NOT VALID", took));
    progress.done(took);

    progress.step(2, plan[1].0);
    let took = with_ticks(
        &progress,
        "validating",
        conn.batch_execute("ALTER TABLE events VALIDATE CONSTRAINT events_legacy_bound"),
    )
    .await?;
    summary.steps.push(("validate CHECK", took));
    progress.done(took);

    progress.step(3, plan[2].0);
    let took = with_ticks(
        &progress,
        "building the index",
        conn.batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS events_legacy_key ON events (account_id, timestamp, id)",
        ),
    )
    .await?;
    summary.steps.push(("unique index, concurrently", took));
    progress.done(took);

    progress.step(4, plan[3].0);
    let started = Instant::now();
    conn.batch_execute(
        "BEGIN; \
         DROP TABLE IF EXISTS events_partitioned; \
         CREATE TABLE events_partitioned (LIKE events INCLUDING DEFAULTS INCLUDING STORAGE, \
             PRIMARY KEY (account_id, timestamp, id)) PARTITION BY RANGE (timestamp); \
         CREATE TABLE events_partitioned_default PARTITION OF events_partitioned DEFAULT; \
         COMMIT",
    )
    .await?;
    for i in 0..config.partition_premake.max(1) {
        conn.batch_execute(&format!(
            "DO $$ DECLARE lo timestamp := '{t}'::timestamp + {i} * interval '1 {unit}'; BEGIN \
               EXECUTE format('CREATE TABLE %I PARTITION OF events_partitioned FOR VALUES FROM (%L) TO (%L)', \
                   'events_p' || to_char(lo, 'YYYYMMDD'), lo, lo + interval '1 {unit}'); END $$"
        ))
        .await?;
    }
    let took = started.elapsed();
    summary.steps.push(("new partitioned table", took));
    progress.done(took);

    progress.step(5, plan[4].0);
    let took = exclusive(
        &conn,
        &format!(
            "LOCK TABLE events IN ACCESS EXCLUSIVE MODE; \
             ALTER TABLE events RENAME TO events_legacy; \
             ALTER TABLE events_legacy DROP CONSTRAINT IF EXISTS events_pkey; \
             ALTER TABLE events_legacy ADD CONSTRAINT events_legacy_pkey PRIMARY KEY USING INDEX events_legacy_key; \
             ALTER TABLE events_partitioned RENAME TO events; \
             ALTER TABLE events_partitioned_default RENAME TO events_default; \
             ALTER SEQUENCE events_id_seq OWNED BY events.id; \
             ALTER TABLE events ATTACH PARTITION events_legacy FOR VALUES FROM (MINVALUE) TO ('{t}')"
        ),
    )
    .await?;
    summary.longest_exclusive = summary.longest_exclusive.max(took);
    summary.steps.push(("swap and attach", took));
    progress.done(took);
    conn.release();

    println!("summary:");
    for (what, took) in &summary.steps {
        println!("  {what:<28} {:>8.3} s", took.as_secs_f64());
    }
    println!(
        "  events is partitioned: events_legacy holds the old rows (timestamps before {}), new partitions from then on",
        summary.cutover
    );
    println!(
        "  longest exclusive lock on events: {:.1} ms; total {:.1} s",
        summary.longest_exclusive.as_secs_f64() * 1000.0,
        total.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `sql` in a transaction with a short `lock_timeout`, retrying while
/// the lock is not granted; returns how long the successful attempt took
/// (the time the lock was held, or waited for and then held).
async fn exclusive(conn: &Conn, sql: &str) -> Result<Duration, DbError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let started = Instant::now();
        let r = conn
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {sql}; COMMIT"
            ))
            .await;
        match r {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) => {
                let _ = conn.batch_execute("ROLLBACK").await;
                let lock_timeout = e.code().is_some_and(|c| c.code() == "55P03");
                if !lock_timeout || attempt >= ATTEMPTS {
                    return Err(e.into());
                }
                println!(
                    "      lock not granted within {LOCK_TIMEOUT}; retrying ({attempt}/{ATTEMPTS})"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Awaits `f`, printing elapsed time on a terminal every second.
async fn with_ticks(
    progress: &Progress,
    what: &str,
    f: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> Result<Duration, DbError> {
    let started = Instant::now();
    tokio::pin!(f);
    loop {
        tokio::select! {
            r = &mut f => return r.map(|_| started.elapsed()).map_err(Into::into),
            _ = tokio::time::sleep(Duration::from_secs(1)) => progress.tick(what),
        }
    }
}

//! Typed settings, read once from the environment at start.
//!
//! Every setting is declared once, in [`SETTINGS`]: its variable, default,
//! form and one-line meaning. Parsing, the defaults, `ingest --help` and the
//! README's settings table all come from that list (a test compares the
//! README with it). Names and defaults follow the Node service's README
//! (`PORT`, `DATABASE_URL`, `NODE_ENV`, `ALLOWED_ORIGINS`, pool 30 / idle
//! 30 s / connect 2 s, flush every 5 s). A value that does not parse stops
//! the process with a message naming the variable and the expected form;
//! nothing falls back silently. To add a setting: a field in [`Config`] and
//! one entry in [`SETTINGS`].

use std::fmt;
use std::time::Duration;

/// Which origins get CORS headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: every origin may read responses.
    Any,
    /// An explicit list of origins such as `https://shop.example.com`.
    List(Vec<String>),
}

impl AllowedOrigins {
    pub fn parse(s: &str) -> AllowedOrigins {
        let items: Vec<String> = s
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        if items.is_empty() || items.iter().any(|o| o == "*") {
            AllowedOrigins::Any
        } else {
            AllowedOrigins::List(items)
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request `Origin`, if allowed.
    pub fn allow<'a>(&self, origin: &'a str) -> Option<&'a str> {
        match self {
            AllowedOrigins::Any => Some("*"),
            AllowedOrigins::List(list) => list
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
                .then_some(origin),
        }
    }
}

/// A PostgreSQL URL whose password never reaches a log line: `Debug` and
/// `Display` show `user:***@`. [`DatabaseUrl::expose`] gives the real one to
/// the code that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", redact(&self.0))
    }
}

/// Every setting of the service.
#[derive(Clone, Debug)]
pub struct Config {
    pub port: u16,
    pub host: String,
    pub database_url: DatabaseUrl,
    /// JSON log lines (`NODE_ENV`/`APP_ENV` = `production`).
    pub production: bool,
    pub allowed_origins: AllowedOrigins,
    pub flush_interval: Duration,
    pub flush_max_events: usize,
    pub pool_max: usize,
    pub pool_idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// After the shutdown signal, keep serving this long with `/readyz` at 503
    /// so load balancers stop sending traffic before the listener closes.
    pub shutdown_grace: Duration,
    pub worker_threads: Option<usize>,
    pub writer_concurrency: usize,
    /// A batch write taking longer than this is abandoned and the batch spooled.
    pub write_timeout: Duration,
    /// The longest a live batch's COPY is spread over (0: not paced).
    pub write_pace_max: Duration,
    pub max_future: Duration,
    pub max_age: Duration,
    pub accounts_refresh: Duration,
    /// Where batches the database would not take are kept until it does.
    pub spool_dir: std::path::PathBuf,
    pub spool_max_bytes: u64,
    /// Memory caps for events not yet stored or spooled; past them the
    /// request side sheds load (POST 503, GET pixel dropped and counted).
    pub max_buffered_events: u64,
    pub max_buffered_bytes: u64,
    /// Open client connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A connection may wait this long for a complete request head, idle
    /// keep-alive included (slow-loris guard; cut at 1–1.5× this).
    pub header_read_timeout: Duration,
    /// A client must send a complete request body within this.
    pub body_read_timeout: Duration,
    /// Deadline for the probe, campaign lookups and cache reloads.
    pub db_query_timeout: Duration,
    /// Deadline for the migrations at start.
    pub db_migration_timeout: Duration,
    /// TCP keepalive idle time on database connections.
    pub db_keepalive_idle: Duration,
    /// `TCP_USER_TIMEOUT` on database connections.
    pub db_tcp_user_timeout: Duration,
    /// Rows per transaction at most; larger batches are written as several.
    pub batch_max_rows: usize,
    /// A second port for `/metrics`, `/livez`, `/readyz` (and `/health`); 0 = none.
    pub admin_port: u16,
    /// `/health` and `/metrics` are rendered at most this often.
    pub view_cache: Duration,
    /// One `events` partition per day, week or month.
    pub partition_interval: PartitionInterval,
    /// Partitions kept ready ahead of now.
    pub partition_premake: u32,
    /// Drop `events` partitions entirely older than this many days (0 = keep).
    pub events_retention_days: u32,
    /// Delete `rejected_events` rows older than this many days (0 = keep).
    pub rejected_retention_days: u32,
    /// Prune the `ingest_batches` ledger after this many days.
    pub ledger_retention_days: u32,
    /// Partition maintenance and retention run this often.
    pub maintenance_interval: Duration,
    /// Hand partitioning to pg_partman when it is installed (`auto`), or never (`off`).
    pub partman: bool,
    /// Count invalid traffic in the invalid columns (`on`) or as billed (`off`).
    pub ivt_filter: bool,
    /// Bot patterns replacing the built-in list, one regular expression per line.
    pub bot_ua_file: Option<std::path::PathBuf>,
    /// Client addresses whose events are `ip_excluded` (CIDRs).
    pub ip_exclude_file: Option<std::path::PathBuf>,
    /// Peers whose `X-Forwarded-For` is believed (CIDRs).
    pub trusted_proxies: String,
    /// The same click within this window counts once.
    pub click_dedup_window: Duration,
    /// Clicks remembered at most.
    pub click_dedup_max: usize,
    /// The same `event_id` again within this is the same event.
    pub dedup_window: Duration,
    /// Event ids remembered in memory at most (the database decides beyond).
    pub event_id_memory_max: usize,
    /// Events in one `POST /events` body at most.
    pub batch_max_events: usize,
    /// When an event is acknowledged.
    pub ack_mode: AckMode,
    /// Durable mode: a journal write waits at most this long for company.
    pub journal_flush: Duration,
    /// Durable mode: a journal write starts once this many events wait.
    pub journal_flush_events: usize,
}

/// When the service answers 2xx to an event (`ACK_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Once the event is in this process's memory (the Node service's promise).
    #[default]
    Fast,
    /// Once the event is in the fsynced local journal.
    Durable,
}

/// The range of one `events` partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionInterval {
    Day,
    Week,
    Month,
}

impl PartitionInterval {
    /// The unit in SQL (`date_trunc` field, `interval` unit).
    pub fn unit(self) -> &'static str {
        match self {
            PartitionInterval::Day => "day",
            PartitionInterval::Week => "week",
            PartitionInterval::Month => "month",
        }
    }

    /// pg_partman's name for it.
    pub fn partman(self) -> &'static str {
        match self {
            PartitionInterval::Day => "daily",
            PartitionInterval::Week => "weekly",
            PartitionInterval::Month => "monthly",
        }
    }
}

/// How a setting's value is read.
#[derive(Clone, Copy)]
enum Parse {
    /// Milliseconds within bounds.
    Millis(u64, u64, fn(&mut Config, Duration)),
    /// An integer within bounds.
    Int(u64, u64, fn(&mut Config, u64)),
    /// Free text with its own check (the error is the expected form).
    Text(fn(&mut Config, &str) -> Result<(), &'static str>),
    /// Read elsewhere (logging); listed for the documentation.
    Elsewhere,
}

/// One environment variable: its name, default, form and meaning.
#[derive(Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    /// Applied when the variable is unset or empty.
    default: Option<&'static str>,
    /// How the default reads in the docs when it is not a plain value.
    default_doc: Option<&'static str>,
    /// The expected form, as the error message names it ("milliseconds between flushes").
    form: &'static str,
    pub doc: &'static str,
    parse: Parse,
}

impl Setting {
    /// The default as the docs show it.
    pub fn default_doc(&self) -> String {
        match (self.default_doc, self.default) {
            (Some(d), _) => d.to_string(),
            (None, Some(v)) => v.to_string(),
            (None, None) => String::new(),
        }
    }

    /// The expected form, as an error names it.
    pub fn expected(&self) -> String {
        match self.parse {
            Parse::Millis(min, max, _) | Parse::Int(min, max, _) => {
                format!("{} {min}-{max}", self.form)
            }
            _ => self.form.to_string(),
        }
    }

    fn apply(&self, c: &mut Config, raw: &str) -> Result<(), ConfigError> {
        let bad = || ConfigError {
            var: self.name,
            expected: self.expected(),
            got: if self.name == "DATABASE_URL" {
                redact(raw)
            } else {
                raw.to_string()
            },
        };
        match self.parse {
            Parse::Millis(min, max, set) => {
                let v = bounded(raw, min, max).ok_or_else(bad)?;
                set(c, Duration::from_millis(v));
            }
            Parse::Int(min, max, set) => set(c, bounded(raw, min, max).ok_or_else(bad)?),
            Parse::Text(set) => set(c, raw).map_err(|why| {
                let mut e = bad();
                if !why.is_empty() {
                    e.got = format!("{} ({why})", e.got);
                }
                e
            })?,
            Parse::Elsewhere => {}
        }
        Ok(())
    }
}

fn bounded(raw: &str, min: u64, max: u64) -> Option<u64> {
    raw.parse::<u64>().ok().filter(|v| (min..=max).contains(v))
}

const fn ms(
    name: &'static str,
    default: &'static str,
    min: u64,
    max: u64,
    form: &'static str,
    doc: &'static str,
    set: fn(&mut Config, Duration),
) -> Setting {
    Setting {
        name,
        default: Some(default),
        default_doc: None,
        form,
        doc,
        parse: Parse::Millis(min, max, set),
    }
}

const fn int(
    name: &'static str,
    default: &'static str,
    min: u64,
    max: u64,
    form: &'static str,
    doc: &'static str,
    set: fn(&mut Config, u64),
) -> Setting {
    Setting {
        name,
        default: Some(default),
        default_doc: None,
        form,
        doc,
        parse: Parse::Int(min, max, set),
    }
}

const fn text(
    name: &'static str,
    default: Option<&'static str>,
    default_doc: Option<&'static str>,
    form: &'static str,
    doc: &'static str,
    set: fn(&mut Config, &str) -> Result<(), &'static str>,
) -> Setting {
    Setting {
        name,
        default,
        default_doc,
        form,
        doc,
        parse: Parse::Text(set),
    }
}

/// Every setting, in the order the docs list them.
pub const SETTINGS: &[Setting] = &[
    int("PORT", "3003", 1, 65_535, "a TCP port number", "listen port", |c, v| {
        c.port = v as u16
    }),
    text("HOST", Some("0.0.0.0"), None, "a listen address", "listen address", |c, v| {
        c.host = v.to_string();
        Ok(())
    }),
    text(
        "DATABASE_URL",
        None,
        Some("(required)"),
        "a valid PostgreSQL URL (postgres://user:pass@host:port/db?sslmode=...)",
        "`postgres://user:pass@host:5432/db`; TLS as with libpq: `?sslmode=disable|prefer|require|verify-ca|verify-full`, `&sslrootcert=/path/ca.pem` (or `PGSSLROOTCERT`); default `prefer`",
        |c, v| {
            check_database_url(v)?;
            c.database_url = DatabaseUrl::new(v);
            Ok(())
        },
    ),
    text(
        "NODE_ENV",
        Some("development"),
        None,
        "an environment name",
        "`production` → JSON log lines",
        |c, v| {
            c.production = v.eq_ignore_ascii_case("production");
            Ok(())
        },
    ),
    text(
        "APP_ENV",
        None,
        Some("`NODE_ENV`"),
        "an environment name",
        "as `NODE_ENV`, and wins over it when set",
        |c, v| {
            c.production = v.eq_ignore_ascii_case("production");
            Ok(())
        },
    ),
    text(
        "ALLOWED_ORIGINS",
        Some("*"),
        Some("`*`"),
        "a comma-separated list of origins",
        "comma-separated origins for CORS, or `*`",
        |c, v| {
            c.allowed_origins = AllowedOrigins::parse(v);
            Ok(())
        },
    ),
    ms("FLUSH_INTERVAL_MS", "5000", 10, 3_600_000, "milliseconds between flushes", "time between flushes", |c, v| {
        c.flush_interval = v
    }),
    int(
        "FLUSH_MAX_EVENTS",
        "20000",
        1,
        10_000_000,
        "events per shard that trigger a flush",
        "a shard holding this many events triggers a flush at once",
        |c, v| c.flush_max_events = v as usize,
    ),
    int("DB_POOL_MAX", "30", 1, 1000, "maximum pool connections", "pool size", |c, v| {
        c.pool_max = v as usize
    }),
    ms(
        "DB_POOL_IDLE_TIMEOUT_MS",
        "30000",
        1000,
        86_400_000,
        "milliseconds",
        "idle connections are closed after this",
        |c, v| c.pool_idle_timeout = v,
    ),
    ms(
        "DB_CONNECT_TIMEOUT_MS",
        "2000",
        100,
        600_000,
        "milliseconds",
        "connect (and pool wait) timeout",
        |c, v| c.connect_timeout = v,
    ),
    ms(
        "DB_QUERY_TIMEOUT_MS",
        "5000",
        100,
        600_000,
        "milliseconds",
        "deadline for the database probe, campaign lookups and cache reloads; a connection that misses it is closed",
        |c, v| c.db_query_timeout = v,
    ),
    ms(
        "DB_MIGRATION_TIMEOUT_MS",
        "300000",
        1000,
        86_400_000,
        "milliseconds",
        "deadline for applying the migrations at start (retried after)",
        |c, v| c.db_migration_timeout = v,
    ),
    ms(
        "DB_KEEPALIVE_IDLE_MS",
        "5000",
        1000,
        7_200_000,
        "milliseconds",
        "TCP keepalive on database connections: idle time before the first probe (then every half of it, 3 probes)",
        |c, v| c.db_keepalive_idle = v,
    ),
    ms(
        "DB_TCP_USER_TIMEOUT_MS",
        "10000",
        1000,
        600_000,
        "milliseconds",
        "`TCP_USER_TIMEOUT` on database connections: unacknowledged data for this long closes the connection",
        |c, v| c.db_tcp_user_timeout = v,
    ),
    ms(
        "SHUTDOWN_TIMEOUT_MS",
        "25000",
        0,
        3_600_000,
        "milliseconds",
        "deadline for draining on SIGTERM/SIGINT",
        |c, v| c.shutdown_timeout = v,
    ),
    ms(
        "SHUTDOWN_GRACE_MS",
        "0",
        0,
        600_000,
        "milliseconds",
        "after SIGTERM, keep serving this long with `/readyz` at 503 before closing the listener (5000 in `deploy/k8s`)",
        |c, v| c.shutdown_grace = v,
    ),
    text(
        "WORKER_THREADS",
        None,
        Some("CPU count"),
        "a thread count 1-1024",
        "runtime worker threads (= shards)",
        |c, v| {
            c.worker_threads = Some(bounded(v, 1, 1024).ok_or("")? as usize);
            Ok(())
        },
    ),
    int(
        "WRITER_CONCURRENCY",
        "2",
        1,
        64,
        "concurrent batch writers",
        "batches written at once",
        |c, v| c.writer_concurrency = v as usize,
    ),
    ms(
        "WRITE_TIMEOUT_MS",
        "10000",
        100,
        3_600_000,
        "milliseconds",
        "deadline for one batch transaction (and a dead-letter write); a slower one is abandoned, its connection closed and the batch spooled",
        |c, v| c.write_timeout = v,
    ),
    ms(
        "WRITE_PACE_MAX_MS",
        "500",
        0,
        60_000,
        "milliseconds (0 turns pacing off)",
        "a live batch's COPY is streamed in 32 KiB pieces over half the time its events took to arrive, at most this long, so PostgreSQL works in short bursts; backlogs and replays go at full speed",
        |c, v| c.write_pace_max = v,
    ),
    int(
        "BATCH_MAX_ROWS",
        "50000",
        100,
        10_000_000,
        "rows per transaction",
        "rows per transaction at most; a larger flush or backlog is written as several ledgered transactions",
        |c, v| c.batch_max_rows = v as usize,
    ),
    ms(
        "MAX_EVENT_FUTURE_MS",
        "3600000",
        0,
        31_536_000_000,
        "milliseconds",
        "how far ahead a `timestamp` may be",
        |c, v| c.max_future = v,
    ),
    ms(
        "MAX_EVENT_AGE_MS",
        "604800000",
        0,
        31_536_000_000,
        "milliseconds",
        "how far back a `timestamp` may be",
        |c, v| c.max_age = v,
    ),
    ms(
        "ACCOUNTS_REFRESH_MS",
        "60000",
        1000,
        86_400_000,
        "milliseconds",
        "full reload of the campaign → account cache",
        |c, v| c.accounts_refresh = v,
    ),
    text(
        "SPOOL_DIR",
        Some("spool"),
        Some("`./spool`"),
        "a directory path",
        "where batches the database would not take are kept (created if missing)",
        |c, v| {
            c.spool_dir = v.into();
            Ok(())
        },
    ),
    int(
        "SPOOL_MAX_BYTES",
        "1073741824",
        1 << 20,
        1 << 50,
        "bytes",
        "spool size cap",
        |c, v| c.spool_max_bytes = v,
    ),
    int(
        "MAX_BUFFERED_EVENTS",
        "1000000",
        1000,
        1 << 40,
        "events held in memory",
        "events held in memory (shards + writer) before shedding",
        |c, v| c.max_buffered_events = v,
    ),
    int(
        "MAX_BUFFERED_BYTES",
        "268435456",
        1 << 20,
        1 << 50,
        "bytes held in memory",
        "bytes held in memory before shedding",
        |c, v| c.max_buffered_bytes = v,
    ),
    int(
        "MAX_CONNECTIONS",
        "10000",
        1,
        1_000_000,
        "a connection count",
        "open client connections; more wait in the listen backlog",
        |c, v| c.max_connections = v as usize,
    ),
    ms(
        "HEADER_READ_TIMEOUT_MS",
        "10000",
        100,
        600_000,
        "milliseconds",
        "time a connection may wait for a complete request head, idle keep-alive included; checked by a per-connection watchdog every half of it, so the cut comes at 1–1.5× this",
        |c, v| c.header_read_timeout = v,
    ),
    ms(
        "BODY_READ_TIMEOUT_MS",
        "10000",
        100,
        600_000,
        "milliseconds",
        "time allowed for a complete request body; slower gets `408` and the connection is closed",
        |c, v| c.body_read_timeout = v,
    ),
    int(
        "ADMIN_PORT",
        "0",
        0,
        65_535,
        "a TCP port number, or 0 for none",
        "when set, `/metrics`, `/livez` and `/readyz` are served on this port only (with `/health`), and the main port keeps the events and `/health`",
        |c, v| c.admin_port = v as u16,
    ),
    ms(
        "VIEW_CACHE_MS",
        "1000",
        0,
        60_000,
        "milliseconds",
        "`/health` and `/metrics` are rendered from one snapshot at most this often, however often they are asked",
        |c, v| c.view_cache = v,
    ),
    text(
        "EVENTS_PARTITION_INTERVAL",
        Some("day"),
        None,
        "day, week or month",
        "one `events` partition per day, week or month (partitioned layout)",
        |c, v| {
            c.partition_interval = match v.to_ascii_lowercase().as_str() {
                "day" | "daily" => PartitionInterval::Day,
                "week" | "weekly" => PartitionInterval::Week,
                "month" | "monthly" => PartitionInterval::Month,
                _ => return Err(""),
            };
            Ok(())
        },
    ),
    int(
        "EVENTS_PREMAKE",
        "3",
        1,
        366,
        "a count of intervals",
        "partitions kept ready ahead of now (the accepted past window is always covered too)",
        |c, v| c.partition_premake = v as u32,
    ),
    int(
        "EVENTS_RETENTION_DAYS",
        "0",
        0,
        100_000,
        "days",
        "drop `events` partitions whose every row is older than this (0 = keep forever)",
        |c, v| c.events_retention_days = v as u32,
    ),
    int(
        "REJECTED_RETENTION_DAYS",
        "0",
        0,
        100_000,
        "days",
        "delete `rejected_events` rows received longer ago than this (0 = keep forever)",
        |c, v| c.rejected_retention_days = v as u32,
    ),
    int(
        "LEDGER_RETENTION_DAYS",
        "30",
        2,
        100_000,
        "days",
        "prune `ingest_batches` entries older than this; a spooled batch older than this minus a day is quarantined, not replayed (see Scale)",
        |c, v| c.ledger_retention_days = v as u32,
    ),
    ms(
        "MAINTENANCE_INTERVAL_MS",
        "600000",
        1000,
        86_400_000,
        "milliseconds",
        "how often partition maintenance and retention run (one replica at a time)",
        |c, v| c.maintenance_interval = v,
    ),
    text(
        "PARTMAN",
        Some("auto"),
        None,
        "auto or off",
        "`auto`: hand `events` partitions and retention to pg_partman when the extension is installed; `off`: the service manages them",
        |c, v| {
            c.partman = match v.to_ascii_lowercase().as_str() {
                "auto" => true,
                "off" => false,
                _ => return Err(""),
            };
            Ok(())
        },
    ),
    text(
        "IVT_FILTER",
        Some("on"),
        None,
        "on or off",
        "`on`: invalid traffic counts in `metrics_hourly.invalid_*`, not in the billed columns; `off`: everything counts as billed, as the Node service did (reasons are stored either way)",
        |c, v| {
            c.ivt_filter = match v.to_ascii_lowercase().as_str() {
                "on" | "true" | "1" => true,
                "off" | "false" | "0" => false,
                _ => return Err(""),
            };
            Ok(())
        },
    ),
    text(
        "BOT_UA_FILE",
        None,
        Some("(built-in list)"),
        "a readable file",
        "bot user-agent patterns replacing the built-in list (the `isbot` crate's, MIT): one case-insensitive regular expression per line",
        |c, v| {
            c.bot_ua_file = Some(v.into());
            Ok(())
        },
    ),
    text(
        "IP_EXCLUDE_FILE",
        None,
        Some("(none)"),
        "a readable file",
        "client addresses whose events are `ip_excluded`: addresses and CIDRs, one per line, `#` comments",
        |c, v| {
            c.ip_exclude_file = Some(v.into());
            Ok(())
        },
    ),
    text(
        "TRUSTED_PROXIES",
        None,
        Some("(none)"),
        "addresses or CIDRs separated by commas",
        "peers whose `X-Forwarded-For` is believed: the client is then its right-most entry that is not a trusted proxy",
        |c, v| {
            crate::ipset::IpSet::parse(v).map_err(|_| "")?;
            c.trusted_proxies = v.to_string();
            Ok(())
        },
    ),
    int(
        "CLICK_DEDUP_WINDOW_S",
        "30",
        1,
        86_400,
        "seconds",
        "the same click (ad unit, campaign, creative, client) again within this counts once; later copies are `duplicate_click`",
        |c, v| c.click_dedup_window = Duration::from_secs(v),
    ),
    int(
        "CLICK_DEDUP_MAX",
        "1000000",
        32,
        1_000_000_000,
        "a count of clicks",
        "clicks remembered for deduplication at most (rounded down so each of the 32 tables fills a power-of-two allocation: 917,504 at the default); when full the older half is forgotten early (so a duplicate may count again, a first click never fails)",
        |c, v| c.click_dedup_max = v as usize,
    ),
    int(
        "DEDUP_WINDOW_HOURS",
        "24",
        1,
        8_760,
        "hours",
        "an event sent again with the same `event_id` within this is answered as before and stored and counted once (the database's `event_ids` decides; older ids are deleted)",
        |c, v| c.dedup_window = Duration::from_secs(v * 3600),
    ),
    int(
        "EVENT_ID_MEMORY_MAX",
        "1000000",
        32,
        1_000_000_000,
        "a count of ids",
        "event ids each replica remembers at most (rounded down as for `CLICK_DEDUP_MAX`: 917,504 at the default, about 35 MB), so a repeat costs no database work; beyond this the database still decides",
        |c, v| c.event_id_memory_max = v as usize,
    ),
    int(
        "BATCH_MAX_EVENTS",
        "500",
        1,
        10_000,
        "a count of events",
        "events one `POST /events` body may carry (the body is at most 64 KiB too)",
        |c, v| c.batch_max_events = v as usize,
    ),
    text(
        "ACK_MODE",
        Some("fast"),
        None,
        "fast or durable",
        "`fast`: answer once the event is in memory; `durable`: answer once it is in the fsynced journal in `SPOOL_DIR/journal` (a crash loses no acknowledged event)",
        |c, v| {
            c.ack_mode = match v.to_ascii_lowercase().as_str() {
                "fast" => AckMode::Fast,
                "durable" => AckMode::Durable,
                _ => return Err(""),
            };
            Ok(())
        },
    ),
    int(
        "JOURNAL_FLUSH_US",
        "1000",
        50,
        100_000,
        "microseconds",
        "durable mode: the longest an event waits for others before the journal is written and fsynced (group commit)",
        |c, v| c.journal_flush = Duration::from_micros(v),
    ),
    int(
        "JOURNAL_FLUSH_EVENTS",
        "256",
        1,
        100_000,
        "a count of events",
        "durable mode: the journal is written and fsynced as soon as this many events wait",
        |c, v| c.journal_flush_events = v as usize,
    ),
    Setting {
        name: "RUST_LOG",
        default: None,
        default_doc: Some("`info`"),
        form: "",
        doc: "log filter (`tracing` syntax); `LOG_LEVEL` sets just the level",
        parse: Parse::Elsewhere,
    },
];

/// Default size trigger per shard; see README "Flush policy" for the measurement.
pub const DEFAULT_FLUSH_MAX_EVENTS: usize = 20_000;

impl Config {
    /// A config with every field zero or empty, before defaults are applied.
    fn blank() -> Config {
        Config {
            port: 0,
            host: String::new(),
            database_url: DatabaseUrl::new(""),
            production: false,
            allowed_origins: AllowedOrigins::Any,
            flush_interval: Duration::ZERO,
            flush_max_events: 0,
            pool_max: 0,
            pool_idle_timeout: Duration::ZERO,
            connect_timeout: Duration::ZERO,
            shutdown_timeout: Duration::ZERO,
            shutdown_grace: Duration::ZERO,
            worker_threads: None,
            writer_concurrency: 0,
            write_timeout: Duration::ZERO,
            write_pace_max: Duration::ZERO,
            max_future: Duration::ZERO,
            max_age: Duration::ZERO,
            accounts_refresh: Duration::ZERO,
            spool_dir: Default::default(),
            spool_max_bytes: 0,
            max_buffered_events: 0,
            max_buffered_bytes: 0,
            max_connections: 0,
            header_read_timeout: Duration::ZERO,
            body_read_timeout: Duration::ZERO,
            db_query_timeout: Duration::ZERO,
            db_migration_timeout: Duration::ZERO,
            db_keepalive_idle: Duration::ZERO,
            db_tcp_user_timeout: Duration::ZERO,
            batch_max_rows: 0,
            admin_port: 0,
            view_cache: Duration::ZERO,
            partition_interval: PartitionInterval::Day,
            partition_premake: 0,
            events_retention_days: 0,
            rejected_retention_days: 0,
            ledger_retention_days: 0,
            maintenance_interval: Duration::ZERO,
            partman: true,
            ivt_filter: true,
            bot_ua_file: None,
            ip_exclude_file: None,
            trusted_proxies: String::new(),
            click_dedup_window: Duration::ZERO,
            click_dedup_max: 0,
            dedup_window: Duration::ZERO,
            event_id_memory_max: 0,
            batch_max_events: 0,
            ack_mode: AckMode::Fast,
            journal_flush: Duration::ZERO,
            journal_flush_events: 0,
        }
    }

    /// Defaults for everything but the database URL (taken as given).
    pub fn with_database_url(database_url: impl Into<String>) -> Config {
        let mut c = Config::blank();
        for s in SETTINGS {
            if let Some(d) = s.default {
                // Every default parses (tested); a failure would leave the zero value.
                let _ = s.apply(&mut c, d);
            }
        }
        c.database_url = DatabaseUrl::new(database_url);
        c
    }

    /// Sets one setting by its variable name, as the environment would.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        match SETTINGS.iter().find(|s| s.name == name) {
            Some(s) => s.apply(self, value),
            None => Err(ConfigError {
                var: "setting",
                expected: "one of the variables in ingest --help".into(),
                got: name.to_string(),
            }),
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut c = Config::blank();
        for s in SETTINGS {
            let value = get(s.name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty());
            match (value.as_deref(), s.default) {
                (Some(v), _) | (None, Some(v)) => s.apply(&mut c, v)?,
                (None, None) if s.name == "DATABASE_URL" => {
                    return Err(ConfigError {
                        var: s.name,
                        expected: "a PostgreSQL URL such as postgres://user:pass@host:5432/db"
                            .into(),
                        got: String::new(),
                    })
                }
                (None, None) => {}
            }
        }
        Ok(c)
    }
}

/// The whole URL must parse now (scheme, host, port, options, sslmode), not at first connect.
fn check_database_url(url: &str) -> Result<(), &'static str> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("it must start with postgres:// or postgresql://");
    }
    let (plain, _) = crate::tls::split_url(url).map_err(|_| "bad sslmode or sslrootcert")?;
    plain
        .parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|_| "not a URL tokio-postgres can use")
}

/// The settings as a Markdown table (the README's "Configuration" table).
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for s in SETTINGS {
        let default = s.default_doc();
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            s.name,
            if default.is_empty() { "" } else { &default },
            s.doc.replace('|', "\\|")
        ));
    }
    out
}

/// The settings as plain text (for `ingest --help`).
pub fn help_text() -> String {
    let width = SETTINGS.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::from("Environment (see README.md, Configuration):\n");
    for s in SETTINGS {
        let default = s.default_doc().replace('`', "");
        let doc = s.doc.replace('`', "");
        out.push_str(&format!("  {:width$}  {doc}", s.name));
        if !default.is_empty() {
            out.push_str(&format!(" [default: {default}]"));
        }
        out.push('\n');
    }
    out
}

/// Hides a password in a URL before it is printed.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A setting that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {var} must be {expected}{}", if .got.is_empty() { " (it is not set)".to_string() } else { format!(" (got {:?})", .got) })]
pub struct ConfigError {
    pub var: &'static str,
    pub expected: String,
    pub got: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_node_service() {
        let c = cfg(&[("DATABASE_URL", "postgres://u@h/db")]).expect("valid");
        assert_eq!(c.port, 3003);
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.pool_max, 30);
        assert_eq!(c.pool_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.flush_max_events, DEFAULT_FLUSH_MAX_EVENTS);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.allowed_origins, AllowedOrigins::Any);
        assert_eq!(c.worker_threads, None);
        assert_eq!(c.spool_dir, std::path::PathBuf::from("spool"));
        assert!(!c.production);
    }

    #[test]
    fn every_default_parses_and_with_database_url_applies_them() {
        let mut c = Config::blank();
        for s in SETTINGS {
            if let Some(d) = s.default {
                s.apply(&mut c, d)
                    .unwrap_or_else(|e| panic!("default of {}: {e}", s.name));
            }
        }
        let a = Config::with_database_url("postgres://u@h/db");
        let b = cfg(&[("DATABASE_URL", "postgres://u@h/db")]).expect("valid");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e =
            cfg(&[("DATABASE_URL", "postgres://u@h/db"), ("PORT", "70000")]).expect_err("bad port");
        assert_eq!(e.var, "PORT");
        assert!(
            e.to_string()
                .contains("PORT must be a TCP port number 1-65535"),
            "{e}"
        );
        let e = cfg(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("FLUSH_INTERVAL_MS", "soon"),
        ])
        .expect_err("bad");
        assert_eq!(e.var, "FLUSH_INTERVAL_MS");
        assert_eq!(cfg(&[]).expect_err("missing").var, "DATABASE_URL");
        let e = cfg(&[("DATABASE_URL", "mysql://u:secret@h/db")]).expect_err("scheme");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = cfg(&[("DATABASE_URL", "postgres://u:secret@h:notaport/db")]).expect_err("port");
        assert_eq!(e.var, "DATABASE_URL");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e =
            cfg(&[("DATABASE_URL", "postgres://u@h/db?sslmode=sometimes")]).expect_err("sslmode");
        assert!(e.to_string().contains("sslmode"), "{e}");
        let e = cfg(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("WORKER_THREADS", "0"),
        ])
        .expect_err("threads");
        assert!(
            e.to_string()
                .contains("WORKER_THREADS must be a thread count 1-1024"),
            "{e}"
        );
    }

    #[test]
    fn production_and_origins() {
        let c = cfg(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("NODE_ENV", "production"),
            ("ALLOWED_ORIGINS", "https://a.example, https://b.example/"),
        ])
        .expect("valid");
        assert!(c.production);
        assert_eq!(
            c.allowed_origins.allow("https://b.example"),
            Some("https://b.example")
        );
        assert_eq!(c.allowed_origins.allow("https://evil.example"), None);
        assert_eq!(AllowedOrigins::parse("*").allow("https://x"), Some("*"));
        let c = cfg(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("NODE_ENV", "production"),
            ("APP_ENV", "staging"),
        ])
        .expect("valid");
        assert!(!c.production, "APP_ENV wins");
    }

    #[test]
    fn the_database_password_never_prints() {
        let c = cfg(&[("DATABASE_URL", "postgres://app:s3cret@db:5432/ingest")]).expect("valid");
        for shown in [format!("{c:?}"), c.database_url.to_string()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("app:***@db:5432/ingest"), "{shown}");
        }
        assert_eq!(
            c.database_url.expose(),
            "postgres://app:s3cret@db:5432/ingest"
        );
    }
}

//! Typed settings, read once from the environment at start.
//!
//! Names and defaults follow the Node service's README (`PORT`, `DATABASE_URL`,
//! `NODE_ENV`, `ALLOWED_ORIGINS`, pool 30 / idle 30 s / connect 2 s, flush every
//! 5 s). A value that does not parse stops the process with a message naming
//! the variable and the expected form; nothing falls back silently.

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

/// Every setting of the service.
#[derive(Clone, Debug)]
pub struct Config {
    pub port: u16,
    pub host: String,
    pub database_url: String,
    pub production: bool,
    pub allowed_origins: AllowedOrigins,
    pub flush_interval: Duration,
    pub flush_max_events: usize,
    pub pool_max: usize,
    pub pool_idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub worker_threads: Option<usize>,
    pub max_future: Duration,
    pub max_age: Duration,
    pub accounts_refresh: Duration,
    pub writer_concurrency: usize,
    /// Where batches the database would not take are kept until it does.
    pub spool_dir: std::path::PathBuf,
    pub spool_max_bytes: u64,
    /// Memory caps for events not yet stored or spooled; past them the
    /// request side sheds load (POST 503, GET pixel dropped and counted).
    pub max_buffered_events: u64,
    pub max_buffered_bytes: u64,
    /// A batch write taking longer than this is abandoned and the batch spooled.
    pub write_timeout: Duration,
    /// Open client connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A client must send a complete request head within this (slow-loris guard).
    pub header_read_timeout: Duration,
    /// After the shutdown signal, keep serving this long with `/readyz` at 503
    /// so load balancers stop sending traffic before the listener closes.
    pub shutdown_grace: Duration,
}

/// Default size trigger per shard; see README "Flush policy" for the measurement.
pub const DEFAULT_FLUSH_MAX_EVENTS: usize = 20_000;

impl Config {
    /// Defaults for everything but the database URL.
    pub fn with_database_url(database_url: impl Into<String>) -> Config {
        Config {
            port: 3003,
            host: "0.0.0.0".into(),
            database_url: database_url.into(),
            production: false,
            allowed_origins: AllowedOrigins::Any,
            flush_interval: Duration::from_millis(5000),
            flush_max_events: DEFAULT_FLUSH_MAX_EVENTS,
            pool_max: 30,
            pool_idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(25),
            worker_threads: None,
            max_future: Duration::from_secs(3600),
            max_age: Duration::from_secs(7 * 86_400),
            accounts_refresh: Duration::from_secs(60),
            writer_concurrency: 2,
            spool_dir: "spool".into(),
            spool_max_bytes: 1 << 30,
            max_buffered_events: 1_000_000,
            max_buffered_bytes: 256 << 20,
            write_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::ZERO,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let database_url = get("DATABASE_URL").ok_or(ConfigError {
            var: "DATABASE_URL",
            expected: "a PostgreSQL URL such as postgres://user:pass@host:5432/db",
            got: String::new(),
        })?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError {
                var: "DATABASE_URL",
                expected: "a URL starting with postgres:// or postgresql://",
                got: redact(&database_url),
            });
        }
        // The whole URL must parse now (host, port, options, sslmode), not at first connect.
        let parsed = crate::tls::split_url(&database_url)
            .map_err(|e| e.to_string())
            .and_then(|(url, _)| {
                url.parse::<tokio_postgres::Config>()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if let Err(why) = parsed {
            return Err(ConfigError {
                var: "DATABASE_URL",
                expected: "a valid PostgreSQL URL (postgres://user:pass@host:port/db?sslmode=...)",
                got: format!("{} ({why})", redact(&database_url)),
            });
        }
        let mut c = Config::with_database_url(database_url);
        let env = get("APP_ENV")
            .or_else(|| get("NODE_ENV"))
            .unwrap_or_default();
        c.production = env.eq_ignore_ascii_case("production");
        if let Some(v) = get("ALLOWED_ORIGINS") {
            c.allowed_origins = AllowedOrigins::parse(&v);
        }
        if let Some(v) = get("HOST") {
            c.host = v;
        }
        c.port =
            num(&get, "PORT", 1, 65_535, "a TCP port number 1-65535")?.map_or(c.port, |v| v as u16);
        let ms = |var: &'static str,
                  min: u64,
                  max: u64,
                  expected: &'static str|
         -> Result<Option<Duration>, ConfigError> {
            Ok(num(&get, var, min, max, expected)?.map(Duration::from_millis))
        };
        c.flush_interval = ms(
            "FLUSH_INTERVAL_MS",
            10,
            3_600_000,
            "milliseconds between flushes, 10-3600000",
        )?
        .unwrap_or(c.flush_interval);
        c.flush_max_events = num(
            &get,
            "FLUSH_MAX_EVENTS",
            1,
            10_000_000,
            "events per shard that trigger a flush, 1-10000000",
        )?
        .map_or(c.flush_max_events, |v| v as usize);
        c.pool_max = num(
            &get,
            "DB_POOL_MAX",
            1,
            1000,
            "maximum pool connections, 1-1000",
        )?
        .map_or(c.pool_max, |v| v as usize);
        c.pool_idle_timeout = ms(
            "DB_POOL_IDLE_TIMEOUT_MS",
            1000,
            86_400_000,
            "milliseconds, 1000-86400000",
        )?
        .unwrap_or(c.pool_idle_timeout);
        c.connect_timeout = ms(
            "DB_CONNECT_TIMEOUT_MS",
            100,
            600_000,
            "milliseconds, 100-600000",
        )?
        .unwrap_or(c.connect_timeout);
        c.shutdown_timeout = ms(
            "SHUTDOWN_TIMEOUT_MS",
            0,
            3_600_000,
            "milliseconds, 0-3600000",
        )?
        .unwrap_or(c.shutdown_timeout);
        c.worker_threads =
            num(&get, "WORKER_THREADS", 1, 1024, "a thread count, 1-1024")?.map(|v| v as usize);
        c.max_future = ms(
            "MAX_EVENT_FUTURE_MS",
            0,
            31_536_000_000,
            "milliseconds, 0-31536000000",
        )?
        .unwrap_or(c.max_future);
        c.max_age = ms(
            "MAX_EVENT_AGE_MS",
            0,
            31_536_000_000,
            "milliseconds, 0-31536000000",
        )?
        .unwrap_or(c.max_age);
        c.accounts_refresh = ms(
            "ACCOUNTS_REFRESH_MS",
            1000,
            86_400_000,
            "milliseconds, 1000-86400000",
        )?
        .unwrap_or(c.accounts_refresh);
        c.writer_concurrency = num(
            &get,
            "WRITER_CONCURRENCY",
            1,
            64,
            "concurrent batch writers, 1-64",
        )?
        .map_or(c.writer_concurrency, |v| v as usize);
        if let Some(v) = get("SPOOL_DIR") {
            c.spool_dir = v.into();
        }
        c.spool_max_bytes = num(
            &get,
            "SPOOL_MAX_BYTES",
            1 << 20,
            1 << 50,
            "bytes, at least 1048576",
        )?
        .unwrap_or(c.spool_max_bytes);
        c.max_buffered_events = num(
            &get,
            "MAX_BUFFERED_EVENTS",
            1000,
            1 << 40,
            "events held in memory, at least 1000",
        )?
        .unwrap_or(c.max_buffered_events);
        c.max_buffered_bytes = num(
            &get,
            "MAX_BUFFERED_BYTES",
            1 << 20,
            1 << 50,
            "bytes held in memory, at least 1048576",
        )?
        .unwrap_or(c.max_buffered_bytes);
        c.write_timeout = ms(
            "WRITE_TIMEOUT_MS",
            100,
            3_600_000,
            "milliseconds, 100-3600000",
        )?
        .unwrap_or(c.write_timeout);
        c.max_connections = num(
            &get,
            "MAX_CONNECTIONS",
            1,
            1_000_000,
            "a connection count, 1-1000000",
        )?
        .map_or(c.max_connections, |v| v as usize);
        c.shutdown_grace = ms("SHUTDOWN_GRACE_MS", 0, 600_000, "milliseconds, 0-600000")?
            .unwrap_or(c.shutdown_grace);
        c.header_read_timeout = ms(
            "HEADER_READ_TIMEOUT_MS",
            100,
            600_000,
            "milliseconds, 100-600000",
        )?
        .unwrap_or(c.header_read_timeout);
        Ok(c)
    }
}

fn num(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Result<Option<u64>, ConfigError> {
    let Some(raw) = get(var) else { return Ok(None) };
    match raw.parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(Some(v)),
        _ => Err(ConfigError {
            var,
            expected,
            got: raw,
        }),
    }
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
    pub expected: &'static str,
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
        assert_eq!(c.pool_max, 30);
        assert_eq!(c.pool_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.allowed_origins, AllowedOrigins::Any);
        assert!(!c.production);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e =
            cfg(&[("DATABASE_URL", "postgres://u@h/db"), ("PORT", "70000")]).expect_err("bad port");
        assert_eq!(e.var, "PORT");
        assert!(
            e.to_string().contains("PORT must be a TCP port number"),
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
    }
}

//! The PostgreSQL pool and the schema migrations.
//!
//! Migrations are the SQL files in `migrations/`, embedded at build time and
//! applied in version order inside one transaction that holds an advisory
//! lock, so several replicas starting at once apply each file exactly once.
//! Every file is written with `IF NOT EXISTS`, so a database that already has
//! the Node service's tables is adopted as it is. An edited, already-applied
//! file is refused (checksum) rather than half-applied.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::config::Config;

/// One embedded migration.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Add new files at the end; never edit one that shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "seed_schema",
        sql: include_str!("../migrations/V1__seed_schema.sql"),
    },
    Migration {
        version: 2,
        name: "rejected_events",
        sql: include_str!("../migrations/V2__rejected_events.sql"),
    },
    Migration {
        version: 3,
        name: "ingest_batches",
        sql: include_str!("../migrations/V3__ingest_batches.sql"),
    },
    Migration {
        version: 4,
        name: "metrics_fillfactor",
        sql: include_str!("../migrations/V4__metrics_fillfactor.sql"),
    },
    Migration {
        version: 5,
        name: "ledger_split",
        sql: include_str!("../migrations/V5__ledger_split.sql"),
    },
    Migration {
        version: 6,
        name: "scale",
        sql: include_str!("../migrations/V6__scale.sql"),
    },
    Migration {
        version: 7,
        name: "invalid_traffic",
        sql: include_str!("../migrations/V7__invalid_traffic.sql"),
    },
    Migration {
        version: 8,
        name: "event_ids",
        sql: include_str!("../migrations/V8__event_ids.sql"),
    },
];

/// Advisory lock key for migrations ("ingest" in ASCII).
const MIGRATION_LOCK: i64 = 0x696e_6765_7374;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("DATABASE_URL TLS settings: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("database unavailable: {0}")]
    Unavailable(#[from] deadpool_postgres::PoolError),
    #[error("database error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("{0} did not finish within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("migration {version} ({name}) was changed after it was applied (checksum {found}, expected {expected})")]
    MigrationChanged {
        version: i32,
        name: &'static str,
        found: String,
        expected: String,
    },
}

/// Session options the service needs, added to the operator's own.
const SESSION_OPTIONS: &str = "-c TimeZone=UTC";

/// The connection settings from `DATABASE_URL` plus the service's: a
/// connect deadline, `TimeZone=UTC` added to (never in place of) the URL's
/// `options`, and TCP keepalive and `TCP_USER_TIMEOUT` so a dead peer is
/// noticed in seconds even on an idle connection (each unless the URL sets it).
pub fn pg_config(
    config: &Config,
) -> Result<(tokio_postgres::Config, crate::tls::TlsSettings), DbError> {
    let raw = config.database_url.expose();
    let (url, tls) = crate::tls::split_url(raw)?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(config.connect_timeout);
    }
    // `timestamp` columns hold UTC wall-clock time, and so does `created_at`'s default.
    let options = match pg.get_options() {
        Some(o) if !o.trim().is_empty() => format!("{o} {SESSION_OPTIONS}"),
        _ => SESSION_OPTIONS.to_string(),
    };
    pg.options(options);
    if pg.get_application_name().is_none() {
        pg.application_name("ingest");
    }
    let set_in_url = |key: &str| url.contains(&format!("{key}="));
    pg.keepalives(true);
    if !set_in_url("keepalives_idle") {
        pg.keepalives_idle(config.db_keepalive_idle);
    }
    if !set_in_url("keepalives_interval") {
        pg.keepalives_interval((config.db_keepalive_idle / 2).max(Duration::from_secs(1)));
    }
    if !set_in_url("keepalives_retries") {
        pg.keepalives_retries(3);
    }
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(config.db_tcp_user_timeout);
    }
    Ok((pg, tls))
}

/// Builds the pool (lazy: no connection is made until first use).
pub fn pool(config: &Config) -> Result<Pool, DbError> {
    let (pg, tls) = pg_config(config)?;
    let connector = crate::tls::connector(&tls)?;
    let manager = Manager::from_config(
        pg,
        connector,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_max)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(config.connect_timeout))
        .wait_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Closes connections idle for longer than `idle` (deadpool has no idle timeout of its own).
pub fn reap_idle(pool: &Pool, idle: Duration) {
    pool.retain(|_, metrics| metrics.last_used() < idle);
}

/// A pooled connection that goes back to the pool only when [`Conn::release`]d
/// after a clean use. Dropped any other way (an error, or a deadline that
/// cancelled the future holding it) it is closed, never handed out again:
/// a connection that missed a deadline may be stuck mid-statement or behind
/// a dead network path. The idle connections are closed with it, since
/// they most likely share its fate (a partition, a failover).
pub struct Conn {
    obj: std::mem::ManuallyDrop<deadpool_postgres::Object>,
    pool: Pool,
    keep: bool,
}

impl Conn {
    /// A connection from the pool (waits at most the pool's wait/connect timeout).
    pub async fn get(pool: &Pool) -> Result<Conn, deadpool_postgres::PoolError> {
        let obj = pool.get().await?;
        Ok(Conn {
            obj: std::mem::ManuallyDrop::new(obj),
            pool: pool.clone(),
            keep: false,
        })
    }

    /// Gives the connection back to the pool for reuse.
    pub fn release(mut self) {
        self.keep = true;
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::ClientWrapper;
    fn deref(&self) -> &Self::Target {
        &self.obj
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.obj
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: `obj` is taken exactly once, here, and never used after.
        let obj = unsafe { std::mem::ManuallyDrop::take(&mut self.obj) };
        if self.keep {
            drop(obj); // back to the pool
        } else {
            // Out of the pool for good; dropping the client closes the socket.
            drop(deadpool_postgres::Object::take(obj));
            self.pool.retain(|_, _| false);
        }
    }
}

/// Runs `f` within `limit`; a miss is [`DbError::Timeout`] naming `what`.
pub async fn within<T>(
    limit: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(DbError::Timeout(what, limit)))
}

/// A database error with its SQLSTATE and the server's message (tokio-postgres
/// alone prints only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

fn checksum(sql: &str) -> String {
    // FNV-1a 64: stable across builds and platforms, enough to spot an edit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Applies every pending migration; returns the versions applied now.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, DbError> {
    let mut client = Conn::get(pool).await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ingest_schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             checksum TEXT NOT NULL,
             applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .await?;
    let done = tx
        .query(
            "SELECT version, checksum FROM ingest_schema_migrations",
            &[],
        )
        .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        match done.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            Some(row) => {
                let found: String = row.get(1);
                if found != sum {
                    return Err(DbError::MigrationChanged {
                        version: m.version,
                        name: m.name,
                        found,
                        expected: sum,
                    });
                }
            }
            None => {
                tx.batch_execute(m.sql).await?;
                tx.execute(
                    "INSERT INTO ingest_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[&m.version, &m.name, &sum],
                )
                .await?;
                applied.push(m.version);
            }
        }
    }
    tx.commit().await?;
    client.release();
    Ok(applied)
}

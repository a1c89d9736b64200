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
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("migration {version} ({name}) was changed after it was applied (checksum {found}, expected {expected})")]
    MigrationChanged {
        version: i32,
        name: &'static str,
        found: String,
        expected: String,
    },
}

/// Builds the pool (lazy: no connection is made until first use).
pub fn pool(config: &Config) -> Result<Pool, DbError> {
    let (url, tls) = crate::tls::split_url(config.database_url.expose())?;
    let connector = crate::tls::connector(&tls)?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    pg.connect_timeout(config.connect_timeout);
    // `timestamp` columns hold UTC wall-clock time, and so does `created_at`'s default.
    pg.options("-c TimeZone=UTC");
    if pg.get_application_name().is_none() {
        pg.application_name("ingest");
    }
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
    let mut client = pool.get().await?;
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
    Ok(applied)
}

//! The operator's commands besides `serve`: one file each, sharing the
//! database and spool code with the service. `main.rs` parses the command
//! line and calls these; each returns what the process should exit with.

pub mod migrate;
pub mod partition;
pub mod quarantine;
pub mod verify;

use std::process::ExitCode;
use std::sync::Arc;

use crate::accounts::AccountCache;
use crate::config::Config;
use crate::stats::Stats;
use crate::writer::{Deadlines, PgWriter};

/// A writer for a command: the service's pool, deadlines and cache.
fn writer(config: &Config) -> Result<Arc<PgWriter>, ExitCode> {
    let pool = crate::db::pool(config).map_err(|e| {
        eprintln!("cannot use DATABASE_URL: {e}");
        ExitCode::from(2)
    })?;
    Ok(Arc::new(PgWriter::new(
        pool,
        Arc::new(AccountCache::new()),
        Arc::new(Stats::new()),
        Deadlines {
            query: config.db_query_timeout,
            migration: config.db_migration_timeout,
        },
    )))
}

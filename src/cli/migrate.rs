//! `ingest migrate`: applies the embedded migrations and exits.

use std::process::ExitCode;

use crate::config::Config;

pub async fn run(config: &Config) -> ExitCode {
    let pool = match crate::db::pool(config) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the pool");
            return ExitCode::FAILURE;
        }
    };
    let applied = crate::db::within(
        config.db_migration_timeout,
        "migrations",
        crate::db::migrate(&pool),
    )
    .await;
    match applied {
        Ok(applied) => {
            tracing::info!(applied = ?applied, "migrations up to date");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "migration failed");
            ExitCode::FAILURE
        }
    }
}

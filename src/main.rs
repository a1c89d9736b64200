//! The `ingest` binary: environment → `Config`, logging, signals → `ingest::serve`.
//!
//! `ingest` (or `ingest serve`) runs the service; `ingest migrate` applies the
//! migrations and exits; `ingest --version` prints the version.

use std::process::ExitCode;

use ingest::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: ingest [serve|migrate|--version|--help]

Environment: DATABASE_URL (required; sslmode as libpq), PORT (3003), HOST (0.0.0.0),
NODE_ENV/APP_ENV, ALLOWED_ORIGINS, FLUSH_INTERVAL_MS, FLUSH_MAX_EVENTS, DB_POOL_MAX,
DB_POOL_IDLE_TIMEOUT_MS, DB_CONNECT_TIMEOUT_MS, SHUTDOWN_TIMEOUT_MS, SHUTDOWN_GRACE_MS,
WORKER_THREADS, WRITER_CONCURRENCY, WRITE_TIMEOUT_MS, MAX_EVENT_FUTURE_MS, MAX_EVENT_AGE_MS,
ACCOUNTS_REFRESH_MS, SPOOL_DIR, SPOOL_MAX_BYTES, MAX_BUFFERED_EVENTS, MAX_BUFFERED_BYTES,
MAX_CONNECTIONS, HEADER_READ_TIMEOUT_MS, RUST_LOG/LOG_LEVEL.
See README.md (Configuration) for what each one does.";

fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    match command.as_str() {
        "--version" | "-V" | "version" => {
            println!("ingest {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "serve" | "migrate" => {}
        other => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    ingest::telemetry::init(config.production);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("ingest-worker");
    if let Some(n) = config.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if command == "migrate" {
            migrate(config).await
        } else {
            serve(config).await
        }
    })
}

async fn migrate(config: Config) -> ExitCode {
    let pool = match ingest::db::pool(&config) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the pool");
            return ExitCode::FAILURE;
        }
    };
    match ingest::db::migrate(&pool).await {
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

async fn serve(config: Config) -> ExitCode {
    // Each connection is a file descriptor: lift the soft limit (often 1024)
    // to the hard one, as nginx does, so MAX_CONNECTIONS is the real cap.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if (n as usize) < config.max_connections + 64 => {
            tracing::warn!(
                open_files = n,
                max_connections = config.max_connections,
                "open-file limit is below MAX_CONNECTIONS"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let addr = format!("{}:{}", config.host, config.port);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "listening");
    match ingest::serve(config, listener, shutdown_signal()).await {
        Ok(report) => {
            if report.unwritten > 0 {
                tracing::error!(
                    unwritten = report.unwritten,
                    "exiting with events unwritten"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "service failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

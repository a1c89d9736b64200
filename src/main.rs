//! The `ingest` binary: environment → `Config`, logging, signals → `ingest::serve`.
//!
//! `ingest` (or `ingest serve`) runs the service; `ingest migrate` applies the
//! migrations and exits; `ingest --version` prints the version; `--help` lists
//! the commands and every setting. An unknown command or flag exits 2 naming it.

use std::process::ExitCode;

use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ingest::cli;
use ingest::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ad impression and click events from tracking pixels into PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "ingest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply the migrations and exit.
    Migrate {
        /// Also convert a plain `events` table into the partitioned layout, live.
        #[arg(long)]
        partition_events: bool,
        /// With --partition-events: print the plan and the locks it takes, change nothing.
        #[arg(long, requires = "partition_events")]
        dry_run: bool,
    },
    /// Recount metrics_hourly from events, hour by hour; exit 0 only if every key matches.
    Verify {
        /// First hour (UTC), e.g. 2026-12-04 or "2026-12-04 13:00"; default: the first stored hour.
        #[arg(long)]
        from: Option<String>,
        /// End (UTC, exclusive); default: two hours from now.
        #[arg(long)]
        to: Option<String>,
    },
    /// Set the counts of metrics_hourly to what events say, hour by hour, while ingest runs.
    Rebuild {
        /// First hour (UTC), e.g. 2026-12-04 or "2026-12-04 13:00".
        #[arg(long)]
        from: String,
        /// End (UTC, exclusive).
        #[arg(long)]
        to: String,
    },
    /// Rows the database refused in both tables, kept in SPOOL_DIR/quarantine.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
}

#[derive(Debug, Subcommand)]
enum QuarantineAction {
    /// List the quarantined files, their events and the database's errors.
    List,
    /// Send the quarantined rows again; delete each file once its rows are stored.
    Retry {
        /// Give up on rows still not stored after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::command().after_help(ingest::config::help_text());
    let cli = match cli
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        // Usage errors exit 2 naming what was wrong; --help and --version exit 0.
        Err(e) => e.exit(),
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    ingest::telemetry::init(config.production);
    // One request thread: tokio's current-thread scheduler on a thread of its
    // own (no work-stealing queues or cross-thread wake-ups; see the README's
    // Performance section for what it measured). More: the multi-thread one.
    let single = config.worker_threads == Some(1);
    let mut runtime = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.thread_name("ingest-worker");
        if let Some(n) = config.worker_threads {
            b.worker_threads(n);
        }
        b
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = move || run_command(runtime, cli.command, config);
    if !single {
        return run();
    }
    let worker = std::thread::Builder::new()
        .name("ingest-worker".into())
        .spawn(run);
    match worker.map(|w| w.join()) {
        Ok(Ok(code)) => code,
        Ok(Err(_)) => ExitCode::FAILURE, // the panic was reported by the hook
        Err(e) => {
            eprintln!("cannot start the worker thread: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one subcommand (`serve` when none) to completion on `runtime`.
fn run_command(
    runtime: tokio::runtime::Runtime,
    command: Option<Command>,
    config: Config,
) -> ExitCode {
    runtime.block_on(async move {
        match command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await,
            Command::Migrate {
                partition_events: false,
                ..
            } => cli::migrate::run(&config).await,
            Command::Migrate {
                partition_events: true,
                dry_run,
            } => cli::partition::run(&config, dry_run).await,
            Command::Verify { from, to } => {
                cli::verify::verify(&config, from.as_deref(), to.as_deref()).await
            }
            Command::Rebuild { from, to } => cli::verify::rebuild(&config, &from, &to).await,
            Command::Quarantine {
                action: QuarantineAction::List,
            } => cli::quarantine::list(&config),
            Command::Quarantine {
                action: QuarantineAction::Retry { timeout_secs },
            } => cli::quarantine::retry(&config, Duration::from_secs(timeout_secs)).await,
        }
    })
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
        // A setting that names a file the service cannot use: a usage
        // error, as for the other settings.
        Err(e @ ingest::ServeError::Setting(_)) => {
            eprintln!("{e}");
            ExitCode::from(2)
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

//! Logging through `tracing`: JSON lines in production, readable text otherwise.
//!
//! The level comes from `RUST_LOG` (full filter syntax) or `LOG_LEVEL`, default `info`.
//! The pipeline logs at most one line per flush at info; never one per event.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call is a no-op.
pub fn init(production: bool) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| {
            EnvFilter::try_new(format!(
                "{},tokio_postgres=warn",
                std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into())
            ))
        })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if production {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.compact().try_init()
    };
}

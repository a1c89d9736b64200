//! The database as the delivery code sees it: a [`Sink`] that takes a batch
//! in one transaction, and the errors it can answer with, sorted into the
//! classes the retry policy treats differently.
//!
//! [`super::PgWriter`] is the real sink; the retry tests drive a scripted one
//! through every error class without a database.

use std::future::Future;
use std::time::Duration;

use crate::batch::Batch;
use crate::db::DbError;

/// What one committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    pub written: u64,
    pub unknown_campaign: u64,
    pub dead_lettered: u64,
    /// Events left out because `event_ids` already held their id (sent
    /// before, to this replica or another, or earlier in this batch).
    pub repeated_event_ids: u64,
    /// Of those, the ones whose payload differs from the first one's.
    pub conflicting_event_ids: u64,
    /// The ledger already had this batch: it committed before; nothing changed.
    pub duplicate: bool,
    /// The ledger says this batch was split before: deliver its halves.
    pub split: bool,
}

impl WriteSummary {
    /// Events this commit stored in either table.
    pub fn stored(&self) -> u64 {
        self.written + self.unknown_campaign + self.dead_lettered
    }
}

/// How the retry policy treats an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database could not be reached or did not answer in time: the same
    /// batch may well succeed later.
    Transient,
    /// The database refused the data itself (SQLSTATE class 22 data
    /// exception, 23 integrity constraint, P0 raised by a trigger): the same
    /// rows will be refused again.
    Data,
}

/// Why a write attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// No connection could be had (pool wait, connect, authentication, TLS).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The connection broke or the protocol failed mid-transaction.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The attempt did not finish within its deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server refused a statement.
    #[error("SQLSTATE {code}: {message}{}", .detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        code: String,
        message: String,
        detail: Option<String>,
    },
}

impl WriteError {
    pub fn class(&self) -> ErrorClass {
        match self {
            WriteError::Refused { code, .. }
                if code.starts_with("22") || code.starts_with("23") =>
            {
                ErrorClass::Data
            }
            _ => ErrorClass::Transient,
        }
    }

    /// True when the error says the database is out of reach (not merely slow
    /// or refusing a statement).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            WriteError::Unavailable(_) | WriteError::ConnectionLost(_)
        )
    }
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            return WriteError::Refused {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
            };
        }
        // Not a server answer: closed connection, I/O or protocol error.
        let mut msg = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            msg.push_str(": ");
            msg.push_str(&src.to_string());
        }
        WriteError::ConnectionLost(msg)
    }
}

impl From<deadpool_postgres::PoolError> for WriteError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => match WriteError::from(e) {
                // Refused at connect (authentication, database missing): unreachable for us.
                WriteError::Refused { code, message, .. } => {
                    WriteError::Unavailable(format!("SQLSTATE {code}: {message}"))
                }
                other => WriteError::Unavailable(other.to_string()),
            },
            other => WriteError::Unavailable(other.to_string()),
        }
    }
}

impl From<DbError> for WriteError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Query(e) => e.into(),
            DbError::Unavailable(e) => e.into(),
            other => WriteError::Unavailable(other.to_string()),
        }
    }
}

/// Where batches are committed.
pub trait Sink: Send + Sync + 'static {
    /// One attempt at committing `batch` in one transaction: its rows, its
    /// aggregates and its ledger entry, all or nothing. A batch the ledger
    /// already holds commits nothing and reports `duplicate`.
    fn write(&self, batch: &Batch)
        -> impl Future<Output = Result<WriteSummary, WriteError>> + Send;

    /// Stores every event of `batch` in `rejected_events` with `reason`,
    /// claiming its id in the ledger the same way.
    fn dead_letter(
        &self,
        batch: &Batch,
        reason: &str,
    ) -> impl Future<Output = Result<WriteSummary, WriteError>> + Send;

    /// Records in the ledger that `batch` is delivered as its two halves
    /// ([`Batch::halves`]), so a later attempt at the whole is sent to them.
    fn mark_split(&self, batch: &Batch) -> impl Future<Output = Result<(), WriteError>> + Send;
}

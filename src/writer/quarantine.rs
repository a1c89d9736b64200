//! The quarantine as the retry path sees it: rows neither `events` nor
//! `rejected_events` would take are kept beside the spool, in its checksummed
//! format, with the database's error (`SPOOL_DIR/quarantine/`), for an
//! operator to inspect (`ingest quarantine list`) and send again once the
//! cause is fixed (`ingest quarantine retry`).

use std::path::PathBuf;

use super::retry::Quarantine;
use crate::batch::Batch;

/// Quarantines into `SPOOL_DIR/quarantine/`, on a blocking thread.
pub struct SpoolQuarantine {
    /// The spool directory.
    pub dir: PathBuf,
}

impl Quarantine for SpoolQuarantine {
    async fn keep(&self, batch: &Batch, error: &str) -> Result<(), String> {
        let dir = self.dir.clone();
        let (record, error) = (crate::spool::encode_record(batch), error.to_string());
        let id = batch.id;
        tokio::task::spawn_blocking(move || {
            crate::spool::quarantine_record(&dir, id, &record, &error)
        })
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

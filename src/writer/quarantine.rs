//! The quarantine as the retry path sees it: rows neither `events` nor
//! `rejected_events` would take are kept beside the spool, in its checksummed
//! format, with the database's error (`SPOOL_DIR/quarantine/`), for an
//! operator to inspect (`ingest quarantine list`) and send again once the
//! cause is fixed (`ingest quarantine retry`).

use std::sync::Arc;

use super::retry::Quarantine;
use crate::batch::Batch;
use crate::spool::Spool;

/// Quarantines into the spool directory, on a blocking thread.
pub struct SpoolQuarantine {
    pub spool: Arc<Spool>,
}

impl Quarantine for SpoolQuarantine {
    async fn keep(&self, batch: &Batch, error: &str) -> Result<(), String> {
        let spool = self.spool.clone();
        let (record, error) = (crate::spool::encode_record(batch), error.to_string());
        let id = batch.id;
        tokio::task::spawn_blocking(move || spool.quarantine(id, &record, &error))
            .await
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

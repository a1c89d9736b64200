//! The one retry path: how a batch gets from memory (or the spool) into the
//! database, used by live delivery and by spool replay alike.
//!
//! [`RetryPolicy`] says how long an attempt may take, how long to wait
//! between attempts, and how each [`ErrorClass`] is treated:
//! - **transient** (unreachable, connection lost, too slow): the batch is
//!   handed to the [`Fallback`] (the spool, for live batches) so memory is
//!   freed; if there is none, or it refuses, the batch is retried after a
//!   backoff;
//! - **data** (the database refuses the rows themselves): retried a few times
//!   in case the refusal was a race, then dead-lettered into
//!   `rejected_events` with the database's error, so nothing waits behind it.
//!
//! A stop signal (the shutdown deadline for live delivery, the start of
//! shutdown for replay) ends the retries: the batch is handed to the fallback,
//! or given back to the caller.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use uuid::Uuid;

use super::sink::{ErrorClass, Sink, WriteError, WriteSummary};
use crate::batch::Batch;
use crate::stats::{Counter, RateLimitedLog, Stats};

/// Deadlines, backoff and the treatment of each error class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// One attempt (connection, transaction, commit) must finish within this.
    pub attempt_timeout: Duration,
    /// Wait before the second attempt; doubles per attempt up to `backoff_cap`.
    pub backoff_start: Duration,
    pub backoff_cap: Duration,
    /// A data error seen this many times in a row dead-letters the batch.
    pub data_error_attempts: u32,
}

impl RetryPolicy {
    /// The defaults around a given attempt deadline (`WRITE_TIMEOUT_MS`).
    pub fn with_timeout(attempt_timeout: Duration) -> Self {
        RetryPolicy {
            attempt_timeout,
            backoff_start: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            data_error_attempts: 3,
        }
    }

    /// Delay before retry number `attempt` (1-based): doubling from
    /// `backoff_start`, capped at `backoff_cap`, with up to 20% jitter
    /// derived from the batch id so replicas spread out.
    pub fn backoff(&self, attempt: u32, id: Uuid) -> Duration {
        let exp = self
            .backoff_start
            .saturating_mul(1u32 << attempt.clamp(1, 17).saturating_sub(1));
        let base = exp.min(self.backoff_cap);
        let jitter = (id.as_u128() as u64 ^ u64::from(attempt)) % 200;
        (base + base.mul_f64(jitter as f64 / 1000.0)).min(self.backoff_cap)
    }
}

/// Where a batch goes when the database will not take it now.
pub trait Fallback: Send + Sync + 'static {
    /// Takes the batch out of memory durably, or gives it back.
    fn hand_off(&self, batch: Batch) -> impl Future<Output = Result<(), Batch>> + Send;
}

/// No fallback: keep retrying (replay: the batch is on disk already).
pub struct KeepRetrying;

impl Fallback for KeepRetrying {
    async fn hand_off(&self, batch: Batch) -> Result<(), Batch> {
        Err(batch)
    }
}

/// Where a delivered batch ended.
#[derive(Debug)]
pub enum Outcome {
    /// Committed (to `events`, or dead-lettered to `rejected_events`), or
    /// found already committed in the ledger.
    Committed(WriteSummary),
    /// Taken by the fallback.
    HandedOff,
    /// Stopped with neither; the batch is given back.
    Stopped(Batch),
}

/// A sink, a fallback and a policy: delivers batches one at a time each
/// (several may be in flight on one `Delivery`).
pub struct Delivery<S, F> {
    pub sink: Arc<S>,
    pub fallback: F,
    pub policy: RetryPolicy,
    pub stats: Arc<Stats>,
    /// Replayed batches are counted as such.
    pub replay: bool,
    failure_log: RateLimitedLog,
}

impl<S: Sink, F: Fallback> Delivery<S, F> {
    pub fn new(
        sink: Arc<S>,
        fallback: F,
        policy: RetryPolicy,
        stats: Arc<Stats>,
        replay: bool,
    ) -> Self {
        Delivery {
            sink,
            fallback,
            policy,
            stats,
            replay,
            failure_log: RateLimitedLog::new(Duration::from_secs(5)),
        }
    }

    /// Delivers one batch until it has an outcome or `stop` turns true.
    pub async fn deliver(&self, mut batch: Batch, stop: &mut watch::Receiver<bool>) -> Outcome {
        let mut attempt = 0u32;
        let mut data_errors = 0u32;
        loop {
            if *stop.borrow() {
                return match self.fallback.hand_off(batch).await {
                    Ok(()) => Outcome::HandedOff,
                    Err(b) => Outcome::Stopped(b),
                };
            }
            // While the database is known to be down, skip the doomed attempt.
            if attempt == 0 && !self.stats.db_up.load(Relaxed) {
                match self.fallback.hand_off(batch).await {
                    Ok(()) => return Outcome::HandedOff,
                    Err(b) => batch = b,
                }
            }
            attempt += 1;
            let started = Instant::now();
            let result = tokio::select! {
                r = self.bounded(self.sink.write(&batch)) => r,
                _ = stop.wait_for(|s| *s) => continue,
            };
            let error = match result {
                Ok(summary) => {
                    self.stats.db_up.store(true, Relaxed);
                    self.record_commit(&batch, summary, started.elapsed());
                    return Outcome::Committed(summary);
                }
                Err(e) => e,
            };
            self.note_failure(&batch, attempt, &error);
            match error.class() {
                ErrorClass::Transient => {
                    data_errors = 0;
                    match self.fallback.hand_off(batch).await {
                        Ok(()) => return Outcome::HandedOff,
                        Err(b) => batch = b,
                    }
                }
                ErrorClass::Data => {
                    data_errors += 1;
                    if data_errors >= self.policy.data_error_attempts {
                        if let Some(summary) = self.dead_letter(&batch, &error).await {
                            return Outcome::Committed(summary);
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.policy.backoff(attempt, batch.id)) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
    }

    /// Runs one sink call under the attempt deadline.
    async fn bounded(
        &self,
        call: impl Future<Output = Result<WriteSummary, WriteError>>,
    ) -> Result<WriteSummary, WriteError> {
        match tokio::time::timeout(self.policy.attempt_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(WriteError::Timeout(self.policy.attempt_timeout)),
        }
    }

    /// Moves a batch the database keeps refusing into `rejected_events`.
    async fn dead_letter(&self, batch: &Batch, why: &WriteError) -> Option<WriteSummary> {
        let reason = format!("write_failed: {why}");
        let started = Instant::now();
        match self.bounded(self.sink.dead_letter(batch, &reason)).await {
            Ok(summary) => {
                tracing::error!(batch = %batch.id, events = batch.len(), error = %why, "batch refused by the database; moved to rejected_events");
                self.record_commit(batch, summary, started.elapsed());
                Some(summary)
            }
            Err(e) => {
                self.note_failure(batch, 0, &e);
                None
            }
        }
    }

    fn note_failure(&self, batch: &Batch, attempt: u32, e: &WriteError) {
        self.stats.add(Counter::WriteFailures, 1);
        if e.is_unreachable() {
            self.stats.db_up.store(false, Relaxed);
        }
        if self.failure_log.allow() {
            tracing::warn!(
                batch = %batch.id,
                events = batch.len(),
                attempt,
                replay = self.replay,
                failures_total = self.stats.get(Counter::WriteFailures),
                error = %e,
                "batch write failed (logged every 5 s at most)"
            );
        }
    }

    /// Counts a committed batch and logs one line for it.
    fn record_commit(&self, batch: &Batch, s: WriteSummary, took: Duration) {
        let st = &self.stats;
        st.add(Counter::Written, s.written);
        st.add(Counter::UnknownCampaign, s.unknown_campaign);
        st.add(Counter::DeadLettered, s.dead_lettered);
        if s.duplicate {
            st.add(Counter::DuplicateBatches, 1);
        } else {
            let now = super::unix_ms_now();
            st.record_flush(
                took,
                batch.len() as u64,
                batch.rows().map(|r| (now - r.received_ms).max(0) as u64),
            );
            st.add(Counter::Flushes, 1);
            st.last_flush_duration_us
                .store(took.as_micros() as u64, Relaxed);
            st.last_flush_events.store(batch.len() as u64, Relaxed);
            st.last_flush_age_ms
                .store((now - batch.oldest_received_ms()).max(0) as u64, Relaxed);
        }
        if self.replay {
            st.add(Counter::ReplayedEvents, s.stored());
            st.add(Counter::ReplayedBatches, 1);
        }
        tracing::info!(
            batch = %batch.id,
            events = s.written,
            unknown_campaign = s.unknown_campaign,
            dead_lettered = s.dead_lettered,
            duplicate = s.duplicate,
            replayed = self.replay,
            aggregates = batch.aggregate_keys(),
            took_ms = took.as_millis() as u64,
            "flushed"
        );
    }
}

#[cfg(test)]
mod tests {
    //! The retry path against a scripted sink: every error class, without a
    //! database (the real-PostgreSQL paths are in `tests/`).

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::batch::{Buffer, EventKind, Row};

    /// Answers each call with the next scripted result; records what it saw.
    #[derive(Default)]
    struct Scripted {
        writes: Mutex<VecDeque<Result<WriteSummary, WriteError>>>,
        dead_letters: Mutex<VecDeque<Result<WriteSummary, WriteError>>>,
        /// Calls that never answer (to test the deadline): the first `hang` writes.
        hang: Mutex<u32>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Sink for Scripted {
        async fn write(&self, _batch: &Batch) -> Result<WriteSummary, WriteError> {
            self.calls.lock().expect("lock").push("write");
            let hang = {
                let mut h = self.hang.lock().expect("lock");
                let hang = *h > 0;
                *h = h.saturating_sub(1);
                hang
            };
            if hang {
                std::future::pending::<()>().await;
            }
            self.writes
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Ok(WriteSummary::default()))
        }

        async fn dead_letter(
            &self,
            batch: &Batch,
            _reason: &str,
        ) -> Result<WriteSummary, WriteError> {
            self.calls.lock().expect("lock").push("dead_letter");
            self.dead_letters
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Ok(WriteSummary {
                    dead_lettered: batch.len() as u64,
                    ..WriteSummary::default()
                }))
        }
    }

    /// Takes batches when `accept` is true; counts them.
    struct Spool {
        accept: bool,
        taken: Mutex<u32>,
    }

    impl Fallback for Spool {
        async fn hand_off(&self, batch: Batch) -> Result<(), Batch> {
            if self.accept {
                *self.taken.lock().expect("lock") += 1;
                Ok(())
            } else {
                Err(batch)
            }
        }
    }

    fn batch() -> Batch {
        let mut b = Buffer::new();
        for i in 0..3 {
            b.push(&Row {
                kind: EventKind::Impression,
                ad_unit_id: Uuid::from_u128(1),
                campaign_id: Uuid::from_u128(2),
                creative_id: Uuid::from_u128(3),
                timestamp_ms: 1_700_000_000_000 + i,
                received_ms: 1_700_000_000_000,
                page_url: "https://e.x/",
                user_agent: None,
            })
            .expect("room");
        }
        Batch::from_parts(vec![b])
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempt_timeout: Duration::from_millis(200),
            backoff_start: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(5),
            data_error_attempts: 3,
        }
    }

    fn refused(code: &str) -> WriteError {
        WriteError::Refused {
            code: code.into(),
            message: "refused".into(),
            detail: None,
        }
    }

    fn delivery<F: Fallback>(sink: Scripted, fallback: F) -> Delivery<Scripted, F> {
        let stats = Arc::new(Stats::new());
        stats.db_up.store(true, Relaxed);
        Delivery::new(Arc::new(sink), fallback, fast(), stats, false)
    }

    fn no_stop() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        rx
    }

    #[tokio::test]
    async fn a_transient_error_hands_the_batch_to_the_fallback() {
        let sink = Scripted::default();
        sink.writes
            .lock()
            .expect("lock")
            .push_back(Err(WriteError::ConnectionLost("reset".into())));
        let d = delivery(
            sink,
            Spool {
                accept: true,
                taken: Mutex::new(0),
            },
        );
        let out = d.deliver(batch(), &mut no_stop()).await;
        assert!(matches!(out, Outcome::HandedOff), "{out:?}");
        assert_eq!(*d.fallback.taken.lock().expect("lock"), 1);
        assert!(
            !d.stats.db_up.load(Relaxed),
            "connection loss marks the database down"
        );
        assert_eq!(d.stats.get(Counter::WriteFailures), 1);
    }

    #[tokio::test]
    async fn without_a_fallback_transient_errors_are_retried_until_they_pass() {
        let sink = Scripted::default();
        {
            let mut w = sink.writes.lock().expect("lock");
            w.push_back(Err(WriteError::Unavailable("refused".into())));
            w.push_back(Err(refused("40001"))); // serialization failure: transient
            w.push_back(Ok(WriteSummary {
                written: 3,
                ..WriteSummary::default()
            }));
        }
        let d = delivery(sink, KeepRetrying);
        let out = d.deliver(batch(), &mut no_stop()).await;
        assert!(
            matches!(out, Outcome::Committed(s) if s.written == 3),
            "{out:?}"
        );
        assert_eq!(d.sink.calls.lock().expect("lock").len(), 3);
        assert_eq!(d.stats.get(Counter::Written), 3);
        assert!(d.stats.db_up.load(Relaxed));
    }

    #[tokio::test]
    async fn an_attempt_past_its_deadline_is_abandoned_and_retried() {
        let sink = Scripted::default();
        *sink.hang.lock().expect("lock") = 1;
        let d = delivery(sink, KeepRetrying);
        let started = Instant::now();
        let out = d.deliver(batch(), &mut no_stop()).await;
        assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(d.stats.get(Counter::WriteFailures), 1);
    }

    #[tokio::test]
    async fn a_data_error_is_retried_then_dead_lettered_never_spooled() {
        let sink = Scripted::default();
        for _ in 0..3 {
            sink.writes
                .lock()
                .expect("lock")
                .push_back(Err(refused("23514")));
        }
        let d = delivery(
            sink,
            Spool {
                accept: true,
                taken: Mutex::new(0),
            },
        );
        let out = d.deliver(batch(), &mut no_stop()).await;
        assert!(
            matches!(out, Outcome::Committed(s) if s.dead_lettered == 3),
            "{out:?}"
        );
        assert_eq!(
            *d.sink.calls.lock().expect("lock"),
            vec!["write", "write", "write", "dead_letter"]
        );
        assert_eq!(*d.fallback.taken.lock().expect("lock"), 0);
        assert_eq!(d.stats.get(Counter::DeadLettered), 3);
    }

    #[tokio::test]
    async fn stop_hands_off_or_gives_the_batch_back() {
        let (tx, mut rx) = watch::channel(false);
        let sink = Scripted::default();
        *sink.hang.lock().expect("lock") = 100;
        let d = delivery(sink, KeepRetrying);
        let b = batch();
        let id = b.id;
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(true);
        });
        match d.deliver(b, &mut rx).await {
            Outcome::Stopped(back) => assert_eq!(back.id, id),
            other => panic!("expected the batch back, got {other:?}"),
        }
        stopper.await.expect("stopper");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy::with_timeout(Duration::from_secs(1));
        let id = Uuid::from_u128(0);
        assert_eq!(
            p.backoff(1, id),
            Duration::from_millis(100) + Duration::from_micros(100)
        );
        assert!(p.backoff(2, id) >= Duration::from_millis(200));
        assert_eq!(p.backoff(30, id), Duration::from_secs(5));
    }
}

//! The one retry path: how a batch gets from memory (or the spool) into the
//! database, used by live delivery and by spool replay alike.
//!
//! [`RetryPolicy`] says how long an attempt may take, how long to wait
//! between attempts, how many rows one transaction may hold, and how each
//! [`ErrorClass`] is treated:
//! - **transient** (unreachable, connection lost, too slow): the batch is
//!   handed to the [`Fallback`] (the spool, for live batches) so memory is
//!   freed; if there is none, or it refuses, it is retried after a backoff;
//! - **data** (the database refuses the rows themselves): the batch is split
//!   in two at once ([`Batch::halves`], recorded in the ledger first) and each
//!   half delivered the same way, until the offending rows are alone; the
//!   rest commits exactly once. A lone offending row goes to
//!   `rejected_events` with the database's error; if that is refused too, to
//!   the [`Quarantine`] (a file beside the spool). Nothing waits behind it.
//!
//! A batch with more rows than the policy allows is split the same way before
//! it is written. A stop signal (the shutdown deadline for live delivery, the
//! start of shutdown for replay) ends the retries: what is left is handed to
//! the fallback, or given back to the caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use uuid::Uuid;

use super::sink::{ErrorClass, Sink, WriteError, WriteSummary};
use crate::batch::Batch;
use crate::stats::{Counter, RateLimitedLog, Stats};

/// Deadlines, backoff, batch size and the treatment of each error class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// One attempt (connection, transaction, commit) must finish within this.
    pub attempt_timeout: Duration,
    /// Wait before the second attempt; doubles per attempt up to `backoff_cap`.
    pub backoff_start: Duration,
    pub backoff_cap: Duration,
    /// Rows per transaction at most (`BATCH_MAX_ROWS`).
    pub max_rows: usize,
}

impl RetryPolicy {
    /// The defaults around a given attempt deadline (`WRITE_TIMEOUT_MS`) and
    /// batch size (`BATCH_MAX_ROWS`).
    pub fn new(attempt_timeout: Duration, max_rows: usize) -> Self {
        RetryPolicy {
            attempt_timeout,
            backoff_start: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            max_rows: max_rows.max(1),
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

/// True when `stop` says so, or when its sender is gone (whoever could stop
/// us has itself stopped: a `wait_for` would return at once, forever).
pub fn is_stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
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

/// Where a row goes that neither table will take.
pub trait Quarantine: Send + Sync + 'static {
    /// Keeps `batch` durably with the database's `error`.
    fn keep(&self, batch: &Batch, error: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// Where the events of one delivered batch ended, by count.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Committed to `events` or `rejected_events`, or found committed in the ledger.
    pub committed: u64,
    /// Taken by the fallback.
    pub handed_off: u64,
    /// Kept in the quarantine.
    pub quarantined: u64,
    /// Stopped with none of the above; given back.
    pub returned: Vec<Batch>,
}

impl Outcome {
    /// Events given back unwritten.
    pub fn unwritten(&self) -> u64 {
        self.returned.iter().map(|b| b.len() as u64).sum()
    }
}

type Boxed<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A sink, a fallback, a quarantine and a policy: delivers batches, several
/// at once if asked.
pub struct Delivery<S, F, Q> {
    pub sink: Arc<S>,
    pub fallback: F,
    pub quarantine: Q,
    pub policy: RetryPolicy,
    pub stats: Arc<Stats>,
    /// Replayed batches are counted as such.
    pub replay: bool,
    failure_log: RateLimitedLog,
    poison_log: RateLimitedLog,
    quarantine_log: RateLimitedLog,
}

impl<S: Sink, F: Fallback, Q: Quarantine> Delivery<S, F, Q> {
    pub fn new(
        sink: Arc<S>,
        fallback: F,
        quarantine: Q,
        policy: RetryPolicy,
        stats: Arc<Stats>,
        replay: bool,
    ) -> Self {
        Delivery {
            sink,
            fallback,
            quarantine,
            policy,
            stats,
            replay,
            failure_log: RateLimitedLog::new(Duration::from_secs(5)),
            poison_log: RateLimitedLog::new(Duration::from_secs(5)),
            quarantine_log: RateLimitedLog::new(Duration::from_secs(5)),
        }
    }

    /// Delivers one batch until every event has an outcome or `stop` turns true.
    pub async fn deliver(&self, batch: Batch, stop: &mut watch::Receiver<bool>) -> Outcome {
        let mut out = Outcome::default();
        self.deliver_into(batch, stop, &mut out).await;
        out
    }

    fn deliver_into<'a>(
        &'a self,
        mut batch: Batch,
        stop: &'a mut watch::Receiver<bool>,
        out: &'a mut Outcome,
    ) -> Boxed<'a> {
        Box::pin(async move {
            if batch.len() > self.policy.max_rows {
                return self.split(batch, stop, out).await;
            }
            let n = batch.len() as u64;
            let mut attempt = 0u32;
            loop {
                if is_stopped(stop) {
                    return self.give_up(batch, out).await;
                }
                // While the database is known to be down, skip the doomed attempt.
                if attempt == 0 && !self.stats.db_up.load(Relaxed) {
                    match self.fallback.hand_off(batch).await {
                        Ok(()) => return out.handed_off += n,
                        Err(b) => batch = b,
                    }
                }
                attempt += 1;
                let started = Instant::now();
                let result = tokio::select! {
                    r = self.bounded(self.sink.write(&batch)) => r,
                    _ = stop.wait_for(|s| *s) => continue,
                };
                match result {
                    Ok(summary) if summary.split => return self.split(batch, stop, out).await,
                    Ok(summary) => {
                        self.stats.db_up.store(true, Relaxed);
                        self.record_commit(&batch, summary, started.elapsed());
                        out.committed += n;
                        return;
                    }
                    Err(e) => {
                        self.note_failure(&batch, attempt, &e);
                        if e.class() == ErrorClass::Data {
                            return match batch.len() {
                                1 => self.isolate(batch, e, stop, out).await,
                                _ => self.split(batch, stop, out).await,
                            };
                        }
                    }
                }
                match self.fallback.hand_off(batch).await {
                    Ok(()) => return out.handed_off += n,
                    Err(b) => batch = b,
                }
                self.pause(attempt, batch.id, stop).await;
            }
        })
    }

    /// Hands what is left to the fallback, or gives it back.
    async fn give_up(&self, batch: Batch, out: &mut Outcome) {
        let n = batch.len() as u64;
        match self.fallback.hand_off(batch).await {
            Ok(()) => out.handed_off += n,
            Err(b) => out.returned.push(b),
        }
    }

    /// Records the split in the ledger, then delivers both halves.
    async fn split(&self, mut batch: Batch, stop: &mut watch::Receiver<bool>, out: &mut Outcome) {
        if batch.len() < 2 {
            return out.returned.push(batch);
        }
        let mut attempt = 0u32;
        loop {
            if is_stopped(stop) {
                return self.give_up(batch, out).await;
            }
            attempt += 1;
            match self.bounded(self.sink.mark_split(&batch)).await {
                Ok(()) => break,
                Err(e) => self.note_failure(&batch, attempt, &e),
            }
            let n = batch.len() as u64;
            match self.fallback.hand_off(batch).await {
                Ok(()) => return out.handed_off += n,
                Err(b) => batch = b,
            }
            self.pause(attempt, batch.id, stop).await;
        }
        let Some((first, second)) = batch.halves() else {
            return out.returned.push(batch);
        };
        tracing::debug!(batch = %batch.id, events = batch.len(), first = %first.id, second = %second.id, "batch split");
        drop(batch);
        self.deliver_into(first, stop, out).await;
        self.deliver_into(second, stop, out).await;
    }

    /// A single row the database refuses: `rejected_events`, else the quarantine.
    async fn isolate(
        &self,
        row: Batch,
        why: WriteError,
        stop: &mut watch::Receiver<bool>,
        out: &mut Outcome,
    ) {
        let reason = format!("write_failed: {why}");
        let mut attempt = 0u32;
        loop {
            if is_stopped(stop) {
                return self.give_up(row, out).await;
            }
            attempt += 1;
            let started = Instant::now();
            let refused = match self.bounded(self.sink.dead_letter(&row, &reason)).await {
                Ok(summary) => {
                    if self.poison_log.allow() {
                        tracing::error!(batch = %row.id, error = %why, "row refused by the database; stored in rejected_events (logged every 5 s at most)");
                    }
                    self.record_commit(&row, summary, started.elapsed());
                    out.committed += 1;
                    return;
                }
                Err(e) => {
                    self.note_failure(&row, attempt, &e);
                    e
                }
            };
            if refused.class() == ErrorClass::Data {
                let error = format!("{why}; rejected_events refused it too: {refused}");
                match self.quarantine.keep(&row, &error).await {
                    Ok(()) => {
                        self.stats.add(Counter::Quarantined, row.len() as u64);
                        if self.quarantine_log.allow() {
                            tracing::error!(batch = %row.id, error = %error, quarantined_total = self.stats.get(Counter::Quarantined), "row refused by both tables; quarantined (ingest quarantine list) (logged every 5 s at most)");
                        }
                        out.quarantined += row.len() as u64;
                        return;
                    }
                    Err(e) => {
                        tracing::error!(batch = %row.id, error = %e, "cannot quarantine a refused row; keeping it in memory")
                    }
                }
            }
            self.pause(attempt, row.id, stop).await;
        }
    }

    async fn pause(&self, attempt: u32, id: Uuid, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.policy.backoff(attempt, id)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// Runs one sink call under the attempt deadline.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, WriteError>>,
    ) -> Result<T, WriteError> {
        match tokio::time::timeout(self.policy.attempt_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(WriteError::Timeout(self.policy.attempt_timeout)),
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
        st.add(Counter::RepeatedEventIdsDb, s.repeated_event_ids);
        st.add(Counter::ConflictingEventIds, s.conflicting_event_ids);
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
            repeated_event_ids = s.repeated_event_ids,
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
    //! The retry path against a model of the database: every error class,
    //! poison rows, the split ledger and the deadline, without a database
    //! (the real-PostgreSQL paths are in `tests/`).

    use std::collections::{HashMap, HashSet, VecDeque};
    use std::sync::Mutex;

    use super::*;
    use crate::batch::{Buffer, EventKind, Row};

    /// A database in miniature: a ledger, the split marks, the rows of
    /// `events` and `rejected_events` (their page URLs). Rows whose URL
    /// contains `poison` are refused by `events`; `poison-both` by both tables.
    #[derive(Default)]
    struct Model {
        ledger: Mutex<HashMap<Uuid, usize>>,
        split: Mutex<HashSet<Uuid>>,
        events: Mutex<Vec<String>>,
        rejected: Mutex<Vec<String>>,
        /// Errors returned by the next writes, before anything else.
        script: Mutex<VecDeque<WriteError>>,
        /// The next this-many writes never answer.
        hang: Mutex<u32>,
        /// Rows per write call, in order.
        writes: Mutex<Vec<usize>>,
    }

    fn refused(code: &str) -> WriteError {
        WriteError::Refused {
            code: code.into(),
            message: "refused".into(),
            detail: None,
        }
    }

    impl Model {
        fn seen(&self, batch: &Batch) -> Option<WriteSummary> {
            if self.split.lock().expect("lock").contains(&batch.id) {
                return Some(WriteSummary {
                    split: true,
                    ..WriteSummary::default()
                });
            }
            self.ledger
                .lock()
                .expect("lock")
                .contains_key(&batch.id)
                .then(|| WriteSummary {
                    duplicate: true,
                    ..WriteSummary::default()
                })
        }
    }

    impl Sink for Model {
        async fn write(&self, batch: &Batch) -> Result<WriteSummary, WriteError> {
            self.writes.lock().expect("lock").push(batch.len());
            let hang = {
                let mut h = self.hang.lock().expect("lock");
                let hang = *h > 0;
                *h = h.saturating_sub(1);
                hang
            };
            if hang {
                std::future::pending::<()>().await;
            }
            if let Some(e) = self.script.lock().expect("lock").pop_front() {
                return Err(e);
            }
            if let Some(s) = self.seen(batch) {
                return Ok(s);
            }
            if batch.rows().any(|r| r.page_url.contains("poison")) {
                return Err(refused("23514"));
            }
            self.ledger
                .lock()
                .expect("lock")
                .insert(batch.id, batch.len());
            self.events
                .lock()
                .expect("lock")
                .extend(batch.rows().map(|r| r.page_url.to_string()));
            Ok(WriteSummary {
                written: batch.len() as u64,
                ..WriteSummary::default()
            })
        }

        async fn dead_letter(
            &self,
            batch: &Batch,
            _reason: &str,
        ) -> Result<WriteSummary, WriteError> {
            if let Some(s) = self.seen(batch) {
                return Ok(s);
            }
            if batch.rows().any(|r| r.page_url.contains("poison-both")) {
                return Err(refused("22001"));
            }
            self.ledger
                .lock()
                .expect("lock")
                .insert(batch.id, batch.len());
            self.rejected
                .lock()
                .expect("lock")
                .extend(batch.rows().map(|r| r.page_url.to_string()));
            Ok(WriteSummary {
                dead_lettered: batch.len() as u64,
                ..WriteSummary::default()
            })
        }

        async fn mark_split(&self, batch: &Batch) -> Result<(), WriteError> {
            self.split.lock().expect("lock").insert(batch.id);
            Ok(())
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

    /// Keeps what it is given.
    #[derive(Default)]
    struct Kept(Mutex<Vec<(String, String)>>);

    impl Quarantine for Kept {
        async fn keep(&self, batch: &Batch, error: &str) -> Result<(), String> {
            let mut k = self.0.lock().expect("lock");
            for r in batch.rows() {
                k.push((r.page_url.to_string(), error.to_string()));
            }
            Ok(())
        }
    }

    /// `n` rows with URLs `https://e.x/<i>`, except those in `poison` (by
    /// index), whose URL is `https://e.x/<i>/<tag>`.
    fn batch(n: usize, poison: &[(usize, &str)]) -> Batch {
        let mut b = Buffer::new();
        for i in 0..n {
            let url = match poison.iter().find(|(p, _)| *p == i) {
                Some((_, tag)) => format!("https://e.x/{i}/{tag}"),
                None => format!("https://e.x/{i}"),
            };
            b.push(&Row {
                kind: EventKind::Impression,
                ad_unit_id: Uuid::from_u128(1),
                campaign_id: Uuid::from_u128(2),
                creative_id: Uuid::from_u128(3),
                timestamp_ms: 1_700_000_000_000 + i as i64,
                received_ms: 1_700_000_000_000,
                page_url: &url,
                user_agent: None,
                invalid: None,
                filtered: true,
                event_id: None,
            })
            .expect("room");
        }
        Batch::from_parts(vec![b])
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempt_timeout: Duration::from_millis(200),
            backoff_start: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(5),
            max_rows: 1000,
        }
    }

    fn delivery<F: Fallback>(fallback: F) -> Delivery<Model, F, Kept> {
        let stats = Arc::new(Stats::new());
        stats.db_up.store(true, Relaxed);
        Delivery::new(
            Arc::new(Model::default()),
            fallback,
            Kept::default(),
            policy(),
            stats,
            false,
        )
    }

    fn no_stop() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        rx
    }

    fn sorted(v: &Mutex<Vec<String>>) -> Vec<String> {
        let mut v = v.lock().expect("lock").clone();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_transient_error_hands_the_batch_to_the_fallback() {
        let d = delivery(Spool {
            accept: true,
            taken: Mutex::new(0),
        });
        d.sink
            .script
            .lock()
            .expect("lock")
            .push_back(WriteError::ConnectionLost("reset".into()));
        let out = d.deliver(batch(3, &[]), &mut no_stop()).await;
        assert_eq!((out.committed, out.handed_off), (0, 3));
        assert_eq!(*d.fallback.taken.lock().expect("lock"), 1);
        assert!(
            !d.stats.db_up.load(Relaxed),
            "connection loss marks the database down"
        );
        assert_eq!(d.stats.get(Counter::WriteFailures), 1);
    }

    #[tokio::test]
    async fn without_a_fallback_transient_errors_are_retried_until_they_pass() {
        let d = delivery(KeepRetrying);
        {
            let mut s = d.sink.script.lock().expect("lock");
            s.push_back(WriteError::Unavailable("refused".into()));
            s.push_back(refused("40001")); // serialization failure: transient
            s.push_back(refused("42703")); // undefined column: the operator's to fix, keep retrying
        }
        let out = d.deliver(batch(3, &[]), &mut no_stop()).await;
        assert_eq!(out.committed, 3);
        assert_eq!(d.sink.writes.lock().expect("lock").len(), 4);
        assert_eq!(d.stats.get(Counter::Written), 3);
        assert!(d.stats.db_up.load(Relaxed));
    }

    #[tokio::test]
    async fn an_attempt_past_its_deadline_is_abandoned_and_retried() {
        let d = delivery(KeepRetrying);
        *d.sink.hang.lock().expect("lock") = 1;
        let started = Instant::now();
        let out = d.deliver(batch(3, &[]), &mut no_stop()).await;
        assert_eq!(out.committed, 3);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(d.stats.get(Counter::WriteFailures), 1);
    }

    #[tokio::test]
    async fn poison_rows_are_isolated_and_the_rest_commits_exactly_once() {
        let d = delivery(Spool {
            accept: true,
            taken: Mutex::new(0),
        });
        let b = batch(
            1000,
            &[
                (3, "poison"),
                (500, "poison"),
                (501, "poison"),
                (999, "poison"),
            ],
        );
        let all: Vec<String> = b.rows().map(|r| r.page_url.to_string()).collect();
        let out = d.deliver(b, &mut no_stop()).await;
        assert_eq!(
            (out.committed, out.handed_off, out.quarantined),
            (1000, 0, 0)
        );
        let events = sorted(&d.sink.events);
        let rejected = sorted(&d.sink.rejected);
        assert_eq!(events.len(), 996);
        assert_eq!(
            rejected,
            [
                "https://e.x/3/poison",
                "https://e.x/500/poison",
                "https://e.x/501/poison",
                "https://e.x/999/poison"
            ]
        );
        let mut both: Vec<String> = events.iter().chain(&rejected).cloned().collect();
        both.sort();
        let mut want = all;
        want.sort();
        assert_eq!(both, want, "every row once, in one table or the other");
        assert_eq!(
            *d.fallback.taken.lock().expect("lock"),
            0,
            "a data error never goes to the spool"
        );
        let calls = d.sink.writes.lock().expect("lock").len();
        assert!(
            calls <= 4 * 2 * 10 + 1,
            "bisection is logarithmic: {calls} writes"
        );
        assert_eq!(d.stats.get(Counter::DeadLettered), 4);
        assert_eq!(d.stats.get(Counter::Written), 996);
    }

    #[tokio::test]
    async fn a_row_both_tables_refuse_is_quarantined_and_nothing_waits() {
        let d = delivery(KeepRetrying);
        let out = d
            .deliver(batch(8, &[(5, "poison-both")]), &mut no_stop())
            .await;
        assert_eq!((out.committed, out.quarantined), (7, 1));
        let kept = d.quarantine.0.lock().expect("lock").clone();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, "https://e.x/5/poison-both");
        assert!(
            kept[0].1.contains("SQLSTATE 23514") && kept[0].1.contains("SQLSTATE 22001"),
            "{}",
            kept[0].1
        );
        assert_eq!(d.stats.get(Counter::Quarantined), 1);
        assert_eq!(sorted(&d.sink.events).len(), 7);
    }

    #[tokio::test]
    async fn a_split_batch_delivered_again_commits_nothing_twice() {
        let d = delivery(KeepRetrying);
        let b = batch(64, &[(10, "poison")]);
        let copy = Batch::restore(
            b.id,
            vec![{
                let mut buf = Buffer::new();
                for r in b.rows() {
                    buf.push(&r).expect("room");
                }
                buf
            }],
        );
        d.deliver(b, &mut no_stop()).await;
        // The same batch again (a replay after a crash mid-split, or after the
        // operator fixed the cause): the ledger sends it to its halves.
        let out = d.deliver(copy, &mut no_stop()).await;
        assert_eq!(out.committed, 64);
        assert_eq!(sorted(&d.sink.events).len(), 63, "no row twice");
        assert_eq!(sorted(&d.sink.rejected).len(), 1);
        assert!(d.stats.get(Counter::DuplicateBatches) >= 2);
    }

    #[tokio::test]
    async fn a_batch_over_max_rows_is_written_in_pieces() {
        let mut d = delivery(KeepRetrying);
        d.policy.max_rows = 10;
        let out = d.deliver(batch(35, &[]), &mut no_stop()).await;
        assert_eq!(out.committed, 35);
        let writes = d.sink.writes.lock().expect("lock").clone();
        assert!(writes.iter().all(|&n| n <= 10), "{writes:?}");
        assert_eq!(writes.iter().sum::<usize>(), 35);
        assert_eq!(sorted(&d.sink.events).len(), 35);
    }

    #[tokio::test]
    async fn stop_hands_off_or_gives_the_batch_back() {
        let (tx, mut rx) = watch::channel(false);
        let d = delivery(KeepRetrying);
        *d.sink.hang.lock().expect("lock") = 100;
        let b = batch(3, &[]);
        let id = b.id;
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(true);
        });
        let out = d.deliver(b, &mut rx).await;
        assert_eq!(out.returned.len(), 1);
        assert_eq!(out.returned[0].id, id);
        assert_eq!(out.unwritten(), 3);
        stopper.await.expect("stopper");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy::new(Duration::from_secs(1), 1000);
        let id = Uuid::from_u128(0);
        assert_eq!(
            p.backoff(1, id),
            Duration::from_millis(100) + Duration::from_micros(100)
        );
        assert!(p.backoff(2, id) >= Duration::from_millis(200));
        assert_eq!(p.backoff(30, id), Duration::from_secs(5));
    }
}

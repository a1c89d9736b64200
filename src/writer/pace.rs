//! `CopyPace`: spreads a live batch's COPY over part of the time its events
//! took to arrive, so PostgreSQL does the work in short bursts instead of one
//! long one.
//!
//! Why: PostgreSQL parses and inserts a COPY stream as fast as it arrives.
//! Handed a whole batch at once, its backend runs for tens of milliseconds
//! without sleeping; where it shares a core with the request thread (one
//! small machine, or a crowded host), the kernel lets it run whole slices of
//! several milliseconds while requests wait (measured: 12 ms preemptions,
//! client p99 in the tens of ms at half the floor's rate). Sent in small
//! pieces at a steady rate, the backend consumes each piece in well under a
//! millisecond and sleeps until the next, so requests find the core free.
//!
//! The rate: a batch whose events arrived over `span` is sent over
//! `span × fraction` (at most `max`), which keeps the COPY at least
//! `1 / fraction` times faster than events arrive. Batches that are not
//! live (older than two flush intervals: a backlog, a retry, spool or journal
//! replay) are sent at full speed, so catching up is never slowed.

use std::time::Duration;

use tokio::time::Instant;

/// COPY data goes out in pieces of about this size when paced.
pub const PACED_CHUNK_BYTES: usize = 32 * 1024;

/// How a live batch's COPY is paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// The longest a COPY is spread over; zero turns pacing off.
    pub max: Duration,
    /// The share of the batch's arrival span the COPY may take (0–1).
    pub fraction: f64,
    /// Batches whose oldest event is older than this are not paced.
    pub live_within: Duration,
}

impl Pacing {
    /// No pacing: every COPY at full speed.
    pub const OFF: Pacing = Pacing {
        max: Duration::ZERO,
        fraction: 0.0,
        live_within: Duration::ZERO,
    };

    /// How long a COPY of a batch whose oldest event is `age` old may take.
    pub fn budget(&self, age: Duration) -> Duration {
        if self.max.is_zero() || age > self.live_within {
            return Duration::ZERO;
        }
        age.mul_f64(self.fraction.clamp(0.0, 1.0)).min(self.max)
    }
}

/// Paces one COPY of `total` rows over a budget.
#[derive(Debug)]
pub struct CopyPace {
    start: Instant,
    budget: Duration,
    total: usize,
}

impl CopyPace {
    pub fn new(budget: Duration, total: usize) -> Self {
        CopyPace {
            start: Instant::now(),
            budget,
            total: total.max(1),
        }
    }

    /// The chunk size to stream with: small when paced, `unpaced` otherwise.
    pub fn chunk_bytes(&self, unpaced: usize) -> usize {
        if self.budget.is_zero() {
            unpaced
        } else {
            PACED_CHUNK_BYTES
        }
    }

    /// When `sent` of the rows have gone out: the moment that progress is
    /// due, if it is still ahead (then the caller waits for it).
    pub fn due(&self, sent: usize) -> Option<Instant> {
        if self.budget.is_zero() {
            return None;
        }
        let share = sent.min(self.total) as f64 / self.total as f64;
        let due = self.start + self.budget.mul_f64(share);
        // Waits shorter than the timer's grain are not worth a wake-up.
        (due > Instant::now() + Duration::from_millis(1)).then_some(due)
    }

    /// Waits until `sent` rows are due.
    pub async fn wait(&self, sent: usize) {
        if let Some(due) = self.due(sent) {
            tokio::time::sleep_until(due).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Pacing = Pacing {
        max: Duration::from_millis(500),
        fraction: 0.5,
        live_within: Duration::from_secs(10),
    };

    #[test]
    fn a_live_batch_gets_half_its_span_up_to_the_cap() {
        assert_eq!(
            P.budget(Duration::from_millis(300)),
            Duration::from_millis(150)
        );
        assert_eq!(P.budget(Duration::from_secs(5)), Duration::from_millis(500));
    }

    #[test]
    fn a_stale_batch_or_pacing_off_goes_at_full_speed() {
        assert_eq!(P.budget(Duration::from_secs(11)), Duration::ZERO);
        assert_eq!(Pacing::OFF.budget(Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn progress_is_due_in_proportion_to_the_rows_sent() {
        let pace = CopyPace::new(Duration::from_secs(60), 1000);
        assert_eq!(pace.chunk_bytes(1 << 20), PACED_CHUNK_BYTES);
        let due = pace.due(500).expect("half the rows are due later");
        assert_eq!(due - pace.start, Duration::from_secs(30));
        assert!(pace.due(0).is_none(), "nothing to wait for at the start");
        let late = CopyPace::new(Duration::from_millis(20), 1000);
        std::thread::sleep(Duration::from_millis(25));
        assert!(late.due(1000).is_none(), "behind schedule: no wait");
        let off = CopyPace::new(Duration::ZERO, 1000);
        assert_eq!(off.chunk_bytes(1 << 20), 1 << 20);
        assert!(off.due(1).is_none());
    }
}

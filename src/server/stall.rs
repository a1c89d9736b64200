//! The slow-loris guard, kept per connection rather than per request.
//!
//! hyper's own `header_read_timeout` arms a fresh timer for every request head
//! (a boxed `Sleep`, a clock read, an insert into and a removal from tokio's
//! timer wheel): about 0.3 µs a request, 4% of a bare hyper server's CPU on
//! this load (`examples/hyper204.rs … timer`). Here a connection instead marks
//! two counter steps per request (head in, response out) on a counter only it
//! and its watchdog share, and the watchdog looks at that counter every half
//! timeout: a connection that spent two looks in a row waiting for a head (an
//! idle keep-alive connection, or a head trickling in) is closed. The cut
//! comes between 1× and 1.5× the timeout after the wait began, as a timer's
//! would at 1×; nothing on the request path reads a clock or touches a timer.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// What a connection's requests report and its watchdog reads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Steps taken: +1 when a request head is complete, +1 when its response
    /// is ready. Odd: a request is being handled (its body read has its own
    /// deadline); even: the connection waits for the next head.
    steps: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// A request head is complete and the request is being handled.
    #[inline]
    pub fn head_in(&self) {
        self.steps.fetch_add(1, Relaxed);
    }

    /// The request's response is ready; the connection waits for the next head.
    #[inline]
    pub fn response_out(&self) {
        self.steps.fetch_add(1, Relaxed);
    }
}

/// Drives `conn` until it ends, or until it has waited for a request head
/// through two watchdog looks `timeout / 2` apart (then it is dropped, which
/// closes the socket). Returns true when the watchdog cut the connection.
pub async fn guard<F: Future>(conn: F, progress: &Progress, timeout: Duration) -> bool {
    let period = (timeout / 2).max(Duration::from_millis(1));
    let mut looks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = pin!(conn);
    // The step count the last looks saw while the connection waited, and how
    // many looks in a row saw it unchanged. A new connection waits from its
    // first moment, at step 0.
    let mut seen = 0;
    let mut unchanged = 1;
    loop {
        tokio::select! {
            biased;
            _ = &mut conn => return false,
            _ = looks.tick() => {
                let now = progress.steps.load(Relaxed);
                if now % 2 == 1 {
                    // A request is being handled: not waiting.
                    seen = u64::MAX;
                    unchanged = 0;
                } else if now == seen {
                    unchanged += 1;
                    // Waiting since at least the look before the last
                    // (`timeout` ago): cut it.
                    if unchanged >= 3 {
                        return true;
                    }
                } else {
                    // The wait began since the last look.
                    seen = now;
                    unchanged = 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_waiting_for_a_head_is_cut_between_one_and_one_and_a_half_timeouts() {
        let progress = Progress::new();
        let started = tokio::time::Instant::now();
        let cut = guard(
            std::future::pending::<()>(),
            &progress,
            Duration::from_secs(10),
        )
        .await;
        assert!(cut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_secs(15),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_in_the_middle_of_a_request_is_left_alone() {
        let progress = Progress::new();
        progress.head_in();
        let slow_request = tokio::time::sleep(Duration::from_secs(60));
        let cut = guard(slow_request, &progress, Duration::from_secs(10)).await;
        assert!(!cut, "a request being handled has its own deadlines");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_keep_a_connection_open() {
        let progress = Progress::new();
        let p = progress.clone();
        // A request every 4 s for a minute, on a 5 s timeout: never idle for long.
        let client = async move {
            for _ in 0..15 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                p.head_in();
                p.response_out();
            }
        };
        let cut = guard(client, &progress, Duration::from_secs(5)).await;
        assert!(!cut);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_after_the_last_response_counts() {
        let progress = Progress::new();
        let p = progress.clone();
        let started = tokio::time::Instant::now();
        let client = async move {
            tokio::time::sleep(Duration::from_secs(7)).await;
            p.head_in();
            p.response_out();
            std::future::pending::<()>().await;
        };
        assert!(guard(client, &progress, Duration::from_secs(10)).await);
        let waited = started.elapsed();
        // Cut 10 to 15 s after the response at 7 s.
        assert!(
            waited >= Duration::from_secs(17) && waited <= Duration::from_secs(22),
            "{waited:?}"
        );
    }
}

//! Exponential backoff with jitter between sync passes that failed on the network.
//!
//! Thousands of phones lose and regain coverage together (end of the day, a tower back up):
//! retrying on a fixed schedule would have them hit the relay in waves. Each delay doubles up
//! to a cap, and half of it is random ("equal jitter": never retry at once, never in step).

use std::time::Duration;

use rand::Rng;

/// First retry delay by default.
pub const DEFAULT_BASE: Duration = Duration::from_secs(1);

/// Longest delay by default: a phone back in coverage should not wait more than this.
pub const DEFAULT_MAX: Duration = Duration::from_secs(300);

/// Delays between retries: `min(max, base · 2^attempt)`, of which a random half.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_BASE, DEFAULT_MAX)
    }
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt (and count the attempt).
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    /// The upper bound of the next delay.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// A pass succeeded: start from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_stay_bounded_and_are_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut caps = Vec::new();
        for _ in 0..10 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            caps.push(cap.as_millis());
        }
        assert_eq!(caps[..6], [100, 200, 400, 800, 1600, 2000]);
        assert!(caps.iter().all(|c| *c <= 2000));
        let samples: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
                b.next_delay()
            })
            .collect();
        assert!(samples.len() > 1, "jitter spreads retries");
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.cap(), Duration::from_millis(100));
        let mut huge = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..100 {
            assert!(huge.next_delay() <= Duration::from_secs(300));
        }
    }
}

//! How long to wait before dialling a tail again: exponential backoff with full jitter.
//!
//! Many heads lose the same server at the same moment (a tail restarts, a cell tower drops).
//! If they all retried on the same schedule they would arrive together and knock it over
//! again, so each wait is drawn uniformly from `[0, min(max, initial · 2^n)]` ("full jitter",
//! as in AWS's architecture blog and gRPC's connection-backoff spec).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff with full jitter; [`reset`](Self::reset) after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    /// Waits start at up to `initial` and double after each failure, up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The ceiling of the next wait: `min(max, initial · 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Counts a failure and returns how long to wait before the next try.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(self.uniform())
    }

    /// Forgets the failures: the next wait starts small again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// A number in `[0, 1)`, from std's per-process random hasher keys; good enough to
    /// spread retries, no random-number crate needed.
    fn uniform(&mut self) -> f64 {
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.draws);
        self.draws += 1;
        (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_under_a_doubling_ceiling_capped_at_max() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let ceiling = backoff.ceiling();
                let wait = backoff.next_wait();
                assert!(wait <= ceiling, "{wait:?} > {ceiling:?}");
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn waits_are_spread_not_all_the_same() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..32).map(|_| backoff.next_wait()).collect();
        let low = waits
            .iter()
            .filter(|w| **w < Duration::from_millis(500))
            .count();
        // 32 fair draws all on one side of the middle: about one chance in two billion.
        assert!(low > 0 && low < 32, "{waits:?}");
    }
}

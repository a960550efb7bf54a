//! Token buckets for the flood limits: the relay's per-source connection rate and per-peer
//! forwarding rate, the connector's per-agent flow rate.
//!
//! Written here rather than taken from `governor`: the cores are fed their time (`now`), and a
//! bucket must decide by that time, deterministically in tests, while governor's limiters read
//! their own clock. A bucket belongs to one core on one thread, so it needs no atomics either.

use std::time::Instant;

/// A sustained rate with a burst: `burst` units at once, then `per_second` on average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u64,
    pub burst: u64,
}

impl Rate {
    pub const fn new(per_second: u64, burst: u64) -> Rate {
        Rate { per_second, burst }
    }

    /// The same rate with a burst of at least `min` (a byte limit must pass one full packet).
    pub fn with_burst_at_least(self, min: u64) -> Rate {
        Rate {
            burst: self.burst.max(min),
            ..self
        }
    }
}

/// One token bucket. It starts full.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: Rate) -> Bucket {
        Bucket {
            rate,
            tokens: rate.burst as f64,
            last: None,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            // Time never runs backwards for a bucket: an earlier `now` adds nothing.
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens =
                (self.tokens + dt * self.rate.per_second as f64).min(self.rate.burst as f64);
        }
        if self.last.is_none_or(|l| now > l) {
            self.last = Some(now);
        }
    }

    /// Takes `n` units if the bucket holds them; otherwise takes nothing and says no.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again at `now`: forgetting it then loses nothing.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate.burst as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Rate::new(10, 5));
        for _ in 0..5 {
            assert!(b.take(1, t0));
        }
        assert!(!b.take(1, t0));
        // 100 ms at 10/s: one more.
        assert!(b.take(1, t0 + Duration::from_millis(100)));
        assert!(!b.take(1, t0 + Duration::from_millis(100)));
        // Idle for long: full, never more than the burst.
        assert!(b.is_full(t0 + Duration::from_secs(60)));
        assert!(b.take(5, t0 + Duration::from_secs(60)));
        assert!(!b.take(1, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn more_than_the_burst_at_once_never_passes() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Rate::new(1_000_000, 1500));
        assert!(!b.take(1501, t0 + Duration::from_secs(10)));
        assert!(b.take(1500, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = Bucket::new(Rate::new(10, 1));
        assert!(b.take(1, t0));
        assert!(!b.take(1, t0 - Duration::from_secs(5)));
        assert!(!b.take(1, t0 + Duration::from_millis(50)));
        assert!(b.take(1, t0 + Duration::from_millis(100)));
    }

    proptest! {
        /// Over any run, what passed is at most the burst plus the rate times the time.
        #[test]
        fn never_more_than_burst_plus_rate_times_time(
            per_second in 1u64..100_000,
            burst in 1u64..10_000,
            steps in proptest::collection::vec((0u64..50_000, 1u64..2_000), 1..200),
        ) {
            let t0 = Instant::now();
            let mut b = Bucket::new(Rate::new(per_second, burst));
            let (mut at, mut passed) = (0u64, 0u64);
            for (dt_us, n) in steps {
                at += dt_us;
                if b.take(n, t0 + Duration::from_micros(at)) {
                    passed += n;
                }
                let bound = burst as f64 + per_second as f64 * at as f64 / 1e6;
                prop_assert!(passed as f64 <= bound + 1e-6, "{passed} > {bound}");
            }
        }
    }
}

//! Wall-clock time for the sans-IO cores, which never read a clock: the host says what the
//! time is at one instant, and the cores count from there on the host's monotonic `now`.

use std::time::Instant;

/// Unix time, known at one instant.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    /// Nanoseconds since the Unix epoch at `at`.
    unix_nanos: i128,
}

impl WallClock {
    /// The wall clock reads `unix_nanos` at `now`.
    pub fn new(now: Instant, unix_nanos: i128) -> Self {
        WallClock {
            at: now,
            unix_nanos,
        }
    }

    /// The instant the host last set the time at.
    pub fn set_at(&self) -> Instant {
        self.at
    }

    /// Nanoseconds since the Unix epoch at `now` (earlier instants count back).
    pub fn unix_nanos(&self, now: Instant) -> i128 {
        match now.checked_duration_since(self.at) {
            Some(d) => self.unix_nanos + d.as_nanos() as i128,
            None => self.unix_nanos - self.at.saturating_duration_since(now).as_nanos() as i128,
        }
    }

    /// Seconds since the Unix epoch at `now`.
    pub fn unix(&self, now: Instant) -> i64 {
        (self.unix_nanos(now) / 1_000_000_000) as i64
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn time_counts_on_from_the_instant_it_was_set_both_ways() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let c = WallClock::new(t0, 1_700_000_000_000_000_000);
        assert_eq!(c.unix(t0 + Duration::from_millis(2500)), 1_700_000_002);
        assert_eq!(
            c.unix_nanos(t0 - Duration::from_secs(3)),
            1_699_999_997_000_000_000
        );
    }
}

//! Which relay a client is homed on, when it has several: the best by round-trip time, with
//! hysteresis so that it does not flap, and a new home at once when the home fails.
//!
//! Sans-IO: the host measures RTTs (a probe on each relay's control connection) and reports
//! failures (the connection closed, was refused, or went silent); the state machine answers
//! with the home to use. The rules follow Tailscale's `net/netcheck`, which homes on the lowest
//! RTT seen over the last minutes and moves only for a clearly better one, and fix what its
//! users and iroh's complain of: a dead home is left at the moment it is known dead, for the
//! best relay still answering, never after a fixed back-off.
//!
//! - A relay's RTT is the lowest sample of the last [`RTT_WINDOW`] (a single slow probe on a
//!   busy link does not count against it).
//! - The home moves to a better relay only when that one's RTT is under [`SWITCH_RATIO`] of the
//!   home's and at least [`SWITCH_MARGIN`] lower.
//! - A failed relay is not a candidate until it answers a probe again.

use std::time::{Duration, Instant};

/// How long an RTT sample counts.
pub const RTT_WINDOW: Duration = Duration::from_secs(300);
/// A better relay must be under this fraction of the home's RTT ...
pub const SWITCH_RATIO: f64 = 2.0 / 3.0;
/// ... and this much faster.
pub const SWITCH_MARGIN: Duration = Duration::from_millis(10);
/// Samples kept per relay (the window's minimum is taken over them).
const SAMPLES: usize = 16;

#[derive(Debug, Clone, Default)]
struct Relay {
    /// (when, rtt), oldest first.
    samples: Vec<(Instant, Duration)>,
    failed: bool,
}

impl Relay {
    fn rtt(&self, now: Instant) -> Option<Duration> {
        self.samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) < RTT_WINDOW)
            .map(|(_, r)| *r)
            .min()
    }
}

/// Why the home changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The first home.
    First,
    /// The home failed; this is the best relay still up.
    HomeFailed,
    /// This relay is clearly faster than the home was.
    Faster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeChange {
    /// Index into the relay list the host gave; None: no relay is up.
    pub home: Option<usize>,
    pub why: Why,
}

#[derive(Debug, Clone)]
pub struct Homing {
    relays: Vec<Relay>,
    home: Option<usize>,
}

impl Homing {
    /// `count` relays, in the order the client's config lists them (a tie in RTT, or no RTT
    /// at all yet, goes to the earlier one).
    pub fn new(count: usize) -> Homing {
        Homing {
            relays: vec![Relay::default(); count],
            home: None,
        }
    }

    pub fn home(&self) -> Option<usize> {
        self.home
    }

    /// The RTT relay `i` counts with now.
    pub fn rtt(&self, i: usize, now: Instant) -> Option<Duration> {
        self.relays.get(i)?.rtt(now)
    }

    pub fn is_failed(&self, i: usize) -> bool {
        self.relays.get(i).is_some_and(|r| r.failed)
    }

    /// Relay `i` answered a probe in `rtt`: it is up. May move the home.
    pub fn on_rtt(&mut self, i: usize, rtt: Duration, now: Instant) -> Option<HomeChange> {
        let r = self.relays.get_mut(i)?;
        r.failed = false;
        if r.samples.len() == SAMPLES {
            r.samples.remove(0);
        }
        r.samples.push((now, rtt));
        self.reconsider(now)
    }

    /// Relay `i` failed (its connection closed, refused us, or went silent). When it was the
    /// home, the best relay still up is the home from now on.
    pub fn on_failure(&mut self, i: usize, now: Instant) -> Option<HomeChange> {
        let r = self.relays.get_mut(i)?;
        r.failed = true;
        if self.home != Some(i) {
            return None;
        }
        self.home = self.best(now);
        Some(HomeChange {
            home: self.home,
            why: Why::HomeFailed,
        })
    }

    /// Looks again at the RTTs (they age out of the window): the home may move.
    pub fn reconsider(&mut self, now: Instant) -> Option<HomeChange> {
        let best = self.best(now)?;
        let Some(home) = self.home else {
            self.home = Some(best);
            return Some(HomeChange {
                home: self.home,
                why: Why::First,
            });
        };
        if best == home {
            return None;
        }
        let (Some(b), Some(h)) = (self.relays[best].rtt(now), self.relays[home].rtt(now)) else {
            // No RTT for the home (its samples aged out): keep it; for the best: not better.
            return None;
        };
        if b.as_secs_f64() < h.as_secs_f64() * SWITCH_RATIO && h.saturating_sub(b) >= SWITCH_MARGIN
        {
            self.home = Some(best);
            return Some(HomeChange {
                home: self.home,
                why: Why::Faster,
            });
        }
        None
    }

    /// The relay up with the lowest RTT; without RTTs the first one up.
    fn best(&self, now: Instant) -> Option<usize> {
        let up = || self.relays.iter().enumerate().filter(|(_, r)| !r.failed);
        up().filter_map(|(i, r)| r.rtt(now).map(|t| (t, i)))
            .min()
            .map(|(_, i)| i)
            .or_else(|| up().map(|(i, _)| i).next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_home_is_the_fastest_and_a_slightly_faster_one_does_not_move_it() {
        let t0 = Instant::now();
        let mut h = Homing::new(3);
        assert_eq!(
            h.on_rtt(1, ms(40), t0),
            Some(HomeChange {
                home: Some(1),
                why: Why::First
            })
        );
        // 30 ms is not under 2/3 of 40.
        assert_eq!(h.on_rtt(2, ms(30), t0), None);
        // 20 ms is, and 20 ms faster.
        assert_eq!(
            h.on_rtt(0, ms(20), t0),
            Some(HomeChange {
                home: Some(0),
                why: Why::Faster
            })
        );
        // Under 2/3 but not 10 ms faster: a near relay stays home.
        let mut h = Homing::new(2);
        h.on_rtt(0, ms(12), t0);
        assert_eq!(h.on_rtt(1, ms(3), t0), None);
        assert_eq!(h.home(), Some(0));
    }

    #[test]
    fn a_failed_home_is_left_at_once_for_the_best_relay_up() {
        let t0 = Instant::now();
        let mut h = Homing::new(3);
        h.on_rtt(0, ms(10), t0);
        h.on_rtt(1, ms(50), t0);
        h.on_rtt(2, ms(30), t0);
        assert_eq!(h.home(), Some(0));
        assert_eq!(
            h.on_failure(0, t0),
            Some(HomeChange {
                home: Some(2),
                why: Why::HomeFailed
            })
        );
        // Another relay failing is no change; the last one failing leaves no home.
        assert_eq!(h.on_failure(1, t0), None);
        assert_eq!(
            h.on_failure(2, t0),
            Some(HomeChange {
                home: None,
                why: Why::HomeFailed
            })
        );
        // The first to answer again is home.
        assert_eq!(
            h.on_rtt(1, ms(50), t0),
            Some(HomeChange {
                home: Some(1),
                why: Why::First
            })
        );
    }

    #[test]
    fn without_rtts_the_first_relay_listed_is_home_and_failure_moves_to_the_next() {
        let t0 = Instant::now();
        let mut h = Homing::new(3);
        assert_eq!(h.reconsider(t0).and_then(|c| c.home), Some(0));
        assert_eq!(h.on_failure(0, t0).and_then(|c| c.home), Some(1));
    }

    #[test]
    fn one_slow_probe_does_not_count_against_a_relay_and_old_samples_age_out() {
        let t0 = Instant::now();
        let mut h = Homing::new(2);
        h.on_rtt(0, ms(20), t0);
        h.on_rtt(1, ms(60), t0);
        h.on_rtt(0, ms(300), t0 + ms(1000));
        assert_eq!(h.rtt(0, t0 + ms(1000)), Some(ms(20)));
        assert_eq!(h.home(), Some(0));
        // Five minutes on, only the slow sample is left: relay 1 (refreshed) is clearly faster.
        let later = t0 + RTT_WINDOW + ms(1);
        assert_eq!(
            h.on_rtt(1, ms(60), later),
            Some(HomeChange {
                home: Some(1),
                why: Why::Faster
            })
        );
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Rtt(usize, u64),
        Fail(usize),
        Wait(u64),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            6 => (0..4usize, 1..400u64).prop_map(|(i, r)| Ev::Rtt(i, r)),
            1 => (0..4usize).prop_map(Ev::Fail),
            1 => (1..120_000u64).prop_map(Ev::Wait),
        ]
    }

    proptest! {
        /// Whatever happens: the home is never a failed relay while one is up; a failed home
        /// is replaced in the same step; a move for speed is always to a clearly faster relay.
        #[test]
        fn homing_invariants(evs in prop::collection::vec(ev(), 1..200)) {
            let mut now = Instant::now();
            let mut h = Homing::new(4);
            for e in evs {
                let before = h.home();
                let change = match e {
                    Ev::Rtt(i, r) => h.on_rtt(i, ms(r), now),
                    Ev::Fail(i) => h.on_failure(i, now),
                    Ev::Wait(d) => { now += ms(d); h.reconsider(now) }
                };
                let any_up = (0..4).any(|i| !h.is_failed(i));
                if let Some(home) = h.home() {
                    prop_assert!(!h.is_failed(home));
                } else {
                    prop_assert!(!any_up || before.is_none() && change.is_none() && matches!(e, Ev::Fail(_)));
                }
                if let Some(c) = change {
                    prop_assert_eq!(c.home, h.home());
                    if c.why == Why::Faster {
                        // The old home's RTT as the decision saw it (this event's sample in).
                        let old = before.and_then(|b| h.rtt(b, now)).unwrap();
                        let new = h.rtt(c.home.unwrap(), now).unwrap();
                        prop_assert!(new.as_secs_f64() < old.as_secs_f64() * SWITCH_RATIO);
                        prop_assert!(old - new >= SWITCH_MARGIN);
                    }
                } else {
                    prop_assert_eq!(h.home(), before);
                }
            }
        }

        /// RTTs that wander within ±15 % of fixed values never bring the home back to a relay
        /// it left: no ping-pong (a move back would need a relay under (2/3)² of its own
        /// earlier RTT).
        #[test]
        fn noisy_rtts_do_not_flap(
            base in prop::collection::vec(5..200u64, 3),
            noise in prop::collection::vec((0..3usize, -15i64..=15), 1..300),
        ) {
            let t0 = Instant::now();
            let mut h = Homing::new(3);
            let mut homes = Vec::new();
            for (i, b) in base.iter().enumerate() {
                if let Some(c) = h.on_rtt(i, ms(*b), t0) {
                    homes.push(c.home);
                }
            }
            for (k, (i, pct)) in noise.into_iter().enumerate() {
                let r = (base[i] as i64 * (100 + pct) / 100).max(1) as u64;
                if let Some(c) = h.on_rtt(i, ms(r), t0 + ms(k as u64 * 100)) {
                    prop_assert!(!homes.contains(&c.home), "back to {:?} after {:?}", c.home, homes);
                    homes.push(c.home);
                }
            }
        }
    }
}

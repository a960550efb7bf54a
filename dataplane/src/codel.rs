//! Active queue management for a tunnel's DATAGRAM queue: CoDel (RFC 8289).
//!
//! IP packets wait in quiche's DATAGRAM send queue while the connection's congestion window is
//! full. A fixed depth alone lets a bulk transfer fill it, and every other packet then waits
//! behind it: a ping through a loaded tunnel took hundreds of milliseconds. CoDel watches how long
//! packets wait (their sojourn time) and, once the wait stayed above [`TARGET`] for a whole
//! [`INTERVAL`], drops packets at the head at a rate that rises with the square root of the drop
//! count, until the wait falls below the target. The senders inside the tunnel (TCP) take the
//! drops as congestion and slow down, so the queue stays short and latency low.
//!
//! quiche dequeues by itself when it sends, so this state machine keeps the enqueue time of each
//! packet in the queue's order and learns how many were taken from the queue's length. Decisions
//! are made when a packet is enqueued, from the sojourn time of the packet at the head.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Acceptable standing queue delay (RFC 8289's default).
pub const TARGET: Duration = Duration::from_millis(5);
/// How long the delay must stay above [`TARGET`] before dropping starts (RFC 8289's default,
/// a worst-case round trip).
pub const INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Codel {
    /// Enqueue times of the packets in the queue, oldest first.
    stamps: VecDeque<Instant>,
    /// When the delay, above target since then, allows dropping.
    first_above: Option<Instant>,
    dropping: bool,
    drop_next: Instant,
    count: u32,
    last_count: u32,
    /// Packets dropped so far.
    dropped: u64,
}

impl Codel {
    pub fn new(now: Instant) -> Self {
        Codel {
            stamps: VecDeque::new(),
            first_above: None,
            dropping: false,
            drop_next: now,
            count: 0,
            last_count: 0,
            dropped: 0,
        }
    }

    /// Packets dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A packet is about to be enqueued at `now` onto a queue now `queued` long. Returns how many
    /// packets to drop from the head of the queue first.
    pub fn before_enqueue(&mut self, queued: usize, now: Instant) -> usize {
        // The packets quiche took were the oldest.
        while self.stamps.len() > queued {
            self.stamps.pop_front();
        }
        let mut drops = 0;
        let ok = self.ok_to_drop(now);
        if self.dropping {
            if !ok {
                self.dropping = false;
            }
            while self.dropping && now >= self.drop_next {
                self.drop_head(&mut drops);
                self.count = self.count.saturating_add(1);
                if self.ok_to_drop(now) {
                    self.drop_next = control_law(self.drop_next, self.count);
                } else {
                    self.dropping = false;
                }
            }
        } else if ok {
            self.drop_head(&mut drops);
            self.dropping = true;
            // Dropping resumed soon after it stopped: start near the old rate, not from scratch.
            let delta = self.count.saturating_sub(self.last_count);
            self.count =
                if delta > 1 && now.saturating_duration_since(self.drop_next) < INTERVAL * 16 {
                    delta
                } else {
                    1
                };
            self.drop_next = control_law(now, self.count);
            self.last_count = self.count;
        }
        drops
    }

    /// The packet was enqueued (call after [`Codel::before_enqueue`] when the queue took it).
    pub fn enqueued(&mut self, now: Instant) {
        self.stamps.push_back(now);
    }

    fn drop_head(&mut self, drops: &mut usize) {
        if self.stamps.pop_front().is_some() {
            *drops += 1;
            self.dropped += 1;
        }
    }

    /// Whether the head's wait has been above target for an interval. A queue of at most one
    /// packet is never dropped from: it is no standing queue.
    fn ok_to_drop(&mut self, now: Instant) -> bool {
        let sojourn = match self.stamps.front() {
            Some(t) if self.stamps.len() > 1 => now.saturating_duration_since(*t),
            _ => Duration::ZERO,
        };
        if sojourn < TARGET {
            self.first_above = None;
            return false;
        }
        match self.first_above {
            None => {
                self.first_above = Some(now + INTERVAL);
                false
            }
            Some(t) => now >= t,
        }
    }
}

/// The next drop time: drops come closer together as `count` grows.
fn control_law(t: Instant, count: u32) -> Instant {
    let n = f64::from(count.max(1)).sqrt();
    t + INTERVAL.div_f64(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    /// A queue that grows by one packet per `gap` and is served one packet per `serve` (none
    /// when `serve` is None), for `steps` enqueues; returns the times of the drops.
    fn run(gap: Duration, serve: Option<Duration>, steps: usize) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut c = Codel::new(t0);
        let mut queued = 0usize;
        let mut served_until = t0;
        let mut drops = Vec::new();
        for i in 0..steps {
            let now = t0 + gap * i as u32;
            if let Some(s) = serve {
                while served_until + s <= now && queued > 0 {
                    served_until += s;
                    queued -= 1;
                }
                if queued == 0 {
                    served_until = now;
                }
            }
            let d = c.before_enqueue(queued, now);
            assert!(d <= queued);
            queued -= d;
            for _ in 0..d {
                drops.push(now - t0);
            }
            c.enqueued(now);
            queued += 1;
        }
        drops
    }

    #[test]
    fn a_queue_that_keeps_up_is_never_dropped_from() {
        // Served twice as fast as it fills.
        assert!(run(MS, Some(MS / 2), 2000).is_empty());
    }

    #[test]
    fn a_short_burst_is_never_dropped_from() {
        // 50 packets at once, then served: the delay is above target for less than an interval.
        let t0 = Instant::now();
        let mut c = Codel::new(t0);
        for i in 0..50 {
            assert_eq!(c.before_enqueue(i, t0), 0);
            c.enqueued(t0);
        }
        for left in (0..50).rev() {
            let now = t0 + MS * (50 - left as u32);
            assert_eq!(c.before_enqueue(left, now), 0);
            c.enqueued(now);
        }
    }

    #[test]
    fn a_standing_queue_is_dropped_from_ever_faster() {
        // Filled every 1 ms, served every 2 ms: the queue and its delay grow without bound.
        let drops = run(MS, Some(2 * MS), 3000);
        assert!(drops.len() > 5, "{drops:?}");
        // Nothing before the delay passed target plus a whole interval.
        assert!(
            drops[0] >= INTERVAL + TARGET,
            "first drop at {:?}",
            drops[0]
        );
        // The gaps between drops shrink (interval / sqrt(count)).
        let gaps: Vec<Duration> = drops.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= INTERVAL - 2 * MS, "{gaps:?}");
        assert!(gaps[gaps.len() - 1] < gaps[0], "{gaps:?}");
    }

    #[test]
    fn dropping_stops_once_the_queue_drains() {
        let t0 = Instant::now();
        let mut c = Codel::new(t0);
        let mut queued = 0;
        // A standing queue of 100 packets for 300 ms.
        for i in 0..300u32 {
            let now = t0 + MS * i;
            queued = queued.min(100);
            queued -= c.before_enqueue(queued, now);
            c.enqueued(now);
            queued += 1;
        }
        assert!(c.dropped() > 0);
        let before = c.dropped();
        // Then the queue empties: no more drops.
        for i in 300..600u32 {
            let now = t0 + MS * i;
            assert_eq!(c.before_enqueue(0, now), 0);
            c.enqueued(now);
        }
        assert_eq!(c.dropped(), before);
    }

    proptest! {
        #[test]
        fn drops_never_exceed_the_queue(steps in proptest::collection::vec((0usize..2000, 0u64..50), 1..300)) {
            let t0 = Instant::now();
            let mut c = Codel::new(t0);
            let mut now = t0;
            for (queued, advance) in steps {
                now += Duration::from_millis(advance);
                let d = c.before_enqueue(queued, now);
                prop_assert!(d <= queued);
                c.enqueued(now);
            }
        }
    }
}

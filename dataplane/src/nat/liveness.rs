//! Whether the direct path in use still works, told from what comes back on it (sans-IO).
//!
//! QUIC answers every ack-eliciting packet within about an RTT, and the tunnel sends a PING at
//! least every 15 s when idle. So "we sent on the direct path, and nothing at all has come back
//! on it for [`DIRECT_SILENCE`]" means the path is gone: while traffic flows that is noticed
//! within a few seconds, and an idle path is checked by each keepalive.

use std::time::{Duration, Instant};

/// How long the direct path may stay silent after we sent on it before the tunnel falls back
/// to the relay. Long enough for quiche's first probe timeouts on a slow link, short enough
/// that a transfer stalls only briefly.
pub const DIRECT_SILENCE: Duration = Duration::from_secs(3);

#[derive(Debug, Default, Clone)]
pub struct Liveness {
    /// The first send since the last packet received on the path.
    unanswered_since: Option<Instant>,
}

impl Liveness {
    /// We sent a packet on the direct path.
    pub fn on_send(&mut self, now: Instant) {
        if self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// A packet arrived on the direct path.
    pub fn on_recv(&mut self) {
        self.unanswered_since = None;
    }

    /// Starts over (the path changed).
    pub fn reset(&mut self) {
        self.unanswered_since = None;
    }

    /// When the path counts as dead unless something arrives first.
    pub fn deadline(&self) -> Option<Instant> {
        self.unanswered_since.map(|t| t + DIRECT_SILENCE)
    }

    pub fn is_dead(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_after_a_send_kills_the_path_and_any_answer_keeps_it() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        assert!(!l.is_dead(t0 + Duration::from_secs(60)), "idle is not dead");
        l.on_send(t0);
        // Later sends do not move the deadline: the first unanswered one counts.
        l.on_send(t0 + Duration::from_secs(2));
        assert_eq!(l.deadline(), Some(t0 + DIRECT_SILENCE));
        assert!(!l.is_dead(t0 + DIRECT_SILENCE - Duration::from_millis(1)));
        assert!(l.is_dead(t0 + DIRECT_SILENCE));
        l.on_recv();
        assert!(!l.is_dead(t0 + Duration::from_secs(10)));
        assert_eq!(l.deadline(), None);
        l.on_send(t0 + Duration::from_secs(10));
        l.reset();
        assert_eq!(l.deadline(), None);
    }
}

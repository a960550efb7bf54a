//! Whether the direct path in use still works, told from what comes back on it (sans-IO).
//!
//! A path is dead when QUIC had to fire a probe timeout on it (an ack-eliciting packet went
//! unanswered: plain ACKs, which nothing answers, do not count) and nothing at all has arrived
//! on it for [`DIRECT_SILENCE`]. While traffic flows that is noticed within a few seconds; an
//! idle path is checked by each keepalive PING (every 15 s).

use std::time::{Duration, Instant};

/// How long the direct path may stay silent, with a probe timeout fired, before the tunnel
/// falls back to the relay. Long enough for a few of quiche's probes on a slow link, short
/// enough that a transfer stalls only briefly.
pub const DIRECT_SILENCE: Duration = Duration::from_secs(3);

/// How often a stream of received packets re-reads the probe count (reading it walks quiche's
/// path statistics: not something to do per packet). A probe counted late only matters if the
/// path then falls silent, which is when it is dead anyway.
const BASELINE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Liveness {
    /// How long a silence with a probe timeout fired makes the path dead.
    silence: Duration,
    /// The last packet received on the path (or when the path started).
    last_rx: Instant,
    /// The path's probe-timeout count at `baseline_at`, a recent receive.
    pto_at_rx: usize,
    baseline_at: Instant,
    /// When an unanswered probe since `last_rx` was first noticed, for an owner that calls
    /// [`Liveness::note_probe`]: the silence then counts from there, not from `last_rx`.
    probe_at: Option<Instant>,
}

impl Liveness {
    /// Watches a path from `now`, whose probe timeouts so far number `pto_total`.
    pub fn new(now: Instant, pto_total: usize) -> Self {
        Self::with_silence(now, pto_total, DIRECT_SILENCE)
    }

    /// The same with another silence limit (a whole tunnel's, whatever its path).
    pub fn with_silence(now: Instant, pto_total: usize, silence: Duration) -> Self {
        Liveness {
            silence,
            last_rx: now,
            pto_at_rx: pto_total,
            baseline_at: now,
            probe_at: None,
        }
    }

    /// A packet arrived on the path; `pto_total` is asked for at most every 100 ms.
    pub fn on_recv(&mut self, now: Instant, pto_total: impl FnOnce() -> usize) {
        self.last_rx = now;
        self.probe_at = None;
        if now.saturating_duration_since(self.baseline_at) >= BASELINE_EVERY {
            self.pto_at_rx = pto_total();
            self.baseline_at = now;
        }
    }

    /// When the path counts as dead unless something arrives first: only once a probe timed
    /// out since the last packet received.
    pub fn deadline(&self, pto_total: usize) -> Option<Instant> {
        let from = self.probe_at.map_or(self.last_rx, |p| p.max(self.last_rx));
        (pto_total > self.pto_at_rx).then_some(from + self.silence)
    }

    /// Notes when a probe went unanswered (call it when QUIC's timers ran): from then on the
    /// path is dead only after `silence` more without a packet, however long it was idle
    /// before. For a whole tunnel, whose peer must get the time to move to another path;
    /// without it, a long-idle path whose keepalive goes unanswered is dead at once.
    pub fn note_probe(&mut self, now: Instant, pto_total: usize) {
        if self.probe_at.is_none() && pto_total > self.pto_at_rx {
            self.probe_at = Some(now);
        }
    }

    /// The silence so far does not count (its cause is known to be elsewhere): the path is
    /// dead only after `silence` more from `now` without a packet.
    pub fn defer(&mut self, now: Instant) {
        self.probe_at = Some(now);
    }

    pub fn is_dead(&self, now: Instant, pto_total: usize) -> bool {
        self.deadline(pto_total).is_some_and(|d| now >= d)
    }

    /// The probe count now comes from another path (whose count so far is `pto_total`):
    /// only its probes from now on count; the last packet received stays what it was.
    pub fn rebase(&mut self, pto_total: usize) {
        self.pto_at_rx = pto_total;
        self.probe_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_with_an_unanswered_probe_kills_the_path() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 4);
        // Quiet without a probe timeout: an idle path, or one we only sent ACKs on.
        assert_eq!(l.deadline(4), None);
        assert!(!l.is_dead(t0 + Duration::from_secs(60), 4));
        // A probe went unanswered: dead once the path has been silent long enough.
        assert_eq!(l.deadline(5), Some(t0 + DIRECT_SILENCE));
        assert!(!l.is_dead(t0 + DIRECT_SILENCE - Duration::from_millis(1), 5));
        assert!(l.is_dead(t0 + DIRECT_SILENCE, 5));
        // Anything received starts over, probe count included.
        let t1 = t0 + Duration::from_secs(10);
        l.on_recv(t1, || 5);
        assert_eq!(l.deadline(5), None);
        assert!(!l.is_dead(t1 + Duration::from_secs(60), 5));
        // A long-idle path whose keepalive goes unanswered is dead at once.
        assert!(l.is_dead(t1 + Duration::from_secs(15), 6));
        // Counted on another path from now on (which has had 2 probes): only its next counts.
        l.rebase(2);
        assert!(!l.is_dead(t1 + Duration::from_secs(15), 2));
        assert!(l.is_dead(t1 + Duration::from_secs(15), 3));
        // With the probe noted when it fired, the silence counts from there.
        let t2 = t1 + Duration::from_secs(15);
        l.note_probe(t2, 3);
        assert!(!l.is_dead(t2 + DIRECT_SILENCE - Duration::from_millis(1), 3));
        assert!(l.is_dead(t2 + DIRECT_SILENCE, 4));
        // Noted once: later probes do not move it.
        l.note_probe(t2 + Duration::from_secs(1), 4);
        assert_eq!(l.deadline(4), Some(t2 + DIRECT_SILENCE));
    }

    #[test]
    fn a_stream_of_packets_reads_the_probe_count_at_most_every_100_ms() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 0);
        let mut reads = 0;
        for ms in 1..=250u64 {
            l.on_recv(t0 + Duration::from_millis(ms), || {
                reads += 1;
                2
            });
        }
        assert_eq!(reads, 2, "at 100 and 200 ms");
        // Packets keep the path alive whatever the count: the deadline follows the last one.
        assert_eq!(
            l.deadline(3),
            Some(t0 + Duration::from_millis(250) + DIRECT_SILENCE)
        );
        assert_eq!(l.deadline(2), None);
    }
}

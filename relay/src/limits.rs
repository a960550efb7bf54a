//! The relay's flood limits: how fast one source address may open connections, how many it
//! may hold, and how fast each peer may send. A peer over its rate loses only what it sends
//! beyond it, dropped before decryption (so it costs the relay little, and the peer's
//! congestion control backs off); its connection stays up and every other peer goes on at its
//! own pace. All of it is plain per-connection state in the one thread that owns the relay
//! core: no lock on the packet path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use sluice_dataplane::rate::{Bucket, Rate};

use crate::server::Refusal;

/// A byte limit's burst is at least one full UDP payload, so any packet can pass.
pub const MIN_BYTE_BURST: u64 = 65_535;

/// How often a refused source, or a peer over its rate, is said in the log at most.
const SAY_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// New connections one source IP address may open (counted after address validation, so
    /// a spoofed address cannot use up another's).
    pub connections_per_source: Rate,
    /// Connections one source IP address may hold at once (a NAT puts many nodes behind one).
    pub connections_per_address: usize,
    /// Packets per second the relay takes from one authenticated peer (its tunnel packets,
    /// nearly all of them, and its control traffic); None: no limit.
    pub peer_packets: Option<Rate>,
    /// Bytes (UDP payload) per second the relay takes from one authenticated peer; None: no
    /// limit.
    pub peer_bytes: Option<Rate>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_source: Rate::new(20, 200),
            connections_per_address: 1024,
            peer_packets: None,
            peer_bytes: None,
        }
    }
}

struct Source {
    bucket: Bucket,
    live: usize,
    said: Option<Instant>,
}

/// Every source address the relay has seen lately.
pub(crate) struct Sources {
    limits: Limits,
    map: HashMap<IpAddr, Source>,
    next_prune: Option<Instant>,
}

impl Sources {
    pub fn new(limits: Limits) -> Sources {
        Sources {
            limits,
            map: HashMap::new(),
            next_prune: None,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        for s in self.map.values_mut() {
            s.bucket = Bucket::new(limits.connections_per_source);
        }
    }

    /// A new connection from `ip`: taken (and counted as live) or refused. When refused,
    /// the second value says whether to log it (once per source per [`SAY_EVERY`]).
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<(), (Refusal, bool)> {
        let rate = self.limits.connections_per_source;
        let s = self.map.entry(ip).or_insert_with(|| Source {
            bucket: Bucket::new(rate),
            live: 0,
            said: None,
        });
        let refusal = if s.live >= self.limits.connections_per_address {
            Refusal::TooManyConnections
        } else if !s.bucket.take(1, now) {
            Refusal::ConnectionRate
        } else {
            s.live += 1;
            return Ok(());
        };
        let say = s
            .said
            .is_none_or(|t| now.saturating_duration_since(t) >= SAY_EVERY);
        if say {
            s.said = Some(now);
        }
        Err((refusal, say))
    }

    /// A connection from `ip` that [`Sources::admit`] took is gone.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(s) = self.map.get_mut(&ip) {
            s.live = s.live.saturating_sub(1);
        }
    }

    /// Forgets sources with no connection whose bucket is full again (every few seconds).
    pub fn prune(&mut self, now: Instant) {
        if self.next_prune.is_some_and(|t| now < t) {
            return;
        }
        self.next_prune = Some(now + SAY_EVERY);
        self.map.retain(|_, s| s.live > 0 || !s.bucket.is_full(now));
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.map.len()
    }
}

/// One peer's forwarding limit, and what it dropped since it was last said.
pub(crate) struct PeerLimit {
    packets: Option<Bucket>,
    bytes: Option<Bucket>,
    dropped: (u64, u64),
    said: Option<Instant>,
}

impl PeerLimit {
    pub fn new(limits: &Limits) -> PeerLimit {
        PeerLimit {
            packets: limits.peer_packets.map(Bucket::new),
            bytes: limits
                .peer_bytes
                .map(|r| Bucket::new(r.with_burst_at_least(MIN_BYTE_BURST))),
            dropped: (0, 0),
            said: None,
        }
    }

    pub fn is_limited(&self) -> bool {
        self.packets.is_some() || self.bytes.is_some()
    }

    /// Whether a packet of `len` bytes may be forwarded now.
    pub fn allow(&mut self, len: usize, now: Instant) -> bool {
        let ok = self.packets.as_mut().is_none_or(|b| b.take(1, now))
            && self.bytes.as_mut().is_none_or(|b| b.take(len as u64, now));
        if !ok {
            self.dropped.0 += 1;
            self.dropped.1 += len as u64;
        }
        ok
    }

    /// Packets and bytes dropped since the last report, at most once per [`SAY_EVERY`].
    pub fn report(&mut self, now: Instant) -> Option<(u64, u64)> {
        if self.dropped.0 == 0
            || self
                .said
                .is_some_and(|t| now.saturating_duration_since(t) < SAY_EVERY)
        {
            return None;
        }
        self.said = Some(now);
        Some(std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_source_is_limited_in_rate_and_in_number_and_others_are_not() {
        let t0 = Instant::now();
        let mut s = Sources::new(Limits {
            connections_per_source: Rate::new(1, 3),
            connections_per_address: 2,
            ..Limits::default()
        });
        assert!(s.admit(ip(1), t0).is_ok());
        assert!(s.admit(ip(1), t0).is_ok());
        assert_eq!(s.admit(ip(1), t0), Err((Refusal::TooManyConnections, true)));
        s.release(ip(1));
        assert!(s.admit(ip(1), t0).is_ok());
        s.release(ip(1));
        // The burst of 3 is spent; said once per interval.
        assert_eq!(s.admit(ip(1), t0), Err((Refusal::ConnectionRate, false)));
        assert!(s.admit(ip(2), t0).is_ok());
        // A second later one more token.
        assert!(s.admit(ip(1), t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn idle_sources_are_forgotten_busy_ones_kept() {
        let t0 = Instant::now();
        let mut s = Sources::new(Limits {
            connections_per_source: Rate::new(1, 1),
            ..Limits::default()
        });
        assert!(s.admit(ip(1), t0).is_ok());
        assert!(s.admit(ip(2), t0).is_ok());
        s.release(ip(2));
        s.prune(t0);
        // ip 2's bucket is still empty: forgetting it would give it a fresh burst.
        assert_eq!(s.tracked(), 2);
        s.prune(t0 + Duration::from_secs(20));
        assert_eq!(s.tracked(), 1);
    }

    #[test]
    fn a_peer_over_its_rate_loses_what_is_beyond_it() {
        let t0 = Instant::now();
        let mut p = PeerLimit::new(&Limits {
            peer_packets: Some(Rate::new(100, 10)),
            peer_bytes: Some(Rate::new(1000, 10)),
            ..Limits::default()
        });
        // The byte burst is raised to one full packet.
        assert!(p.allow(1500, t0));
        let passed = (0..100).filter(|_| p.allow(100, t0)).count();
        assert_eq!(passed, 9);
        assert_eq!(p.report(t0), Some((91, 9100)));
        assert_eq!(p.report(t0), None);
        assert!(p.allow(100, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn no_limit_passes_everything() {
        let mut p = PeerLimit::new(&Limits::default());
        assert!(!p.is_limited());
        let t0 = Instant::now();
        assert!((0..100_000).all(|_| p.allow(65_535, t0)));
    }
}

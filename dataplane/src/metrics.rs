//! What a node counts for its operators: plain numbers that the sans-IO cores (the agent
//! engine, the connector core) keep as they decide, and that a host exports (Prometheus on
//! Linux, `linux/src/metrics.rs`). No clock reads and no I/O here; counters only grow, so a
//! tunnel that closes takes nothing with it.
//!
//! Labels are closed sets (a path, a reason, a result), never a peer: the series count stays
//! fixed however many agents come and go.

use std::time::Duration;

pub use crate::status::PathKind;

/// Packets and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

/// Which way a packet went, seen from this node's tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Into a tunnel, towards the peer.
    Sent,
    /// Out of a tunnel, from the peer.
    Received,
}

impl PathKind {
    pub const ALL: [PathKind; 2] = [PathKind::Direct, PathKind::Relay];

    pub fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// IP packets carried by the tunnels (the apps' packets, not the QUIC around them), by
/// direction and by the path the tunnel was on at the time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    sent: [Count; 2],
    received: [Count; 2],
}

impl Traffic {
    pub fn count(&mut self, dir: Direction, path: PathKind, bytes: usize) {
        match dir {
            Direction::Sent => self.sent[path.index()].add(bytes),
            Direction::Received => self.received[path.index()].add(bytes),
        }
    }

    pub fn get(&self, dir: Direction, path: PathKind) -> Count {
        match dir {
            Direction::Sent => self.sent[path.index()],
            Direction::Received => self.received[path.index()],
        }
    }

    /// Both paths together.
    pub fn total(&self, dir: Direction) -> Count {
        let mut c = Count::default();
        for p in PathKind::ALL {
            let x = self.get(dir, p);
            c.packets += x.packets;
            c.bytes += x.bytes;
        }
        c
    }
}

/// Why a packet was dropped (or answered with an error instead of carried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The policy denies its flow.
    Policy,
    /// No resource covers its destination, or its protocol cannot be carried.
    NoRoute,
    /// Larger than the tunnel carries (answered with ICMP "too big").
    TooBig,
    /// Not a well-formed IP packet.
    Malformed,
    /// A queue on its way was full (or its tunnel refused it).
    QueueFull,
    /// Over a rate limit.
    RateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::Policy,
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::Malformed,
        DropReason::QueueFull,
        DropReason::RateLimited,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Policy => "policy",
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::Malformed => "malformed",
            DropReason::QueueFull => "queue_full",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// Dropped packets by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops([u64; 6]);

impl Drops {
    pub fn add(&mut self, why: DropReason) {
        self.0[why as usize] += 1;
    }

    pub fn add_n(&mut self, why: DropReason, n: u64) {
        self.0[why as usize] += n;
    }

    pub fn get(&self, why: DropReason) -> u64 {
        self.0[why as usize]
    }
}

/// New-flow decisions of the policy (one per flow, not per packet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decisions {
    pub allowed: u64,
    pub denied: u64,
}

impl Decisions {
    pub fn count(&mut self, allowed: bool) {
        if allowed {
            self.allowed += 1;
        } else {
            self.denied += 1;
        }
    }
}

/// Who answered a DNS query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKind {
    /// The agent itself: a resource name's synthetic address, or a name the policy hides.
    Local,
    /// The resource's connector (records other than A/AAAA), asked through the tunnel.
    Connector,
    /// The upstream resolvers (every name that is not a resource's).
    Upstream,
    /// A connector's lookup in its own network, for an agent.
    Lookup,
}

impl DnsKind {
    pub const ALL: [DnsKind; 4] = [
        DnsKind::Local,
        DnsKind::Connector,
        DnsKind::Upstream,
        DnsKind::Lookup,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DnsKind::Local => "local",
            DnsKind::Connector => "connector",
            DnsKind::Upstream => "upstream",
            DnsKind::Lookup => "lookup",
        }
    }
}

/// How a DNS query ended: the answer's response code, or no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsResult {
    NoError,
    NxDomain,
    ServFail,
    Refused,
    /// Any other response code (FORMERR, NOTIMP, ...).
    Other,
    /// Never answered (not a query, or its client went away).
    Dropped,
}

impl DnsResult {
    pub const ALL: [DnsResult; 6] = [
        DnsResult::NoError,
        DnsResult::NxDomain,
        DnsResult::ServFail,
        DnsResult::Refused,
        DnsResult::Other,
        DnsResult::Dropped,
    ];

    /// The result an answer carries, read from its header's RCODE bits.
    pub fn of_answer(answer: &[u8]) -> DnsResult {
        match answer.get(3).map(|b| b & 0x0f) {
            Some(0) => DnsResult::NoError,
            Some(2) => DnsResult::ServFail,
            Some(3) => DnsResult::NxDomain,
            Some(5) => DnsResult::Refused,
            _ => DnsResult::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            DnsResult::NoError => "noerror",
            DnsResult::NxDomain => "nxdomain",
            DnsResult::ServFail => "servfail",
            DnsResult::Refused => "refused",
            DnsResult::Other => "other",
            DnsResult::Dropped => "dropped",
        }
    }
}

/// Upper bounds, in seconds, of the DNS answer-time histogram's buckets (a last one, +Inf,
/// is implied): from a local answer (well under a millisecond) to an upstream's timeout.
pub const DNS_LATENCY_BOUNDS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// A histogram with [`DNS_LATENCY_BOUNDS`]: per-bucket counts (not cumulative; the last is
/// +Inf), their sum in seconds and their number.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Histogram {
    buckets: [u64; DNS_LATENCY_BOUNDS.len() + 1],
    pub sum_secs: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = DNS_LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(DNS_LATENCY_BOUNDS.len());
        self.buckets[i] += 1;
        self.sum_secs += s;
        self.count += 1;
    }

    /// `(upper bound, count)` for each bucket, not cumulative; the last bound is infinite.
    pub fn per_bucket(&self) -> Vec<(f64, u64)> {
        DNS_LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets)
            .collect()
    }

    /// `(upper bound, cumulative count)` for each finite bucket, as Prometheus writes them.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        DNS_LATENCY_BOUNDS
            .iter()
            .zip(self.buckets)
            .map(|(b, n)| {
                acc += n;
                (*b, acc)
            })
            .collect()
    }
}

/// DNS queries by who answered and how, with the time to answer by who answered.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DnsStats {
    queries: [[u64; 6]; 4],
    latency: [Histogram; 4],
}

impl DnsStats {
    /// A query of `kind` answered with `answer` after `took`.
    pub fn answered(&mut self, kind: DnsKind, answer: &[u8], took: Duration) {
        let r = DnsResult::of_answer(answer);
        self.queries[kind as usize][r as usize] += 1;
        self.latency[kind as usize].observe(took);
    }

    /// A query of `kind` that got no answer.
    pub fn dropped(&mut self, kind: DnsKind) {
        self.queries[kind as usize][DnsResult::Dropped as usize] += 1;
    }

    pub fn queries(&self, kind: DnsKind, result: DnsResult) -> u64 {
        self.queries[kind as usize][result as usize]
    }

    pub fn total(&self) -> u64 {
        self.queries.iter().flatten().sum()
    }

    pub fn latency(&self, kind: DnsKind) -> &Histogram {
        &self.latency[kind as usize]
    }
}

/// Everything an agent or a connector counts about its tunnels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeCounters {
    pub traffic: Traffic,
    pub drops: Drops,
    pub decisions: Decisions,
    pub dns: DnsStats,
    /// Path changes of tunnels, by the path they moved to.
    pub switches_to: [u64; 2],
    /// Packets read from the TUN device (the agent).
    pub device_packets: u64,
    /// TCP segments of connections whose tunnel went away, answered with a reset (the agent).
    pub resets: u64,
    /// Tunnels up now (a gauge, filled in when a snapshot is taken).
    pub tunnels: u64,
    /// Flows open now (a gauge, filled in when a snapshot is taken).
    pub flows: u64,
}

impl NodeCounters {
    pub fn switched(&mut self, to: PathKind) {
        self.switches_to[to.index()] += 1;
    }

    pub fn switches(&self, to: PathKind) -> u64 {
        self.switches_to[to.index()]
    }

    /// One line for the log at exit.
    pub fn line(&self) -> String {
        let sent = self.traffic.total(Direction::Sent);
        let recv = self.traffic.total(Direction::Received);
        let d = |r| self.drops.get(r);
        format!(
            "{} packets from TUN, {} malformed, {} without route, {} denied, {} too big, {} dropped, {} reset, {} DNS queries; {} packets ({} bytes) sent and {} ({} bytes) received through tunnels, {} flows allowed and {} denied",
            self.device_packets,
            d(DropReason::Malformed),
            d(DropReason::NoRoute),
            d(DropReason::Policy),
            d(DropReason::TooBig),
            d(DropReason::QueueFull),
            self.resets,
            self.dns.total(),
            sent.packets,
            sent.bytes,
            recv.packets,
            recv.bytes,
            self.decisions.allowed,
            self.decisions.denied,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(30));
        let c = h.cumulative();
        assert_eq!(c.len(), DNS_LATENCY_BOUNDS.len());
        assert_eq!(c[0], (0.000_25, 1));
        assert_eq!(c[2], (0.001, 2), "a bound is inclusive");
        assert_eq!(c.last().map(|x| x.1), Some(2), "30 s is only in +Inf");
        let per = h.per_bucket();
        assert_eq!(per.len(), DNS_LATENCY_BOUNDS.len() + 1);
        assert_eq!(per.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(per.iter().map(|b| b.1).sum::<u64>(), h.count);
        assert_eq!(h.count, 3);
        assert!((h.sum_secs - 30.0011).abs() < 1e-9);
    }

    #[test]
    fn results_come_from_the_rcode() {
        let mut a = [0u8; 12];
        assert_eq!(DnsResult::of_answer(&a), DnsResult::NoError);
        a[3] = 0x83;
        assert_eq!(DnsResult::of_answer(&a), DnsResult::NxDomain);
        a[3] = 0x05;
        assert_eq!(DnsResult::of_answer(&a), DnsResult::Refused);
        a[3] = 0x02;
        assert_eq!(DnsResult::of_answer(&a), DnsResult::ServFail);
        a[3] = 0x04;
        assert_eq!(DnsResult::of_answer(&a), DnsResult::Other);
        assert_eq!(DnsResult::of_answer(&a[..2]), DnsResult::Other);
        let mut s = DnsStats::default();
        s.answered(DnsKind::Upstream, &[0u8; 12], Duration::from_millis(3));
        s.dropped(DnsKind::Local);
        assert_eq!(s.queries(DnsKind::Upstream, DnsResult::NoError), 1);
        assert_eq!(s.queries(DnsKind::Local, DnsResult::Dropped), 1);
        assert_eq!(s.total(), 2);
        assert_eq!(s.latency(DnsKind::Upstream).count, 1);
    }

    #[test]
    fn traffic_is_kept_by_path_and_direction() {
        let mut t = Traffic::default();
        t.count(Direction::Sent, PathKind::Relay, 100);
        t.count(Direction::Sent, PathKind::Direct, 50);
        t.count(Direction::Received, PathKind::Direct, 1500);
        assert_eq!(
            t.get(Direction::Sent, PathKind::Relay),
            Count {
                packets: 1,
                bytes: 100
            }
        );
        assert_eq!(t.total(Direction::Sent).bytes, 150);
        assert_eq!(t.total(Direction::Received).packets, 1);
        assert_eq!(
            t.get(Direction::Received, PathKind::Relay),
            Count::default()
        );
    }
}

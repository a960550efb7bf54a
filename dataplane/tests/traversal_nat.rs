//! The connectivity checks between two peers behind simulated NATs of every RFC 4787 kind, in
//! memory and in virtual time: which pairs of NATs get a direct path, and how fast. The lab
//! proves the same with real iptables NATs; this runs in milliseconds and under proptest.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sluice_dataplane::identity::PeerId;
use sluice_dataplane::nat::candidate::gather;
use sluice_dataplane::nat::traversal::{Phase, Traversal, TraversalEvent, CHECK_BUDGET};
use sluice_dataplane::wire::{ControlMessage, Punch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatType {
    None,
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
}

const ALL: [NatType; 5] = [
    NatType::None,
    NatType::FullCone,
    NatType::AddressRestricted,
    NatType::PortRestricted,
    NatType::Symmetric,
];

/// A NAT as RFC 4787 describes it: mapping and filtering behaviour.
struct Nat {
    kind: NatType,
    public: IpAddr,
    inside: SocketAddr,
    /// Mapping key (destination for symmetric, none otherwise) to public port.
    ports: HashMap<Option<SocketAddr>, u16>,
    /// (public port, remote) pairs the inside has sent to.
    sent_to: HashSet<(u16, SocketAddr)>,
    next_port: u16,
}

impl Nat {
    fn new(kind: NatType, public: &str, inside: &str, first_port: u16) -> Nat {
        Nat {
            kind,
            public: public.parse().unwrap(),
            inside: inside.parse().unwrap(),
            ports: HashMap::new(),
            sent_to: HashSet::new(),
            next_port: first_port,
        }
    }

    /// The public source of a packet from the inside to `to`.
    fn outbound(&mut self, to: SocketAddr) -> SocketAddr {
        if self.kind == NatType::None {
            return self.inside;
        }
        let key = (self.kind == NatType::Symmetric).then_some(to);
        let port = match self.ports.get(&key) {
            Some(p) => *p,
            None => {
                // Endpoint-independent NATs keep the port (as Linux does); symmetric ones don't.
                let p = if self.kind == NatType::Symmetric {
                    self.next_port += 7;
                    self.next_port
                } else {
                    self.inside.port()
                };
                self.ports.insert(key, p);
                p
            }
        };
        self.sent_to.insert((port, to));
        SocketAddr::new(self.public, port)
    }

    /// Whether a packet from `from` to our public `port` gets in.
    fn inbound(&self, from: SocketAddr, port: u16) -> bool {
        if !self.ports.values().any(|p| *p == port) {
            return false;
        }
        match self.kind {
            NatType::None | NatType::FullCone => true,
            NatType::AddressRestricted => self
                .sent_to
                .iter()
                .any(|(p, a)| *p == port && a.ip() == from.ip()),
            NatType::PortRestricted | NatType::Symmetric => self.sent_to.contains(&(port, from)),
        }
    }

    /// The address others see for a NAT of kind None, or the public one.
    fn owns(&self, to: SocketAddr) -> bool {
        if self.kind == NatType::None {
            to == self.inside
        } else {
            to.ip() == self.public
        }
    }
}

const RELAY: &str = "192.0.2.1:4433";

struct Side {
    nat: Nat,
    t: Traversal,
}

/// Runs one attempt; the time from start to nomination, or None if it failed.
fn attempt(a: NatType, c: NatType, delay: Duration, seed: u64) -> Option<Duration> {
    let t0 = Instant::now();
    let (ida, idc) = (PeerId([1; 32]), PeerId([2; 32]));
    let mut sides = [
        Side {
            nat: Nat::new(
                a,
                "192.0.2.11",
                if a == NatType::None {
                    "192.0.2.10:5000"
                } else {
                    "10.0.1.10:5000"
                },
                20_000 + (seed % 1000) as u16,
            ),
            t: Traversal::new(true, ida, idc, 11, t0),
        },
        Side {
            nat: Nat::new(
                c,
                "192.0.2.21",
                if c == NatType::None {
                    "192.0.2.20:6000"
                } else {
                    "10.0.2.20:6000"
                },
                30_000 + (seed % 977) as u16,
            ),
            t: Traversal::new(false, idc, ida, 22, t0),
        },
    ];
    // Each side learns its reflexive address from the relay (QUIC Address Discovery).
    for s in sides.iter_mut() {
        let observed = s.nat.outbound(RELAY.parse().unwrap());
        let local = gather(&[s.nat.inside.ip()], s.nat.inside.port(), Some(observed));
        s.t.set_local(local, t0);
    }
    // Packets in flight: (arrival, receiving side, from, to, payload).
    #[allow(clippy::type_complexity)]
    let mut wire: Vec<(Instant, usize, SocketAddr, SocketAddr, Vec<u8>)> = Vec::new();
    let mut now = t0;
    let step = Duration::from_millis(1);
    while now < t0 + CHECK_BUDGET + Duration::from_secs(1) {
        for i in 0..2 {
            // Signaling rides the relayed tunnel: delivered after `delay`, never lost.
            while let Some(ev) = sides[i].t.poll_event() {
                match ev {
                    TraversalEvent::SendCandidates(ControlMessage::Candidates {
                        generation,
                        secret,
                        list,
                    }) => {
                        let other = &mut sides[1 - i].t;
                        other.on_candidates(generation, secret, &list, now + delay);
                    }
                    TraversalEvent::Nominate(_) => return Some(now - t0),
                    TraversalEvent::Failed => return None,
                    other => panic!("{other:?}"),
                }
            }
            while let Some((to, pkt)) = sides[i].t.poll_transmit() {
                let from = sides[i].nat.outbound(to);
                let dst = (0..2).find(|j| sides[*j].nat.owns(to));
                if let Some(j) = dst {
                    if j != i {
                        wire.push((now + delay, j, from, to, pkt.to_vec()));
                    }
                }
            }
        }
        let (due, rest): (Vec<_>, Vec<_>) = wire.drain(..).partition(|(at, ..)| *at <= now);
        wire = rest;
        for (_, j, from, to, pkt) in due {
            let s = &mut sides[j];
            if s.nat.kind != NatType::None && !s.nat.inbound(from, to.port()) {
                continue; // filtered by the NAT
            }
            let punch = Punch::parse(&pkt).unwrap();
            s.t.on_punch(from, &punch).unwrap();
        }
        for s in sides.iter_mut() {
            if s.t.timeout().is_some_and(|t| t <= now) {
                s.t.on_timeout(now);
            }
        }
        now += step;
    }
    panic!("neither nominated nor failed: {:?}", sides[0].t.phase());
}

fn direct_expected(a: NatType, c: NatType) -> bool {
    use NatType::*;
    !matches!(
        (a, c),
        (Symmetric, PortRestricted) | (PortRestricted, Symmetric) | (Symmetric, Symmetric)
    )
}

#[test]
fn the_nat_matrix() {
    for a in ALL {
        for c in ALL {
            let r = attempt(a, c, Duration::from_millis(5), 0);
            assert_eq!(
                r.is_some(),
                direct_expected(a, c),
                "agent {a:?} connector {c:?}: {r:?}"
            );
            if let Some(t) = r {
                assert!(t < Duration::from_secs(1), "{a:?}/{c:?} took {t:?}");
            }
        }
    }
}

#[test]
fn punches_from_another_peer_or_with_a_wrong_secret_are_refused() {
    let t0 = Instant::now();
    let (me, peer, other) = (PeerId([1; 32]), PeerId([2; 32]), PeerId([3; 32]));
    let mut t = Traversal::new(true, me, peer, 99, t0);
    let from: SocketAddr = "192.0.2.21:6000".parse().unwrap();
    let p = |from_peer, secret| Punch {
        ack: true,
        to: me,
        from: from_peer,
        secret,
        txid: 1,
    };
    assert!(t.on_punch(from, &p(other, 99)).is_err());
    assert!(t.on_punch(from, &p(peer, 98)).is_err());
    assert!(t.on_punch(from, &p(peer, 99)).is_ok());
    // Not checking yet: an ack nominates nothing.
    assert_eq!(t.phase(), Phase::Waiting);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever the one-way delay and the ports the NATs pick, the outcome is the matrix's.
    #[test]
    fn outcome_depends_only_on_the_nat_types(a in 0usize..5, c in 0usize..5, delay_ms in 0u64..200, seed in any::<u64>()) {
        let r = attempt(ALL[a], ALL[c], Duration::from_millis(delay_ms), seed);
        prop_assert_eq!(r.is_some(), direct_expected(ALL[a], ALL[c]));
    }
}

/// The controlled side stops punching once the peer moved onto a direct path, instead of
/// punching out its whole check budget.
#[test]
fn the_controlled_side_stops_punching_once_the_peer_moved() {
    let t0 = Instant::now();
    let (me, peer) = (PeerId([1; 32]), PeerId([2; 32]));
    let mut t = Traversal::new(false, me, peer, 7, t0);
    t.set_local(gather(&["192.0.2.20".parse().unwrap()], 6000, None), t0);
    let remote = gather(&["192.0.2.10".parse().unwrap()], 5000, None);
    t.on_candidates(1, 9, &remote, t0);
    assert!(matches!(t.phase(), Phase::Checking { .. }));
    assert!(t.poll_transmit().is_some(), "checks punch");
    while t.poll_transmit().is_some() {}
    let addr: SocketAddr = "192.0.2.10:5000".parse().unwrap();
    t.peer_nominated(addr);
    assert_eq!(t.phase(), Phase::Nominated(addr));
    assert_eq!(t.timeout(), None, "no more check timer");
    t.on_timeout(t0 + Duration::from_secs(1));
    assert!(t.poll_transmit().is_none(), "no more punches");
    // A new list from the peer is a new attempt.
    t.on_candidates(2, 9, &remote, t0 + Duration::from_secs(40));
    assert!(matches!(t.phase(), Phase::Checking { .. }));
}

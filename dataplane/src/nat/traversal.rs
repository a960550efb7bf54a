//! Connectivity checks for one tunnel's direct path, as a sans-IO state machine (RFC 8445's
//! ideas, much reduced: one component, no TURN, QUIC's own path validation on top).
//!
//! Both peers exchange [`Candidate`]s inside the already authenticated relayed tunnel
//! (`ControlMessage::Candidates`); receiving the peer's list starts the checks on both sides at
//! once. Each side then sends punches from its tunnel socket to every remote candidate in pair
//! priority order, paced, for at most [`CHECK_BUDGET`], and acknowledges every valid punch it
//! receives to where it came from (a peer-reflexive address is learned that way, which is what
//! lets a symmetric NAT through when the other side's NAT filters by address only). Both sides
//! sending is what opens both NATs. The agent (controlling) nominates the first address whose
//! ack comes back: a round trip from its socket works there. The shell then has QUIC validate
//! and migrate to it; the relay stays the fallback. A failed attempt is retried after
//! [`RETRY_AFTER`], or at once when the local candidates change (a network change).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::identity::PeerId;
use crate::nat::candidate::{pair_priority, priority, Candidate, Kind};
use crate::wire::{ControlMessage, Punch, PUNCH_LEN};

/// How long the checks of one attempt may take.
pub const CHECK_BUDGET: Duration = Duration::from_secs(5);
/// Between two punches of one side (RFC 8445's Ta is 50 ms).
pub const PACE: Duration = Duration::from_millis(25);
/// After a failed attempt (or a direct path that died), the next one.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Remote addresses checked at most (announced plus learned).
const MAX_REMOTE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No candidates from the peer yet.
    Waiting,
    Checking {
        until: Instant,
    },
    /// The agent nominated this remote address.
    Nominated(SocketAddr),
    Failed {
        retry_at: Instant,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraversalEvent {
    /// Send our candidates to the peer, inside the tunnel.
    SendCandidates(ControlMessage),
    /// (Agent) a round trip works from our socket to this address: validate and migrate.
    Nominate(SocketAddr),
    /// No pair worked within the budget: stay on the relay.
    Failed,
}

/// Why a punch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PunchRefused {
    #[error("addressed to another peer")]
    NotForUs,
    /// A NAT may map two peers to one address: only the tunnel's own peer counts.
    #[error("from a peer other than this tunnel's")]
    WrongPeer,
    #[error("wrong secret")]
    BadSecret,
    #[error("no direct path search under way")]
    NotChecking,
}

pub struct Traversal {
    controlling: bool,
    me: PeerId,
    peer: PeerId,
    secret: u64,
    generation: u32,
    local: Vec<Candidate>,
    /// The peer's candidates (and learned peer-reflexive ones), best pair first.
    remote: Vec<Candidate>,
    peer_secret: Option<u64>,
    peer_generation: Option<u32>,
    phase: Phase,
    next_punch: Instant,
    cursor: usize,
    txid: u64,
    out: VecDeque<(SocketAddr, [u8; PUNCH_LEN])>,
    events: VecDeque<TraversalEvent>,
    /// Networks never checked: the agent's own tunnel routes them, so a punch there would
    /// travel inside the tunnel it is meant to bypass.
    excluded: Vec<ipnet::IpNet>,
}

impl Traversal {
    /// `controlling` is the agent's side.
    pub fn new(controlling: bool, me: PeerId, peer: PeerId, secret: u64, now: Instant) -> Self {
        Traversal {
            controlling,
            me,
            peer,
            secret,
            generation: 0,
            local: Vec::new(),
            remote: Vec::new(),
            peer_secret: None,
            peer_generation: None,
            phase: Phase::Waiting,
            next_punch: now,
            cursor: 0,
            txid: 0,
            out: VecDeque::new(),
            events: VecDeque::new(),
            excluded: Vec::new(),
        }
    }

    /// Remote addresses in these networks are never checked (the agent's routed networks).
    pub fn exclude(&mut self, nets: Vec<ipnet::IpNet>) {
        self.excluded = nets;
        let excluded = &self.excluded;
        self.remote
            .retain(|c| !excluded.iter().any(|n| n.contains(&c.addr.ip())));
    }

    fn is_excluded(&self, addr: &SocketAddr) -> bool {
        self.excluded.iter().any(|n| n.contains(&addr.ip()))
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn local(&self) -> &[Candidate] {
        &self.local
    }

    pub fn remote(&self) -> &[Candidate] {
        &self.remote
    }

    pub fn poll_event(&mut self) -> Option<TraversalEvent> {
        self.events.pop_front()
    }

    /// The next punch to send from the tunnel's socket.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, [u8; PUNCH_LEN])> {
        self.out.pop_front()
    }

    fn candidates_message(&self) -> ControlMessage {
        ControlMessage::Candidates {
            generation: self.generation,
            secret: self.secret,
            list: self.local.clone(),
        }
    }

    /// Our candidates now (host addresses and the reflexive one). A change is a network change:
    /// the peer hears of it and, unless a direct path works, checks start over at once.
    pub fn set_local(&mut self, mut local: Vec<Candidate>, now: Instant) {
        local.truncate(crate::wire::MAX_CANDIDATES);
        if local == self.local {
            return;
        }
        self.local = local;
        self.generation = self.generation.wrapping_add(1);
        // The agent speaks first; the connector answers the agent's candidates with its own,
        // and tells of later changes itself.
        if self.controlling || self.peer_generation.is_some() {
            self.events
                .push_back(TraversalEvent::SendCandidates(self.candidates_message()));
        }
        if !matches!(self.phase, Phase::Nominated(_) | Phase::Waiting) && self.peer_secret.is_some()
        {
            self.start(now);
        }
    }

    /// The agent asks to try again (after its direct path failed, or on a timer).
    pub fn restart(&mut self, now: Instant) {
        self.generation = self.generation.wrapping_add(1);
        self.events
            .push_back(TraversalEvent::SendCandidates(self.candidates_message()));
        if self.peer_secret.is_some() {
            self.start(now);
        }
    }

    /// (Controlled side) the peer moved the connection onto the direct path to `addr`: the
    /// checks did their job, so punching stops (it went on for the whole budget, a punch and its
    /// answer every 25 ms). A new candidate list from the peer starts a new attempt.
    pub fn peer_nominated(&mut self, addr: SocketAddr) {
        if !self.controlling && matches!(self.phase, Phase::Checking { .. }) {
            self.phase = Phase::Nominated(addr);
        }
    }

    /// The direct path in use stopped working: back to the relay, retry later.
    pub fn direct_failed(&mut self, now: Instant) {
        self.phase = Phase::Failed {
            retry_at: now + RETRY_AFTER,
        };
    }

    /// The peer's candidates arrived (inside the tunnel): checks start now.
    pub fn on_candidates(
        &mut self,
        generation: u32,
        secret: u64,
        list: &[Candidate],
        now: Instant,
    ) {
        let first = self.peer_generation.is_none();
        if self.peer_generation == Some(generation) && self.peer_secret == Some(secret) {
            return;
        }
        self.peer_generation = Some(generation);
        self.peer_secret = Some(secret);
        self.remote = list
            .iter()
            .filter(|c| c.kind != Kind::Relay && !self.is_excluded(&c.addr))
            .take(MAX_REMOTE)
            .copied()
            .collect();
        self.sort_remote();
        if !self.controlling && first {
            self.events
                .push_back(TraversalEvent::SendCandidates(self.candidates_message()));
        }
        // A new list from the peer is a fresh attempt, even after a nomination (the peer moved).
        self.start(now);
    }

    fn sort_remote(&mut self) {
        let best_local = self.local.first().map_or(0, |c| c.priority);
        let controlling = self.controlling;
        self.remote.sort_by_key(|r| {
            let (g, d) = if controlling {
                (best_local, r.priority)
            } else {
                (r.priority, best_local)
            };
            std::cmp::Reverse(pair_priority(g, d))
        });
    }

    fn start(&mut self, now: Instant) {
        if self.remote.is_empty() {
            self.phase = Phase::Failed {
                retry_at: now + RETRY_AFTER,
            };
            self.events.push_back(TraversalEvent::Failed);
            return;
        }
        self.phase = Phase::Checking {
            until: now + CHECK_BUDGET,
        };
        self.cursor = 0;
        self.next_punch = now;
        self.on_timeout(now);
    }

    /// A punch packet arrived on the tunnel's socket from `from`.
    pub fn on_punch(&mut self, from: SocketAddr, p: &Punch) -> Result<(), PunchRefused> {
        if p.to != self.me {
            return Err(PunchRefused::NotForUs);
        }
        if p.from != self.peer {
            return Err(PunchRefused::WrongPeer);
        }
        if p.secret != self.secret {
            return Err(PunchRefused::BadSecret);
        }
        if !p.ack {
            // Answer where it came from: that is the address the peer's NAT gave it.
            if let Some(secret) = self.peer_secret {
                let ack = Punch {
                    ack: true,
                    to: self.peer,
                    from: self.me,
                    secret,
                    txid: p.txid,
                };
                self.out.push_back((from, ack.encode()));
            }
            if !self.remote.iter().any(|c| c.addr == from)
                && self.remote.len() < MAX_REMOTE
                && !self.is_excluded(&from)
            {
                // Peer-reflexive: the peer reaches us from an address it could not know.
                self.remote.push(Candidate {
                    kind: Kind::PeerReflexive,
                    addr: from,
                    priority: priority(Kind::PeerReflexive, 0),
                });
                self.sort_remote();
            }
            return Ok(());
        }
        if self.controlling {
            if let Phase::Checking { .. } = self.phase {
                self.phase = Phase::Nominated(from);
                self.events.push_back(TraversalEvent::Nominate(from));
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Checking { until } => Some(self.next_punch.min(until)),
            Phase::Failed { retry_at } if self.controlling => Some(retry_at),
            _ => None,
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Checking { until } if now >= until => {
                self.phase = Phase::Failed {
                    retry_at: now + RETRY_AFTER,
                };
                self.events.push_back(TraversalEvent::Failed);
            }
            Phase::Checking { .. } => {
                let Some(secret) = self.peer_secret else {
                    return;
                };
                while now >= self.next_punch && !self.remote.is_empty() {
                    let to = self.remote[self.cursor % self.remote.len()].addr;
                    self.cursor += 1;
                    self.txid = self.txid.wrapping_add(1);
                    let p = Punch {
                        ack: false,
                        to: self.peer,
                        from: self.me,
                        secret,
                        txid: self.txid,
                    };
                    self.out.push_back((to, p.encode()));
                    self.next_punch += PACE;
                    if self.next_punch + PACE < now {
                        // Woken late: pace from now rather than bursting to catch up.
                        self.next_punch = now;
                    }
                }
            }
            Phase::Failed { retry_at } if self.controlling && now >= retry_at => self.restart(now),
            _ => {}
        }
    }
}

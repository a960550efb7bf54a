//! One relay-to-relay link's routes: what lets a relay hand an end-to-end packet to the relay
//! its destination is connected to, in one hop.
//!
//! A packet from a client names only its destination (a peer id); the relay at the other end
//! of the link must learn the source too, or its client could not tell whose tunnel the
//! packet belongs to. Two 32-byte peer ids on every packet would not fit: a client's packets
//! are sized for its own connection to the relay, and a link's QUIC packet has the same
//! room. So each side numbers the (destination, source) pairs it sends for, says each number
//! once on the link's control stream ([`ControlMessage::MeshRoute`]), and puts only the
//! number on each packet ([`DGRAM_MESH_FORWARD`]: 5 bytes, less than a client's 33).
//!
//! A packet whose number has not arrived yet (the stream and the datagram raced) is dropped;
//! the end-to-end tunnel resends. Numbers idle for [`ROUTE_IDLE`] are withdrawn
//! ([`ControlMessage::MeshUnroute`]), so a link's tables stay bounded by its live tunnels.
//!
//! [`ControlMessage::MeshRoute`]: sluice_dataplane::wire::ControlMessage::MeshRoute
//! [`ControlMessage::MeshUnroute`]: sluice_dataplane::wire::ControlMessage::MeshUnroute
//! [`DGRAM_MESH_FORWARD`]: sluice_dataplane::wire::DGRAM_MESH_FORWARD

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_dataplane::identity::PeerId;
use sluice_dataplane::wire::ControlMessage;

/// A route unused this long is withdrawn.
pub const ROUTE_IDLE: Duration = Duration::from_secs(600);
/// Most routes one side of a link may announce (and the other keeps).
pub const MAX_ROUTES: usize = 65_536;
/// How often a relay tells another that a destination is not here, per route.
pub const GONE_EVERY: Duration = Duration::from_millis(500);

/// A (destination, source) pair of peer ids.
pub type Pair = (PeerId, PeerId);

/// Says "gone" for a pair at most every [`GONE_EVERY`], and keeps at most [`MAX_ROUTES`] pairs.
#[derive(Debug, Default)]
pub struct GoneLimiter(HashMap<Pair, Instant>);

impl GoneLimiter {
    pub fn should_say(&mut self, pair: Pair, now: Instant) -> bool {
        if self
            .0
            .get(&pair)
            .is_some_and(|t| now.saturating_duration_since(*t) < GONE_EVERY)
        {
            return false;
        }
        if self.0.len() >= MAX_ROUTES {
            self.sweep(now);
        }
        self.0.insert(pair, now);
        true
    }

    pub fn sweep(&mut self, now: Instant) {
        self.0
            .retain(|_, t| now.saturating_duration_since(*t) < GONE_EVERY);
    }
}

#[derive(Debug)]
pub struct Routes {
    /// Pairs this side sends for, by pair: the number and when it was last used.
    out: HashMap<Pair, (u32, Instant)>,
    next: u32,
    /// The other side's numbers.
    inbound: HashMap<u32, Pair>,
    /// When the other side last heard that a destination is not here, per pair.
    gone_said: GoneLimiter,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            out: HashMap::new(),
            next: 1,
            inbound: HashMap::new(),
            gone_said: GoneLimiter::default(),
        }
    }
}

/// Why a route was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The link already carries [`MAX_ROUTES`] pairs.
    Full,
}

impl Routes {
    /// The number for `pair`, and the announcement to send first when it is new.
    pub fn outbound(
        &mut self,
        pair: Pair,
        now: Instant,
    ) -> Result<(u32, Option<ControlMessage>), RouteError> {
        if let Some((id, used)) = self.out.get_mut(&pair) {
            *used = now;
            return Ok((*id, None));
        }
        if self.out.len() >= MAX_ROUTES {
            return Err(RouteError::Full);
        }
        let id = self.next;
        // Never 0, and never one in use (after 4 billion routes the numbers wrap).
        self.next = self.next.wrapping_add(1).max(1);
        self.out.insert(pair, (id, now));
        let (dst, src) = pair;
        Ok((id, Some(ControlMessage::MeshRoute { id, dst, src })))
    }

    /// The other side announced `id`. False if it announces more than it may.
    pub fn announce(&mut self, id: u32, pair: Pair) -> bool {
        if self.inbound.len() >= MAX_ROUTES && !self.inbound.contains_key(&id) {
            return false;
        }
        self.inbound.insert(id, pair);
        true
    }

    pub fn withdraw(&mut self, id: u32) {
        self.inbound.remove(&id);
    }

    /// The pair a number stands for.
    pub fn inbound(&self, id: u32) -> Option<Pair> {
        self.inbound.get(&id).copied()
    }

    /// Whether to tell the other side now that `pair`'s destination is not here.
    pub fn should_say_gone(&mut self, pair: Pair, now: Instant) -> bool {
        self.gone_said.should_say(pair, now)
    }

    /// Drops this side's routes to `dst` (it went, or moved elsewhere); the other side hears of
    /// it through the returned withdrawals.
    pub fn forget(&mut self, dst: &PeerId) -> Vec<ControlMessage> {
        let mut out = Vec::new();
        self.out.retain(|(d, _), (id, _)| {
            if d == dst {
                out.push(ControlMessage::MeshUnroute { id: *id });
                false
            } else {
                true
            }
        });
        out
    }

    /// Withdraws the routes idle for [`ROUTE_IDLE`].
    pub fn sweep(&mut self, now: Instant) -> Vec<ControlMessage> {
        let mut out = Vec::new();
        self.out.retain(|_, (id, used)| {
            if now.saturating_duration_since(*used) >= ROUTE_IDLE {
                out.push(ControlMessage::MeshUnroute { id: *id });
                false
            } else {
                true
            }
        });
        self.gone_said.sweep(now);
        out
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(n: u8) -> PeerId {
        PeerId([n; 32])
    }

    #[test]
    fn a_pair_is_announced_once_and_known_by_its_number_on_the_other_side() {
        let t = Instant::now();
        let (mut a, mut b) = (Routes::default(), Routes::default());
        let (id, msg) = a.outbound((p(1), p(2)), t).unwrap();
        let Some(ControlMessage::MeshRoute { id: i, dst, src }) = msg else {
            panic!("{msg:?}")
        };
        assert_eq!((i, dst, src), (id, p(1), p(2)));
        assert!(b.announce(i, (dst, src)));
        assert_eq!(b.inbound(id), Some((p(1), p(2))));
        // Again: the same number, no announcement.
        assert_eq!(a.outbound((p(1), p(2)), t).unwrap(), (id, None));
        let (id2, msg2) = a.outbound((p(1), p(3)), t).unwrap();
        assert_ne!(id2, id);
        assert!(msg2.is_some());
        // Forgetting a destination withdraws every route to it.
        let w = a.forget(&p(1));
        assert_eq!(w.len(), 2);
        for m in w {
            let ControlMessage::MeshUnroute { id } = m else {
                panic!()
            };
            b.withdraw(id);
        }
        assert_eq!(b.inbound(id), None);
        assert!(a.is_empty());
    }

    #[test]
    fn idle_routes_are_withdrawn_and_gone_is_said_at_most_every_half_second() {
        let t = Instant::now();
        let mut a = Routes::default();
        a.outbound((p(1), p(2)), t).unwrap();
        a.outbound((p(3), p(2)), t + ROUTE_IDLE / 2).unwrap();
        let w = a.sweep(t + ROUTE_IDLE);
        assert_eq!(w.len(), 1);
        assert_eq!(a.len(), 1);
        assert!(a.should_say_gone((p(1), p(2)), t));
        assert!(!a.should_say_gone((p(1), p(2)), t + GONE_EVERY / 2));
        assert!(a.should_say_gone((p(1), p(2)), t + GONE_EVERY));
    }

    proptest! {
        /// Whatever the other side announces, the tables stay bounded and consistent.
        #[test]
        fn announcements_never_break_the_table(ops in proptest::collection::vec((any::<u32>(), any::<u8>(), any::<bool>()), 0..200)) {
            let mut b = Routes::default();
            for (id, n, add) in ops {
                if add {
                    prop_assert!(b.announce(id, (p(n), p(n.wrapping_add(1)))));
                    prop_assert_eq!(b.inbound(id), Some((p(n), p(n.wrapping_add(1)))));
                } else {
                    b.withdraw(id);
                    prop_assert_eq!(b.inbound(id), None);
                }
            }
        }
    }
}

//! The TCP connections a tunnel carries, as far as the app's side of them shows: enough to
//! reset each one in-window when the tunnel goes.
//!
//! Why: when a connector dies without a goodbye (a crash, a restart after SIGKILL), its
//! flows are gone with it. An app that only receives sends nothing the engine could answer
//! with a reset, so it would hang until its own timeout (minutes). With the app's last
//! acknowledgment number at hand, the engine resets it at once, and a reset whose sequence
//! number is exactly what the app expects next is accepted without a challenge (RFC 5961).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::packet::{self, PacketInfo, RstTo, PROTO_TCP};

/// At most this many connections are remembered per tunnel; past it new ones are not (they
/// are still reset when they send a segment after the tunnel went).
pub const MAX_CARRIED: usize = 32_768;
/// A connection that sent nothing for this long is forgotten (a silent app is rare; a
/// closed one that the engine never saw close is the common case).
pub const CARRIED_IDLE: Duration = Duration::from_secs(600);

/// App address, service address: a connection as the app sees it.
type Key = (SocketAddr, SocketAddr);

#[derive(Debug, Clone, Copy)]
struct Seen {
    answer: RstTo,
    last: Instant,
}

#[derive(Debug, Default)]
pub struct Carried {
    conns: FxHashMap<Key, Seen>,
}

impl Carried {
    /// A TCP segment from the app, handed to the tunnel.
    pub fn note(&mut self, info: &PacketInfo, now: Instant) {
        if info.proto != PROTO_TCP || info.fragment {
            return;
        }
        let key = (info.src_socket(), info.dst_socket());
        if info.tcp.rst {
            self.conns.remove(&key);
            return;
        }
        let answer = if info.tcp.ack {
            RstTo::Acked(info.tcp_ack)
        } else if info.tcp.syn {
            RstTo::Unacked(info.tcp_seq.wrapping_add(1))
        } else {
            // Neither SYN nor ACK: not a segment any connection sends.
            return;
        };
        let seen = Seen { answer, last: now };
        if let Some(s) = self.conns.get_mut(&key) {
            *s = seen;
        } else if self.conns.len() < MAX_CARRIED {
            self.conns.insert(key, seen);
        }
    }

    /// Forgets the connections idle for [`CARRIED_IDLE`].
    pub fn sweep(&mut self, now: Instant) {
        self.conns
            .retain(|_, s| now.saturating_duration_since(s.last) < CARRIED_IDLE);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The resets (from the service to the app) for every connection remembered, which are
    /// forgotten.
    pub fn drain_resets(&mut self) -> Vec<Vec<u8>> {
        self.conns
            .drain()
            .filter_map(|((app, svc), s)| packet::tcp_reset(svc, app, s.answer))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use std::net::{IpAddr, Ipv4Addr};

    const APP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)), 40000);
    const SVC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 80);

    fn segment(seq: u32, ack: Option<u32>, syn: bool, rst: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4([100, 64, 0, 2], [10, 0, 0, 5], 64).tcp(40000, 80, seq, 1024);
        let b = if syn { b.syn() } else { b };
        let b = if rst { b.rst() } else { b };
        let b = match ack {
            Some(a) => b.ack(a),
            None => b,
        };
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    }

    fn note(c: &mut Carried, pkt: &[u8], now: Instant) {
        c.note(&packet::inspect(pkt).unwrap(), now);
    }

    /// (src, dst, seq, ack if the ACK flag is set) of a reset.
    fn rst_fields(pkt: &[u8]) -> (SocketAddr, SocketAddr, u32, Option<u32>) {
        let info = packet::inspect(pkt).unwrap();
        assert!(info.tcp.rst);
        let s = SlicedPacket::from_ip(pkt).unwrap();
        let Some(TransportSlice::Tcp(t)) = s.transport else {
            panic!("not TCP")
        };
        (
            info.src_socket(),
            info.dst_socket(),
            t.sequence_number(),
            t.ack().then(|| t.acknowledgment_number()),
        )
    }

    #[test]
    fn an_acknowledged_connection_is_reset_at_the_apps_last_ack() {
        let t0 = Instant::now();
        let mut c = Carried::default();
        note(&mut c, &segment(1000, None, true, false), t0);
        note(&mut c, &segment(1001, Some(5001), false, false), t0);
        note(&mut c, &segment(1001, Some(90_001), false, false), t0);
        let r = c.drain_resets();
        assert_eq!(r.len(), 1);
        assert_eq!(rst_fields(&r[0]), (SVC, APP, 90_001, None));
        assert!(c.is_empty());
    }

    #[test]
    fn a_connection_still_opening_is_reset_acknowledging_its_syn() {
        let mut c = Carried::default();
        note(
            &mut c,
            &segment(u32::MAX, None, true, false),
            Instant::now(),
        );
        let r = c.drain_resets();
        assert_eq!(rst_fields(&r[0]), (SVC, APP, 0, Some(0)));
    }

    #[test]
    fn a_connection_the_app_reset_is_forgotten_and_idle_ones_are_swept() {
        let t0 = Instant::now();
        let mut c = Carried::default();
        note(&mut c, &segment(1, Some(2), false, false), t0);
        note(&mut c, &segment(1, Some(2), false, true), t0);
        assert!(c.is_empty());
        note(&mut c, &segment(1, Some(2), false, false), t0);
        c.sweep(t0 + CARRIED_IDLE - Duration::from_secs(1));
        assert_eq!(c.len(), 1);
        c.sweep(t0 + CARRIED_IDLE);
        assert!(c.is_empty());
    }
}

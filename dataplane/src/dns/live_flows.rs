//! The flows an agent's apps have open to synthetic addresses, so the pool never recycles the
//! address of a name in use ([`SyntheticPool::flow_opened`] / [`SyntheticPool::flow_closed`]).
//!
//! The agent sees the packets apps send. A flow ends when it idles past its protocol's limit
//! (the connector's limits: TCP 2 h, others 60 s), shortly after the app's FIN, or at once after
//! its RST. Keyed by the caller's flow key (addresses, protocol, ports).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use crate::dns::pool::SyntheticPool;
use crate::packet::{TcpFlags, PROTO_TCP};

/// Seconds an idle TCP flow stays open.
pub const TCP_IDLE: u64 = 2 * 3600;
/// Seconds an idle UDP or ICMP flow stays open.
pub const OTHER_IDLE: u64 = 60;
/// Seconds a TCP flow stays after the app's FIN: the other side may still be sending.
pub const FIN_LINGER: u64 = 60;

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    last_seen: u64,
    idle_limit: u64,
}

#[derive(Debug)]
pub struct LiveFlows<K> {
    flows: HashMap<K, Entry>,
}

impl<K> Default for LiveFlows<K> {
    fn default() -> Self {
        LiveFlows {
            flows: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> LiveFlows<K> {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// An app's packet of flow `key` to synthetic address `ip`, at `now` (seconds).
    pub fn packet(
        &mut self,
        pool: &mut SyntheticPool,
        key: K,
        ip: IpAddr,
        proto: u8,
        tcp: TcpFlags,
        now: u64,
    ) {
        let idle_limit = match proto {
            PROTO_TCP if tcp.rst => 0,
            PROTO_TCP if tcp.fin => FIN_LINGER,
            PROTO_TCP => TCP_IDLE,
            _ => OTHER_IDLE,
        };
        match self.flows.get_mut(&key) {
            Some(e) => {
                e.last_seen = now;
                // A FIN or RST only ever shortens what is left of the flow.
                e.idle_limit = e.idle_limit.min(idle_limit);
                pool.touch(ip, now);
            }
            // A lone RST (or a stray packet of a flow ended long ago) opens nothing.
            None if idle_limit == 0 => pool.touch(ip, now),
            None => {
                pool.flow_opened(ip, now);
                self.flows.insert(
                    key,
                    Entry {
                        ip,
                        last_seen: now,
                        idle_limit,
                    },
                );
            }
        }
    }

    /// Ends the flows idle past their limit at `now`.
    pub fn sweep(&mut self, pool: &mut SyntheticPool, now: u64) {
        self.flows.retain(|_, e| {
            let live = now.saturating_sub(e.last_seen) < e.idle_limit.max(1);
            if !live {
                pool.flow_closed(e.ip, now);
            }
            live
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::pool::{DEFAULT_V4, DEFAULT_V6};

    const SYN: TcpFlags = TcpFlags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    const ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    const FIN: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
    };
    const RST: TcpFlags = TcpFlags {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };

    /// A pool of two names: whichever is not live gets recycled for a third.
    fn pool() -> SyntheticPool {
        SyntheticPool::new(DEFAULT_V4, DEFAULT_V6, 2).unwrap()
    }

    /// Whether `name` still has address `ip` after a third name needs a slot.
    fn survives(p: &mut SyntheticPool, ip: IpAddr, now: u64) -> bool {
        p.assign("third.corp", now);
        p.name_of(ip) == Some("a.corp")
    }

    #[test]
    fn a_live_tcp_flow_keeps_its_name_until_it_ends() {
        let mut p = pool();
        let (a, _) = p.assign("a.corp", 0).unwrap();
        p.assign("b.corp", 1).unwrap();
        let ip = IpAddr::V4(a);
        let mut f = LiveFlows::default();
        f.packet(&mut p, 1u32, ip, PROTO_TCP, SYN, 2);
        // Hours of silence, well short of the TCP limit: still live, b is recycled instead.
        f.sweep(&mut p, 3600);
        assert_eq!(f.len(), 1);
        assert!(survives(&mut p, ip, 3600));
        // The app closes: after the linger it is no longer live.
        f.packet(&mut p, 1, ip, PROTO_TCP, FIN, 3601);
        f.sweep(&mut p, 3601 + FIN_LINGER - 1);
        assert_eq!(f.len(), 1);
        f.sweep(&mut p, 3601 + FIN_LINGER);
        assert!(f.is_empty());
        p.assign("b.corp", 3700);
        assert!(!survives(&mut p, ip, 3701));
    }

    #[test]
    fn resets_end_at_once_and_udp_idles_out() {
        let mut p = pool();
        let (a, _) = p.assign("a.corp", 0).unwrap();
        let ip = IpAddr::V4(a);
        let mut f = LiveFlows::default();
        f.packet(&mut p, 1u32, ip, PROTO_TCP, ACK, 1);
        f.packet(&mut p, 1, ip, PROTO_TCP, RST, 2);
        f.sweep(&mut p, 3);
        assert!(f.is_empty());
        // A stray RST opens nothing.
        f.packet(&mut p, 2, ip, PROTO_TCP, RST, 4);
        assert!(f.is_empty());
        f.packet(&mut p, 3, ip, 17, ACK, 5);
        f.sweep(&mut p, 5 + OTHER_IDLE - 1);
        assert_eq!(f.len(), 1);
        f.sweep(&mut p, 5 + OTHER_IDLE);
        assert!(f.is_empty());
    }
}

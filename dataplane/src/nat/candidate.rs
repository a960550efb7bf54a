//! Address candidates for a direct path and their priorities (RFC 8445 §5.1.2 and §6.1.2.3).

use std::net::{IpAddr, SocketAddr};

/// Where a candidate address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An address of one of the host's interfaces.
    Host,
    /// The address the relay saw us at (QUIC Address Discovery): the NAT's mapping.
    ServerReflexive,
    /// An address a peer's punch arrived from that it never announced (RFC 8445 §7.3.1.3).
    PeerReflexive,
    /// The relay: always there, never checked, the last resort.
    Relay,
}

impl std::fmt::Display for Kind {
    /// RFC 8445's short names, as ICE tools print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Host => "host",
            Kind::ServerReflexive => "srflx",
            Kind::PeerReflexive => "prflx",
            Kind::Relay => "relay",
        })
    }
}

impl Kind {
    /// RFC 8445 §5.1.2.2's recommended type preferences.
    pub fn type_preference(self) -> u32 {
        match self {
            Kind::Host => 126,
            Kind::PeerReflexive => 110,
            Kind::ServerReflexive => 100,
            Kind::Relay => 0,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Kind::Host => 1,
            Kind::ServerReflexive => 2,
            Kind::PeerReflexive => 3,
            Kind::Relay => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            1 => Kind::Host,
            2 => Kind::ServerReflexive,
            3 => Kind::PeerReflexive,
            4 => Kind::Relay,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::ServerReflexive => "srflx",
            Kind::PeerReflexive => "prflx",
            Kind::Relay => "relay",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub priority: u32,
}

/// Tunnels carry one component (RFC 8445's RTP component 1).
const COMPONENT: u32 = 1;

/// RFC 8445 §5.1.2.1: `2^24 * type pref + 2^8 * local pref + (256 - component)`.
pub fn priority(kind: Kind, local_preference: u16) -> u32 {
    (kind.type_preference() << 24) + (u32::from(local_preference) << 8) + (256 - COMPONENT)
}

/// RFC 8445 §6.1.2.3: the pair priority from the controlling (`g`) and controlled (`d`) side's
/// candidate priorities.
pub fn pair_priority(g: u32, d: u32) -> u64 {
    let (g, d) = (u64::from(g), u64::from(d));
    (1u64 << 32) * g.min(d) + 2 * g.max(d) + u64::from(g > d)
}

/// Local preference among host addresses: IPv4 before IPv6 (NATs and firewalls pass IPv4 UDP
/// more often here), private and global before loopback; later interfaces lower.
fn local_preference(ip: IpAddr, index: usize) -> u16 {
    let family: u16 = if ip.is_ipv4() { 60_000 } else { 30_000 };
    family.saturating_sub(index.min(30_000) as u16)
}

/// Whether a peer elsewhere could ever reach `ip`.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_unspecified() || v4.is_link_local() || v4.is_multicast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// The local candidates of a socket on `port`, bound to all of `interface_ips`: one host
/// candidate per usable address, and the server-reflexive one when the relay told us.
pub fn gather(interface_ips: &[IpAddr], port: u16, observed: Option<SocketAddr>) -> Vec<Candidate> {
    let mut v: Vec<Candidate> = interface_ips
        .iter()
        .filter(|ip| usable(**ip))
        .enumerate()
        .map(|(i, ip)| Candidate {
            kind: Kind::Host,
            addr: SocketAddr::new(*ip, port),
            priority: priority(Kind::Host, local_preference(*ip, i)),
        })
        .collect();
    if let Some(o) = observed {
        // Without a NAT the relay sees a host address: the same candidate, said once.
        if !v.iter().any(|c| c.addr == o) {
            v.push(Candidate {
                kind: Kind::ServerReflexive,
                addr: o,
                priority: priority(Kind::ServerReflexive, local_preference(o.ip(), 0)),
            });
        }
    }
    v.sort_by_key(|c| std::cmp::Reverse(c.priority));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_rfc_8445() {
        // Host beats server-reflexive beats relay, whatever the local preference.
        assert!(priority(Kind::Host, 0) > priority(Kind::ServerReflexive, u16::MAX));
        assert!(priority(Kind::ServerReflexive, 0) > priority(Kind::Relay, u16::MAX));
        assert_eq!(priority(Kind::Host, 65_535), 2_130_706_431);
        // The pair formula is symmetric but for the tie-breaking bit.
        assert_eq!(pair_priority(5, 3), (1 << 32) * 3 + 10 + 1);
        assert_eq!(pair_priority(3, 5), (1 << 32) * 3 + 10);
    }

    #[test]
    fn gathering_skips_unusable_addresses_and_dedups_the_reflexive_one() {
        let ips: Vec<IpAddr> = ["127.0.0.1", "192.0.2.10", "fe80::1", "2001:db8::10"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let c = gather(&ips, 4500, Some("203.0.113.9:61000".parse().unwrap()));
        let addrs: Vec<String> = c.iter().map(|c| c.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "192.0.2.10:4500",
                "[2001:db8::10]:4500",
                "203.0.113.9:61000"
            ]
        );
        assert_eq!(c[2].kind, Kind::ServerReflexive);
        // No NAT: the relay saw our host address, which is not repeated.
        let c = gather(&ips, 4500, Some("192.0.2.10:4500".parse().unwrap()));
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.kind == Kind::Host));
    }
}

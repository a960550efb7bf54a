//! The routes the tunnel device needs: the policy's resource networks, the synthetic pools and
//! the DNS address, less the relay's own addresses (the agent's way to the relay never goes
//! into its tunnel, whatever the policy says).

use std::net::IpAddr;

use ipnet::IpNet;
use sluice_policy::Policy;

/// The networks a policy routes into the tunnel.
pub fn networks(p: &Policy) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = p.networks().iter().map(|(n, _)| *n).collect();
    v.sort();
    v.dedup();
    v
}

/// Whether two networks share an address.
pub fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// What is routed into the device, and why.
#[derive(Debug, Default)]
pub struct Routes {
    /// The networks the policy, the pools and the DNS address ask for.
    wanted: Vec<IpNet>,
    /// `wanted` less the relay's addresses: what the device gets.
    routed: Vec<IpNet>,
    /// The relay addresses kept out of `routed`.
    kept_out: Vec<IpAddr>,
}

impl Routes {
    pub fn wanted(&self) -> &[IpNet] {
        &self.wanted
    }

    pub fn routed(&self) -> &[IpNet] {
        &self.routed
    }

    /// Routes `wanted` less `relay`; returns the new `wanted` when it changed (tunnels keep
    /// their direct paths out of it).
    pub fn set(&mut self, mut wanted: Vec<IpNet>, relay: &[IpAddr]) -> Option<Vec<IpNet>> {
        wanted.sort();
        wanted.dedup();
        let (nets, hits) = without(&wanted, relay);
        for (net, ip) in &hits {
            if !self.kept_out.contains(ip) {
                tracing::warn!(
                    "the policy routes {net} into the tunnel, which holds the relay's address {ip}: {ip} stays outside the tunnel"
                );
            }
        }
        self.kept_out = hits.iter().map(|(_, ip)| *ip).collect();
        self.kept_out.sort();
        self.kept_out.dedup();
        self.routed = nets;
        if wanted == self.wanted {
            return None;
        }
        self.wanted = wanted.clone();
        Some(wanted)
    }

    /// Whether the relay's addresses inside the wanted networks differ from those kept out.
    pub fn relay_moved(&self, relay: &[IpAddr]) -> bool {
        let mut inside: Vec<IpAddr> = relay
            .iter()
            .copied()
            .filter(|ip| self.wanted.iter().any(|n| n.contains(ip)))
            .collect();
        inside.sort();
        inside.dedup();
        inside != self.kept_out
    }
}

/// `nets` without the addresses in `keep_out`: a network holding one is split into the
/// smallest set of prefixes that covers the rest of it. The agent keeps its relay (and so its
/// own control traffic) out of the tunnel this way, whatever the policy says. Also returns
/// which network held which excluded address, for the log.
pub fn without(nets: &[IpNet], keep_out: &[IpAddr]) -> (Vec<IpNet>, Vec<(IpNet, IpAddr)>) {
    let mut out: Vec<IpNet> = nets.to_vec();
    let mut hits = Vec::new();
    for ip in keep_out {
        let mut next = Vec::with_capacity(out.len());
        for net in out {
            if !net.contains(ip) {
                next.push(net);
                continue;
            }
            if let Some(original) = nets.iter().find(|n| n.contains(ip)) {
                hits.push((*original, *ip));
            }
            // Halve the network, keep the half without the address, go on in the other half.
            let mut cur = net;
            while cur.prefix_len() < cur.max_prefix_len() {
                let Ok(mut halves) = cur.subnets(cur.prefix_len() + 1) else {
                    break;
                };
                let (Some(a), Some(b)) = (halves.next(), halves.next()) else {
                    break;
                };
                let (with, other) = if a.contains(ip) { (a, b) } else { (b, a) };
                next.push(other);
                cur = with;
            }
        }
        out = next;
    }
    out.sort();
    out.dedup();
    hits.sort();
    hits.dedup();
    (out, hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_excluded_address_is_cut_out_of_its_network_and_nothing_else_changes() {
        let relay: IpAddr = "192.0.2.1".parse().unwrap();
        let (out, hits) = without(&nets(&["198.51.100.0/24", "192.0.2.1/32"]), &[relay]);
        assert_eq!(out, nets(&["198.51.100.0/24"]));
        assert_eq!(hits, vec![("192.0.2.1/32".parse().unwrap(), relay)]);

        let (out, _) = without(&nets(&["192.0.2.0/30"]), &[relay]);
        assert_eq!(out, nets(&["192.0.2.0/32", "192.0.2.2/31"]));

        // All of IPv4 but one address: 32 prefixes, none of them holding it, covering the rest.
        let (out, hits) = without(&nets(&["0.0.0.0/0", "::/0"]), &[relay]);
        assert_eq!(out.len(), 33);
        assert_eq!(hits.len(), 1);
        assert!(out.iter().all(|n| !n.contains(&relay)));
        let covered: u128 = out
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .map(|n| 1u128 << (32 - n.prefix_len()))
            .sum();
        assert_eq!(covered, (1u128 << 32) - 1);
        for probe in ["192.0.2.0", "192.0.2.2", "10.0.0.1", "255.255.255.255"] {
            let ip: IpAddr = probe.parse().unwrap();
            assert!(out.iter().any(|n| n.contains(&ip)), "{probe}");
        }

        // Not in any network: unchanged.
        let (out, hits) = without(&nets(&["10.0.0.0/8"]), &["2001:db8::1".parse().unwrap()]);
        assert_eq!(out, nets(&["10.0.0.0/8"]));
        assert!(hits.is_empty());
    }

    #[test]
    fn routes_keep_the_relay_out_and_say_when_wanted_changes() {
        let relay: IpAddr = "192.0.2.1".parse().unwrap();
        let mut r = Routes::default();
        assert!(r.set(nets(&["192.0.2.0/24"]), &[relay]).is_some());
        assert!(r.routed().iter().all(|n| !n.contains(&relay)));
        assert!(!r.relay_moved(&[relay]));
        assert!(r.relay_moved(&["192.0.2.9".parse().unwrap()]));
        assert!(
            r.set(nets(&["192.0.2.0/24"]), &[]).is_none(),
            "wanted is unchanged"
        );
        assert_eq!(r.routed(), nets(&["192.0.2.0/24"]).as_slice());
    }
}

//! A node's own side of direct paths: its candidates, gathered from the interface addresses the
//! host reports and the address the relay sees it at.

use std::net::{IpAddr, SocketAddr};

use crate::identity::PeerId;
use crate::nat::candidate::{gather, Candidate};

/// This node's direct-path candidates: every interface address in the socket's address
/// family (only the socket's own when it is bound to one), on the socket's port, and the
/// address the relay sees.
pub fn local_candidates(
    socket: SocketAddr,
    interface_ips: &[IpAddr],
    observed: Option<SocketAddr>,
) -> Vec<Candidate> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in interface_ips {
        // A socket bound to an IPv4 address sends IPv4 only, and the other way round.
        if ip.is_ipv4() == socket.is_ipv4() && !ips.contains(ip) {
            ips.push(*ip);
        }
    }
    if !socket.ip().is_unspecified() {
        ips.retain(|ip| *ip == socket.ip());
    }
    gather(&ips, socket.port(), observed)
}

/// A node's side of direct paths: its peer id, its socket, and its current candidates.
pub struct DirectSetup {
    pub me: PeerId,
    /// The socket's address, as quiche names every direct path of this node.
    pub local: SocketAddr,
    observed: Option<SocketAddr>,
    /// The host's interface addresses (a TUN device's own left out by the host).
    interface_ips: Vec<IpAddr>,
    pub candidates: Vec<Candidate>,
    refused: u64,
}

impl DirectSetup {
    pub fn new(me: PeerId, local: SocketAddr, interface_ips: Vec<IpAddr>) -> Self {
        let candidates = local_candidates(local, &interface_ips, None);
        DirectSetup {
            me,
            local,
            observed: None,
            interface_ips,
            candidates,
            refused: 0,
        }
    }

    /// The host's interface addresses now (a network change): the new candidates if they
    /// changed.
    pub fn set_interfaces(&mut self, interface_ips: Vec<IpAddr>) -> Option<Vec<Candidate>> {
        self.interface_ips = interface_ips;
        self.refresh()
    }

    /// Gathers the candidates again: the new list if it changed.
    pub fn refresh(&mut self) -> Option<Vec<Candidate>> {
        let now = local_candidates(self.local, &self.interface_ips, self.observed);
        if now == self.candidates {
            return None;
        }
        tracing::info!(
            "direct-path candidates now {}",
            now.iter()
                .map(|c| c.addr.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.candidates = now.clone();
        Some(now)
    }

    /// The relay sees us at `addr` now.
    pub fn set_observed(&mut self, addr: SocketAddr) -> Option<Vec<Candidate>> {
        self.observed = Some(addr);
        self.refresh()
    }

    /// A packet off a direct path was refused: said at the 1st, 2nd, 4th, 8th... time, so a
    /// flood cannot fill the log.
    pub fn refuse(&mut self, from: SocketAddr, why: &dyn std::fmt::Display) {
        self.refused += 1;
        if self.refused.is_power_of_two() {
            tracing::info!(
                "refused a direct-path packet from {from}: {why} ({} refused so far)",
                self.refused
            );
        } else {
            tracing::debug!("refused a direct-path packet from {from}: {why}");
        }
    }
}

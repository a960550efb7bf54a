//! What the connector core asks of its host: a terminator per agent (the host's TCP/IP stack
//! for that agent's packets, netstack's smoltcp stack on Linux) and the services side (the
//! real sockets toward the private services). The core decides; these carry it out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::identity::PeerId;

/// The transport of a new flow, for [`FlowGate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    Tcp,
    Udp,
    Icmp,
}

/// A flow a terminator is about to open, for the access decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewFlow<'a> {
    pub kind: FlowKind,
    pub src: SocketAddr,
    /// Destination; the port is 0 for ICMP.
    pub dst: SocketAddr,
    /// The hostname the agent addressed (its destination is then a synthetic address).
    pub hostname: Option<&'a str>,
}

/// Decides whether a new flow may open (the connector's policy enforcement). A terminator
/// answers a denied TCP flow with a RST and other flows with ICMP "administratively
/// prohibited", at once.
pub trait FlowGate {
    fn admit(&mut self, flow: &NewFlow<'_>) -> bool;
}

/// Admits everything (tests, and deployments without a policy).
pub struct AdmitAll;

impl FlowGate for AdmitAll {
    fn admit(&mut self, _: &NewFlow<'_>) -> bool {
        true
    }
}

/// Terminates one agent's IP packets: its flows, their buffers and their idle expiry.
pub trait Terminator {
    /// A packet from the agent; `hostname` is the name it was addressed to (a named packet).
    /// A packet that opens a flow is put to `gate` first.
    fn input(&mut self, pkt: &[u8], hostname: Option<&str>, gate: &mut dyn FlowGate);
    /// Runs timers and moves data up to `now` (`epoch`: the same instant for every call).
    fn advance(&mut self, now: Instant, epoch: Instant);
    /// The next packet for the agent.
    fn output(&mut self) -> Option<Vec<u8>>;
    /// Gives back a buffer [`Terminator::output`] handed out, for reuse.
    fn recycle(&mut self, buf: Vec<u8>);
    /// How long until [`Terminator::advance`] has work again.
    fn poll_delay(&mut self) -> Duration;
    /// Puts every open flow to `gate` again (a new policy); returns how many were cut.
    fn recheck(&mut self, gate: &mut dyn FlowGate) -> usize;
    /// Flows open now (TCP connections, UDP flows, pings), for metrics.
    fn flows(&self) -> usize;
    /// Packets that would have opened a flow, dropped by the agent's flood limits so far.
    fn rate_limited(&self) -> u64 {
        0
    }
}

/// The host's side of the flows: dialling the services and moving bytes to and from them.
pub trait Services {
    type Terminator: Terminator;
    /// A terminator for an agent whose tunnel just arrived.
    fn terminator(&mut self) -> Self::Terminator;
    /// Carries out what `agent`'s terminator asked for (dial, send, close).
    fn carry_out(&mut self, agent: PeerId, terminator: &mut Self::Terminator);
    /// Moves bytes between `agent`'s flows and their services.
    fn pump(&mut self, agent: PeerId, terminator: &mut Self::Terminator);
    /// `agent`'s tunnel is gone, and with it every flow of its.
    fn agent_gone(&mut self, agent: PeerId);
}

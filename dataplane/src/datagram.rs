//! A node's UDP socket, both ways: what an incoming datagram is (the relay's control
//! connection, a connectivity check, or QUIC straight from a peer), and which datagram goes out
//! next (direct tunnel packets and punches, relayed packets wrapped for the relay, the control
//! connection's own packets).

use std::net::SocketAddr;
use std::time::Instant;

use crate::control_link::ControlLink;
use crate::tunnel::Tunnel;
use crate::wire::{Punch, RELAY_FORWARD_OVERHEAD};

/// A node's tunnels, by index, for [`TransmitRound`] (the agent keeps them in slots, the
/// connector in a list).
pub trait Tunnels {
    fn count(&self) -> usize;
    fn tunnel(&mut self, i: usize) -> Option<&mut Tunnel>;
}

impl Tunnels for [&mut Tunnel] {
    fn count(&self) -> usize {
        self.len()
    }
    fn tunnel(&mut self, i: usize) -> Option<&mut Tunnel> {
        self.get_mut(i).map(|t| &mut **t)
    }
}

/// Which datagram a node sends next, in rounds: each tunnel's direct packets and punches
/// straight from the socket (they need no relay), its relayed packets in relay forward
/// DATAGRAMs (only while the control connection has room, so the rest waits inside quiche
/// instead of being dropped), then the control link's UDP packets; a round whose control link
/// sent something is followed by another (its room for forwards grew). A tunnel with nothing
/// left is not asked again within the round: an empty quiche send costs as much as a small one.
#[derive(Debug, Default)]
pub struct TransmitRound {
    /// The tunnel being drained in this round.
    cursor: usize,
    /// Whether the control link sent a packet in this round.
    link_sent: bool,
}

impl TransmitRound {
    /// The next datagram, written into `out`; None once nothing is left (the round starts
    /// over at the next call).
    pub fn next(
        &mut self,
        link: &mut ControlLink,
        tunnels: &mut (impl Tunnels + ?Sized),
        out: &mut [u8],
        now: Instant,
    ) -> Option<(usize, SocketAddr)> {
        loop {
            while self.cursor < tunnels.count() {
                if let Some(t) = tunnels.tunnel(self.cursor) {
                    if let Some(sent) = t.send_direct(out) {
                        return Some(sent);
                    }
                    if let Some((to, punch)) = t.poll_punch() {
                        let n = punch.len().min(out.len());
                        out[..n].copy_from_slice(&punch[..n]);
                        return Some((n, to));
                    }
                    while let Some(client) = link.connected().filter(|c| c.can_forward()) {
                        let Some(n) = t.send_relayed(&mut out[RELAY_FORWARD_OVERHEAD..]) else {
                            break;
                        };
                        if let Err(e) =
                            client.send_forward(&t.peer(), &mut out[..RELAY_FORWARD_OVERHEAD + n])
                        {
                            tracing::debug!("relay forward to {} failed: {e}", t.peer().short());
                        }
                    }
                }
                self.cursor += 1;
            }
            if let Some(sent) = link.send(out, now) {
                self.link_sent = true;
                return Some(sent);
            }
            let again = self.link_sent;
            *self = TransmitRound::default();
            if !again {
                return None;
            }
        }
    }
}

/// What a UDP packet on a node's socket is.
pub enum Incoming {
    /// From the relay: the control connection's.
    Control,
    /// A connectivity check of a direct path.
    Punch(Punch),
    /// QUIC straight from a peer, for the tunnel that issued this destination connection id
    /// (ours are all `MAX_CONN_ID_LEN` long; held inline, no allocation per packet).
    Direct { dcid: [u8; quiche::MAX_CONN_ID_LEN] },
    /// Nothing we take (logged by the caller at debug level).
    Junk(&'static str),
}

/// Sorts a packet from `from` on the node's socket.
pub fn classify(pkt: &mut [u8], from: SocketAddr, relay: SocketAddr) -> Incoming {
    if from == relay {
        return Incoming::Control;
    }
    if Punch::is_punch(pkt) {
        return match Punch::parse(pkt) {
            Ok(p) => Incoming::Punch(p),
            Err(_) => Incoming::Junk("malformed punch"),
        };
    }
    // Our connection ids are all MAX_CONN_ID_LEN long: a short header names one at once.
    match quiche::Header::from_slice(pkt, quiche::MAX_CONN_ID_LEN) {
        Ok(h) if h.ty == quiche::Type::Short => match h.dcid.as_ref().try_into() {
            Ok(dcid) => Incoming::Direct { dcid },
            Err(_) => Incoming::Junk("connection id of another length"),
        },
        Ok(_) => Incoming::Junk("long-header QUIC packet off the relay"),
        Err(_) => Incoming::Junk("not QUIC"),
    }
}

//! A node's UDP socket, both ways: what an incoming datagram is (the relay's control
//! connection, a connectivity check, or QUIC straight from a peer), and which datagram goes out
//! next (direct tunnel packets and punches, relayed packets wrapped for the relay, the control
//! connection's own packets).

use std::net::SocketAddr;
use std::time::Instant;

use crate::control_link::ControlLink;
use crate::tunnel::Tunnel;
use crate::wire::{Punch, RELAY_FORWARD_OVERHEAD};

/// The next datagram a node sends, written into `out`: each tunnel's direct packets and
/// punches straight from the socket (they need no relay), its relayed packets in relay forward
/// DATAGRAMs (only while the control connection has room, so the rest waits inside quiche
/// instead of being dropped), then the control link's UDP packets. None once nothing is left.
pub fn next_transmit<'t>(
    link: &mut ControlLink,
    tunnels: impl Iterator<Item = &'t mut Tunnel>,
    out: &mut [u8],
    now: Instant,
) -> Option<(usize, SocketAddr)> {
    for t in tunnels {
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
            if let Err(e) = client.send_forward(&t.peer(), &mut out[..RELAY_FORWARD_OVERHEAD + n]) {
                tracing::debug!("relay forward to {} failed: {e}", t.peer().short());
            }
        }
    }
    link.send(out, now)
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

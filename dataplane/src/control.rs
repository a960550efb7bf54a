//! The client side of a control connection to the relay, as a sans-IO state machine.
//!
//! The shell feeds it UDP packets from the relay (`recv`), drains packets to send (`send`),
//! calls `on_timeout` when `timeout` expires, and reads [`ControlEvent`]s. Relay forward
//! DATAGRAMs (opaque end-to-end packets) are read with [`ControlClient::recv_forward`] straight
//! into the caller's buffer, and sent with [`ControlClient::send_forward`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::ack_hold::AckHold;
use crate::identity::{identity_from_der, PeerId, Role};
use crate::msgstream::MessageStream;
use crate::session::QuicSession;
use crate::tls;
use crate::wire::{
    put_relay_forward_header, ControlMessage, Datagram, MAX_TUNNEL_MESSAGE, RELAY_FORWARD_OVERHEAD,
};

/// The control stream: the client's first bidirectional stream.
pub const CONTROL_STREAM: u64 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// The handshake finished and the relay's certificate was checked.
    Connected {
        relay: String,
    },
    /// The relay saw us at this address (QUIC Address Discovery).
    ObservedAddr(SocketAddr),
    LookupReply {
        name: String,
        peer: Option<PeerId>,
    },
    /// The relay's revocation list (signed bytes, not yet verified: the receiver checks them
    /// against its CA).
    Revocations(Vec<u8>),
    /// The relay cannot reach this peer (see [`ControlMessage::PeerGone`]).
    PeerGone(PeerId),
    /// The relay shares a registry with others and asks a connector for its signed record
    /// (an empty [`ControlMessage::ConnectorRecord`]).
    RecordWanted,
    /// The connection is gone; the reason in words.
    Closed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("QUIC: {0}")]
    Quic(#[from] quiche::Error),
    #[error("control message: {0}")]
    Wire(#[from] crate::wire::WireError),
}

pub struct ControlClient {
    conn: quiche::Connection,
    local: SocketAddr,
    relay: SocketAddr,
    stream: MessageStream,
    events: VecDeque<ControlEvent>,
    connected: bool,
    closed_reported: bool,
    observed: Option<SocketAddr>,
    /// Whether sending now would only carry an ACK that can wait.
    acks: AckHold,
    /// This process's instance id, sent in the hello.
    instance: u64,
    /// When the relay's certificate expires: the connection closes then.
    relay_expires: Option<Instant>,
}

/// The relay closes a connection with this application code when another node with the same
/// certificate holds the registration; the closed node should stay off for a while.
pub const CLOSE_DUPLICATE: u64 = 0x5105;

impl ControlClient {
    /// Connects to the relay; `instance` is random per process (see [`ControlMessage::Hello`]).
    pub fn connect(
        config: &mut quiche::Config,
        local: SocketAddr,
        relay: SocketAddr,
        instance: u64,
    ) -> Result<Self, ControlError> {
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        rand::fill(&mut scid);
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(None, &scid, local, relay, config)?;
        Ok(ControlClient {
            conn,
            local,
            relay,
            // The relay's messages may be large (a revocation list); ours stay small, and the
            // relay holds them to MAX_CONTROL_MESSAGE.
            stream: MessageStream::new(CONTROL_STREAM, MAX_TUNNEL_MESSAGE),
            events: VecDeque::new(),
            connected: false,
            closed_reported: false,
            observed: None,
            acks: AckHold::default(),
            instance,
            relay_expires: None,
        })
    }

    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    pub fn is_connected(&self) -> bool {
        self.connected && !self.is_closed()
    }

    /// When the relay's certificate expires (once connected).
    pub fn relay_expires(&self) -> Option<Instant> {
        self.relay_expires
    }

    /// Whether the relay closed us because another node with our certificate is connected.
    pub fn closed_as_duplicate(&self) -> bool {
        self.conn
            .peer_error()
            .is_some_and(|e| e.is_app && e.error_code == CLOSE_DUPLICATE)
    }

    pub fn observed_addr(&self) -> Option<SocketAddr> {
        self.observed
    }

    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        self.events.pop_front()
    }

    /// Feeds one UDP packet received from the relay.
    pub fn recv(&mut self, pkt: &mut [u8], from: SocketAddr) {
        let info = quiche::RecvInfo {
            from,
            to: self.local,
        };
        let len = pkt.len();
        match self.conn.recv(pkt, info) {
            Ok(_) => self.acks.on_recv(len, Instant::now()),
            Err(e) => tracing::debug!("control: dropped a packet from {from}: {e}"),
        }
        self.after_io_impl();
    }

    /// Receives the next relay forward DATAGRAM into `buf`: the source peer and the packet.
    /// Other DATAGRAMs are dropped and logged.
    pub fn recv_forward<'b>(&mut self, buf: &'b mut [u8]) -> Option<(PeerId, &'b mut [u8])> {
        loop {
            let n = self.conn.dgram_recv(buf).ok()?;
            match Datagram::parse(&buf[..n]) {
                Ok(Datagram::RelayForward { peer, .. }) => {
                    return Some((peer, &mut buf[RELAY_FORWARD_OVERHEAD..n]));
                }
                Ok(_) => tracing::debug!("control: unexpected datagram type from the relay"),
                Err(e) => tracing::debug!("control: bad datagram from the relay: {e}"),
            }
        }
    }

    /// The largest end-to-end packet that fits one relay forward DATAGRAM right now.
    pub fn max_forward_len(&self) -> Option<usize> {
        self.conn
            .dgram_max_writable_len()
            .and_then(|n| n.checked_sub(RELAY_FORWARD_OVERHEAD))
    }

    /// Sends `buf[RELAY_FORWARD_OVERHEAD..]` to `peer` through the relay. The first
    /// [`RELAY_FORWARD_OVERHEAD`] bytes of `buf` are overwritten with the header, so the caller
    /// can write the packet in place and nothing is copied.
    pub fn send_forward(&mut self, peer: &PeerId, buf: &mut [u8]) -> Result<(), ControlError> {
        put_relay_forward_header(buf, peer);
        self.conn.dgram_send(buf)?;
        Ok(())
    }

    /// Whether the DATAGRAM send queue has room (backpressure for the tunnels above it).
    pub fn can_forward(&self) -> bool {
        self.is_connected() && !self.conn.is_dgram_send_queue_full()
    }

    /// Presents our renewed certificate (DER) to the relay, which then keeps the connection
    /// past the old one's expiry.
    pub fn present_certificate(&mut self, der: Vec<u8>) -> Result<(), ControlError> {
        self.stream.queue(&ControlMessage::Certificate(der))?;
        self.flush_stream();
        Ok(())
    }

    /// Hands the relay a connector's signed record (`crate::connector_record`) for the
    /// relays' registry.
    pub fn publish_record(&mut self, record: Vec<u8>) -> Result<(), ControlError> {
        self.stream
            .queue(&ControlMessage::ConnectorRecord(record))?;
        self.flush_stream();
        Ok(())
    }

    pub fn lookup(&mut self, name: &str) -> Result<(), ControlError> {
        self.stream
            .queue(&ControlMessage::Lookup { name: name.into() })?;
        self.flush_stream();
        Ok(())
    }

    /// Writes the next UDP packet to send into `out`.
    pub fn send(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        if !self.acks.may_send_on(&self.conn, Instant::now()) {
            return None;
        }
        match self.conn.send(out) {
            Ok((n, info)) => {
                self.acks.on_sent();
                Some((n, info.to))
            }
            Err(e) => {
                if e != quiche::Error::Done {
                    tracing::debug!("control: send failed: {e}");
                }
                self.acks.on_idle();
                self.after_io_impl();
                None
            }
        }
    }

    /// Hands queued messages to the connection; what it took goes out at the next send.
    fn flush_stream(&mut self) {
        if self.stream.flush(&mut self.conn) > 0 {
            self.acks.urgent();
        }
    }

    fn after_io_impl(&mut self) {
        if !self.connected && self.conn.is_established() {
            match self.conn.peer_cert().map(identity_from_der) {
                Some(Ok(id)) if id.role == Role::Relay => {
                    self.connected = true;
                    let left = id.not_after - crate::identity::unix_now();
                    self.relay_expires =
                        Some(Instant::now() + std::time::Duration::from_secs(left.max(0) as u64));
                    self.events.push_back(ControlEvent::Connected {
                        relay: id.name.clone(),
                    });
                    // The first message opens the stream, so the relay can answer on it.
                    let hello = ControlMessage::Hello {
                        software: concat!("sluice ", env!("CARGO_PKG_VERSION")).into(),
                        instance: self.instance,
                    };
                    if let Err(e) = self.stream.queue_first(&hello) {
                        tracing::debug!("control: cannot send hello: {e}");
                    }
                }
                other => {
                    tracing::warn!("control: relay certificate unusable: {other:?}");
                    let _ = self.conn.close(false, 0x100 + 46, b"not a relay");
                }
            }
        }
        self.flush_stream();
        self.stream.read(&mut self.conn);
        while let Some(msg) = self.stream.next_message() {
            match msg {
                Ok(ControlMessage::ObservedAddr(a)) => {
                    if self.observed != Some(a) {
                        self.observed = Some(a);
                        self.events.push_back(ControlEvent::ObservedAddr(a));
                    }
                }
                Ok(ControlMessage::LookupReply { name, peer }) => self
                    .events
                    .push_back(ControlEvent::LookupReply { name, peer }),
                Ok(ControlMessage::Revocations(list)) => {
                    self.events.push_back(ControlEvent::Revocations(list))
                }
                Ok(ControlMessage::PeerGone(peer)) => {
                    self.events.push_back(ControlEvent::PeerGone(peer))
                }
                Ok(ControlMessage::ConnectorRecord(b)) if b.is_empty() => {
                    self.events.push_back(ControlEvent::RecordWanted)
                }
                Ok(other) => tracing::debug!("control: unexpected message {other:?}"),
                Err(e) => {
                    tracing::warn!("control: closing, relay sent a bad message: {e}");
                    let _ = self.conn.close(false, 0x1, b"bad control message");
                    break;
                }
            }
        }
        if self.is_closed() && !self.closed_reported {
            self.closed_reported = true;
            let why = tls::describe_close(&self.conn).unwrap_or_else(|| "closed".into());
            self.events.push_back(ControlEvent::Closed(why));
        }
    }
}

impl QuicSession for ControlClient {
    fn conn(&self) -> &quiche::Connection {
        &self.conn
    }
    fn conn_mut(&mut self) -> &mut quiche::Connection {
        &mut self.conn
    }
    fn acks(&self) -> &AckHold {
        &self.acks
    }
    fn acks_mut(&mut self) -> &mut AckHold {
        &mut self.acks
    }
    fn after_io(&mut self) {
        self.after_io_impl();
    }
}

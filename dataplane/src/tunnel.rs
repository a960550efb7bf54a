//! One end-to-end tunnel: the mutually authenticated QUIC connection between an agent and a
//! connector that carries IP packets in DATAGRAMs, as a sans-IO state machine.
//!
//! The relay is one *path* of this connection. It gets a virtual peer address (one per remote
//! peer, see [`VirtualPaths`]): when quiche says a packet goes `to` that address, the shell wraps
//! it in a relay forward DATAGRAM; a forward DATAGRAM from that peer is fed to `recv` with that
//! address as `from`. A direct path is then just another address of the same connection, which
//! quiche's own path validation and migration can move to without resetting a flow.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::ack_hold::AckHold;
use crate::codel::Codel;
use crate::identity::{identity_from_der, Identity, PeerId};
use crate::msgstream::MessageStream;
use crate::nat::candidate::Candidate;
use crate::nat::liveness::Liveness;
use crate::nat::traversal::{PunchRefused, Traversal, TraversalEvent};
use crate::session::QuicSession;
use crate::tls;
use crate::wire::{
    put_named_ip_header, ControlMessage, Datagram, Punch, WireError, DGRAM_TUNNEL_IP,
    MAX_TUNNEL_MESSAGE, PUNCH_LEN, TUNNEL_IP_OVERHEAD,
};

/// The tunnel's message stream: the agent's first bidirectional stream.
pub const TUNNEL_STREAM: u64 = 0;
/// Application close code for a peer that broke the message stream's framing.
pub const CLOSE_BAD_MESSAGE: u64 = 0x1;

/// The local address of every relayed path (it names no socket).
pub const RELAY_PATH_LOCAL: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0xfd5c, 0x1ce0, 0, 0, 0, 0, 0, 1)),
    1,
);

/// Close code when the peer's certificate is valid but not who we meant to reach: a transport
/// CRYPTO_ERROR carrying TLS alert 46 (certificate_unknown). A transport close, unlike an
/// application close, can be sent before the handshake is confirmed.
pub const CLOSE_IDENTITY_MISMATCH: u64 = 0x100 + 46;

/// Stable virtual addresses for the relayed paths to remote peers.
#[derive(Default)]
pub struct VirtualPaths {
    by_peer: HashMap<PeerId, SocketAddr>,
    by_addr: HashMap<SocketAddr, PeerId>,
    next: u32,
}

impl VirtualPaths {
    pub fn addr_of(&mut self, peer: PeerId) -> SocketAddr {
        if let Some(a) = self.by_peer.get(&peer) {
            return *a;
        }
        self.next = self.next.wrapping_add(1);
        let n = self.next;
        let ip = Ipv6Addr::new(0xfd5c, 0x1ce1, 0, 0, 0, 0, (n >> 16) as u16, n as u16);
        let addr = SocketAddr::new(IpAddr::V6(ip), 1);
        self.by_peer.insert(peer, addr);
        self.by_addr.insert(addr, peer);
        addr
    }

    pub fn peer_of(&self, addr: &SocketAddr) -> Option<PeerId> {
        self.by_addr.get(addr).copied()
    }
}

/// Where a received IP packet (and the hostname it is addressed to, if any) lies in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvIp {
    pub packet: std::ops::Range<usize>,
    pub name: Option<std::ops::Range<usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEvent {
    /// Handshake done and the peer is who we expected.
    Up(Identity),
    /// A message from the peer on the tunnel's message stream.
    Message(ControlMessage),
    /// The connection now runs over this path (after a migration).
    PathChanged(Path),
    /// (Agent) the direct path to this address failed QUIC's validation, or stopped answering
    /// while in use; the tunnel is on the relay and tries again later.
    DirectFailed(SocketAddr),
    /// No candidate pair answered the connectivity checks: the tunnel stays on the relay.
    DirectNotFound,
    Closed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("QUIC: {0}")]
    Quic(#[from] quiche::Error),
    #[error("tunnel not established yet")]
    NotReady,
    #[error("packet of {len} bytes exceeds the tunnel's {max}")]
    TooBig { len: usize, max: usize },
    #[error("message: {0}")]
    Wire(#[from] WireError),
}

/// The path a tunnel's packets take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Relay,
    /// Plain UDP to the peer at this address.
    Direct(SocketAddr),
}

/// The direct-path side of a tunnel: the connectivity checks, and whether the path in use still
/// answers.
struct Direct {
    traversal: Traversal,
    /// Our UDP socket's address, as quiche names every direct path of this node.
    local: SocketAddr,
    liveness: Liveness,
}

pub struct Tunnel {
    conn: quiche::Connection,
    peer: PeerId,
    relay_path: SocketAddr,
    expect_name: Option<String>,
    remote: Option<Identity>,
    closed_reported: bool,
    events: VecDeque<TunnelEvent>,
    stream: MessageStream,
    path: Path,
    direct: Option<Direct>,
    /// The peer's candidates when they came before [`Tunnel::enable_direct`].
    early_candidates: Option<(u32, u64, Vec<Candidate>)>,
    /// When `path` last changed (None: never moved off the relay), for status displays.
    path_changed_at: Option<Instant>,
    /// When the handshake finished and the peer checked out.
    up_at: Option<Instant>,
    /// Whether sending now would only carry an ACK that can wait for an answer.
    acks: AckHold,
    /// Keeps the DATAGRAM queue's standing delay short under load.
    codel: Codel,
    /// When the tunnel was made: a handshake not done by [`HANDSHAKE_TIMEOUT`] is given up.
    created: Instant,
    /// Whether anything comes back at all, on whichever path: a peer that is gone (killed,
    /// its machine off) is noticed within [`PEER_SILENCE`] of an unanswered packet (a probe
    /// timeout on the path in use).
    peer_liveness: Liveness,
    /// When the peer's certificate expires: the tunnel closes then.
    peer_expires: Option<Instant>,
    /// The host's relay is silent too (see [`Tunnel::set_network_silent`]).
    network_silent: bool,
}

/// End-to-end keepalive (DESIGN: 15 s), both ends.
pub const TUNNEL_KEEPALIVE: Duration = Duration::from_secs(15);
/// A tunnel whose handshake has not finished by then is closed (the connector is gone, or
/// the relay routes to a registration that is dead), so new flows are refused, not held.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A tunnel that got no packet for this long while QUIC had to probe is dead.
pub const PEER_SILENCE: Duration = Duration::from_secs(5);
/// The same on the connector's side, which cannot choose a path: the agent, which does, sends
/// at least every keepalive, and a NAT in front of an idle agent may have dropped the mapping
/// the connector sends to (rebinding) until the agent's next packet; the connector waits for
/// it rather than close a tunnel the agent still uses.
pub const SERVER_PEER_SILENCE: Duration = Duration::from_secs(20);
const _: () =
    assert!(SERVER_PEER_SILENCE.as_secs() >= TUNNEL_KEEPALIVE.as_secs() + PEER_SILENCE.as_secs());
/// Application close codes of a tunnel (also used by control connections).
pub const CLOSE_PEER_SILENT: u64 = 0x5101;
pub const CLOSE_CERT_EXPIRED: u64 = 0x5102;
pub const CLOSE_HANDSHAKE_TIMEOUT: u64 = 0x5103;
pub const CLOSE_GOODBYE: u64 = 0x5104;
/// The peer's certificate is on the revocation list in force.
pub const CLOSE_REVOKED: u64 = 0x5106;
/// The peer said it holds no such tunnel (it restarted): [`crate::wire::TUNNEL_GONE`].
pub const CLOSE_PEER_RESTARTED: u64 = 0x5107;

/// Probe timeouts so far on `conn`'s active path.
fn active_pto_total(conn: &quiche::Connection) -> usize {
    conn.path_stats()
        .find(|p| p.active)
        .map_or(0, |p| p.total_pto_count)
}

fn random_cid() -> [u8; quiche::MAX_CONN_ID_LEN] {
    let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
    rand::fill(&mut scid);
    scid
}

impl Tunnel {
    /// Agent side: opens a tunnel to the connector `expect_name` whose key is `peer`.
    pub fn connect(
        config: &mut quiche::Config,
        peer: PeerId,
        expect_name: &str,
        relay_path: SocketAddr,
    ) -> Result<Self, TunnelError> {
        let scid = random_cid();
        let conn = quiche::connect(
            None,
            &quiche::ConnectionId::from_ref(&scid),
            RELAY_PATH_LOCAL,
            relay_path,
            config,
        )?;
        Ok(Self::new(conn, peer, Some(expect_name.into()), relay_path))
    }

    /// Connector side: accepts a tunnel whose first packet came from `peer` via the relay.
    pub fn accept(
        config: &mut quiche::Config,
        peer: PeerId,
        relay_path: SocketAddr,
    ) -> Result<Self, TunnelError> {
        let scid = random_cid();
        let conn = quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            None,
            RELAY_PATH_LOCAL,
            relay_path,
            config,
        )?;
        Ok(Self::new(conn, peer, None, relay_path))
    }

    fn new(
        conn: quiche::Connection,
        peer: PeerId,
        expect: Option<String>,
        path: SocketAddr,
    ) -> Self {
        Tunnel {
            conn,
            peer,
            relay_path: path,
            expect_name: expect,
            remote: None,
            closed_reported: false,
            events: VecDeque::new(),
            stream: MessageStream::new(TUNNEL_STREAM, MAX_TUNNEL_MESSAGE),
            path: Path::Relay,
            direct: None,
            early_candidates: None,
            path_changed_at: None,
            up_at: None,
            acks: AckHold::default(),
            codel: Codel::new(Instant::now()),
            created: Instant::now(),
            peer_liveness: Liveness::with_silence(Instant::now(), 0, PEER_SILENCE),
            network_silent: false,
            peer_expires: None,
        }
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Whether the host's relay is silent too (its control link has heard nothing for longer
    /// than its keepalives allow). While it is, the peer's silence does not close the tunnel:
    /// on the relayed path the relay is the likelier culprit (a crash it comes back from), and
    /// with both paths silent the network is.
    pub fn set_network_silent(&mut self, silent: bool) {
        self.network_silent = silent;
    }

    /// Runs what is due at `now`: QUIC's timer, the tunnel's own deadline (direct paths,
    /// certificate expiry, handshake limit) and the end-to-end keepalive, which
    /// `next_keepalive` schedules and is moved on when it fires.
    pub fn run_timers(&mut self, now: Instant, next_keepalive: &mut Instant) {
        if self.timeout() == Some(Duration::ZERO) {
            self.on_timeout();
            // A probe that fired now starts the peer's silence (it may have been idle long).
            let pto = active_pto_total(&self.conn);
            self.peer_liveness.note_probe(now, pto);
        }
        if self.deadline().is_some_and(|d| d <= now) {
            self.on_deadline(now);
        }
        if now >= *next_keepalive {
            *next_keepalive = now + TUNNEL_KEEPALIVE;
            if self.is_up() {
                self.keepalive();
            }
        }
    }

    /// The authenticated remote identity, once up.
    pub fn remote(&self) -> Option<&Identity> {
        self.remote.as_ref()
    }

    pub fn is_up(&self) -> bool {
        self.remote.is_some() && !self.is_closed()
    }

    /// Whether an Initial packet with this destination connection id belongs to this tunnel.
    pub fn owns_cid(&self, dcid: &[u8]) -> bool {
        self.conn.source_ids().any(|c| c.as_ref() == dcid)
    }

    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    /// Feeds one end-to-end QUIC packet that arrived over the relay.
    pub fn recv_relayed(&mut self, pkt: &mut [u8]) {
        let info = quiche::RecvInfo {
            from: self.relay_path,
            to: RELAY_PATH_LOCAL,
        };
        let len = pkt.len();
        match self.conn.recv(pkt, info) {
            Ok(_) => {
                let now = Instant::now();
                self.acks.on_recv(len, now);
                let conn = &self.conn;
                self.peer_liveness.on_recv(now, || active_pto_total(conn));
                if self.path != Path::Relay {
                    // Off the active path: a path probe, answered at once.
                    self.acks.urgent();
                }
            }
            Err(e) => tracing::debug!("tunnel {}: dropped a packet: {e}", self.peer.short()),
        }
        if self.conn.is_server() && self.path != Path::Relay {
            self.follow_active_path();
        }
        self.after_io_impl();
    }

    /// Feeds one QUIC packet that arrived directly from the peer at `from` on our socket's
    /// `local` address.
    pub fn recv_direct(&mut self, pkt: &mut [u8], from: SocketAddr, local: SocketAddr) {
        if let Path::Direct(addr) = self.path {
            if !self.conn.is_server()
                && from != addr
                && !self.conn.paths_iter(local).any(|p| p == from)
            {
                // The connector sends from an address we have no path to (quiche would drop
                // it): its NAT gave it a new mapping, and the one we send to is gone. Back to
                // the relay at once (the connector follows there; left alone it would find
                // us silent first), and look for a direct path again later.
                tracing::info!(
                    "tunnel {}: the connector now sends from {from}, not {addr}; back to the relay",
                    self.peer.short()
                );
                if let Some(d) = &mut self.direct {
                    d.traversal.direct_failed(Instant::now());
                }
                self.events.push_back(TunnelEvent::DirectFailed(addr));
                if let Err(e) = self.use_relay() {
                    tracing::debug!(
                        "tunnel {}: cannot go back to the relay: {e}",
                        self.peer.short()
                    );
                }
                self.after_io_impl();
                return;
            }
        }
        let info = quiche::RecvInfo { from, to: local };
        let len = pkt.len();
        match self.conn.recv(pkt, info) {
            Ok(_) => {
                let now = Instant::now();
                self.acks.on_recv(len, now);
                let conn = &self.conn;
                self.peer_liveness.on_recv(now, || active_pto_total(conn));
                if self.path != Path::Direct(from) {
                    // Off the active path: a path probe, answered at once.
                    self.acks.urgent();
                }
                if self.path == Path::Direct(from) {
                    if let Some(d) = &mut self.direct {
                        let conn = &self.conn;
                        d.liveness.on_recv(now, || active_pto_total(conn));
                    }
                }
            }
            Err(e) => tracing::debug!("tunnel {}: dropped a direct packet: {e}", self.peer.short()),
        }
        if self.conn.is_server() && self.path != Path::Direct(from) {
            self.follow_active_path();
        }
        self.after_io_impl();
    }

    /// The path in use.
    pub fn path(&self) -> Path {
        self.path
    }

    /// Connecting, up or closed, as status displays name it.
    pub fn state(&self) -> crate::status::TunnelState {
        use crate::status::TunnelState;
        if self.is_closed() {
            TunnelState::Closed
        } else if self.is_up() {
            TunnelState::Up
        } else {
            TunnelState::Connecting
        }
    }

    /// The path in use, as status and metrics name it.
    pub fn path_kind(&self) -> crate::status::PathKind {
        match self.path {
            Path::Relay => crate::status::PathKind::Relay,
            Path::Direct(_) => crate::status::PathKind::Direct,
        }
    }

    /// (Agent) asks QUIC to validate the direct path from our `local` address to `peer`; once
    /// validated the connection migrates to it ([`TunnelEvent::PathChanged`]).
    pub fn probe_direct(&mut self, local: SocketAddr, peer: SocketAddr) -> Result<(), TunnelError> {
        if self.conn.is_path_validated(local, peer).unwrap_or(false) {
            // A path validated before (we left it when it fell silent): quiche does not report
            // a second validation, and the punch that nominated it just made a round trip.
            self.conn.migrate(local, peer)?;
            self.set_path(Path::Direct(peer));
            self.events.push_back(TunnelEvent::PathChanged(self.path));
            return Ok(());
        }
        self.conn.probe_path(local, peer)?;
        self.acks.urgent();
        Ok(())
    }

    /// (Agent) moves the connection back onto the relay (the direct path stopped working).
    pub fn use_relay(&mut self) -> Result<(), TunnelError> {
        if self.path != Path::Relay {
            self.conn.migrate(RELAY_PATH_LOCAL, self.relay_path)?;
            self.set_path(Path::Relay);
            self.events.push_back(TunnelEvent::PathChanged(Path::Relay));
        }
        Ok(())
    }

    /// Connection ids of ours the peer may use: a direct packet's destination id is one of
    /// them (the connector demultiplexes direct packets by them).
    pub fn source_cids(&self) -> Vec<Vec<u8>> {
        self.conn.source_ids().map(|c| c.to_vec()).collect()
    }

    /// Gives the peer spare connection ids: a new path needs one each way.
    fn issue_spare_cids(&mut self) {
        while self.conn.scids_left() > 0 {
            let cid = random_cid();
            let token = rand::random::<u128>();
            if self
                .conn
                .new_scid(&quiche::ConnectionId::from_ref(&cid), token, false)
                .is_err()
            {
                break;
            }
            self.acks.urgent();
        }
    }

    fn on_path_events(&mut self) {
        while let Some(ev) = self.conn.path_event_next() {
            match ev {
                quiche::PathEvent::Validated(local, peer) if peer != self.relay_path => {
                    if self.conn.is_server() {
                        continue;
                    }
                    match self.conn.migrate(local, peer) {
                        Ok(_) => {
                            self.set_path(Path::Direct(peer));
                            self.events.push_back(TunnelEvent::PathChanged(self.path));
                        }
                        Err(e) => {
                            tracing::debug!(
                                "tunnel {}: cannot migrate to {peer}: {e}",
                                self.peer.short()
                            );
                            self.events.push_back(TunnelEvent::DirectFailed(peer));
                        }
                    }
                }
                quiche::PathEvent::FailedValidation(_, peer) if peer != self.relay_path => {
                    if let Some(d) = &mut self.direct {
                        d.traversal.direct_failed(Instant::now());
                    }
                    self.events.push_back(TunnelEvent::DirectFailed(peer));
                }
                quiche::PathEvent::PeerMigrated(_, peer) => self.follow_peer(peer),
                _ => {}
            }
        }
    }

    /// (Connector) the agent's packets now come over the path to `peer`: ours go there too.
    fn follow_peer(&mut self, peer: SocketAddr) {
        let path = if peer == self.relay_path {
            Path::Relay
        } else {
            Path::Direct(peer)
        };
        if path != self.path {
            self.set_path(path);
            self.events.push_back(TunnelEvent::PathChanged(path));
        }
        if let (Path::Direct(addr), Some(d)) = (path, &mut self.direct) {
            d.traversal.peer_nominated(addr);
        }
    }

    /// (Connector) after a packet from another path than ours: quiche reports a peer's move
    /// only when it had to validate the path, not when it returns to one it knows.
    fn follow_active_path(&mut self) {
        let active = self
            .conn
            .path_stats()
            .find(|p| p.active)
            .map(|p| p.peer_addr);
        if let Some(peer) = active {
            self.follow_peer(peer);
        }
    }

    fn set_path(&mut self, path: Path) {
        self.acks.urgent();
        if !self.conn.is_server() {
            // The connector moves to our new path on the first packet it gets there; we may
            // have nothing to send for a while (a download only needs ACKs, and none are due
            // when the old path stopped delivering), so say something now.
            if let Err(e) = self.conn.send_ack_eliciting() {
                tracing::debug!(
                    "tunnel {}: cannot ping the new path: {e}",
                    self.peer.short()
                );
            }
        }
        self.path = path;
        let now = Instant::now();
        self.path_changed_at = Some(now);
        let pto = self.pto_total();
        if let Some(d) = &mut self.direct {
            d.liveness = Liveness::new(now, pto);
        }
        // The peer's liveness counts the probes of the path in use only: quiche goes on
        // probing a path we left (its packets in flight there), and those probes, never
        // answered, must not close an idle tunnel that is fine on its new path.
        self.peer_liveness.rebase(pto);
    }

    /// Probe timeouts so far on the active path.
    fn pto_total(&self) -> usize {
        active_pto_total(&self.conn)
    }

    /// Starts looking for a direct path (once up): `me` is our peer id, `local` the address of
    /// our UDP socket (the one every direct path of this node uses), `candidates` our addresses.
    /// Remote addresses in `exclude` are never tried (the agent passes the networks its TUN
    /// routes: a direct path there would run inside this very tunnel).
    pub fn enable_direct(
        &mut self,
        me: PeerId,
        local: SocketAddr,
        candidates: Vec<Candidate>,
        exclude: Vec<ipnet::IpNet>,
        now: Instant,
    ) {
        if self.direct.is_some() {
            return;
        }
        let secret = rand::random::<u64>();
        let mut traversal = Traversal::new(!self.conn.is_server(), me, self.peer, secret, now);
        traversal.exclude(exclude);
        traversal.set_local(candidates, now);
        if let Some((generation, secret, list)) = self.early_candidates.take() {
            traversal.on_candidates(generation, secret, &list, now);
        }
        self.direct = Some(Direct {
            traversal,
            local,
            liveness: Liveness::new(now, 0),
        });
        self.drive_direct(now);
    }

    /// Our addresses changed (a new interface address, or the relay sees us elsewhere): the peer
    /// hears of it, and checks start over unless a direct path works.
    pub fn set_candidates(&mut self, candidates: Vec<Candidate>, now: Instant) {
        if let Some(d) = &mut self.direct {
            d.traversal.set_local(candidates, now);
        }
        self.drive_direct(now);
    }

    /// The networks whose addresses are never tried changed (the agent's routes did).
    pub fn exclude_from_direct(&mut self, nets: Vec<ipnet::IpNet>) {
        if let Some(d) = &mut self.direct {
            d.traversal.exclude(nets);
        }
    }

    /// Our candidates and the peer's, for display.
    pub fn candidates(&self) -> Option<(&[Candidate], &[Candidate])> {
        self.direct
            .as_ref()
            .map(|d| (d.traversal.local(), d.traversal.remote()))
    }

    /// A punch addressed to this tunnel's peer arrived on our socket from `from`.
    pub fn on_punch(
        &mut self,
        from: SocketAddr,
        p: &Punch,
        now: Instant,
    ) -> Result<(), PunchRefused> {
        let d = self.direct.as_mut().ok_or(PunchRefused::NotChecking)?;
        d.traversal.on_punch(from, p)?;
        self.drive_direct(now);
        Ok(())
    }

    /// The next punch to send from our socket.
    pub fn poll_punch(&mut self) -> Option<(SocketAddr, [u8; PUNCH_LEN])> {
        self.direct.as_mut()?.traversal.poll_transmit()
    }

    /// When [`Tunnel::on_deadline`] is due: the direct path's checks, the handshake's limit,
    /// the peer's silence or its certificate's expiry, whichever comes first.
    pub fn deadline(&self) -> Option<Instant> {
        // Once we closed it, quiche's own timer runs the closing (it may wait for a path to
        // send the close on): a deadline in the past would spin the host's timer.
        if self.is_closed() || self.conn.local_error().is_some() {
            return None;
        }
        let own = if self.remote.is_none() {
            Some(self.created + HANDSHAKE_TIMEOUT)
        } else {
            let silent = self.peer_liveness.deadline(active_pto_total(&self.conn));
            match (silent, self.peer_expires) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match (own, self.direct_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what [`Tunnel::deadline`] said was due: the tunnel may close here (the event says
    /// why).
    pub fn on_deadline(&mut self, now: Instant) {
        if self.is_closed() || self.conn.local_error().is_some() {
            return;
        }
        let pto = active_pto_total(&self.conn);
        self.peer_liveness.note_probe(now, pto);
        let close = if self.remote.is_none() {
            (now >= self.created + HANDSHAKE_TIMEOUT)
                .then_some((CLOSE_HANDSHAKE_TIMEOUT, "no handshake within 5 s"))
        } else if self.peer_expires.is_some_and(|t| now >= t) {
            Some((CLOSE_CERT_EXPIRED, "certificate expired"))
        } else if self.peer_liveness.is_dead(now, pto) && self.network_silent {
            // Everything is silent, the relay too: the network (ours, or the relay) is down,
            // not necessarily the peer. The tunnel waits for it (QUIC's idle timeout still
            // bounds the wait), so an outage or a relay crash costs no flow.
            tracing::debug!(
                "tunnel {}: peer silent, but so is the relay: waiting",
                self.peer.short()
            );
            self.peer_liveness.defer(now);
            None
        } else if self.peer_liveness.is_dead(now, pto) {
            Some((
                CLOSE_PEER_SILENT,
                if self.conn.is_server() {
                    "peer silent for 20 s"
                } else {
                    "peer silent for 5 s"
                },
            ))
        } else {
            None
        };
        if let Some((code, why)) = close {
            tracing::info!("tunnel {}: closing: {why}", self.peer.short());
            let _ = self.conn.close(true, code, why.as_bytes());
            self.acks.urgent();
            self.after_io_impl();
            return;
        }
        if self.direct_deadline().is_some_and(|d| d <= now) {
            self.on_direct_timeout(now);
        }
    }

    /// The peer presented a renewed certificate, which the owner checked
    /// ([`crate::tls::PeerCheck`]): the tunnel now lives until the new one expires.
    pub fn peer_renewed(&mut self, id: Identity) {
        let left = id.not_after - crate::identity::unix_now();
        self.peer_expires = Some(Instant::now() + Duration::from_secs(left.max(0) as u64));
        self.remote = Some(id);
    }

    /// Closes the tunnel because the peer's certificate is revoked; `reason` goes to the peer.
    pub fn revoke(&mut self, reason: &str) {
        self.close_now(CLOSE_REVOKED, reason);
    }

    /// Closes the tunnel because the peer restarted and holds no state of it
    /// ([`crate::wire::TUNNEL_GONE`]): its flows are gone, and a new tunnel is needed.
    pub fn peer_restarted(&mut self) {
        if self.is_closed() || self.conn.local_error().is_some() {
            return;
        }
        tracing::info!(
            "tunnel {}: the peer holds no such tunnel (it restarted): closing",
            self.peer.short()
        );
        self.close_now(CLOSE_PEER_RESTARTED, "peer restarted");
    }

    fn close_now(&mut self, code: u64, reason: &str) {
        let _ = self.conn.close(true, code, reason.as_bytes());
        self.acks.urgent();
        self.after_io_impl();
    }

    /// Closes the tunnel because this side is stopping; the peer hears it at once.
    pub fn goodbye(&mut self) {
        let _ = self.conn.close(true, CLOSE_GOODBYE, b"stopping");
        self.acks.urgent();
        self.after_io_impl();
    }

    /// When [`Tunnel::on_direct_timeout`] is due.
    pub fn direct_deadline(&self) -> Option<Instant> {
        let d = self.direct.as_ref()?;
        let checks = d.traversal.timeout();
        let silence = match self.path {
            Path::Direct(_) if !self.conn.is_server() => d.liveness.deadline(self.pto_total()),
            _ => None,
        };
        match (checks, silence) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Paces the checks and (agent) falls back to the relay when the direct path went silent.
    pub fn on_direct_timeout(&mut self, now: Instant) {
        let pto = self.pto_total();
        let Some(d) = &mut self.direct else { return };
        d.traversal.on_timeout(now);
        if let Path::Direct(addr) = self.path {
            if !self.conn.is_server() && d.liveness.is_dead(now, pto) {
                d.traversal.direct_failed(now);
                self.events.push_back(TunnelEvent::DirectFailed(addr));
                if let Err(e) = self.use_relay() {
                    tracing::debug!(
                        "tunnel {}: cannot go back to the relay: {e}",
                        self.peer.short()
                    );
                }
            }
        }
        self.drive_direct(now);
    }

    fn drive_direct(&mut self, now: Instant) {
        let Some(d) = &mut self.direct else { return };
        let local = d.local;
        let mut events = Vec::new();
        while let Some(ev) = d.traversal.poll_event() {
            events.push(ev);
        }
        for ev in events {
            tracing::debug!("tunnel {}: traversal {ev:?}", self.peer.short());
            match ev {
                TraversalEvent::SendCandidates(m) => {
                    if let Err(e) = self.stream.queue(&m) {
                        tracing::debug!(
                            "tunnel {}: cannot send candidates: {e}",
                            self.peer.short()
                        );
                    }
                }
                TraversalEvent::Nominate(addr) => {
                    if let Err(e) = self.probe_direct(local, addr) {
                        tracing::debug!("tunnel {}: cannot probe {addr}: {e}", self.peer.short());
                        if let Some(d) = &mut self.direct {
                            d.traversal.direct_failed(now);
                        }
                        self.events.push_back(TunnelEvent::DirectFailed(addr));
                    }
                }
                TraversalEvent::Failed => self.events.push_back(TunnelEvent::DirectNotFound),
            }
        }
        self.flush_stream();
    }

    /// Hands queued messages to the connection; what it took goes out at the next send.
    fn flush_stream(&mut self) {
        if self.stream.flush(&mut self.conn) > 0 {
            self.acks.urgent();
        }
    }

    /// Whether to ask quiche for packets now (see [`AckHold`]).
    fn may_send(&self) -> bool {
        self.acks.may_send_on(&self.conn, Instant::now())
    }

    /// Writes the next QUIC packet for a direct path into `out`: its length and where it goes.
    pub fn send_direct(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let local = self.direct.as_ref()?.local;
        if !self.may_send() {
            return None;
        }
        // A handful of paths at most (the active one and one being probed).
        let mut peers = [None; 4];
        for (slot, p) in peers.iter_mut().zip(self.conn.paths_iter(local)) {
            *slot = Some(p);
        }
        for to in peers.into_iter().flatten() {
            match self.conn.send_on_path(out, Some(local), Some(to)) {
                Ok((n, _)) => {
                    self.acks.on_sent();
                    return Some((n, to));
                }
                Err(quiche::Error::Done) => {}
                Err(e) => tracing::debug!("tunnel {}: send to {to} failed: {e}", self.peer.short()),
            }
        }
        // Asked on the active path, quiche has nothing more (the relayed path's turn decides
        // while the relay carries the tunnel).
        if matches!(self.path, Path::Direct(_)) {
            self.acks.on_idle();
        }
        None
    }

    /// Writes the next QUIC packet for the relayed path into `out`.
    pub fn send_relayed(&mut self, out: &mut [u8]) -> Option<usize> {
        if !self.may_send() {
            return None;
        }
        let r = self
            .conn
            .send_on_path(out, Some(RELAY_PATH_LOCAL), Some(self.relay_path));
        self.sent(r).map(|(n, _)| n)
    }

    /// A send's outcome; when nothing went out, a close we just sent may have made the
    /// connection draining.
    fn sent(
        &mut self,
        r: Result<(usize, quiche::SendInfo), quiche::Error>,
    ) -> Option<(usize, quiche::SendInfo)> {
        match r {
            Ok(sent) => {
                self.acks.on_sent();
                Some(sent)
            }
            Err(e) => {
                self.acks.on_idle();
                if e != quiche::Error::Done {
                    tracing::debug!("tunnel {}: send failed: {e}", self.peer.short());
                }
                self.after_io_impl();
                None
            }
        }
    }

    /// Writes the next QUIC packet into `out`: its length and whether it goes over the relay
    /// (`None`) or to a direct address.
    pub fn send(&mut self, out: &mut [u8]) -> Option<(usize, Option<SocketAddr>)> {
        if !self.may_send() {
            return None;
        }
        let r = self.conn.send(out);
        let (n, info) = self.sent(r)?;
        Some((n, (info.to != self.relay_path).then_some(info.to)))
    }

    /// Largest IP packet the tunnel carries right now.
    pub fn max_ip_len(&self) -> Option<usize> {
        self.conn
            .dgram_max_writable_len()
            .map(|n| n.saturating_sub(TUNNEL_IP_OVERHEAD))
    }

    /// Sends the IP packet in `buf[TUNNEL_IP_OVERHEAD..]`; the first byte is overwritten with
    /// the tunnel header so the packet is not copied here.
    pub fn send_ip(&mut self, buf: &mut [u8]) -> Result<(), TunnelError> {
        self.check_room(buf.len())?;
        buf[0] = DGRAM_TUNNEL_IP;
        self.enqueue(buf)
    }

    /// Queues one DATAGRAM, after the drops CoDel asks for at the queue's head.
    fn enqueue(&mut self, dgram: &[u8]) -> Result<(), TunnelError> {
        let now = Instant::now();
        let drops = self
            .codel
            .before_enqueue(self.conn.dgram_send_queue_len(), now);
        if drops > 0 {
            let left = std::cell::Cell::new(drops);
            // quiche's queue is a FIFO and `purge` visits it in order: this drops the oldest.
            self.conn.dgram_purge_outgoing(|_| {
                let n = left.get();
                left.set(n.saturating_sub(1));
                n > 0
            });
            tracing::debug!(
                "tunnel {}: queue delay above target, dropped {drops} packet(s) ({} so far)",
                self.peer.short(),
                self.codel.dropped()
            );
        }
        self.conn.dgram_send(dgram)?;
        self.codel.enqueued(now);
        Ok(())
    }

    /// Whether a DATAGRAM of `total` bytes (header included) can go now.
    fn check_room(&self, total: usize) -> Result<(), TunnelError> {
        if self.remote.is_none() {
            return Err(TunnelError::NotReady);
        }
        let max = self.max_ip_len().unwrap_or(0);
        let len = total.saturating_sub(TUNNEL_IP_OVERHEAD);
        if len > max {
            return Err(TunnelError::TooBig { len, max });
        }
        Ok(())
    }

    pub fn can_send_ip(&self) -> bool {
        !self.conn.is_dgram_send_queue_full()
    }

    /// Sends the IP packet in `buf[named_ip_overhead(name)..]` as addressed to `name` (its
    /// destination is a synthetic address for that hostname); the header is written into the
    /// front of `buf`.
    pub fn send_named_ip(&mut self, buf: &mut [u8], name: &str) -> Result<(), TunnelError> {
        self.check_room(buf.len())?;
        if put_named_ip_header(buf, name).is_none() {
            let max = self.max_ip_len().unwrap_or(0);
            return Err(TunnelError::TooBig {
                len: buf.len(),
                max,
            });
        }
        self.enqueue(buf)
    }

    /// Receives the next IP packet into `buf`: its range in `buf`, and the range of the
    /// hostname it is addressed to, when it came as a named packet.
    pub fn recv_ip(&mut self, buf: &mut [u8]) -> Option<RecvIp> {
        loop {
            let n = self.conn.dgram_recv(buf).ok()?;
            match Datagram::parse(&buf[..n]) {
                Ok(Datagram::TunnelIp(_)) => {
                    return Some(RecvIp {
                        packet: TUNNEL_IP_OVERHEAD..n,
                        name: None,
                    })
                }
                Ok(Datagram::NamedIp { name, .. }) => {
                    let end = 2 + name.len();
                    return Some(RecvIp {
                        packet: end..n,
                        name: Some(2..end),
                    });
                }
                Ok(_) => tracing::debug!("tunnel {}: unexpected datagram type", self.peer.short()),
                Err(e) => tracing::debug!("tunnel {}: bad datagram: {e}", self.peer.short()),
            }
        }
    }

    /// Sends a message to the peer on the tunnel's message stream (reliable, in order). The
    /// agent's first message opens the stream; the connector only answers.
    pub fn send_message(&mut self, msg: &ControlMessage) -> Result<(), TunnelError> {
        if !self.is_up() {
            return Err(TunnelError::NotReady);
        }
        self.stream.queue(msg)?;
        self.flush_stream();
        Ok(())
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.conn.path_stats().next().map(|p| p.rtt)
    }

    fn after_io_impl(&mut self) {
        if self.remote.is_none() && self.conn.is_established() {
            self.check_identity();
        }
        let mut got_candidates = false;
        if self.remote.is_some() {
            self.issue_spare_cids();
            self.on_path_events();
            self.flush_stream();
            self.stream.read(&mut self.conn);
            while let Some(m) = self.stream.next_message() {
                match m {
                    Ok(ControlMessage::Candidates {
                        generation,
                        secret,
                        list,
                    }) => match &mut self.direct {
                        Some(d) => {
                            d.traversal
                                .on_candidates(generation, secret, &list, Instant::now());
                            got_candidates = true;
                        }
                        None => self.early_candidates = Some((generation, secret, list)),
                    },
                    Ok(m) => self.events.push_back(TunnelEvent::Message(m)),
                    Err(e) => {
                        tracing::warn!(
                            "tunnel {}: closing, the peer sent a bad message: {e}",
                            self.peer.short()
                        );
                        let _ = self.conn.close(true, CLOSE_BAD_MESSAGE, b"bad message");
                        break;
                    }
                }
            }
        }
        if got_candidates {
            self.drive_direct(Instant::now());
        }
        if self.is_closed() && !self.closed_reported {
            self.closed_reported = true;
            let why = tls::describe_close(&self.conn).unwrap_or_else(|| "closed".into());
            self.events.push_back(TunnelEvent::Closed(why));
        }
    }

    /// The certificate chain was verified by TLS; here we check it is the peer we meant: the
    /// key the relay routed for, and (agent side) the connector name we asked for.
    fn check_identity(&mut self) {
        let id = match self.conn.peer_cert().map(identity_from_der) {
            Some(Ok(id)) => id,
            other => {
                tracing::warn!(
                    "tunnel {}: unusable peer certificate: {other:?}",
                    self.peer.short()
                );
                let _ = self
                    .conn
                    .close(false, CLOSE_IDENTITY_MISMATCH, b"bad certificate");
                return;
            }
        };
        if id.peer_id != self.peer {
            tracing::warn!(
                "tunnel: refusing {id}: its key is not the peer {} the relay routed for",
                self.peer.short()
            );
            let _ = self
                .conn
                .close(false, CLOSE_IDENTITY_MISMATCH, b"peer id mismatch");
            return;
        }
        if let Some(want) = &self.expect_name {
            if &id.name != want {
                tracing::warn!("tunnel: refusing {id}: expected connector {want:?}");
                let _ = self
                    .conn
                    .close(false, CLOSE_IDENTITY_MISMATCH, b"name mismatch");
                return;
            }
        }
        let now = Instant::now();
        let left = id.not_after - crate::identity::unix_now();
        self.peer_expires = Some(now + Duration::from_secs(left.max(0) as u64));
        let conn = &self.conn;
        let silence = if conn.is_server() {
            SERVER_PEER_SILENCE
        } else {
            PEER_SILENCE
        };
        self.peer_liveness = Liveness::with_silence(now, active_pto_total(conn), silence);
        self.remote = Some(id.clone());
        self.up_at = Some(now);
        // The handshake's last flight (HANDSHAKE_DONE, first ACKs) goes at once.
        self.acks.urgent();
        self.events.push_back(TunnelEvent::Up(id));
    }

    /// Counters for status displays: QUIC packets and bytes (UDP payloads, on every path,
    /// retransmissions included) and the active path's RTT.
    pub fn stats(&self) -> TunnelStats {
        let s = self.conn.stats();
        // The active path's estimate; the first path's while none is active yet.
        let rtt = (self.conn.path_stats().find(|p| p.active))
            .or_else(|| self.conn.path_stats().next())
            .map(|p| p.rtt);
        TunnelStats {
            path: self.path,
            rtt,
            bytes_sent: s.sent_bytes,
            bytes_received: s.recv_bytes,
            packets_sent: s.sent as u64,
            packets_received: s.recv as u64,
            path_changed_at: self.path_changed_at,
            up_at: self.up_at,
        }
    }
}

impl QuicSession for Tunnel {
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

/// A tunnel's counters at one moment ([`Tunnel::stats`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TunnelStats {
    pub path: Path,
    /// Round-trip time on the active path, once measured.
    pub rtt: Option<Duration>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// When the path last changed; None if the tunnel never left the relay.
    pub path_changed_at: Option<Instant>,
    /// When the tunnel came up; None while it is still connecting.
    pub up_at: Option<Instant>,
}

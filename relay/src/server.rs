//! The relay as a sans-IO state machine: control connections from agents and connectors, QUIC
//! Address Discovery, the registry of connectors, and forwarding of opaque end-to-end packets.
//!
//! Forwarding rewrites only the 32-byte peer id of a relay forward DATAGRAM (destination in,
//! source out); the end-to-end packet behind it is encrypted with keys the relay never has.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use sluice_dataplane::ack_hold::AckHold;
use sluice_dataplane::control::{CLOSE_DUPLICATE, CONTROL_STREAM};
use sluice_dataplane::identity::{identity_from_der, unix_now, Identity, PeerId, Role};
use sluice_dataplane::revocation::Revocations;
use sluice_dataplane::tls;
use sluice_dataplane::tunnel::{CLOSE_CERT_EXPIRED, CLOSE_GOODBYE, CLOSE_REVOKED};
use sluice_dataplane::wire::{
    ControlDecoder, ControlMessage, Datagram, DGRAM_MESH_FORWARD, DGRAM_RELAY_FORWARD,
    MESH_FORWARD_OVERHEAD, RELAY_FORWARD_OVERHEAD,
};

use sluice_dataplane::connector_record::ConnectorRecord;

use crate::limits::{Limits, PeerLimit, Sources};
use crate::mesh::{GoneLimiter, Routes};
use crate::registry::{Change, Event, Registry, RelayRecord};
use crate::retry::RetryTokens;

type Handle = u64;

/// The TLS alert the handshake ends with when the peer's certificate is revoked.
const TLS_ALERT_REVOKED: u64 = 44;

/// Counters for operators and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub clients: usize,
    pub connectors: usize,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_packets: u64,
    pub bad_packets: u64,
    pub retries_sent: u64,
    /// Connections whose peer proved its identity.
    pub accepted: u64,
    /// Connections (or attempts) turned away, by [`Refusal`].
    pub refused: [u64; Refusal::ALL.len()],
    /// UDP packets (and their bytes) of a peer over its rate, dropped before decryption.
    pub rate_limited_packets: u64,
    pub rate_limited_bytes: u64,
}

impl RelayStats {
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize]
    }
}

/// Why the relay turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The handshake did not complete (TLS refused the peer's certificate, or it went quiet).
    HandshakeFailed,
    /// A completed handshake with a certificate that names no Sluice node.
    BadCertificate,
    /// Another process with the same certificate holds the registration.
    DuplicateIdentity,
    /// An Initial with a retry token that this relay did not give to that address.
    InvalidToken,
    /// The certificate is on the revocation list (at the handshake, or when a new list came).
    Revoked,
    /// The source address opened connections faster than its limit.
    ConnectionRate,
    /// The source address already holds as many connections as it may.
    TooManyConnections,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::HandshakeFailed,
        Refusal::BadCertificate,
        Refusal::DuplicateIdentity,
        Refusal::InvalidToken,
        Refusal::Revoked,
        Refusal::ConnectionRate,
        Refusal::TooManyConnections,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::DuplicateIdentity => "duplicate_identity",
            Refusal::InvalidToken => "invalid_token",
            Refusal::Revoked => "revoked",
            Refusal::ConnectionRate => "connection_rate",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }
}

struct Client {
    conn: quiche::Connection,
    identity: Option<Identity>,
    /// The address last reported to the client (QUIC Address Discovery).
    reported: Option<SocketAddr>,
    peer_addr: SocketAddr,
    decoder: ControlDecoder,
    out: Vec<u8>,
    stream_open: bool,
    cids: Vec<Vec<u8>>,
    /// A forwarded packet's ACK waits (briefly) for the next packet to this client.
    acks: AckHold,
    /// The client's process (from its hello); 0 until then.
    instance: u64,
    /// Whether the client holds its peer id's registration (a second node with the same
    /// certificate waits for its hello before it may take it over).
    registered: bool,
    /// When the client's certificate expires: the connection closes then.
    expires: Option<Instant>,
    /// Already counted as refused (it is closing).
    refused: bool,
    /// Bytes of tunnel packets it sent that were forwarded.
    forwarded_bytes: u64,
    /// The address it connected from: its connection counts against that address's limit.
    source: IpAddr,
    /// How fast its tunnel packets may be forwarded.
    limit: PeerLimit,
    /// Set when the peer is another relay: this is a relay-to-relay link.
    link: Option<Link>,
}

/// A relay-to-relay link (one QUIC connection, from either side).
struct Link {
    /// The other relay's name (its certificate's).
    relay: String,
    /// Whether this relay dialed it; then `peer_id` is who must answer.
    dialed: Option<String>,
    routes: Routes,
}

/// One connected client, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// None while the handshake runs.
    pub identity: Option<Identity>,
    pub addr: SocketAddr,
    pub registered: bool,
    pub forwarded_bytes: u64,
}

pub struct Relay {
    config: quiche::Config,
    local: SocketAddr,
    retry: RetryTokens,
    clients: HashMap<Handle, Client>,
    by_cid: HashMap<Vec<u8>, Handle>,
    by_peer: HashMap<PeerId, Handle>,
    connectors: HashMap<String, PeerId>,
    /// Per peer id, the processes that another process with the same certificate replaced
    /// while that one is still connected: they are refused, so two nodes sharing one
    /// certificate do not take the registration from each other forever.
    displaced: HashMap<PeerId, Vec<u64>>,
    next_handle: Handle,
    dirty: BTreeSet<Handle>,
    /// Packets that are not for a connection (retry, version negotiation), to send as is.
    stateless_out: Vec<(Vec<u8>, SocketAddr)>,
    stats: RelayStats,
    scratch: Vec<u8>,
    /// The list the TLS config checks at every handshake (the host shares it through
    /// [`Relay::apply_revocations`]); also handed to every connector.
    revocations: Revocations,
    /// Checks clients' renewed certificates; without it they are ignored (the connection
    /// then closes when the old certificate expires).
    peer_check: Option<tls::PeerCheck>,
    /// Connection limits per source address.
    sources: Sources,
    /// The relays' shared registry (etcd), when this relay is one of several.
    shared: Option<Shared>,
    /// Links to other relays, by relay name.
    links: HashMap<String, Handle>,
    /// Agents connected to other relays that sent through a link, and which relay that was.
    remote: HashMap<PeerId, (String, Instant)>,
    /// Limits "peer gone" said to local clients.
    gone: GoneLimiter,
    /// Scratch for packets moved between a client's framing and a link's.
    mesh_buf: Vec<u8>,
}

/// What a relay of several keeps of the shared registry.
struct Shared {
    /// This relay's name (its certificate's): what its connectors' records must name.
    me: String,
    registry: Registry,
    /// The record of each connector connected here, as the registry should hold it.
    local: HashMap<String, ConnectorRecord>,
    /// What the store holds under each key, as read (refused values too): what tells this
    /// relay that one of its connectors' keys holds something else.
    stored: HashMap<Vec<u8>, Vec<u8>>,
    /// Changes for the host to make in the registry.
    writes: VecDeque<RegistryWrite>,
    /// What links to other relays are dialed with (this relay's certificate, relays only).
    dial: quiche::Config,
}

/// A change the relay wants in the shared registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryWrite {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Delete `key` only if it still holds `value` (the connector did not move elsewhere).
    Delete {
        key: String,
        value: Vec<u8>,
    },
}

impl Relay {
    pub fn new(config: quiche::Config, local: SocketAddr) -> Self {
        Relay {
            config,
            local,
            retry: RetryTokens::new(),
            clients: HashMap::new(),
            by_cid: HashMap::new(),
            by_peer: HashMap::new(),
            connectors: HashMap::new(),
            displaced: HashMap::new(),
            next_handle: 1,
            dirty: BTreeSet::new(),
            stateless_out: Vec::new(),
            stats: RelayStats::default(),
            scratch: vec![0u8; 65_536],
            revocations: Revocations::default(),
            peer_check: None,
            sources: Sources::new(Limits::default()),
            shared: None,
            links: HashMap::new(),
            remote: HashMap::new(),
            gone: GoneLimiter::default(),
            // Room for the largest datagram with the longer of the two headers in front.
            mesh_buf: vec![0u8; 65_536 + RELAY_FORWARD_OVERHEAD],
        }
    }

    /// Makes this relay one of several sharing `registry` (its host keeps the registry's keys
    /// in etcd): `me` is this relay's name. Connectors' signed records are checked and put
    /// there, and a connector that registered anew on another relay is closed here.
    ///
    /// `dial` is what links to other relays are opened with: this relay's certificate,
    /// accepting relays only. The relay's own config must accept relays as well as agents and
    /// connectors, for the links other relays open.
    pub fn share_registry(&mut self, me: &str, registry: Registry, dial: quiche::Config) {
        self.shared = Some(Shared {
            me: me.to_string(),
            registry,
            local: HashMap::new(),
            stored: HashMap::new(),
            writes: VecDeque::new(),
            dial,
        });
    }

    pub fn registry(&self) -> Option<&Registry> {
        self.shared.as_ref().map(|s| &s.registry)
    }

    /// The next change to make in the shared registry.
    pub fn poll_registry_write(&mut self) -> Option<RegistryWrite> {
        self.shared.as_mut()?.writes.pop_front()
    }

    /// The whole registry as read at `revision` (the first read, or a read again).
    pub fn registry_loaded(&mut self, kvs: Vec<(Vec<u8>, Vec<u8>, i64)>, revision: i64) {
        let Some(sh) = &mut self.shared else { return };
        sh.stored = kvs.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
        let (changes, errors) = sh.registry.load(kvs, revision, unix_now());
        for e in errors {
            tracing::warn!("relay: registry: {e}");
        }
        for c in changes {
            self.on_registry_change(c);
        }
        self.heal_registry();
    }

    /// One change the registry's watch reported.
    pub fn registry_event(&mut self, ev: Event) {
        let Some(sh) = &mut self.shared else { return };
        let key = match &ev {
            Event::Put { key, value, .. } => {
                sh.stored.insert(key.clone(), value.clone());
                key.clone()
            }
            Event::Delete { key, .. } => {
                sh.stored.remove(key);
                key.clone()
            }
        };
        match sh.registry.apply(ev, unix_now()) {
            Ok(Some(c)) => self.on_registry_change(c),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "relay: registry: {} refused: {e}",
                String::from_utf8_lossy(&key)
            ),
        }
        self.heal_registry();
    }

    /// Puts back the record of every connector connected here whose key in the registry holds
    /// something else that was refused (a replayed or forged record) or nothing at all.
    fn heal_registry(&mut self) {
        let Some(sh) = &mut self.shared else { return };
        let now = unix_now();
        for (name, rec) in &sh.local {
            let key = sh.registry.connector_key(name);
            if sh.stored.get(key.as_bytes()).map(Vec::as_slice) == Some(rec.encoded()) {
                continue;
            }
            // Unless a newer registration (elsewhere) holds the key: then this one yields.
            let newer = sh
                .registry
                .record_of(name, now)
                .is_some_and(|r| r.sequence > rec.sequence);
            if !newer {
                let w = RegistryWrite::Put {
                    key,
                    value: rec.encoded().to_vec(),
                };
                if !sh.writes.contains(&w) {
                    sh.writes.push_back(w);
                }
            }
        }
    }

    fn on_registry_change(&mut self, c: Change) {
        tracing::debug!("relay: registry: {c:?}");
        let Some(sh) = &mut self.shared else { return };
        let (name, relay) = match c {
            Change::ConnectorHomed { name, relay } => (name, relay),
            Change::RelayUp(r) => {
                // One link per pair of relays: the one whose name sorts first dials at once;
                // either dials when it has a packet for the other and no link.
                if sh.me < r.name && !self.links.contains_key(&r.name) {
                    self.dial(&r);
                }
                return;
            }
            Change::RelayGone(name) => {
                if let Some(&h) = self.links.get(&name) {
                    if let Some(c) = self.clients.get_mut(&h) {
                        let _ = c.conn.close(true, CLOSE_GOODBYE, b"left the registry");
                        self.dirty.insert(h);
                    }
                }
                return;
            }
            Change::ConnectorGone(_) => return,
        };
        if relay == sh.me {
            return;
        }
        // A newer record homes a connector connected here on another relay: it registered
        // anew there (it moved, or a second process with its certificate started), and the
        // newest registration wins.
        let Some(ours) = sh.local.get(&name) else {
            return;
        };
        let newer = sh
            .registry
            .record_of(&name, unix_now())
            .is_some_and(|r| r.sequence > ours.sequence);
        if !newer {
            return;
        }
        sh.local.remove(&name);
        let Some(peer) = self.connectors.get(&name).copied() else {
            return;
        };
        let Some(&h) = self.by_peer.get(&peer) else {
            return;
        };
        tracing::warn!(
            "relay: closing connector {name:?}: it registered anew on relay {relay:?}, and the newest registration wins"
        );
        self.unregister(h);
        if let Some(c) = self.clients.get_mut(&h) {
            let reason = format!("replaced by a newer registration on relay {relay}");
            let _ = c.conn.close(true, CLOSE_DUPLICATE, reason.as_bytes());
            self.dirty.insert(h);
        }
    }

    /// Forgets connector records past their expiry (call now and then; once a second does).
    pub fn sweep_registry(&mut self) {
        let Some(sh) = &mut self.shared else { return };
        sh.registry.sweep(unix_now());
        let now = Instant::now();
        let links: Vec<Handle> = self.links.values().copied().collect();
        for h in links {
            let Some(c) = self.clients.get_mut(&h) else {
                continue;
            };
            let Some(l) = c.link.as_mut() else { continue };
            for m in l.routes.sweep(now) {
                let _ = m.encode(&mut c.out);
            }
            // The dialer keeps the link alive (the idle timeout is the control connections').
            if l.dialed.is_some() && c.identity.is_some() {
                let _ = c.conn.send_ack_eliciting();
            }
            self.dirty.insert(h);
            self.flush_stream(h);
        }
        self.remote
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < crate::mesh::ROUTE_IDLE);
        self.gone.sweep(now);
    }

    /// A connector's signed record, from its control connection.
    fn on_record(&mut self, handle: Handle, bytes: &[u8]) {
        let Some(c) = self.clients.get(&handle) else {
            return;
        };
        let (Some(id), true) = (c.identity.clone(), c.registered) else {
            return;
        };
        let Some(sh) = &mut self.shared else {
            tracing::debug!("relay: {id} sent its record; this relay shares no registry");
            return;
        };
        let Some(check) = &self.peer_check else {
            return;
        };
        let rec = match ConnectorRecord::verify(bytes, check, unix_now()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("relay: {id}: its record is refused: {e}");
                return;
            }
        };
        let wrong = if rec.name != id.name || rec.peer_id != id.peer_id {
            Some("it is another connector's".to_string())
        } else if rec.home_relay != sh.me {
            Some(format!("it names relay {:?}", rec.home_relay))
        } else {
            sh.local
                .get(&rec.name)
                .filter(|old| old.sequence >= rec.sequence)
                .map(|_| "it is not newer than the one it replaces".to_string())
        };
        if let Some(why) = wrong {
            tracing::warn!("relay: {id}: its record is refused: {why}");
            return;
        }
        tracing::debug!(
            "relay: {id}: record #{} (until {})",
            rec.sequence,
            rec.expires_at
        );
        sh.writes.push_back(RegistryWrite::Put {
            key: sh.registry.connector_key(&rec.name),
            value: rec.encoded().to_vec(),
        });
        sh.local.insert(rec.name.clone(), rec);
    }

    /// Opens a link to relay `r` (address validation, then mutual TLS: relays only).
    fn dial(&mut self, r: &RelayRecord) {
        let Some(sh) = &mut self.shared else { return };
        if r.name == sh.me {
            return;
        }
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        rand::fill(&mut scid);
        let conn = match quiche::connect(
            None,
            &quiche::ConnectionId::from_ref(&scid),
            self.local,
            r.mesh_addr,
            &mut sh.dial,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "relay: cannot dial relay {:?} at {}: {e}",
                    r.name,
                    r.mesh_addr
                );
                return;
            }
        };
        tracing::info!(
            "relay: opening a link to relay {:?} at {}",
            r.name,
            r.mesh_addr
        );
        let handle = self.next_handle;
        self.next_handle += 1;
        self.by_cid.insert(scid.to_vec(), handle);
        self.links.insert(r.name.clone(), handle);
        self.clients.insert(
            handle,
            Client {
                conn,
                identity: None,
                reported: None,
                peer_addr: r.mesh_addr,
                decoder: ControlDecoder::default(),
                out: Vec::new(),
                // Ours to open: the dialer speaks first.
                stream_open: true,
                cids: vec![scid.to_vec()],
                acks: AckHold::default(),
                instance: 0,
                registered: false,
                expires: None,
                refused: false,
                forwarded_bytes: 0,
                // Not counted against any source's limit (see reap).
                source: IpAddr::from([0, 0, 0, 0]),
                limit: PeerLimit::new(&Limits {
                    peer_packets: None,
                    peer_bytes: None,
                    ..self.sources.limits()
                }),
                link: Some(Link {
                    relay: r.name.clone(),
                    dialed: Some(r.peer_id.clone()),
                    routes: Routes::default(),
                }),
            },
        );
        self.dirty.insert(handle);
    }

    /// A handshake with another relay finished (`handle` dialed it, or it dialed us): the link
    /// is up, or refused.
    fn link_established(&mut self, handle: Handle, id: Identity) {
        let shared = self.shared.is_some();
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        let refuse = match &c.link {
            _ if !shared => Some("this relay shares no registry".to_string()),
            Some(Link {
                relay,
                dialed: Some(peer),
                ..
            }) if (relay, peer) != (&id.name, &id.peer_id.to_string()) => Some(format!(
                "the registry says {relay:?} with peer {}",
                &peer[..peer.len().min(16)]
            )),
            _ => None,
        };
        if let Some(why) = refuse {
            tracing::warn!(
                "relay: refusing a link with {id} from {}: {why}",
                c.peer_addr
            );
            let _ = c.conn.close(true, 0x1, why.as_bytes());
            c.refused = true;
            return;
        }
        if c.link.is_none() {
            c.link = Some(Link {
                relay: id.name.clone(),
                dialed: None,
                routes: Routes::default(),
            });
            // Another relay's traffic is everyone's: no per-peer rate.
            c.limit = PeerLimit::new(&Limits {
                peer_packets: None,
                peer_bytes: None,
                ..self.sources.limits()
            });
        }
        tracing::info!("relay: link with {id} at {} is up", c.peer_addr);
        c.identity = Some(id.clone());
        c.acks.urgent();
        // The newest link to a relay is the one packets go on; an older one still delivers.
        self.links.insert(id.name, handle);
    }

    /// Hands an end-to-end packet (in `self.scratch[..n]`, client framing, from `src` of role
    /// `role`) to the relay its destination is connected to. False if no relay has it.
    fn forward_remote(&mut self, src: PeerId, role: Role, dst: PeerId, n: usize) -> bool {
        let now = Instant::now();
        let relay = match role {
            // An agent sends to connectors: the registry says where each is.
            Role::Agent => self.shared.as_ref().and_then(|sh| {
                sh.registry
                    .home_of_peer(&dst, unix_now())
                    .filter(|r| r.name != sh.me)
                    .cloned()
            }),
            // A connector answers agents that reached it through another relay.
            _ => self.remote.get(&dst).and_then(|(name, _)| {
                self.shared
                    .as_ref()
                    .and_then(|sh| sh.registry.relay(name).cloned())
            }),
        };
        let Some(relay) = relay else { return false };
        let link = match self.links.get(&relay.name) {
            Some(&h) => h,
            None => {
                self.dial(&relay);
                // This packet is lost; the tunnel resends once the link is up.
                self.stats.dropped_packets += 1;
                return true;
            }
        };
        let Some(c) = self.clients.get_mut(&link) else {
            return true;
        };
        let Some(l) = c.link.as_mut().filter(|_| c.identity.is_some()) else {
            self.stats.dropped_packets += 1;
            return true;
        };
        let (route, announce) = match l.routes.outbound((dst, src), now) {
            Ok(r) => r,
            Err(_) => {
                self.stats.dropped_packets += 1;
                return true;
            }
        };
        if let Some(m) = announce {
            if m.encode(&mut c.out).is_ok() {
                if let Ok(w) = c.conn.stream_send(CONTROL_STREAM, &c.out, false) {
                    c.out.drain(..w);
                }
            }
        }
        let payload = &self.scratch[RELAY_FORWARD_OVERHEAD..n];
        let len = MESH_FORWARD_OVERHEAD + payload.len();
        self.mesh_buf[0] = DGRAM_MESH_FORWARD;
        self.mesh_buf[1..MESH_FORWARD_OVERHEAD].copy_from_slice(&route.to_be_bytes());
        self.mesh_buf[MESH_FORWARD_OVERHEAD..len].copy_from_slice(payload);
        match c.conn.dgram_send(&self.mesh_buf[..len]) {
            Ok(()) => {
                self.stats.forwarded_packets += 1;
                self.stats.forwarded_bytes += payload.len() as u64;
                self.dirty.insert(link);
            }
            Err(_) => self.stats.dropped_packets += 1,
        }
        true
    }

    /// Packets another relay forwarded on link `handle`, for clients connected here.
    fn link_datagrams(&mut self, handle: Handle) {
        let now = Instant::now();
        loop {
            let Some(c) = self.clients.get_mut(&handle) else {
                return;
            };
            let n = match c.conn.dgram_recv(&mut self.scratch) {
                Ok(n) => n,
                Err(_) => return,
            };
            let Some(l) = c.link.as_mut() else { return };
            let (route, packet) = match Datagram::parse(&self.scratch[..n]) {
                Ok(Datagram::MeshForward { route, packet }) => (route, packet),
                _ => {
                    self.stats.bad_packets += 1;
                    continue;
                }
            };
            let Some((dst, src)) = l.routes.inbound(route) else {
                // Its announcement is still on the way.
                self.stats.dropped_packets += 1;
                continue;
            };
            let from_relay = l.relay.clone();
            let Some(&d) = self.by_peer.get(&dst) else {
                if l.routes.should_say_gone((dst, src), now) {
                    let _ = ControlMessage::MeshGone { dst, src }.encode(&mut c.out);
                }
                self.stats.dropped_packets += 1;
                continue;
            };
            let len = RELAY_FORWARD_OVERHEAD + packet.len();
            self.mesh_buf[0] = DGRAM_RELAY_FORWARD;
            self.mesh_buf[1..RELAY_FORWARD_OVERHEAD].copy_from_slice(&src.0);
            self.mesh_buf[RELAY_FORWARD_OVERHEAD..len].copy_from_slice(packet);
            if !self.by_peer.contains_key(&src) {
                self.remote.insert(src, (from_relay, now));
            }
            let Some(dc) = self.clients.get_mut(&d) else {
                continue;
            };
            match dc.conn.dgram_send(&self.mesh_buf[..len]) {
                Ok(()) => {
                    self.stats.forwarded_packets += 1;
                    self.stats.forwarded_bytes += (len - RELAY_FORWARD_OVERHEAD) as u64;
                    self.dirty.insert(d);
                }
                Err(_) => self.stats.dropped_packets += 1,
            }
        }
    }

    /// A message on a link's control stream.
    fn on_link_message(&mut self, handle: Handle, msg: ControlMessage) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        let Some(l) = c.link.as_mut() else { return };
        match msg {
            ControlMessage::MeshRoute { id, dst, src } => {
                if !l.routes.announce(id, (dst, src)) {
                    tracing::warn!(
                        "relay: closing the link with relay {:?}: too many routes",
                        l.relay
                    );
                    let _ = c.conn.close(true, 0x1, b"too many routes");
                }
            }
            ControlMessage::MeshUnroute { id } => l.routes.withdraw(id),
            ControlMessage::MeshGone { dst, src } => {
                // Not there (any more): forget our routes to it, and tell the sender.
                for m in l.routes.forget(&dst) {
                    let _ = m.encode(&mut c.out);
                }
                self.tell_gone(src, dst);
            }
            other => tracing::debug!("relay: unexpected message on a link: {other:?}"),
        }
    }

    /// Tells local client `src` that `dst` cannot be reached (at most every half second).
    fn tell_gone(&mut self, src: PeerId, dst: PeerId) {
        let Some(&h) = self.by_peer.get(&src) else {
            return;
        };
        if !self.gone.should_say((dst, src), Instant::now()) {
            return;
        }
        if let Some(c) = self.clients.get_mut(&h) {
            if ControlMessage::PeerGone(dst).encode(&mut c.out).is_ok() {
                self.dirty.insert(h);
                self.flush_stream(h);
            }
        }
    }

    /// A connector connected here is gone: its record leaves the registry, if it is still ours.
    fn forget_record(&mut self, name: &str) {
        let Some(sh) = &mut self.shared else { return };
        if let Some(rec) = sh.local.remove(name) {
            sh.writes.push_back(RegistryWrite::Delete {
                key: sh.registry.connector_key(name),
                value: rec.encoded().to_vec(),
            });
        }
    }

    /// The flood limits (the defaults until set). Connections already up keep the per-peer
    /// rates they started with.
    pub fn set_limits(&mut self, limits: Limits) {
        self.sources.set_limits(limits);
    }

    /// What checks the renewed certificates clients present in place (see
    /// [`ControlMessage::Certificate`]).
    pub fn set_peer_check(&mut self, check: tls::PeerCheck) {
        self.peer_check = Some(check);
    }

    /// A new revocation list is in force in `revocations` (the handle the relay's TLS config
    /// checks at every handshake): every connection it revokes closes now, and every other
    /// client is handed the list. Returns how many connections were closed.
    pub fn apply_revocations(&mut self, revocations: &Revocations) -> usize {
        self.revocations = revocations.clone();
        let Some(list) = revocations.current() else {
            return 0;
        };
        let mut revoked = Vec::new();
        let mut others = Vec::new();
        for (h, c) in &self.clients {
            let Some(id) = &c.identity else { continue };
            if c.conn.is_closed() || c.conn.is_draining() {
                continue;
            }
            match list.revokes(id) {
                Some(why) => revoked.push((*h, why)),
                None if c.registered => others.push(*h),
                None => {}
            }
        }
        for (h, why) in &revoked {
            self.unregister(*h);
            if let Some(c) = self.clients.get_mut(h) {
                if let Some(id) = &c.identity {
                    tracing::warn!(
                        "relay: closing {id}: certificate revoked ({why} is on revocation list #{})",
                        list.sequence
                    );
                }
                let reason = format!("certificate revoked (revocation list #{})", list.sequence);
                let _ = c.conn.close(true, CLOSE_REVOKED, reason.as_bytes());
                c.refused = true;
                self.stats.refused[Refusal::Revoked as usize] += 1;
            }
            self.dirty.insert(*h);
        }
        for h in others {
            self.send_revocations(h);
        }
        revoked.len()
    }

    /// Queues the list in force for client `h`.
    fn send_revocations(&mut self, h: Handle) {
        let Some(list) = self.revocations.current() else {
            return;
        };
        let Some(c) = self.clients.get_mut(&h) else {
            return;
        };
        let msg = ControlMessage::Revocations(list.encoded().to_vec());
        if msg.encode(&mut c.out).is_ok() {
            self.dirty.insert(h);
            self.flush_stream(h);
        }
    }

    /// Takes `h`'s registration away at once, so nothing is forwarded to or from it while its
    /// connection closes.
    fn unregister(&mut self, h: Handle) {
        let Some(c) = self.clients.get_mut(&h) else {
            return;
        };
        c.registered = false;
        let Some(id) = &c.identity else { return };
        if self.by_peer.get(&id.peer_id) == Some(&h) {
            self.by_peer.remove(&id.peer_id);
            if self.connectors.get(&id.name) == Some(&id.peer_id) {
                self.connectors.remove(&id.name);
                let name = id.name.clone();
                self.forget_record(&name);
            }
        }
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats {
            clients: self.clients.len(),
            connectors: self.connectors.len(),
            ..self.stats
        }
    }

    /// Every client connected now.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .clients
            .values()
            .filter(|c| !c.conn.is_closed())
            .map(|c| PeerInfo {
                identity: c.identity.clone(),
                addr: c.peer_addr,
                registered: c.registered,
                forwarded_bytes: c.forwarded_bytes,
            })
            .collect();
        v.sort_by(|a, b| {
            let name = |p: &PeerInfo| p.identity.as_ref().map(|i| i.name.clone());
            name(a).cmp(&name(b)).then(a.addr.cmp(&b.addr))
        });
        v
    }

    /// The connectors registered now, by name.
    pub fn connectors(&self) -> impl Iterator<Item = (&String, &PeerId)> {
        self.connectors.iter()
    }

    /// Feeds one UDP packet.
    pub fn recv(&mut self, pkt: &mut [u8], from: SocketAddr) {
        let hdr = match quiche::Header::from_slice(pkt, quiche::MAX_CONN_ID_LEN) {
            Ok(h) => h,
            Err(_) => {
                self.stats.bad_packets += 1;
                return;
            }
        };
        let handle = match self.by_cid.get(hdr.dcid.as_ref()) {
            Some(h) => *h,
            None => match self.new_client(&hdr, from) {
                Some(h) => h,
                None => return,
            },
        };
        let Some(client) = self.clients.get_mut(&handle) else {
            return;
        };
        // A peer over its rate loses the excess here, before any decryption: it costs the
        // relay nearly nothing, and the peer's congestion control sees the loss and slows
        // down, while what fits its rate (its ACKs and keepalives among it) keeps the
        // connection up.
        if client.identity.is_some()
            && client.limit.is_limited()
            && !client.limit.allow(pkt.len(), Instant::now())
        {
            self.stats.rate_limited_packets += 1;
            self.stats.rate_limited_bytes += pkt.len() as u64;
            if let Some((p, b)) = client.limit.report(Instant::now()) {
                let id = client
                    .identity
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                tracing::warn!(
                    "relay: {id} sends faster than its rate (`limits.peer_packets`, `limits.peer_bytes`): dropped {p} packet(s), {b} bytes beyond it"
                );
            }
            return;
        }
        let info = quiche::RecvInfo {
            from,
            to: self.local,
        };
        let len = pkt.len();
        match client.conn.recv(pkt, info) {
            // Only an authenticated packet may move the client's observed address, and only
            // where quiche moved the connection: it also answers Ok to a packet it dropped (a
            // new address it has no path slot for) or one that only probes a path.
            Ok(_) => {
                if from != client.peer_addr {
                    if let Some(active) = client.conn.path_stats().find(|p| p.active) {
                        client.peer_addr = active.peer_addr;
                    }
                }
                client.acks.on_recv(len, Instant::now());
            }
            Err(e) => {
                tracing::debug!("relay: dropped a packet from {from}: {e}");
                self.stats.bad_packets += 1;
            }
        }
        self.dirty.insert(handle);
        self.process(handle);
    }

    fn new_client(&mut self, hdr: &quiche::Header, from: SocketAddr) -> Option<Handle> {
        if hdr.ty != quiche::Type::Initial {
            self.stats.bad_packets += 1;
            return None;
        }
        if !quiche::version_is_supported(hdr.version) {
            let mut out = vec![0u8; 1350];
            if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut out) {
                out.truncate(n);
                self.stateless_out.push((out, from));
            }
            return None;
        }
        let token = hdr.token.as_deref().unwrap_or(&[]);
        if token.is_empty() {
            // Address validation first: the Retry is smaller than the Initial that caused it.
            let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
            rand::fill(&mut scid);
            let new_token = self.retry.mint(&hdr.dcid, &from);
            let mut out = vec![0u8; 1350];
            if let Ok(n) = quiche::retry(
                &hdr.scid,
                &hdr.dcid,
                &quiche::ConnectionId::from_ref(&scid),
                &new_token,
                hdr.version,
                &mut out,
            ) {
                out.truncate(n);
                self.stateless_out.push((out, from));
                self.stats.retries_sent += 1;
            }
            return None;
        }
        let Some(odcid) = self.retry.validate(token, &from) else {
            tracing::debug!("relay: invalid retry token from {from}");
            self.stats.bad_packets += 1;
            self.stats.refused[Refusal::InvalidToken as usize] += 1;
            return None;
        };
        // The address is validated: its limits count now. A refused Initial gets no answer;
        // the client tries again with backoff.
        if let Err((why, say)) = self.sources.admit(from.ip(), Instant::now()) {
            self.stats.refused[why as usize] += 1;
            if say {
                let limits = self.sources.limits();
                match why {
                    Refusal::TooManyConnections => tracing::warn!(
                        "relay: refusing new connections from {}: it holds {} already (limit `connections_per_address`)",
                        from.ip(),
                        limits.connections_per_address
                    ),
                    _ => tracing::warn!(
                        "relay: refusing new connections from {}: faster than {}/s (burst {}, limit `connections_per_source`)",
                        from.ip(),
                        limits.connections_per_source.per_second,
                        limits.connections_per_source.burst
                    ),
                }
            }
            return None;
        }
        let scid = hdr.dcid.to_vec();
        let conn = match quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            Some(&quiche::ConnectionId::from_ref(&odcid)),
            self.local,
            from,
            &mut self.config,
        ) {
            Ok(c) => c,
            Err(_) => {
                self.sources.release(from.ip());
                return None;
            }
        };
        let handle = self.next_handle;
        self.next_handle += 1;
        self.by_cid.insert(scid.clone(), handle);
        self.clients.insert(
            handle,
            Client {
                conn,
                identity: None,
                reported: None,
                peer_addr: from,
                decoder: ControlDecoder::default(),
                out: Vec::new(),
                stream_open: false,
                cids: vec![scid],
                acks: AckHold::default(),
                instance: 0,
                registered: false,
                expires: None,
                refused: false,
                forwarded_bytes: 0,
                source: from.ip(),
                limit: PeerLimit::new(&self.sources.limits()),
                link: None,
            },
        );
        Some(handle)
    }

    fn process(&mut self, handle: Handle) {
        self.check_established(handle);
        self.read_control(handle);
        if self.clients.get(&handle).is_some_and(|c| c.link.is_some()) {
            self.link_datagrams(handle);
        } else {
            self.forward_datagrams(handle);
            self.report_address(handle);
        }
        self.flush_stream(handle);
    }

    fn check_established(&mut self, handle: Handle) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        if c.identity.is_some() || !c.conn.is_established() {
            return;
        }
        let id = match c.conn.peer_cert().map(identity_from_der) {
            Some(Ok(id)) => id,
            other => {
                tracing::warn!(
                    "relay: closing {}: unusable certificate {other:?}",
                    c.peer_addr
                );
                let _ = c.conn.close(false, 0x100 + 46, b"bad certificate");
                c.refused = true;
                self.stats.refused[Refusal::BadCertificate as usize] += 1;
                return;
            }
        };
        if id.role == Role::Relay || c.link.is_some() {
            return self.link_established(handle, id);
        }
        if let Some((seq, why)) = self.revocations.revokes(&id) {
            // TLS refuses these at the handshake; a list that came during it is caught here.
            tracing::warn!(
                "relay: refusing {id} from {}: certificate revoked ({why} is on revocation list #{seq})",
                c.peer_addr
            );
            let reason = format!("certificate revoked (revocation list #{seq})");
            let _ = c.conn.close(true, CLOSE_REVOKED, reason.as_bytes());
            c.refused = true;
            self.stats.refused[Refusal::Revoked as usize] += 1;
            return;
        }
        tracing::info!("relay: {id} connected from {}", c.peer_addr);
        self.stats.accepted += 1;
        c.identity = Some(id.clone());
        let left = id.not_after - sluice_dataplane::identity::unix_now();
        c.expires = Some(Instant::now() + Duration::from_secs(left.max(0) as u64));
        // The handshake's last flight (HANDSHAKE_DONE) goes at once.
        c.acks.urgent();
        // A peer id already held by a live connection is settled by the hello, which says
        // whether this is the same process reconnecting or another one with the same key.
        if !self.by_peer.contains_key(&id.peer_id) {
            self.register(handle);
        }
    }

    /// Gives `handle` its peer id's registration (forwarding and, for a connector, its name).
    fn register(&mut self, handle: Handle) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        let Some(id) = c.identity.clone() else { return };
        c.registered = true;
        if let Some(old) = self.by_peer.insert(id.peer_id, handle) {
            if old != handle {
                if let Some(o) = self.clients.get_mut(&old) {
                    o.registered = false;
                    let _ = o.conn.close(true, 0, b"replaced by a newer connection");
                    self.dirty.insert(old);
                }
            }
        }
        // A node with no list of its own learns the relay's: connectors refuse revoked agents,
        // agents close their (direct) tunnels to revoked connectors.
        self.send_revocations(handle);
        if id.role == Role::Connector {
            // A relay of several needs the connector's signed record for the registry.
            if self.shared.is_some() {
                if let Some(c) = self.clients.get_mut(&handle) {
                    let _ = ControlMessage::ConnectorRecord(Vec::new()).encode(&mut c.out);
                    self.flush_stream(handle);
                }
            }
            if let Some(prev) = self.connectors.insert(id.name.clone(), id.peer_id) {
                if prev != id.peer_id {
                    tracing::warn!(
                        "relay: connector name {:?} now served by peer {} (was {})",
                        id.name,
                        id.peer_id.short(),
                        prev.short()
                    );
                }
            }
        }
    }

    /// The hello of a client whose peer id another connection holds: the same process
    /// reconnecting takes over; another process (a copied certificate, two connectors started
    /// with one config) takes over too, once, and the one it replaced stays off while it is
    /// connected.
    fn on_hello(&mut self, handle: Handle, instance: u64) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        c.instance = instance;
        if c.registered {
            return;
        }
        let Some(id) = c.identity.clone() else { return };
        let new_addr = c.peer_addr;
        let Some(&old) = self.by_peer.get(&id.peer_id) else {
            return self.register(handle);
        };
        let (old_instance, old_addr) = match self.clients.get(&old) {
            Some(o) => (o.instance, o.peer_addr),
            None => return self.register(handle),
        };
        if old_instance == instance && instance != 0 {
            tracing::info!("relay: {id} reconnected; closing its previous connection");
            return self.register(handle);
        }
        let displaced = self.displaced.entry(id.peer_id).or_default();
        if instance != 0 && displaced.contains(&instance) {
            // Refused quietly: it was told, and the relay logged it, when it was replaced.
            if let Some(c) = self.clients.get_mut(&handle) {
                let _ = c.conn.close(
                    true,
                    CLOSE_DUPLICATE,
                    b"duplicate identity: another node with this certificate is connected",
                );
                c.refused = true;
                self.stats.refused[Refusal::DuplicateIdentity as usize] += 1;
                self.dirty.insert(handle);
            }
            return;
        }
        tracing::warn!(
            "relay: duplicate identity: {id} connected from {new_addr} while another process with the same certificate is connected from {old_addr}; the newer one is kept, the older stays off while the newer is connected (give each node its own certificate)"
        );
        if old_instance != 0 {
            displaced.push(old_instance);
            // Bounded: a node restarted over and over leaves one id per restart.
            if displaced.len() > 16 {
                displaced.remove(0);
            }
        }
        if let Some(o) = self.clients.get_mut(&old) {
            o.registered = false;
            let _ = o.conn.close(
                true,
                CLOSE_DUPLICATE,
                b"duplicate identity: another node with this certificate connected",
            );
            self.dirty.insert(old);
        }
        self.register(handle);
    }

    fn read_control(&mut self, handle: Handle) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        if c.identity.is_none() {
            return;
        }
        while let Ok((n, _)) = c.conn.stream_recv(CONTROL_STREAM, &mut self.scratch) {
            c.decoder.push(&self.scratch[..n]);
            c.stream_open = true;
        }
        let mut replies = Vec::new();
        let mut hello = None;
        let mut renewed = None;
        let mut record = None;
        let mut mesh = Vec::new();
        let is_link = c.link.is_some();
        while let Some(msg) = c.decoder.next_message() {
            match msg {
                Ok(ControlMessage::Hello { software, instance }) => {
                    tracing::debug!("relay: {} runs {software}", c.peer_addr);
                    hello = Some(instance);
                }
                Ok(ControlMessage::Certificate(der)) => renewed = Some(der),
                Ok(ControlMessage::ConnectorRecord(b)) => record = Some(b),
                Ok(
                    m @ (ControlMessage::MeshRoute { .. }
                    | ControlMessage::MeshUnroute { .. }
                    | ControlMessage::MeshGone { .. }),
                ) if is_link => mesh.push(m),
                Ok(ControlMessage::Lookup { name }) => {
                    // Here, or (for a relay of several) homed on another relay that is up.
                    let peer = self.connectors.get(&name).copied().or_else(|| {
                        let sh = self.shared.as_ref()?;
                        let now = unix_now();
                        sh.registry.home_of(&name, now)?;
                        Some(sh.registry.record_of(&name, now)?.peer_id)
                    });
                    replies.push(ControlMessage::LookupReply { name, peer });
                }
                Ok(other) => tracing::debug!("relay: unexpected message {other:?}"),
                Err(e) => {
                    tracing::warn!("relay: closing {}: bad control message: {e}", c.peer_addr);
                    let _ = c.conn.close(false, 0x1, b"bad control message");
                    return;
                }
            }
        }
        for r in replies {
            let _ = r.encode(&mut c.out);
        }
        for m in mesh {
            self.on_link_message(handle, m);
        }
        if let Some(der) = renewed {
            self.on_renewed(handle, &der);
        }
        if let Some(instance) = hello {
            self.on_hello(handle, instance);
        }
        // After the hello: the record counts only from the holder of the registration.
        if let Some(b) = record {
            self.on_record(handle, &b);
        }
    }

    /// A client presents its renewed certificate: once checked, its connection lives until the
    /// new one expires (and its groups are the new ones).
    fn on_renewed(&mut self, handle: Handle, der: &[u8]) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        let Some(current) = c.identity.clone() else {
            return;
        };
        let Some(check) = &self.peer_check else {
            tracing::debug!("relay: {current} presented a renewed certificate; not checked here");
            return;
        };
        match check.renewed(&current, der, sluice_dataplane::identity::unix_now()) {
            Ok(id) => {
                tracing::info!("relay: {id} renewed its certificate in place");
                let left = id.not_after - sluice_dataplane::identity::unix_now();
                c.expires = Some(Instant::now() + Duration::from_secs(left.max(0) as u64));
                c.identity = Some(id);
            }
            Err(e) => tracing::warn!(
                "relay: {current}: renewed certificate refused: {e}; the connection lasts until its certificate expires"
            ),
        }
    }

    fn report_address(&mut self, handle: Handle) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        if !c.stream_open || c.reported == Some(c.peer_addr) {
            return;
        }
        if ControlMessage::ObservedAddr(c.peer_addr)
            .encode(&mut c.out)
            .is_ok()
        {
            c.reported = Some(c.peer_addr);
        }
    }

    fn flush_stream(&mut self, handle: Handle) {
        let Some(c) = self.clients.get_mut(&handle) else {
            return;
        };
        if c.out.is_empty() || !c.stream_open {
            return;
        }
        if let Ok(n) = c.conn.stream_send(CONTROL_STREAM, &c.out, false) {
            c.out.drain(..n);
            if n > 0 {
                c.acks.urgent();
            }
        }
    }

    fn forward_datagrams(&mut self, from: Handle) {
        // Only the holder of a peer id's registration speaks for it.
        let (src_id, src_role) = match self
            .clients
            .get(&from)
            .filter(|c| c.registered)
            .and_then(|c| c.identity.as_ref())
        {
            Some(id) => (id.peer_id, id.role),
            None => return,
        };
        loop {
            let Some(c) = self.clients.get_mut(&from) else {
                return;
            };
            let n = match c.conn.dgram_recv(&mut self.scratch) {
                Ok(n) => n,
                Err(_) => return,
            };
            let pkt = &mut self.scratch[..n];
            if n < RELAY_FORWARD_OVERHEAD || pkt[0] != DGRAM_RELAY_FORWARD {
                self.stats.bad_packets += 1;
                continue;
            }
            let Some(dst_id) = PeerId::from_slice(&pkt[1..RELAY_FORWARD_OVERHEAD]) else {
                continue;
            };
            let Some(&dst) = self.by_peer.get(&dst_id) else {
                if !self.forward_remote(src_id, src_role, dst_id, n) {
                    self.stats.dropped_packets += 1;
                    self.tell_gone(src_id, dst_id);
                }
                continue;
            };
            let Some(d) = self.clients.get_mut(&dst) else {
                continue;
            };
            // Tunnels run between an agent and a connector, never between two of a kind.
            if d.identity.as_ref().map(|i| i.role) == Some(src_role) {
                self.stats.dropped_packets += 1;
                continue;
            }
            pkt[1..RELAY_FORWARD_OVERHEAD].copy_from_slice(&src_id.0);
            match d.conn.dgram_send(pkt) {
                Ok(()) => {
                    let bytes = (n - RELAY_FORWARD_OVERHEAD) as u64;
                    self.stats.forwarded_packets += 1;
                    self.stats.forwarded_bytes += bytes;
                    self.dirty.insert(dst);
                    if let Some(src) = self.clients.get_mut(&from) {
                        src.forwarded_bytes += bytes;
                    }
                }
                Err(_) => self.stats.dropped_packets += 1,
            }
        }
    }

    /// Writes the next UDP packet to send into `out`: its length and destination.
    pub fn send(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        if let Some((pkt, to)) = self.stateless_out.pop() {
            let n = pkt.len().min(out.len());
            out[..n].copy_from_slice(&pkt[..n]);
            return Some((n, to));
        }
        let now = Instant::now();
        while let Some(&h) = self.dirty.iter().next() {
            if let Some(c) = self.clients.get_mut(&h) {
                // A held ACK comes back through `timeout`, not through `dirty`.
                if !c.acks.may_send_on(&c.conn, now) {
                    self.dirty.remove(&h);
                    continue;
                }
                match c.conn.send(out) {
                    Ok((n, info)) => {
                        c.acks.on_sent();
                        return Some((n, info.to));
                    }
                    Err(quiche::Error::Done) => c.acks.on_idle(),
                    Err(e) => {
                        tracing::debug!("relay: send failed: {e}");
                        c.acks.on_idle();
                    }
                }
                if c.conn.is_closed() {
                    self.reap(h);
                }
            }
            self.dirty.remove(&h);
        }
        None
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        self.clients
            .values()
            .filter_map(|c| {
                let quic = c.acks.timeout_on(&c.conn, now);
                let expiry = c
                    .expires
                    .filter(|_| !c.conn.is_closed() && !c.conn.is_draining())
                    .map(|e| e.saturating_duration_since(now));
                match (quic, expiry) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Closes every connection: the relay is stopping, and its clients should know now (they
    /// reconnect, to this relay once it is back, with backoff).
    pub fn goodbye(&mut self) {
        for (h, c) in &mut self.clients {
            let _ = c.conn.close(true, CLOSE_GOODBYE, b"relay stopping");
            self.dirty.insert(*h);
        }
    }

    /// Runs the timers that have expired.
    pub fn on_timeout(&mut self) {
        let now = Instant::now();
        self.sources.prune(now);
        for (h, c) in &mut self.clients {
            if c.expires.is_some_and(|e| now >= e) && !c.conn.is_closed() && !c.conn.is_draining() {
                if let Some(id) = &c.identity {
                    tracing::info!("relay: closing {id}: its certificate expired");
                }
                let _ = c
                    .conn
                    .close(true, CLOSE_CERT_EXPIRED, b"certificate expired");
                self.dirty.insert(*h);
            }
        }
        let due: Vec<Handle> = self
            .clients
            .iter()
            .filter(|(_, c)| c.acks.timeout_on(&c.conn, now) == Some(Duration::ZERO))
            .map(|(h, _)| *h)
            .collect();
        for h in due {
            if let Some(c) = self.clients.get_mut(&h) {
                // quiche's timers or a held ACK: either way the next send goes.
                c.conn.on_timeout();
                c.acks.urgent();
                self.dirty.insert(h);
            }
            self.process(h);
        }
    }

    /// Removes a closed connection from the registry.
    fn reap(&mut self, h: Handle) {
        let Some(c) = self.clients.remove(&h) else {
            return;
        };
        if let Some(l) = &c.link {
            if self.links.get(&l.relay) == Some(&h) {
                self.links.remove(&l.relay);
            }
            if c.identity.is_some() {
                tracing::info!("relay: link with relay {:?} closed", l.relay);
            }
            self.remote.retain(|_, (r, _)| r != &l.relay);
            for cid in &c.cids {
                self.by_cid.remove(cid);
            }
            if l.dialed.is_some() {
                // A dialed link was never counted against a source.
                return;
            }
        }
        self.sources.release(c.source);
        for cid in &c.cids {
            self.by_cid.remove(cid);
        }
        let why = tls::describe_close(&c.conn).unwrap_or_else(|| "closed".into());
        match &c.identity {
            Some(id) => {
                tracing::info!("relay: {id} disconnected: {why}");
                if self.by_peer.get(&id.peer_id) == Some(&h) {
                    self.by_peer.remove(&id.peer_id);
                    // The node that won a duplicate is gone: the one it replaced may come back.
                    self.displaced.remove(&id.peer_id);
                    if self.connectors.get(&id.name) == Some(&id.peer_id) {
                        self.connectors.remove(&id.name);
                        let name = id.name.clone();
                        self.forget_record(&name);
                    }
                }
            }
            None => {
                let revoked = c
                    .conn
                    .local_error()
                    .is_some_and(|e| !e.is_app && e.error_code == 0x100 + TLS_ALERT_REVOKED);
                if revoked {
                    self.stats.refused[Refusal::Revoked as usize] += 1;
                } else if !c.refused {
                    self.stats.refused[Refusal::HandshakeFailed as usize] += 1;
                }
                tracing::info!("relay: handshake with {} failed: {why}", c.peer_addr)
            }
        }
    }
}

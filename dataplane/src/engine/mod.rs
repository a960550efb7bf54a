//! The agent engine: everything the agent decides, as one sans-IO state machine that every
//! host drives (the Linux binary over tun-rs and tokio, the Apple library over utun, tests in
//! memory).
//!
//! Inputs are IP packets from the tunnel device ([`Engine::handle_device_packet`]), UDP
//! datagrams ([`Engine::handle_datagram`]), the time ([`Engine::handle_timeout`]) and commands
//! (a new policy, a network change, sleep and wake, a resolved relay name, DNS queries a host
//! read from its own socket). Outputs are polled: packets for the device
//! ([`Engine::drain_device`]), datagrams to send ([`Engine::poll_transmit`]), the next deadline
//! ([`Engine::poll_timeout`]) and [`Event`]s (network settings to apply, relay names to
//! resolve, DNS-over-TCP exchanges, tunnel state, audit lines). The engine never opens a
//! socket or a file and never reads a clock: `now` is always the host's.
//!
//! What it decides: which flows the policy admits (and answers the rest at once), one
//! end-to-end tunnel per connector (looked up through the relay, packets held while it comes
//! up), direct paths, synthetic DNS answers and the names behind synthetic addresses, the
//! routes the device needs, and the status.

mod carried;
pub mod dns;
pub mod dns_tcp;
pub mod routes;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sluice_policy::cache::FlowCache;
use sluice_policy::{Flow, Policy, Proto, Subject};

use crate::control::ControlEvent;
use crate::control_link::{ControlLink, RelayTarget};
use crate::datagram::{classify, Incoming, TransmitRound, Tunnels};
use crate::dns::live_flows::LiveFlows;
use crate::dns::pool::SyntheticPool;
use crate::dns::responder::{respond, Reply};
use crate::identity::{PeerId, Role};
use crate::metrics::{Direction, DnsKind, DropReason, NodeCounters};
use crate::nat::candidate::{Candidate, Kind};
use crate::nat::local::DirectSetup;
use crate::nat::traversal::RETRY_AFTER;
use crate::packet::{
    self, PacketInfo, Unreachable, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use crate::revocation::{CaKey, Offered, RevocationError, Revocations};
use crate::session::QuicSession;
use crate::status::{
    millis, secs, AgentStatus, CandidatePair, PathKind, TunnelState, TunnelStatus,
};
use crate::tls::{self, Credentials, QuicParams};
use crate::tunnel::{Path, Tunnel, TunnelError, TunnelEvent, VirtualPaths};
use crate::wall_clock::WallClock;
use crate::wire::{named_ip_overhead, ControlMessage, TUNNEL_GONE, TUNNEL_IP_OVERHEAD};
use carried::Carried;

pub use dns::DnsClient;

/// Free bytes a host leaves in front of every packet it hands to
/// [`Engine::handle_device_packet`]: the tunnel header is written there, with no copy. (One
/// byte: a host that reads a 4-byte utun header in front of each packet reads at
/// `max(DEVICE_HEADROOM, 4)` and passes the slice that starts `DEVICE_HEADROOM` before the
/// packet.)
pub const DEVICE_HEADROOM: usize = TUNNEL_IP_OVERHEAD;
pub use crate::tunnel::TUNNEL_KEEPALIVE;
/// Packets held per connector while its tunnel comes up.
const QUEUE_MAX: usize = 256;
/// After a failed lookup, packets to that connector are refused for this long.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(2);
/// A lookup with no reply is sent again after this long.
const LOOKUP_RETRY: Duration = Duration::from_secs(2);
/// Flows whose decision is cached; past this the cache starts over.
const FLOW_CACHE: usize = 65_536;
/// DNS queries held per connector while its tunnel comes up.
const DNS_QUEUE_MAX: usize = 64;
/// How often idle synthetic names are swept.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Bytes of packets for the device held between two drains; past this packets are dropped
/// (a host that stops draining must not grow the engine without bound).
const DEVICE_QUEUE_BYTES: usize = 4 << 20;
/// Events held for a host that does not poll them; past this the oldest go.
const EVENTS_MAX: usize = 1024;

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub relay: RelayTarget,
    /// The address of the host's peer socket (the one [`SocketKind::Peer`] datagrams use), as
    /// quiche names every path of this node; unspecified IP with the real port is fine.
    pub local: SocketAddr,
    /// The device's own addresses: the source of the packets apps send into the tunnel.
    pub ipv4: Ipv4Net,
    pub ipv6: Option<Ipv6Net>,
    pub mtu: u16,
    pub dns: DnsConfig,
    /// Whether tunnels look for direct paths.
    pub direct_paths: bool,
    /// The host's interface addresses (the tunnel device's own left out): direct-path
    /// candidates.
    pub interface_ips: Vec<IpAddr>,
    /// Random per process: tells the relay this node's reconnections from another node with the
    /// same certificate.
    pub instance: u64,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Whether the engine answers DNS at all.
    pub enabled: bool,
    /// Where apps send their queries. Packets to it on port 53 are answered in the packet
    /// path; a host whose kernel delivers this address locally (the device's own address on
    /// Linux) reads queries from a socket and passes them to [`Engine::handle_dns_query`].
    pub address: IpAddr,
    pub pool_v4: Ipv4Net,
    pub pool_v6: Ipv6Net,
    /// Names held at once.
    pub max_names: u32,
    /// Resolvers for every name that is not a resource.
    pub upstreams: Vec<SocketAddr>,
}

/// The network settings the host applies to its device and system, sent at start and each
/// time they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Counts up by one per change.
    pub generation: u64,
    pub ipv4: Ipv4Net,
    pub ipv6: Option<Ipv6Net>,
    pub mtu: u16,
    /// Networks to route into the device: the policy's resources, the synthetic pools and the
    /// DNS address when it is not the device's own, less the relay's addresses.
    pub routes: Vec<IpNet>,
    /// The resolver to use for `match_domains` (empty when DNS is off).
    pub dns_servers: Vec<IpAddr>,
    /// The resource domains (exact names and wildcard parents) the policy names.
    pub match_domains: Vec<String>,
}

impl Settings {
    /// The settings an engine with `config` and `policy` starts with (its first
    /// [`Event::Settings`]). A host that must apply settings before it can start reads them
    /// here: Apple's utun descriptor exists only once settings are applied.
    pub fn initial(config: &EngineConfig, policy: &Policy) -> Settings {
        let d = &config.dns;
        let dns = d.enabled.then_some(d.address);
        let pools = (d.pool_v4.trunc(), d.pool_v6.trunc());
        let wanted = wanted_routes(policy, pools, config.ipv4, config.ipv6, dns);
        let relay: Vec<IpAddr> = config.relay.literal.map(|a| a.ip()).into_iter().collect();
        let mut routes = routes::Routes::default();
        routes.set(wanted, &relay);
        Settings {
            generation: 1,
            ipv4: config.ipv4,
            ipv6: config.ipv6,
            mtu: config.mtu,
            routes: routes.routed().to_vec(),
            dns_servers: dns.into_iter().collect(),
            match_domains: policy.dns_domains(),
        }
    }
}

/// What the device routes before the relay's addresses are kept out: the policy's resources,
/// the synthetic pools, and the DNS address (`dns`, when the engine answers DNS) unless it is
/// the device's own, so that queries reach the packet path.
fn wanted_routes(
    policy: &Policy,
    pools: (Ipv4Net, Ipv6Net),
    ipv4: Ipv4Net,
    ipv6: Option<Ipv6Net>,
    dns: Option<IpAddr>,
) -> Vec<IpNet> {
    let mut wanted = routes::networks(policy);
    wanted.push(IpNet::V4(pools.0));
    wanted.push(IpNet::V6(pools.1));
    if let Some(a) = dns {
        let own = IpAddr::V4(ipv4.addr()) == a || ipv6.is_some_and(|v6| IpAddr::V6(v6.addr()) == a);
        if !own {
            wanted.push(IpNet::from(a));
        }
    }
    wanted
}

/// Something the host has to know or do.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Apply these network settings.
    Settings(Settings),
    /// Resolve the relay's name and call [`Engine::handle_relay_resolved`].
    ResolveRelay { host: String, port: u16 },
    /// Send `query` to `server` over TCP (length-prefixed) and give the answer to
    /// [`Engine::handle_dns_tcp_answer`] with `id` (None when it fails).
    DnsOverTcp {
        id: u64,
        server: SocketAddr,
        query: Vec<u8>,
    },
    /// A connector's tunnel changed state.
    Tunnel {
        connector: String,
        state: TunnelState,
        path: PathKind,
    },
    /// One flow decision, as a JSON line for the audit log.
    Audit(String),
}

/// Which of the host's sockets a datagram uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// The node's socket: relay, tunnels, punches.
    Peer,
    /// A socket for upstream DNS queries (any port, the upstream's address family).
    Dns,
}

/// A datagram to send, written into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub len: usize,
    pub to: SocketAddr,
    pub socket: SocketKind,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("`dns`: {0}")]
    Pool(String),
    #[error("the synthetic pool {pool} overlaps the policy's resource network {net}; pick a pool no resource uses")]
    PoolOverlap { pool: IpNet, net: IpNet },
}

/// A flow as the agent sees it: source, destination, protocol, ports (ICMP: echo id).
pub type FlowKey = (IpAddr, IpAddr, u8, u16, u16);

/// The policy's view of a packet, or None for protocols no policy can allow.
pub fn flow_of(info: &PacketInfo) -> Option<Flow<'static>> {
    let (proto, port) = match info.proto {
        PROTO_TCP => (Proto::Tcp, info.dst_port),
        PROTO_UDP => (Proto::Udp, info.dst_port),
        PROTO_ICMP | PROTO_ICMPV6 => (Proto::Icmp, 0),
        _ => return None,
    };
    Some(Flow {
        dst: info.dst,
        hostname: None,
        proto,
        port,
    })
}

/// Packets for the device, in one buffer: no allocation per packet once traffic flows.
#[derive(Default)]
struct DeviceQueue {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl DeviceQueue {
    fn push(&mut self, pkt: &[u8]) -> bool {
        if self.data.len() + pkt.len() > DEVICE_QUEUE_BYTES {
            return false;
        }
        self.data.extend_from_slice(pkt);
        self.ends.push(self.data.len());
        true
    }

    fn drain(&mut self, mut f: impl FnMut(&[u8])) {
        let mut start = 0;
        for &end in &self.ends {
            f(&self.data[start..end]);
            start = end;
        }
        self.data.clear();
        self.ends.clear();
        // A burst's buffer is kept for the next one, but not a flood's.
        if self.data.capacity() > 1 << 20 {
            self.data.shrink_to(1 << 20);
        }
    }
}

struct Slot {
    name: String,
    tunnel: Option<Tunnel>,
    lookup_sent: Option<Instant>,
    /// Packets (with the tunnel header's headroom) and the hostname each is addressed to.
    queue: VecDeque<(Option<Arc<str>>, Vec<u8>)>,
    /// DNS queries for the connector, held while its tunnel comes up.
    dns_queue: Vec<ControlMessage>,
    unavailable_until: Option<Instant>,
    next_keepalive: Instant,
    /// The state last told to the host.
    told: Option<(TunnelState, PathKind)>,
    /// The app's TCP connections this tunnel carries, reset when it goes.
    carried: Carried,
}

impl Slot {
    /// Whether something waits for this connector's tunnel.
    fn waiting(&self) -> bool {
        !self.queue.is_empty() || !self.dns_queue.is_empty()
    }

    fn state(&self) -> (TunnelState, PathKind) {
        match &self.tunnel {
            None if self.waiting() || self.lookup_sent.is_some() => {
                (TunnelState::Connecting, PathKind::Relay)
            }
            None => (TunnelState::Closed, PathKind::Relay),
            Some(t) => (t.state(), t.path_kind()),
        }
    }
}

/// Sends one IP packet (in `buf[TUNNEL_IP_OVERHEAD..]`) into the tunnel; a packet to a
/// synthetic address goes with the hostname it stands for, copied behind it in `scratch`.
fn send_packet(
    t: &mut Tunnel,
    buf: &mut [u8],
    name: Option<&str>,
    scratch: &mut Vec<u8>,
) -> Result<(), TunnelError> {
    match name {
        None => t.send_ip(buf),
        Some(n) => {
            let ip = &buf[TUNNEL_IP_OVERHEAD..];
            let head = named_ip_overhead(n);
            scratch.clear();
            scratch.resize(head + ip.len(), 0);
            scratch[head..].copy_from_slice(ip);
            t.send_named_ip(scratch, n)
        }
    }
}

fn is_unicast_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_link_local()),
        IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unicast_link_local()),
    }
}

/// The first of the synthetic pools that overlaps a resource network of `policy`.
pub fn pool_overlap(policy: &Policy, pools: &[IpNet]) -> Option<(IpNet, IpNet)> {
    routes::networks(policy).iter().find_map(|n| {
        pools
            .iter()
            .find(|p| routes::overlap(n, p))
            .map(|p| (*p, *n))
    })
}

pub struct Engine {
    link: ControlLink,
    tunnel_cfg: quiche::Config,
    /// One per connector in use, created on a flow's first packet.
    slots: Vec<Slot>,
    paths: VirtualPaths,
    mtu: usize,
    stats: NodeCounters,
    out: Vec<u8>,
    policy: Arc<Policy>,
    generation: u64,
    /// This agent's user as the policy sees it.
    subject: Subject,
    cert_groups: Vec<String>,
    device_id: String,
    flows: FlowCache<FlowKey>,
    /// Routes and DNS settings.
    routes: routes::Routes,
    settings: Option<Settings>,
    ipv4: Ipv4Net,
    ipv6: Option<Ipv6Net>,
    /// Connector slot of each resource of the current policy, filled on first use.
    resource_slots: Vec<Option<usize>>,
    pool: SyntheticPool,
    /// Apps' flows to synthetic addresses: their names keep their addresses.
    live: LiveFlows<FlowKey>,
    pool_nets: (Ipv4Net, Ipv6Net),
    /// Scratch for packets sent to a name (the name goes in front of the packet).
    named_buf: Vec<u8>,
    dns_enabled: bool,
    dns_address: IpAddr,
    resolver: dns::Resolver,
    dns_tcp: dns_tcp::DnsTcp,
    /// Answers to queries the host read from its own socket: token and bytes.
    host_answers: VecDeque<(u64, Vec<u8>)>,
    direct: DirectSetup,
    direct_paths: bool,
    name: String,
    peer_id: PeerId,
    device: DeviceQueue,
    events: VecDeque<Event>,
    next_housekeeping: Instant,
    clock: WallClock,
    asleep: bool,
    /// Where [`Engine::poll_transmit`] is in its round over the tunnels.
    tx_round: TransmitRound,
    /// A slot's state may have changed since the host was last told.
    slots_changed: bool,
    /// Checks connectors' renewed certificates.
    peer_check: tls::PeerCheck,
    /// The revocation list every tunnel handshake checks (shared with the TLS config), which
    /// the relay hands on; and the CA key it must be signed by.
    revocations: Revocations,
    ca_key: Result<CaKey, RevocationError>,
}

/// The slots' tunnels, by slot index, for [`TransmitRound`].
struct SlotTunnels<'a>(&'a mut [Slot]);

impl Tunnels for SlotTunnels<'_> {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn tunnel(&mut self, i: usize) -> Option<&mut Tunnel> {
        self.0.get_mut(i)?.tunnel.as_mut()
    }
}

impl Engine {
    /// An engine for the agent `creds`, enforcing `policy`; `unix_nanos` is the wall clock at
    /// `now`. The first events are the settings and, for a relay name, its resolution.
    pub fn new(
        config: EngineConfig,
        creds: &Credentials,
        policy: Arc<Policy>,
        now: Instant,
        unix_nanos: i128,
    ) -> Result<Engine, EngineError> {
        let control_cfg = tls::quic_config(creds, &[Role::Relay], &QuicParams::control())?;
        let tunnel_cfg = tls::quic_config(creds, &[Role::Connector], &QuicParams::tunnel())?;
        let dns = config.dns;
        let pool = SyntheticPool::new(
            (dns.pool_v4.network(), dns.pool_v4.prefix_len()),
            (dns.pool_v6.network(), dns.pool_v6.prefix_len()),
            dns.max_names,
        )
        .map_err(|e| EngineError::Pool(e.to_string()))?;
        let pools = [IpNet::V4(pool.v4_net()), IpNet::V6(pool.v6_net())];
        if let Some((pool, net)) = pool_overlap(&policy, &pools) {
            return Err(EngineError::PoolOverlap { pool, net });
        }
        let link = ControlLink::new(
            control_cfg,
            config.local,
            config.relay,
            config.instance,
            now,
        );
        let identity = &creds.identity;
        let subject = policy.subject(&identity.name, &identity.groups);
        tracing::info!(
            "policy: {:?} is in group(s): {}",
            subject.user,
            if subject.groups.is_empty() {
                "none".into()
            } else {
                subject.groups.join(", ")
            }
        );
        let mut e = Engine {
            link,
            tunnel_cfg,
            slots: Vec::new(),
            paths: VirtualPaths::default(),
            mtu: usize::from(config.mtu),
            stats: NodeCounters::default(),
            out: vec![0u8; 65_536],
            subject,
            cert_groups: identity.groups.clone(),
            device_id: identity.peer_id.short(),
            flows: FlowCache::new(FLOW_CACHE),
            routes: routes::Routes::default(),
            settings: None,
            ipv4: config.ipv4,
            ipv6: config.ipv6,
            resource_slots: Vec::new(),
            pool_nets: (pool.v4_net(), pool.v6_net()),
            pool,
            live: LiveFlows::default(),
            named_buf: Vec::with_capacity(2048),
            dns_enabled: dns.enabled,
            dns_address: dns.address,
            resolver: dns::Resolver::new(Vec::new()),
            dns_tcp: dns_tcp::DnsTcp::new(dns.address, now),
            host_answers: VecDeque::new(),
            direct: DirectSetup::new(identity.peer_id, config.local, config.interface_ips),
            direct_paths: config.direct_paths,
            name: identity.name.clone(),
            peer_id: identity.peer_id,
            device: DeviceQueue::default(),
            events: VecDeque::new(),
            next_housekeeping: now + HOUSEKEEPING,
            clock: WallClock::new(now, unix_nanos),
            asleep: false,
            tx_round: TransmitRound::default(),
            slots_changed: true,
            peer_check: creds.peer_check()?,
            revocations: creds.revocations.clone(),
            ca_key: creds.ca_key(),
            policy,
            generation: 1,
        };
        e.set_upstreams(dns.upstreams);
        e.update_settings();
        e.pump(now);
        Ok(e)
    }

    /// What the engine counted, with the tunnels up and the flows known now.
    pub fn stats(&self) -> NodeCounters {
        let mut c = self.stats;
        c.dns = self.resolver.stats;
        c.tunnels = self
            .slots
            .iter()
            .filter(|s| s.tunnel.as_ref().is_some_and(|t| t.is_up()))
            .count() as u64;
        c.flows = self.flows.len() as u64;
        c
    }

    /// The wall clock is `unix_nanos` at `now` (the host's clock was set, or it woke up).
    pub fn set_wall_clock(&mut self, now: Instant, unix_nanos: i128) {
        self.clock = WallClock::new(now, unix_nanos);
    }

    /// Upstream resolvers for names that are not resources; the engine's own DNS address is
    /// left out (asking ourselves would loop).
    pub fn set_upstreams(&mut self, upstreams: Vec<SocketAddr>) {
        let own = self.dns_address;
        let mut v: Vec<SocketAddr> = upstreams.into_iter().filter(|u| u.ip() != own).collect();
        v.dedup();
        if v != self.resolver.upstreams() {
            tracing::info!(
                "DNS: resource names answered here, others forwarded to {}",
                if v.is_empty() {
                    "nobody (no upstream resolver known)".to_string()
                } else {
                    v.iter()
                        .map(|u| u.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        self.resolver.set_upstreams(v);
    }

    // ---- inputs ----------------------------------------------------------------------------

    /// An IP packet from the tunnel device, in `buf[DEVICE_HEADROOM..]` (the headroom in front
    /// is the engine's to write into).
    pub fn handle_device_packet(&mut self, buf: &mut [u8], now: Instant) {
        self.on_device_packet(buf, now);
        self.pump(now);
    }

    fn on_device_packet(&mut self, buf: &mut [u8], now: Instant) {
        self.stats.device_packets += 1;
        let Some(pkt) = buf.get(DEVICE_HEADROOM..) else {
            self.stats.drops.add(DropReason::Malformed);
            return;
        };
        let info = match packet::inspect(pkt) {
            Ok(i) => i,
            Err(e) => {
                self.stats.drops.add(DropReason::Malformed);
                tracing::debug!(
                    "TUN: dropping a malformed packet ({} bytes): {e}",
                    pkt.len()
                );
                return;
            }
        };
        if self.dns_enabled && info.dst == self.dns_address && info.dst_port == 53 {
            return self.on_dns_packet(&info, &buf[DEVICE_HEADROOM..], now);
        }
        let Some((i, name)) = self.admit(&info, &buf[DEVICE_HEADROOM..], now) else {
            return;
        };
        // A packet to a name carries the name in front: the tunnel has that much less room.
        let extra = name
            .as_deref()
            .map_or(0, |n| named_ip_overhead(n) - TUNNEL_IP_OVERHEAD);
        let max = self.slots[i]
            .tunnel
            .as_ref()
            .and_then(|t| t.max_ip_len())
            .map_or(self.mtu, |m| m.saturating_sub(extra).min(self.mtu));
        let pkt = &buf[DEVICE_HEADROOM..];
        if pkt.len() > max {
            self.stats.drops.add(DropReason::TooBig);
            if let Some(icmp) = packet::icmp_too_big(pkt, &info, max as u16) {
                self.push_device(&icmp);
            }
            return;
        }
        let slot = &mut self.slots[i];
        if let Some(t) = slot.tunnel.as_mut().filter(|t| t.is_up()) {
            match send_packet(t, buf, name.as_deref(), &mut self.named_buf) {
                Ok(()) => {
                    slot.carried.note(&info, now);
                    let len = buf.len() - DEVICE_HEADROOM;
                    (self.stats.traffic).count(Direction::Sent, t.path_kind(), len);
                }
                Err(TunnelError::TooBig { max, .. }) => {
                    self.stats.drops.add(DropReason::TooBig);
                    let pkt = &buf[DEVICE_HEADROOM..];
                    if let Some(icmp) = packet::icmp_too_big(pkt, &info, max as u16) {
                        self.push_device(&icmp);
                    }
                }
                Err(e) => {
                    self.stats.drops.add(DropReason::QueueFull);
                    tracing::debug!("tunnel to {}: dropping a packet: {e}", slot.name);
                }
            }
            return;
        }
        if info.proto == PROTO_TCP && !info.tcp.syn {
            // A segment of a connection whose tunnel is gone (the connector stopped or
            // restarted): no new tunnel can carry it on, so the app hears it now, not after
            // its retransmissions give up.
            self.stats.resets += 1;
            if let Some(rst) = packet::tcp_rst(&info) {
                self.push_device(&rst);
            }
            return;
        }
        if slot.unavailable_until.is_some_and(|u| now < u) {
            if let Some(icmp) = packet::icmp_unreachable(pkt, &info, Unreachable::Host) {
                self.push_device(&icmp);
            }
            return;
        }
        if slot.queue.len() >= QUEUE_MAX {
            self.stats.drops.add(DropReason::QueueFull);
            return;
        }
        slot.queue.push_back((name, buf.to_vec()));
        self.slots_changed = true;
        if slot.tunnel.is_none()
            && slot
                .lookup_sent
                .is_none_or(|t| now.duration_since(t) > LOOKUP_RETRY)
        {
            self.start_lookup(i, now);
        }
    }

    /// A datagram that arrived on the host's socket `socket` from `from`.
    pub fn handle_datagram(
        &mut self,
        socket: SocketKind,
        from: SocketAddr,
        pkt: &mut [u8],
        now: Instant,
    ) {
        match socket {
            SocketKind::Dns => {
                if !self.resolver.handle_upstream(from, pkt, now) {
                    tracing::debug!("DNS: dropping a datagram from {from} that answers nothing");
                }
            }
            SocketKind::Peer => self.on_peer_datagram(pkt, from, now),
        }
        self.pump(now);
    }

    fn on_peer_datagram(&mut self, pkt: &mut [u8], from: SocketAddr, now: Instant) {
        match classify(pkt, from, self.link.relay_addr()) {
            Incoming::Control => {}
            Incoming::Punch(p) => {
                let Some(i) = self.slot_of_peer(&p.from) else {
                    return self
                        .direct
                        .refuse(from, &"punch from a peer with no tunnel here");
                };
                if let Some(t) = &mut self.slots[i].tunnel {
                    if let Err(e) = t.on_punch(from, &p, now) {
                        self.direct.refuse(from, &e);
                    }
                }
                return self.tunnel_events(i, now);
            }
            Incoming::Direct { dcid } => {
                let Some(i) = self
                    .slots
                    .iter()
                    .position(|s| s.tunnel.as_ref().is_some_and(|t| t.owns_cid(&dcid)))
                else {
                    return self
                        .direct
                        .refuse(from, &"QUIC packet for no tunnel of ours");
                };
                if let Some(t) = &mut self.slots[i].tunnel {
                    t.recv_direct(pkt, from, self.direct.local);
                }
                self.deliver(i);
                return self.tunnel_events(i, now);
            }
            Incoming::Junk(why) => {
                // An upstream resolver answering on the peer socket (a host with one socket).
                if !self.resolver.handle_upstream(from, pkt, now) {
                    self.direct.refuse(from, &why);
                }
                return;
            }
        }
        self.link.recv(pkt, from, now);
        let mut buf = std::mem::take(&mut self.out);
        while let Some((peer, data)) = self.link.connected().and_then(|c| c.recv_forward(&mut buf))
        {
            let Some(i) = self.slot_of_peer(&peer) else {
                self.stats.drops.add(DropReason::NoRoute);
                continue;
            };
            if let Some(t) = &mut self.slots[i].tunnel {
                if *data == TUNNEL_GONE {
                    t.peer_restarted();
                } else {
                    t.recv_relayed(data);
                }
            }
            self.deliver(i);
            self.tunnel_events(i, now);
        }
        self.out = buf;
    }

    /// The deadline from [`Engine::poll_timeout`] passed (or any time: early calls are fine).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.slots_changed = true;
        self.link.on_timeout(now);
        // Before anything is sent to a relay address that resolved anew.
        self.check_relay_routes();
        self.resolver.on_deadline(now);
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            let unix = self.clock.unix(now).max(0) as u64;
            self.live.sweep(&mut self.pool, unix);
            for s in &mut self.slots {
                s.carried.sweep(now);
            }
        }
        let relay_silent = self.link.relay_silent(now);
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(t) = &mut slot.tunnel {
                t.set_network_silent(relay_silent);
                t.run_timers(now, &mut slot.next_keepalive);
            }
            if slot.tunnel.is_none()
                && slot.waiting()
                && slot
                    .lookup_sent
                    .is_none_or(|t| now.duration_since(t) > LOOKUP_RETRY)
            {
                self.start_lookup(i, now);
            }
            self.tunnel_events(i, now);
        }
        self.dns_tcp.poll(now);
        self.pump(now);
    }

    /// A DNS query the host read from its own socket (`tcp`: over TCP, so no UDP size limit).
    /// The answer comes out of [`Engine::poll_dns_answer`] with `token`; a query that is not
    /// DNS at all gets none.
    pub fn handle_dns_query(&mut self, token: u64, tcp: bool, query: &[u8], now: Instant) {
        if self.dns_enabled {
            self.dns_query(DnsClient::Host { token, tcp }, query, now);
        }
        self.pump(now);
    }

    /// The answer to [`Event::DnsOverTcp`] `id`, or None when the exchange failed.
    pub fn handle_dns_tcp_answer(&mut self, id: u64, answer: Option<Vec<u8>>, now: Instant) {
        self.resolver.handle_tcp_answer(id, answer, now);
        self.pump(now);
    }

    /// The answer to [`Event::ResolveRelay`]: the relay's addresses, or why there are none.
    pub fn handle_relay_resolved(&mut self, result: Result<Vec<SocketAddr>, String>, now: Instant) {
        self.link.handle_resolved(result, now);
        self.pump(now);
    }

    /// A new policy is in force: new subject, new routes, and every cached decision is stale
    /// (flows are re-decided on their next packet). A policy whose resources overlap the
    /// synthetic pools is refused, and the previous one stays in force.
    pub fn set_policy(&mut self, policy: Arc<Policy>, now: Instant) -> Result<(), EngineError> {
        let pools = [IpNet::V4(self.pool_nets.0), IpNet::V6(self.pool_nets.1)];
        if let Some((pool, net)) = pool_overlap(&policy, &pools) {
            return Err(EngineError::PoolOverlap { pool, net });
        }
        self.generation += 1;
        self.subject = policy.subject(&self.subject.user, &self.cert_groups);
        self.policy = policy;
        self.resource_slots.clear();
        self.update_settings();
        self.pump(now);
        Ok(())
    }

    /// This agent's certificate file changed: new tunnels and relay connections present
    /// `creds`. With the same key (a renewal: `sluice ca renew`, or `sluice login` keeping the
    /// device key) the live tunnels and the relay connection present the new certificate in
    /// place, so no flow is dropped; its groups count from now on. With a new key that cannot
    /// be done (their handshakes proved the old key): they go on until the old certificate
    /// expires, and new ones use the new key.
    pub fn set_credentials(
        &mut self,
        creds: &Credentials,
        now: Instant,
    ) -> Result<(), EngineError> {
        let control_cfg = tls::quic_config(creds, &[Role::Relay], &QuicParams::control())?;
        self.tunnel_cfg = tls::quic_config(creds, &[Role::Connector], &QuicParams::tunnel())?;
        self.peer_check = creds.peer_check()?;
        self.revocations = creds.revocations.clone();
        self.ca_key = creds.ca_key();
        let id = &creds.identity;
        let der = if id.peer_id == self.peer_id {
            Some(creds.certificate_der()?)
        } else {
            tracing::warn!(
                "the new certificate has another key (peer {}): new tunnels use it; the open ones keep the old certificate until it expires (renew with `sluice ca renew` to keep the key)",
                id.peer_id.short()
            );
            None
        };
        self.link.renew(control_cfg, der.clone());
        if let Some(der) = der {
            let msg = ControlMessage::Certificate(der);
            for slot in &mut self.slots {
                if let Some(t) = slot.tunnel.as_mut().filter(|t| t.is_up()) {
                    if let Err(e) = t.send_message(&msg) {
                        tracing::warn!(
                            "cannot present the renewed certificate to {}: {e}",
                            slot.name
                        );
                    }
                }
            }
        }
        self.cert_groups = id.groups.clone();
        self.subject = self.policy.subject(&id.name, &self.cert_groups);
        // Flow decisions cached under the old groups are made again.
        self.generation += 1;
        self.pump(now);
        Ok(())
    }

    /// The host's interface addresses now (its tunnel device's own left out). A change is a
    /// network change for direct paths: tunnels look for a direct path again.
    pub fn set_interfaces(&mut self, interface_ips: Vec<IpAddr>, now: Instant) {
        if let Some(c) = self.direct.set_interfaces(interface_ips) {
            self.set_candidates(&c, now);
        }
        self.pump(now);
    }

    /// The network path changed (an interface came or went, the address moved, the resolvers
    /// changed): the control connection is dialled again from where we are now, tunnels look
    /// for direct paths again, and `resolvers` (when the host knows them) become the upstreams.
    pub fn path_changed(
        &mut self,
        interface_ips: Vec<IpAddr>,
        resolvers: Option<Vec<SocketAddr>>,
        now: Instant,
    ) {
        tracing::info!("network path changed: reconnecting to the relay");
        if let Some(r) = resolvers.filter(|r| !r.is_empty()) {
            self.set_upstreams(r);
        }
        let c = self.direct.set_interfaces(interface_ips);
        self.link.reconnect(now);
        if let Some(c) = c {
            self.set_candidates(&c, now);
        }
        self.keepalive_tunnels(now);
        self.pump(now);
    }

    /// The machine goes to sleep: nothing to do but remember it (timers stop with it).
    pub fn sleep(&mut self, _now: Instant) {
        tracing::info!("going to sleep");
        self.asleep = true;
    }

    /// The machine woke up (`now` counts the time asleep): NAT mappings and the relay's view of
    /// us may be gone, so the control connection is dialled again and the tunnels are probed.
    pub fn wake(&mut self, now: Instant) {
        tracing::info!("woke up: reconnecting to the relay");
        self.asleep = false;
        self.link.reconnect(now);
        self.keepalive_tunnels(now);
        self.pump(now);
    }

    /// Says goodbye: connectors and the relay hear the close at once. The host sends what
    /// [`Engine::poll_transmit`] gives next, then stops.
    pub fn shut_down(&mut self) {
        tracing::info!("agent: shutting down ({})", self.stats().line());
        for s in &mut self.slots {
            if let Some(t) = &mut s.tunnel {
                t.goodbye();
            }
        }
        self.link.goodbye();
    }

    // ---- outputs ---------------------------------------------------------------------------

    /// Hands each packet for the device to `f`, then forgets them.
    pub fn drain_device(&mut self, f: impl FnMut(&[u8])) {
        self.device.drain(f);
    }

    /// The next datagram to send, written into `out` (64 KiB is always enough).
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<Transmit> {
        if let Some((to, q)) = self.resolver.transmits.pop_front() {
            let len = q.len().min(out.len());
            out[..len].copy_from_slice(&q[..len]);
            return Some(Transmit {
                len,
                to,
                socket: SocketKind::Dns,
            });
        }
        let (len, to) =
            self.tx_round
                .next(&mut self.link, &mut SlotTunnels(&mut self.slots), out, now)?;
        Some(Transmit {
            len,
            to,
            socket: SocketKind::Peer,
        })
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The answer to a query from [`Engine::handle_dns_query`]: its token and bytes.
    pub fn poll_dns_answer(&mut self) -> Option<(u64, Vec<u8>)> {
        self.host_answers.pop_front()
    }

    /// When [`Engine::handle_timeout`] is due next.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut t = self
            .link
            .timeout(now)
            .min(self.next_housekeeping.saturating_duration_since(now));
        for s in &self.slots {
            if let Some(tn) = &s.tunnel {
                if let Some(d) = tn.timeout() {
                    t = t.min(d);
                }
                if let Some(d) = tn.deadline() {
                    t = t.min(d.saturating_duration_since(now));
                }
                t = t.min(s.next_keepalive.saturating_duration_since(now));
            }
        }
        let mut at = now + t;
        if let Some(d) = self.resolver.deadline() {
            at = at.min(d);
        }
        if let Some(d) = self.dns_tcp.deadline() {
            at = at.min(d);
        }
        at
    }

    // ---- internals -------------------------------------------------------------------------

    /// Carries out what an input caused: control link events, DNS answers, requests to the
    /// host, and tunnel state changes.
    fn pump(&mut self, now: Instant) {
        self.on_control_events(now);
        if self.dns_tcp.due(now) {
            self.dns_tcp.poll(now);
        }
        let mut streamed = false;
        while let Some((conn, query)) = self.dns_tcp.poll_query() {
            self.dns_query(DnsClient::Stream { conn }, &query, now);
        }
        for c in self.dns_tcp.poll_closed() {
            self.resolver.forget(DnsClient::Stream { conn: c });
        }
        while let Some((client, answer)) = self.resolver.answers.pop_front() {
            match client {
                DnsClient::Host { token, .. } => self.host_answers.push_back((token, answer)),
                DnsClient::Packet { client, server } => {
                    if let Some(p) = packet::udp_packet(server, client, &answer) {
                        self.push_device(&p);
                    }
                }
                DnsClient::Stream { conn } => {
                    self.dns_tcp.answer(conn, &answer);
                    streamed = true;
                }
            }
        }
        if streamed {
            self.dns_tcp.poll(now);
        }
        while let Some(p) = self.dns_tcp.poll_packet() {
            self.push_device(&p);
        }
        while let Some((id, server, query)) = self.resolver.tcp_exchanges.pop_front() {
            self.push_event(Event::DnsOverTcp { id, server, query });
        }
        if let Some((host, port)) = self.link.poll_resolve() {
            self.push_event(Event::ResolveRelay { host, port });
        }
        if !std::mem::take(&mut self.slots_changed) {
            return;
        }
        for i in 0..self.slots.len() {
            let now_state = self.slots[i].state();
            if self.slots[i].told != Some(now_state) {
                self.slots[i].told = Some(now_state);
                let connector = self.slots[i].name.clone();
                self.push_event(Event::Tunnel {
                    connector,
                    state: now_state.0,
                    path: now_state.1,
                });
            }
        }
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn push_device(&mut self, pkt: &[u8]) {
        if !self.device.push(pkt) {
            self.stats.drops.add(DropReason::QueueFull);
        }
    }

    /// A DNS packet from the device for the engine's DNS address.
    fn on_dns_packet(&mut self, info: &PacketInfo, pkt: &[u8], now: Instant) {
        match info.proto {
            PROTO_UDP if !info.fragment => {
                let client = DnsClient::Packet {
                    client: info.src_socket(),
                    server: info.dst_socket(),
                };
                let query = info.payload(pkt).to_vec();
                self.dns_query(client, &query, now);
            }
            PROTO_TCP => self.dns_tcp.handle_packet(pkt, now),
            _ => {
                if let Some(icmp) = packet::icmp_unreachable(pkt, info, Unreachable::Prohibited) {
                    self.push_device(&icmp);
                }
            }
        }
    }

    /// Answers a query locally, or passes it upstream or to the name's connector.
    fn dns_query(&mut self, client: DnsClient, query: &[u8], now: Instant) {
        let policy = self.policy.clone();
        let unix = self.clock.unix(now).max(0) as u64;
        match respond(query, &mut self.pool, |n| policy.has_hostname(n), unix) {
            Reply::Answer(a) => self.resolver.answer_local(client, a, now),
            Reply::Drop => self.resolver.stats.dropped(DnsKind::Local),
            Reply::Forward => self.resolver.forward(client, query, now),
            Reply::AskConnector { name } => self.ask_connector(client, &name, query, now),
        }
    }

    /// A query for a resource name's records other than A/AAAA: sent to the connector serving
    /// the name, if this user may see them.
    fn ask_connector(&mut self, client: DnsClient, name: &str, query: &[u8], now: Instant) {
        let unix = self.clock.unix(now);
        let Some(r) = self.policy.name_allowed(&self.subject, name, unix, None) else {
            // The name exists, with no records this user may see.
            let local = DnsKind::Local;
            return (self.resolver).fail(client, query, ResponseCode::NoError, local, now, now);
        };
        let i = self.slot_of_resource(r);
        let Some(id) = self.resolver.ask_connector(client, query, now) else {
            return;
        };
        let msg = ControlMessage::DnsQuery {
            id,
            message: query.to_vec(),
        };
        let slot = &mut self.slots[i];
        if let Some(t) = slot.tunnel.as_mut().filter(|t| t.is_up()) {
            if let Err(e) = t.send_message(&msg) {
                tracing::debug!("tunnel to {}: cannot send a DNS query: {e}", slot.name);
                self.resolver.connector_failed(id, now);
            }
        } else if slot.unavailable_until.is_some_and(|u| now < u)
            || slot.dns_queue.len() >= DNS_QUEUE_MAX
        {
            self.resolver.connector_failed(id, now);
        } else {
            slot.dns_queue.push(msg);
            if slot.tunnel.is_none()
                && slot
                    .lookup_sent
                    .is_none_or(|t| now.duration_since(t) > LOOKUP_RETRY)
            {
                self.start_lookup(i, now);
            }
        }
    }

    fn slot_of_peer(&self, peer: &PeerId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.tunnel.as_ref().is_some_and(|t| t.peer() == *peer))
    }

    /// IP packets that came out of slot `i`'s tunnel, for the device.
    fn deliver(&mut self, i: usize) {
        let Some(t) = &mut self.slots[i].tunnel else {
            return;
        };
        let mut buf = [0u8; 2048];
        let path = t.path_kind();
        while let Some(r) = t.recv_ip(&mut buf) {
            let len = r.packet.len();
            if self.device.push(&buf[r.packet]) {
                (self.stats.traffic).count(Direction::Received, path, len);
            } else {
                self.stats.drops.add(DropReason::QueueFull);
            }
        }
    }

    /// The policy's fast path: the connector slot for an allowed packet, or None after
    /// answering a denied one (TCP reset, or ICMP administratively prohibited) at once.
    fn admit(
        &mut self,
        info: &PacketInfo,
        pkt: &[u8],
        now: Instant,
    ) -> Option<(usize, Option<Arc<str>>)> {
        if !is_unicast_global(info.dst) {
            // Link-local and multicast chatter of the interface itself (IPv6 router
            // solicitations, MLD): not a flow to any resource.
            self.stats.drops.add(DropReason::NoRoute);
            return None;
        }
        let Some(mut flow) = flow_of(info) else {
            // The kernel routes only resource networks here; other protocols are not allowed.
            self.stats.drops.add(DropReason::NoRoute);
            if let Some(icmp) = packet::icmp_unreachable(pkt, info, Unreachable::Prohibited) {
                self.push_device(&icmp);
            }
            return None;
        };
        let sport = info.echo.map_or(info.src_port, |e| e.id);
        let key: FlowKey = (info.src, info.dst, info.proto, sport, info.dst_port);
        let unix = self.clock.unix(now);
        // A synthetic address stands for the hostname it was handed out for.
        let synthetic = match info.dst {
            IpAddr::V4(a) => self.pool_nets.0.contains(&a),
            IpAddr::V6(a) => self.pool_nets.1.contains(&a),
        };
        let name: Option<Arc<str>> = if synthetic {
            match self.pool.shared_name_of(info.dst) {
                Some(n) => {
                    // The packet's flow keeps the name's addresses in use.
                    self.live.packet(
                        &mut self.pool,
                        key,
                        info.dst,
                        info.proto,
                        info.tcp,
                        unix.max(0) as u64,
                    );
                    Some(n)
                }
                None => {
                    // An address no name holds (the pool recycled it, or it was never given).
                    if let Some(icmp) = packet::icmp_unreachable(pkt, info, Unreachable::Host) {
                        self.push_device(&icmp);
                    }
                    return None;
                }
            }
        } else {
            None
        };
        flow.hostname = name.as_deref();
        let d = match self.flows.get(&key, self.generation, unix) {
            Some(d) => d,
            None => {
                let d = self.policy.decide(&self.subject, &flow, unix);
                (self.stats.decisions).count(d.allowed() && d.resource.is_some());
                self.flows.insert(key, self.generation, d);
                let line = self.audit_line(&flow, info.src, sport, &d, now);
                self.push_event(Event::Audit(line));
                d
            }
        };
        match d.resource.filter(|_| d.allowed()) {
            Some(r) => Some((self.slot_of_resource(r), name)),
            None => {
                self.stats.drops.add(DropReason::Policy);
                // Answering an ICMP error with an ICMP error is never done; a RST is not
                // answered either (packet helpers refuse both).
                let reply = if info.proto == PROTO_TCP {
                    packet::tcp_rst(info)
                } else {
                    packet::icmp_unreachable(pkt, info, Unreachable::Prohibited)
                };
                if let Some(r) = reply {
                    self.push_device(&r);
                }
                None
            }
        }
    }

    fn audit_line(
        &self,
        flow: &Flow<'_>,
        src: IpAddr,
        src_port: u16,
        d: &sluice_policy::Decision,
        now: Instant,
    ) -> String {
        sluice_policy::audit::FlowDecision {
            enforcer: "agent",
            user: &self.subject.user,
            device: &self.device_id,
            source: SocketAddr::new(src, src_port),
            flow,
            decision: d,
        }
        .line(&self.policy, self.clock.unix_nanos(now))
    }

    /// The connector slot serving resource `r`, remembered per resource until the next policy
    /// so the packet path does no name lookups.
    fn slot_of_resource(&mut self, r: sluice_policy::matcher::ResourceId) -> usize {
        let r = r as usize;
        if let Some(Some(i)) = self.resource_slots.get(r) {
            return *i;
        }
        let name = self.policy.resource(r as u32).connector.clone();
        let i = self.slot_index(&name);
        if self.resource_slots.len() <= r {
            self.resource_slots.resize(r + 1, None);
        }
        self.resource_slots[r] = Some(i);
        i
    }

    fn slot_index(&mut self, connector: &str) -> usize {
        if let Some(i) = self.slots.iter().position(|s| s.name == connector) {
            return i;
        }
        self.slots_changed = true;
        self.slots.push(Slot {
            name: connector.to_string(),
            tunnel: None,
            lookup_sent: None,
            queue: VecDeque::new(),
            dns_queue: Vec::new(),
            unavailable_until: None,
            // Any instant: it is set when the slot's tunnel opens.
            next_keepalive: self.clock.set_at(),
            told: None,
            carried: Carried::default(),
        });
        self.slots.len() - 1
    }

    /// Routes and DNS settings from the policy, the pools and the relay's addresses; a
    /// Settings event when they changed.
    fn update_settings(&mut self) {
        let dns = self.dns_enabled.then_some(self.dns_address);
        let wanted = wanted_routes(&self.policy, self.pool_nets, self.ipv4, self.ipv6, dns);
        let relay = self.link.relay_addrs();
        if let Some(changed) = self.routes.set(wanted, &relay) {
            for s in &mut self.slots {
                if let Some(t) = &mut s.tunnel {
                    t.exclude_from_direct(changed.clone());
                }
            }
        }
        let next = Settings {
            generation: self.settings.as_ref().map_or(1, |s| s.generation + 1),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            mtu: self.mtu as u16,
            routes: self.routes.routed().to_vec(),
            dns_servers: dns.into_iter().collect(),
            match_domains: self.policy.dns_domains(),
        };
        let same = self.settings.as_ref().is_some_and(|s| {
            s.routes == next.routes
                && s.dns_servers == next.dns_servers
                && s.match_domains == next.match_domains
        });
        if !same {
            self.settings = Some(next.clone());
            self.push_event(Event::Settings(next));
        }
    }

    /// The relay's addresses changed (a name resolved anew): keep them out of the routes.
    fn check_relay_routes(&mut self) {
        if self.routes.relay_moved(&self.link.relay_addrs()) {
            self.update_settings();
        }
    }

    fn start_lookup(&mut self, i: usize, now: Instant) {
        self.slots_changed = true;
        let name = self.slots[i].name.clone();
        if let Some(c) = self.link.connected() {
            if c.lookup(&name).is_ok() {
                tracing::debug!("looking up connector {name:?}");
                self.slots[i].lookup_sent = Some(now);
            }
        }
    }

    fn on_control_events(&mut self, now: Instant) {
        while let Some(ev) = self.link.poll_event() {
            match ev {
                ControlEvent::Connected { .. } => {
                    for i in 0..self.slots.len() {
                        if self.slots[i].tunnel.is_none() && self.slots[i].waiting() {
                            self.start_lookup(i, now);
                        }
                    }
                }
                ControlEvent::LookupReply { name, peer } => {
                    for i in 0..self.slots.len() {
                        if self.slots[i].name != name || self.slots[i].tunnel.is_some() {
                            continue;
                        }
                        self.slots[i].lookup_sent = None;
                        match peer {
                            Some(peer) => self.open_tunnel(i, peer, now),
                            None => self.unavailable(i, now),
                        }
                    }
                }
                ControlEvent::ObservedAddr(a) => {
                    if let Some(c) = self.direct.set_observed(a) {
                        self.set_candidates(&c, now);
                    }
                }
                ControlEvent::Revocations(list) => self.handle_revocations(&list, now),
                ControlEvent::PeerGone(peer) => {
                    // The tunnel stays: its connector may be on its way to another relay, and
                    // the tunnel's own silence limit ends it if it does not come back.
                    if let Some(slot) = self
                        .slots
                        .iter()
                        .find(|s| s.tunnel.as_ref().is_some_and(|t| t.peer() == peer))
                    {
                        tracing::info!(
                            "the relay cannot reach connector {:?} (peer {}) at the moment",
                            slot.name,
                            peer.short()
                        );
                    }
                }
                ControlEvent::RecordWanted | ControlEvent::Closed(_) => {}
            }
        }
    }

    /// A revocation list from the relay: once verified, and if newer than the one in force, it
    /// is put in force (new tunnel handshakes check it) and every tunnel to a connector it
    /// revokes closes now, direct ones too.
    fn handle_revocations(&mut self, bytes: &[u8], now: Instant) {
        let ca = match &self.ca_key {
            Ok(ca) => ca,
            Err(e) => {
                tracing::warn!("revocation list from the relay refused: {e}");
                return;
            }
        };
        let Ok(Offered::Installed { .. }) =
            self.revocations
                .load(bytes, ca, "the relay", self.clock.unix(now))
        else {
            return;
        };
        let Some(list) = self.revocations.current() else {
            return;
        };
        for slot in &mut self.slots {
            let Some(t) = slot.tunnel.as_mut() else {
                continue;
            };
            let Some(why) = t.remote().and_then(|id| list.revokes(id)) else {
                continue;
            };
            tracing::warn!(
                "closing the tunnel to connector {:?}: its certificate is revoked ({why} is on revocation list #{})",
                slot.name,
                list.sequence
            );
            t.revoke(&format!(
                "certificate revoked (revocation list #{})",
                list.sequence
            ));
        }
        self.pump(now);
    }

    /// The relay says connector `i` is not connected: what waits for it is refused.
    fn unavailable(&mut self, i: usize, now: Instant) {
        self.slots_changed = true;
        tracing::warn!(
            "connector {:?} is not connected to the relay",
            self.slots[i].name
        );
        let slot = &mut self.slots[i];
        slot.unavailable_until = Some(now + UNAVAILABLE_FOR);
        let dns: Vec<ControlMessage> = slot.dns_queue.drain(..).collect();
        let queued: Vec<(Option<Arc<str>>, Vec<u8>)> = slot.queue.drain(..).collect();
        for m in dns {
            if let ControlMessage::DnsQuery { id, .. } = m {
                self.resolver.connector_failed(id, now);
            }
        }
        for (_, p) in queued {
            let ip = &p[DEVICE_HEADROOM..];
            if let Ok(info) = packet::inspect(ip) {
                if let Some(icmp) = packet::icmp_unreachable(ip, &info, Unreachable::Host) {
                    self.push_device(&icmp);
                }
            }
        }
    }

    fn open_tunnel(&mut self, i: usize, peer: PeerId, now: Instant) {
        self.slots_changed = true;
        let path = self.paths.addr_of(peer);
        let slot = &mut self.slots[i];
        match Tunnel::connect(&mut self.tunnel_cfg, peer, &slot.name, path) {
            Ok(t) => {
                tracing::info!(
                    "opening tunnel to connector {:?} (peer {}) via the relay",
                    slot.name,
                    peer.short()
                );
                slot.tunnel = Some(t);
                slot.next_keepalive = now + TUNNEL_KEEPALIVE;
            }
            Err(e) => tracing::warn!("cannot open tunnel to {:?}: {e}", slot.name),
        }
    }

    fn tunnel_events(&mut self, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        let Some(t) = &mut slot.tunnel else { return };
        while let Some(ev) = t.poll_event() {
            self.slots_changed = true;
            match ev {
                TunnelEvent::Up(id) => {
                    tracing::info!(
                        "tunnel to {id} is up via the relay (rtt {:?}); sending {} queued packet(s)",
                        t.rtt().unwrap_or_default(),
                        slot.queue.len()
                    );
                    slot.unavailable_until = None;
                    if self.direct_paths {
                        t.enable_direct(
                            self.direct.me,
                            self.direct.local,
                            self.direct.candidates.clone(),
                            self.routes.wanted().to_vec(),
                            now,
                        );
                    }
                    while let Some((name, mut p)) = slot.queue.pop_front() {
                        let len = p.len().saturating_sub(DEVICE_HEADROOM);
                        if send_packet(t, &mut p, name.as_deref(), &mut self.named_buf).is_err() {
                            self.stats.drops.add(DropReason::QueueFull);
                        } else {
                            (self.stats.traffic).count(Direction::Sent, t.path_kind(), len);
                        }
                    }
                    for m in slot.dns_queue.drain(..) {
                        if let Err(e) = t.send_message(&m) {
                            tracing::debug!(
                                "tunnel to {}: cannot send a DNS query: {e}",
                                slot.name
                            );
                        }
                    }
                }
                TunnelEvent::Message(ControlMessage::DnsAnswer { id, message }) => {
                    self.resolver.connector_answer(id, message, now);
                }
                TunnelEvent::Message(ControlMessage::Certificate(der)) => {
                    let Some(current) = t.remote().cloned() else {
                        continue;
                    };
                    match self.peer_check.renewed(&current, &der, self.clock.unix(now)) {
                        Ok(id) => {
                            tracing::info!("{id} renewed its certificate in place");
                            t.peer_renewed(id);
                        }
                        Err(e) => tracing::warn!(
                            "{current}: renewed certificate refused: {e}; the tunnel lasts until its certificate expires"
                        ),
                    }
                }
                TunnelEvent::Message(other) => {
                    tracing::debug!("tunnel to {}: unexpected message {other:?}", slot.name);
                }
                TunnelEvent::PathChanged(path) => {
                    self.stats.switched(t.path_kind());
                    tracing::info!("tunnel to {}: now {}", slot.name, describe_path(path));
                }
                TunnelEvent::DirectFailed(addr) => {
                    tracing::info!(
                        "tunnel to {}: direct path to {addr} failed; relayed, trying again in {}s",
                        slot.name,
                        RETRY_AFTER.as_secs()
                    );
                }
                TunnelEvent::DirectNotFound => {
                    tracing::info!(
                        "tunnel to {}: no direct path found; staying relayed, trying again in {}s",
                        slot.name,
                        RETRY_AFTER.as_secs()
                    );
                }
                TunnelEvent::Closed(why) => {
                    tracing::warn!("tunnel to connector {:?} closed: {why}", slot.name);
                }
            }
        }
        if t.is_closed() {
            slot.tunnel = None;
            self.slots_changed = true;
            // Its connections ended with it (the connector's side of each is gone): the apps
            // hear it now, even those that only receive and would otherwise wait for their
            // own timeouts.
            let resets = slot.carried.drain_resets();
            if !resets.is_empty() {
                tracing::info!(
                    "tunnel to connector {:?}: resetting the {} TCP connection(s) it carried",
                    slot.name,
                    resets.len()
                );
            }
            self.stats.resets += resets.len() as u64;
            for r in resets {
                self.push_device(&r);
            }
        }
    }

    /// Tells every tunnel our new candidates.
    fn set_candidates(&mut self, c: &[Candidate], now: Instant) {
        for s in &mut self.slots {
            if let Some(t) = &mut s.tunnel {
                t.set_candidates(c.to_vec(), now);
            }
        }
    }

    /// Probes every tunnel now (after sleep or a path change), rather than at its next
    /// keepalive.
    fn keepalive_tunnels(&mut self, now: Instant) {
        for s in &mut self.slots {
            if let Some(t) = s.tunnel.as_mut().filter(|t| t.is_up()) {
                t.keepalive();
                s.next_keepalive = now + TUNNEL_KEEPALIVE;
            }
        }
    }

    /// A snapshot for `sluice status`: the relay link and the tunnel of every connector used.
    pub fn status(&self, now: Instant) -> AgentStatus {
        let age = |t: Instant| secs(now.saturating_duration_since(t));
        let tunnels = self
            .slots
            .iter()
            .map(|s| {
                let Some(t) = &s.tunnel else {
                    // Closed tunnels are dropped; the slot says whether a new one is coming.
                    return TunnelStatus::without_tunnel(s.name.clone(), s.state().0);
                };
                let st = t.stats();
                let (path, direct_addr) = match st.path {
                    Path::Relay => (PathKind::Relay, None),
                    Path::Direct(a) => (PathKind::Direct, Some(a.to_string())),
                };
                TunnelStatus {
                    connector: s.name.clone(),
                    peer_id: Some(t.peer().to_string()),
                    state: s.state().0,
                    path,
                    candidate_pair: candidate_pair(t),
                    direct_addr,
                    // Before the handshake quiche reports its initial guess, not a measurement.
                    rtt_ms: st.rtt.filter(|_| t.is_up()).map(millis),
                    bytes_sent: st.bytes_sent,
                    bytes_received: st.bytes_received,
                    packets_sent: st.packets_sent,
                    packets_received: st.packets_received,
                    since_switch_secs: st.path_changed_at.map(age),
                    up_secs: st.up_at.map_or(0.0, age),
                }
            })
            .collect();
        AgentStatus {
            name: self.name.clone(),
            peer_id: self.peer_id.to_string(),
            relay: self.link.status(),
            tunnels,
        }
    }

    /// Whether the host said the machine sleeps.
    pub fn is_asleep(&self) -> bool {
        self.asleep
    }
}

/// How a log line names a tunnel path.
pub fn describe_path(p: Path) -> String {
    match p {
        Path::Relay => "relayed".into(),
        Path::Direct(a) => format!("direct to {a}"),
    }
}

/// The pair a direct tunnel uses: the peer's address, and ours as the peer sees it (the
/// reflexive candidate when a NAT is in the way, else the host one).
fn candidate_pair(t: &Tunnel) -> Option<CandidatePair> {
    let Path::Direct(remote) = t.path() else {
        return None;
    };
    let (local, _) = t.candidates()?;
    let ours = local
        .iter()
        .filter(|c| c.addr.is_ipv4() == remote.is_ipv4())
        .max_by_key(|c| (c.kind == Kind::ServerReflexive, c.priority))?;
    Some(CandidatePair {
        local: format!("{} {}", ours.kind, ours.addr),
        remote: remote.to_string(),
    })
}

//! The three cores in memory, for tests: the agent engine, the relay core and the connector core
//! (terminating in netstack's real smoltcp stack), joined by a simulated network of addressed
//! UDP datagrams, with optional NATs in front of the agent and the connector, a direct path
//! that can be cut and a relay that can be restarted. Nothing opens a socket; every clock is the
//! test's (`World::now`, moved by the test). The services behind the connector are in memory
//! too ([`MemServices`]), and so is the app's TCP stack ([`App`], smoltcp).
//!
//! Used by `engine_memory.rs` (fixed scenarios) and `tunnel_model.rs` (the reference model).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_dataplane::connector::{self, Connector, ConnectorConfig, Services};
use sluice_dataplane::engine::{
    DnsConfig, Engine, EngineConfig, Event, SocketKind, DEVICE_HEADROOM,
};
use sluice_dataplane::identity::{self, PeerId, PemPair, Role};
use sluice_dataplane::queue_device::QueueDevice;
use sluice_dataplane::status::{PathKind, TunnelState};
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_netstack::stack::{DialError, FlowId, Stack, StackEvent};
use sluice_policy::Policy;
use sluice_relay::server::Relay;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

pub const RELAY: &str = "192.0.2.1:4433";
pub const APP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
pub const DNS: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 53);
pub const UNIX_T0: i128 = 1_700_000_000_000_000_000;

pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// A node's credentials, issued by `ca` for `valid`.
pub fn creds(ca: &PemPair, role: Role, name: &str, valid: Duration) -> Credentials {
    let n = identity::issue(ca, role, name, &[], valid).expect("issued");
    creds_from(ca, &n)
}

/// Credentials from PEM already issued (each call gets its own revocation list handle).
pub fn creds_from(ca: &PemPair, node: &PemPair) -> Credentials {
    Credentials::from_pem(
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
        ca.cert_pem.as_bytes(),
        ["cert", "key", "ca"],
    )
    .expect("credentials")
}

/// A compiled policy.
pub fn policy(text: &str) -> Arc<Policy> {
    Arc::new(
        sluice_policy::compile::compile(text, "test.yaml", 0)
            .expect("policy")
            .policy,
    )
}

/// A policy for alice to resource `web` (10.1.0.0/24 and `mail.corp.internal`, served by
/// connector `office`) on `ports` (like `tcp/7, udp/9`).
pub fn web_policy(ports: &str) -> Arc<Policy> {
    policy(&format!(
        "version: 1\nresources:\n  - name: web\n    connector: office\n    addresses: [10.1.0.0/24, \"mail.corp.internal\"]\n    ports: [{ports}]\nrules:\n  - name: staff\n    action: allow\n    who: [user:alice]\n    to: [web]\n"
    ))
}

// ---- the services behind the connector ---------------------------------------------------

/// What a TCP service does with the bytes it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpService {
    /// Sends every byte back.
    Echo,
    /// Keeps them (the test sends its own bytes back with [`MemServices::tcp_send`]).
    Sink,
}

/// One flow as the service side saw it.
#[derive(Debug, Clone)]
pub struct SvcFlow {
    pub agent: PeerId,
    pub id: FlowId,
    pub dst: SocketAddr,
    pub udp: bool,
    /// TCP: the byte stream received, in order.
    pub rx: Vec<u8>,
    /// UDP: the datagrams received, in order.
    pub datagrams: Vec<Vec<u8>>,
    /// Bytes (TCP) or datagrams (UDP) to hand to the stack at the next pump.
    to_app: Vec<Vec<u8>>,
    /// The agent half-closed (TCP FIN from the app).
    pub app_eof: bool,
    /// The stack dropped the flow (closed, reset, expired, or the agent's tunnel went).
    pub closed: bool,
    pub agent_gone: bool,
}

/// The services behind the connector, in memory: TCP ports in `tcp` are served, others refuse
/// the dial; UDP ports in `udp` are served (those in `udp_echo` answer each datagram with
/// itself); pings are answered.
#[derive(Default)]
pub struct MemServices {
    pub tcp: HashMap<u16, TcpService>,
    pub udp: HashSet<u16>,
    pub udp_echo: HashSet<u16>,
    pub flows: Vec<SvcFlow>,
    /// Where each (agent, stack flow id) is in `flows`.
    pub index: HashMap<(PeerId, FlowId), usize>,
    pub gone: Vec<PeerId>,
    pub dialed: Vec<SocketAddr>,
}

impl MemServices {
    /// The open flow to `dst`, newest first.
    pub fn flow_to(&self, dst: SocketAddr) -> Option<usize> {
        self.flows.iter().rposition(|f| f.dst == dst && !f.closed)
    }

    /// Every flow (open or not) that was ever opened to `dst`.
    pub fn flows_to(&self, dst: SocketAddr) -> impl Iterator<Item = &SvcFlow> {
        self.flows.iter().filter(move |f| f.dst == dst)
    }

    /// Queues `data` from the service to the app on flow `i` (TCP bytes or one UDP datagram).
    pub fn send(&mut self, i: usize, data: &[u8]) {
        if let Some(f) = self.flows.get_mut(i) {
            f.to_app.push(data.to_vec());
        }
    }

    fn flow(&mut self, agent: PeerId, id: FlowId) -> Option<&mut SvcFlow> {
        let i = *self.index.get(&(agent, id))?;
        self.flows.get_mut(i)
    }

    fn open(&mut self, agent: PeerId, id: FlowId, dst: SocketAddr, udp: bool) {
        self.index.insert((agent, id), self.flows.len());
        self.flows.push(SvcFlow {
            agent,
            id,
            dst,
            udp,
            rx: Vec::new(),
            datagrams: Vec::new(),
            to_app: Vec::new(),
            app_eof: false,
            closed: false,
            agent_gone: false,
        });
    }
}

impl Services for MemServices {
    type Terminator = Stack;
    fn terminator(&mut self) -> Stack {
        Stack::new(Default::default())
    }
    fn carry_out(&mut self, agent: PeerId, stack: &mut Stack) {
        while let Some(ev) = stack.poll_event() {
            match ev {
                StackEvent::DialTcp { id, dst, .. } => {
                    self.dialed.push(dst);
                    if self.tcp.contains_key(&dst.port()) {
                        self.open(agent, id, dst, false);
                        stack.tcp_dialed(id, Ok(()));
                    } else {
                        stack.tcp_dialed(id, Err(DialError::Refused));
                    }
                }
                StackEvent::OpenUdp { id, dst, .. } => {
                    self.dialed.push(dst);
                    self.open(agent, id, dst, true);
                }
                StackEvent::UdpSend { id, payload } => {
                    let Some(&i) = self.index.get(&(agent, id)) else {
                        continue;
                    };
                    let port = self.flows[i].dst.port();
                    let f = &mut self.flows[i];
                    if self.udp.contains(&port) && !f.closed {
                        if self.udp_echo.contains(&port) {
                            f.to_app.push(payload.clone());
                        }
                        f.datagrams.push(payload);
                    }
                }
                StackEvent::Echo { request, .. } => stack.echo_reply(&request),
                StackEvent::ShutdownWrite { id } => {
                    if let Some(f) = self.flow(agent, id) {
                        f.app_eof = true;
                    }
                    // The service closes its side in turn.
                    stack.tcp_service_eof(id);
                }
                StackEvent::Close { id } => {
                    if let Some(f) = self.flow(agent, id) {
                        f.closed = true;
                    }
                }
            }
        }
    }
    fn pump(&mut self, agent: PeerId, stack: &mut Stack) {
        let mut buf = [0u8; 4096];
        for id in stack.tcp_readable() {
            let Some(&i) = self.index.get(&(agent, id)) else {
                continue;
            };
            let echo = self.tcp.get(&self.flows[i].dst.port()) == Some(&TcpService::Echo);
            loop {
                let n = stack.tcp_to_service(id, &mut buf);
                if n == 0 {
                    break;
                }
                if let Some(f) = self.flow(agent, id) {
                    f.rx.extend_from_slice(&buf[..n]);
                    if echo {
                        f.to_app.push(buf[..n].to_vec());
                    }
                }
            }
        }
        for f in self.flows.iter_mut().filter(|f| f.agent == agent) {
            for data in f.to_app.drain(..) {
                if f.closed {
                    continue;
                }
                if f.udp {
                    stack.udp_from_service(f.id, &data);
                } else {
                    stack.tcp_from_service(f.id, &data);
                }
            }
        }
    }
    fn agent_gone(&mut self, agent: PeerId) {
        self.gone.push(agent);
        for f in self.flows.iter_mut().filter(|f| f.agent == agent) {
            f.closed = true;
            f.agent_gone = true;
        }
    }
}

// ---- the app's TCP stack -----------------------------------------------------------------

/// The app's side of TCP: a smoltcp stack at the agent's address, with any number of sockets.
pub struct App {
    pub dev: QueueDevice,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    t0: Instant,
    buffer: usize,
}

pub fn smol(t: Instant, t0: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(t.saturating_duration_since(t0).as_micros() as i64)
}

impl App {
    /// A stack whose clock starts at `t0`; each socket gets `buffer` bytes each way.
    pub fn new(t0: Instant, buffer: usize) -> App {
        let mut dev = QueueDevice::new(1280);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, smol(t0, t0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(APP), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(APP);
        App {
            dev,
            iface,
            sockets: SocketSet::new(Vec::new()),
            t0,
            buffer,
        }
    }

    /// A new connection from `local_port` to `dst`.
    pub fn connect(&mut self, dst: SocketAddr, local_port: u16) -> SocketHandle {
        let h = self.sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.buffer]),
            tcp::SocketBuffer::new(vec![0; self.buffer]),
        ));
        let IpAddr::V4(ip) = dst.ip() else {
            panic!("the app speaks IPv4 here");
        };
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(ip), dst.port()),
                local_port,
            )
            .expect("connects");
        h
    }

    pub fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Runs the stack at `now`; what it sends goes to `out`.
    pub fn poll(&mut self, now: Instant, out: &mut dyn FnMut(Vec<u8>)) {
        self.iface
            .poll(smol(now, self.t0), &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.tx.pop_front() {
            out(p);
        }
    }

    /// When the stack wants to run again.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let d = self.iface.poll_delay(smol(now, self.t0), &self.sockets)?;
        Some(now + Duration::from_micros(d.total_micros()))
    }
}

// ---- the network -------------------------------------------------------------------------

/// How a NAT in front of a node maps and filters (RFC 4787), much reduced: one mapping per
/// node, kept until [`Nat::rebind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// No NAT: the node's own address is public.
    None,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
}

#[derive(Debug, Clone)]
pub struct Nat {
    pub kind: NatKind,
    /// The node's own socket address.
    pub inside: SocketAddr,
    public_ip: IpAddr,
    port: u16,
    /// Remote addresses the inside sent to through the current mapping.
    contacted: HashSet<SocketAddr>,
}

impl Nat {
    pub fn new(kind: NatKind, inside: SocketAddr, public_ip: IpAddr) -> Nat {
        Nat {
            kind,
            inside,
            public_ip,
            port: 20_000 + inside.port() % 1000,
            contacted: HashSet::new(),
        }
    }

    /// Where the rest of the network sees the node now.
    pub fn public(&self) -> SocketAddr {
        match self.kind {
            NatKind::None => self.inside,
            _ => SocketAddr::new(self.public_ip, self.port),
        }
    }

    fn outbound(&mut self, to: SocketAddr) -> SocketAddr {
        self.contacted.insert(to);
        self.public()
    }

    fn inbound(&self, from: SocketAddr, to: SocketAddr) -> bool {
        to == self.public()
            && match self.kind {
                NatKind::None | NatKind::FullCone => true,
                NatKind::PortRestricted => self.contacted.contains(&from),
            }
    }

    /// The NAT forgets its mapping (a conntrack flush, a router reboot): the node's next
    /// packet gets a new public port, and packets to the old one are dropped. No effect
    /// without a NAT.
    pub fn rebind(&mut self) {
        if self.kind != NatKind::None {
            self.port += 1;
            self.contacted.clear();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Agent,
    Connector,
    Relay,
}

/// How the world is built.
#[derive(Clone)]
pub struct WorldConfig {
    pub agent_policy: Arc<Policy>,
    pub connector_policy: Arc<Policy>,
    pub dns: bool,
    pub direct_paths: bool,
    pub agent_nat: NatKind,
    pub connector_nat: NatKind,
    /// Every certificate's lifetime.
    pub valid: Duration,
    pub services: fn() -> MemServices,
}

impl WorldConfig {
    /// Relayed only, no NATs, the services of `engine_memory.rs` (TCP echo on port 7).
    pub fn relayed(agent_ports: &str, connector_ports: &str, dns: bool) -> WorldConfig {
        WorldConfig {
            agent_policy: web_policy(agent_ports),
            connector_policy: web_policy(connector_ports),
            dns,
            direct_paths: false,
            agent_nat: NatKind::None,
            connector_nat: NatKind::None,
            valid: Duration::from_secs(3600),
            services: || MemServices {
                tcp: HashMap::from([(7, TcpService::Echo)]),
                ..Default::default()
            },
        }
    }
}

/// One certificate authority and the three nodes' certificates.
pub struct Pki {
    pub ca: PemPair,
    pub relay: PemPair,
    pub agent: PemPair,
    pub connector: PemPair,
}

impl Pki {
    pub fn new(valid: Duration) -> Pki {
        let ca = identity::create_ca("test", valid).expect("ca");
        let issue = |role, name| identity::issue(&ca, role, name, &[], valid).expect("issued");
        Pki {
            relay: issue(Role::Relay, "relay"),
            agent: issue(Role::Agent, "alice"),
            connector: issue(Role::Connector, "office"),
            ca,
        }
    }
}

/// The three nodes, the network between them and the clock.
pub struct World {
    pub relay: Relay,
    /// The relay's credentials: its TLS config checks their revocation list.
    pub relay_creds: Credentials,
    pub engine: Engine,
    pub connector: Connector<Stack>,
    pub connector_creds: Credentials,
    pub services: MemServices,
    pub now: Instant,
    pub agent_nat: Nat,
    pub connector_nat: Nat,
    /// Datagrams between the agent and the connector (not through the relay) are dropped.
    pub direct_cut: bool,
    /// Until then the relay is down: what is sent to it is lost.
    pub relay_down_until: Option<Instant>,
    /// Every datagram into or out of the relay, when set.
    pub relay_tap: Option<Vec<Vec<u8>>>,
    /// Called with the world's time whenever it moves (a test that runs the cores' own clock
    /// reads from it).
    pub on_time: fn(Instant),
    out: Vec<u8>,
    pub tunnel_events: Vec<(String, TunnelState, PathKind)>,
    pub connector_events: Vec<connector::Event>,
    pub agent_audit: Vec<String>,
}

impl World {
    pub fn new(cfg: &WorldConfig) -> World {
        World::with_pki(cfg, &Pki::new(cfg.valid), Instant::now(), |_| {})
    }

    /// A world whose nodes hold `pki`'s certificates, starting at `t0`.
    pub fn with_pki(cfg: &WorldConfig, pki: &Pki, t0: Instant, on_time: fn(Instant)) -> World {
        let relay_creds = creds_from(&pki.ca, &pki.relay);
        let agent_creds = creds_from(&pki.ca, &pki.agent);
        let connector_creds = creds_from(&pki.ca, &pki.connector);
        let relay = new_relay(&relay_creds);
        let (agent_inside, agent_public) = match cfg.agent_nat {
            NatKind::None => ("192.0.2.10:40000", "192.0.2.10"),
            _ => ("10.0.1.10:40000", "198.51.100.10"),
        };
        let (conn_inside, conn_public) = match cfg.connector_nat {
            NatKind::None => ("192.0.2.20:40001", "192.0.2.20"),
            _ => ("10.0.2.20:40001", "203.0.113.20"),
        };
        let agent_nat = Nat::new(cfg.agent_nat, addr(agent_inside), conn_ip(agent_public));
        let connector_nat = Nat::new(cfg.connector_nat, addr(conn_inside), conn_ip(conn_public));
        let connector = Connector::new(
            ConnectorConfig {
                relay: RELAY.parse().expect("target"),
                local: connector_nat.inside,
                interface_ips: vec![connector_nat.inside.ip()],
                instance: 7,
            },
            &connector_creds,
            cfg.connector_policy.clone(),
            t0,
            UNIX_T0,
        )
        .expect("connector core");
        let ecfg = EngineConfig {
            relay: RELAY.parse().expect("target"),
            local: agent_nat.inside,
            ipv4: "100.96.0.1/32".parse().expect("v4"),
            ipv6: None,
            mtu: 1280,
            dns: DnsConfig {
                enabled: cfg.dns,
                address: IpAddr::V4(DNS),
                pool_v4: "198.18.0.0/15".parse().expect("pool"),
                pool_v6: "fd5c:1ce0:d5::/96".parse().expect("pool6"),
                max_names: 64,
                upstreams: Vec::new(),
            },
            direct_paths: cfg.direct_paths,
            interface_ips: if cfg.direct_paths {
                vec![agent_nat.inside.ip()]
            } else {
                Vec::new()
            },
            instance: 9,
        };
        let engine =
            Engine::new(ecfg, &agent_creds, cfg.agent_policy.clone(), t0, UNIX_T0).expect("engine");
        World {
            relay,
            relay_creds,
            engine,
            connector,
            connector_creds,
            services: (cfg.services)(),
            now: t0,
            agent_nat,
            connector_nat,
            direct_cut: false,
            relay_down_until: None,
            relay_tap: None,
            on_time,
            out: vec![0u8; 65_536],
            tunnel_events: Vec::new(),
            connector_events: Vec::new(),
            agent_audit: Vec::new(),
        }
    }

    /// Moves the clock to `t` (never back).
    pub fn set_now(&mut self, t: Instant) {
        if t > self.now {
            self.now = t;
            (self.on_time)(t);
        }
    }

    /// 5 ms pass; then everything due runs and every datagram goes where it is addressed;
    /// the device's packets go to `device`.
    pub fn tick(&mut self, device: &mut dyn FnMut(&[u8])) {
        let t = self.now + Duration::from_millis(5);
        self.set_now(t);
        self.pump(device);
    }

    /// Runs what is due now: every core's timers, then datagrams back and forth until none is
    /// left. The engine's packets for the device go to `device`.
    pub fn pump(&mut self, device: &mut dyn FnMut(&[u8])) {
        let now = self.now;
        self.engine.handle_timeout(now);
        self.connector.handle_timeout(now);
        if self.relay_up() {
            self.relay.on_timeout();
        }
        for _ in 0..100_000 {
            self.connector.step(now, &mut self.services);
            let mut moved = false;
            while let Some(t) = self.engine.poll_transmit(&mut self.out, now) {
                moved = true;
                // No resolver answers in here.
                if t.socket == SocketKind::Peer {
                    let mut pkt = self.out[..t.len].to_vec();
                    self.route(Node::Agent, t.to, &mut pkt);
                }
            }
            while let Some((n, to)) = self.connector.poll_transmit(&mut self.out, now) {
                moved = true;
                let mut pkt = self.out[..n].to_vec();
                self.route(Node::Connector, to, &mut pkt);
            }
            while self.relay_up() {
                let Some((n, to)) = self.relay.send(&mut self.out) else {
                    break;
                };
                moved = true;
                let mut pkt = self.out[..n].to_vec();
                self.route(Node::Relay, to, &mut pkt);
            }
            self.connector.step(now, &mut self.services);
            self.engine.drain_device(|p| {
                moved = true;
                device(p)
            });
            if !moved {
                break;
            }
        }
        while let Some(e) = self.engine.poll_event() {
            match e {
                Event::Tunnel {
                    connector,
                    state,
                    path,
                } => self.tunnel_events.push((connector, state, path)),
                Event::Audit(line) => self.agent_audit.push(line),
                _ => {}
            }
        }
        while let Some(e) = self.connector.poll_event() {
            self.connector_events.push(e);
        }
    }

    /// The earliest time any core wants to run again.
    pub fn next_deadline(&mut self) -> Instant {
        let now = self.now;
        let mut t = self
            .engine
            .poll_timeout(now)
            .min(self.connector.poll_timeout(now));
        if self.relay_up() {
            if let Some(d) = self.relay.timeout() {
                t = t.min(now + d);
            }
        }
        if let Some(u) = self.relay_down_until {
            t = t.min(u.max(now));
        }
        t
    }

    pub fn relay_up(&self) -> bool {
        self.relay_down_until.is_none_or(|u| self.now >= u)
    }

    /// The relay process restarts: everything it knew is gone, and for `down` nothing it is
    /// sent arrives. It comes back with the same certificate and revocation list.
    pub fn restart_relay(&mut self, down: Duration) {
        self.relay = new_relay(&self.relay_creds);
        self.relay_down_until = Some(self.now + down);
    }

    /// Sends `pkt` from `from` to `to` across the simulated network.
    fn route(&mut self, from: Node, to: SocketAddr, pkt: &mut [u8]) {
        let relay = addr(RELAY);
        let src = match from {
            Node::Agent => self.agent_nat.outbound(to),
            Node::Connector => self.connector_nat.outbound(to),
            Node::Relay => relay,
        };
        let now = self.now;
        if to == relay {
            if !self.relay_up() {
                return;
            }
            if let Some(tap) = &mut self.relay_tap {
                tap.push(pkt.to_vec());
            }
            return self.relay.recv(pkt, src);
        }
        if from == Node::Relay {
            if let Some(tap) = &mut self.relay_tap {
                tap.push(pkt.to_vec());
            }
        } else if self.direct_cut {
            return;
        }
        if from != Node::Agent && self.agent_nat.inbound(src, to) {
            self.engine.handle_datagram(SocketKind::Peer, src, pkt, now);
        } else if from != Node::Connector && self.connector_nat.inbound(src, to) {
            self.connector
                .handle_datagram(src, pkt, now, &mut self.services);
        }
    }

    /// Runs 5 ms ticks until the connector is registered with the relay.
    pub fn until_registered(&mut self) {
        for _ in 0..400 {
            if self.relay.connectors().count() == 1 {
                return;
            }
            self.tick(&mut |_| {});
        }
        panic!("the connector never registered with the relay");
    }

    /// An IP packet from the app into the engine.
    pub fn device_packet(&mut self, pkt: &[u8]) {
        let mut buf = vec![0u8; DEVICE_HEADROOM];
        buf.extend_from_slice(pkt);
        self.engine.handle_device_packet(&mut buf, self.now);
    }

    pub fn connector_audit(&self) -> Vec<&str> {
        self.connector_events
            .iter()
            .filter_map(|e| match e {
                connector::Event::Audit(l) => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }
}

fn conn_ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn new_relay(creds: &Credentials) -> Relay {
    Relay::new(
        tls::quic_config(
            creds,
            &[Role::Agent, Role::Connector],
            &QuicParams::control(),
        )
        .expect("relay config"),
        addr(RELAY),
    )
}

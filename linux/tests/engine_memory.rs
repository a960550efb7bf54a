//! The agent engine meets the relay core and the connector core in memory: no sockets, no TUN
//! device, every clock given by the test. The connector core terminates packets in netstack's
//! real smoltcp stack; its services are in memory too (an echo service on port 7, pings
//! answered, other ports refused). The app's side of TCP is a smoltcp stack as well.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use sluice_dataplane::connector::{self, Connector, ConnectorConfig, Services};
use sluice_dataplane::engine::{
    DnsConfig, Engine, EngineConfig, Event, SocketKind, DEVICE_HEADROOM,
};
use sluice_dataplane::identity::{self, PeerId, Role};
use sluice_dataplane::packet::{self, PROTO_TCP};
use sluice_dataplane::queue_device::QueueDevice;
use sluice_dataplane::status::{PathKind, TunnelState};
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_netstack::stack::{DialError, FlowId, Stack, StackEvent};
use sluice_policy::Policy;
use sluice_relay::server::Relay;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

const RELAY: &str = "192.0.2.1:4433";
const AGENT: &str = "192.0.2.10:40000";
const CONNECTOR: &str = "192.0.2.20:40001";
const APP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
const DNS: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 53);
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
/// The echo service's port.
const ECHO: u16 = 7;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn creds(ca: &identity::PemPair, role: Role, name: &str) -> Credentials {
    let n = identity::issue(ca, role, name, &[], Duration::from_secs(3600)).expect("issued");
    Credentials::from_pem(
        n.cert_pem.as_bytes(),
        n.key_pem.as_bytes(),
        ca.cert_pem.as_bytes(),
        ["cert", "key", "ca"],
    )
    .expect("credentials")
}

/// A policy for alice to resource `web` (10.1.0.0/24 and `mail.corp.internal`) on `ports`.
fn policy(ports: &str) -> Arc<Policy> {
    let text = format!(
        "version: 1\nresources:\n  - name: web\n    connector: office\n    addresses: [10.1.0.0/24, \"mail.corp.internal\"]\n    ports: [{ports}]\nrules:\n  - name: staff\n    action: allow\n    who: [user:alice]\n    to: [web]\n"
    );
    Arc::new(
        sluice_policy::compile::compile(&text, "test.yaml", 0)
            .expect("policy")
            .policy,
    )
}

/// The services behind the connector, in memory: TCP port 7 echoes, other ports refuse, pings
/// are answered.
#[derive(Default)]
struct EchoServices {
    open: HashSet<(PeerId, FlowId)>,
    gone: Vec<PeerId>,
    dialed: Vec<SocketAddr>,
}

impl Services for EchoServices {
    type Terminator = Stack;
    fn terminator(&mut self) -> Stack {
        Stack::new(Default::default())
    }
    fn carry_out(&mut self, agent: PeerId, stack: &mut Stack) {
        while let Some(ev) = stack.poll_event() {
            match ev {
                StackEvent::DialTcp { id, dst, .. } => {
                    self.dialed.push(dst);
                    if dst.port() == ECHO {
                        self.open.insert((agent, id));
                        stack.tcp_dialed(id, Ok(()));
                    } else {
                        stack.tcp_dialed(id, Err(DialError::Refused));
                    }
                }
                StackEvent::Echo { request, .. } => stack.echo_reply(&request),
                StackEvent::Close { id } => {
                    self.open.remove(&(agent, id));
                }
                StackEvent::ShutdownWrite { id } => stack.tcp_service_eof(id),
                StackEvent::OpenUdp { .. } | StackEvent::UdpSend { .. } => {}
            }
        }
    }
    fn pump(&mut self, agent: PeerId, stack: &mut Stack) {
        let mut buf = [0u8; 4096];
        for id in stack.tcp_readable() {
            if !self.open.contains(&(agent, id)) {
                continue;
            }
            let n = stack.tcp_to_service(id, &mut buf);
            stack.tcp_from_service(id, &buf[..n]);
        }
    }
    fn agent_gone(&mut self, agent: PeerId) {
        self.gone.push(agent);
        self.open.retain(|(a, _)| *a != agent);
    }
}

/// The three nodes and the clock.
struct World {
    relay: Relay,
    engine: Engine,
    connector: Connector<Stack>,
    services: EchoServices,
    now: Instant,
    out: Vec<u8>,
    tunnel_events: Vec<(String, TunnelState, PathKind)>,
    connector_events: Vec<connector::Event>,
    agent_audit: Vec<String>,
}

impl World {
    /// `agent_ports` and `connector_ports`: what each side's policy allows.
    fn new(agent_ports: &str, connector_ports: &str, dns: bool) -> World {
        let ca = identity::create_ca("test", Duration::from_secs(3600)).expect("ca");
        let relay_creds = creds(&ca, Role::Relay, "relay");
        let agent_creds = creds(&ca, Role::Agent, "alice");
        let conn_creds = creds(&ca, Role::Connector, "office");
        let relay = Relay::new(
            tls::quic_config(
                &relay_creds,
                &[Role::Agent, Role::Connector],
                &QuicParams::control(),
            )
            .expect("relay config"),
            addr(RELAY),
        );
        let t0 = Instant::now();
        let unix = 1_700_000_000_000_000_000;
        let connector = Connector::new(
            ConnectorConfig {
                relay: RELAY.parse().expect("target"),
                local: addr(CONNECTOR),
                interface_ips: Vec::new(),
                instance: 7,
            },
            &conn_creds,
            policy(connector_ports),
            t0,
            unix,
        )
        .expect("connector core");
        let cfg = EngineConfig {
            relay: RELAY.parse().expect("target"),
            local: addr(AGENT),
            ipv4: "100.96.0.1/32".parse().expect("v4"),
            ipv6: None,
            mtu: 1280,
            dns: DnsConfig {
                enabled: dns,
                address: IpAddr::V4(DNS),
                pool_v4: "198.18.0.0/15".parse().expect("pool"),
                pool_v6: "fd5c:1ce0:d5::/96".parse().expect("pool6"),
                max_names: 64,
                upstreams: Vec::new(),
            },
            direct_paths: false,
            interface_ips: Vec::new(),
            instance: 9,
        };
        let engine = Engine::new(cfg, &agent_creds, policy(agent_ports), t0, unix).expect("engine");
        World {
            relay,
            engine,
            connector,
            services: EchoServices::default(),
            now: t0,
            out: vec![0u8; 65_536],
            tunnel_events: Vec::new(),
            connector_events: Vec::new(),
            agent_audit: Vec::new(),
        }
    }

    /// 5 ms pass; every datagram goes where it is addressed; the device's packets go to `device`.
    fn tick(&mut self, device: &mut dyn FnMut(&[u8])) {
        self.now += Duration::from_millis(5);
        let now = self.now;
        self.engine.handle_timeout(now);
        self.connector.handle_timeout(now);
        self.relay.on_timeout();
        self.connector.step(now, &mut self.services);
        while let Some(t) = self.engine.poll_transmit(&mut self.out, now) {
            assert_eq!((t.socket, t.to), (SocketKind::Peer, addr(RELAY)));
            self.relay.recv(&mut self.out[..t.len], addr(AGENT));
        }
        while let Some((n, to)) = self.connector.poll_transmit(&mut self.out, now) {
            assert_eq!(to, addr(RELAY));
            self.relay.recv(&mut self.out[..n], addr(CONNECTOR));
        }
        while let Some((n, to)) = self.relay.send(&mut self.out) {
            if to == addr(AGENT) {
                self.engine
                    .handle_datagram(SocketKind::Peer, addr(RELAY), &mut self.out[..n], now);
            } else if to == addr(CONNECTOR) {
                let pkt = &mut self.out[..n];
                self.connector
                    .handle_datagram(addr(RELAY), pkt, now, &mut self.services);
            }
        }
        self.connector.step(now, &mut self.services);
        self.engine.drain_device(|p| device(p));
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

    /// Runs until the connector is registered with the relay.
    fn until_registered(&mut self) {
        for _ in 0..400 {
            if self.relay.connectors().count() == 1 {
                return;
            }
            self.tick(&mut |_| {});
        }
        panic!("the connector never registered with the relay");
    }

    fn device_packet(&mut self, pkt: &[u8]) {
        let mut buf = vec![0u8; DEVICE_HEADROOM];
        buf.extend_from_slice(pkt);
        self.engine.handle_device_packet(&mut buf, self.now);
    }

    fn connector_audit(&self) -> Vec<&str> {
        self.connector_events
            .iter()
            .filter_map(|e| match e {
                connector::Event::Audit(l) => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_ping_opens_a_tunnel_through_the_relay_and_its_reply_comes_back() {
    let mut w = World::new("icmp", "icmp", false);
    w.until_registered();
    let mut ping = Vec::new();
    etherparse::PacketBuilder::ipv4(APP.octets(), SERVICE.octets(), 64)
        .icmpv4_echo_request(0x77, 1)
        .write(&mut ping, b"hello")
        .expect("builds");
    w.device_packet(&ping);
    let mut replies = Vec::new();
    for _ in 0..400 {
        w.tick(&mut |p| replies.push(p.to_vec()));
        if !replies.is_empty() {
            break;
        }
    }
    assert_eq!(replies.len(), 1, "the echo reply came out of the engine");
    let info = packet::inspect(&replies[0]).expect("ip");
    assert_eq!(info.src, IpAddr::V4(SERVICE));
    assert_eq!(info.dst, IpAddr::V4(APP));
    assert_eq!(info.echo.map(|e| e.id), Some(0x77));
    assert!(
        w.tunnel_events
            .contains(&("office".into(), TunnelState::Up, PathKind::Relay)),
        "a tunnel-up event: {:?}",
        w.tunnel_events
    );
    let st = w.engine.status(w.now);
    assert!(st.relay.connected);
    assert_eq!(st.tunnels.len(), 1);
    assert_eq!(st.tunnels[0].state, TunnelState::Up);
    assert_eq!(w.connector.agents(), 1);
    assert!(w.connector.relay_connected());
    // Both enforcers wrote one audit line for the ping (one flow, not one per echo).
    assert_eq!(w.agent_audit.len(), 1, "{:?}", w.agent_audit);
    let audit = w.connector_audit();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(
        audit[0].contains(r#""enforcer":"connector""#),
        "{}",
        audit[0]
    );
    assert!(audit[0].contains(r#""decision":"allow""#), "{}", audit[0]);
    assert!(audit[0].contains(r#""user":"alice""#), "{}", audit[0]);
}

/// The app's TCP client: a smoltcp stack at the agent's address.
struct App {
    dev: QueueDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: smoltcp::iface::SocketHandle,
}

impl App {
    fn connect(port: u16, t: Instant, t0: Instant) -> App {
        let mut dev = QueueDevice::new(1280);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, smol(t, t0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(APP), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(APP);
        let mut sockets = SocketSet::new(Vec::new());
        let handle = sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 8192]),
            tcp::SocketBuffer::new(vec![0; 8192]),
        ));
        sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(iface.context(), (IpAddress::Ipv4(SERVICE), port), 43000)
            .expect("connects");
        App {
            dev,
            iface,
            sockets,
            handle,
        }
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }

    /// Polls the stack at `t` and hands its packets to `w`'s engine.
    fn poll(&mut self, w: &mut World, t0: Instant) {
        self.iface
            .poll(smol(w.now, t0), &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.tx.pop_front() {
            w.device_packet(&p);
        }
    }
}

fn smol(t: Instant, t0: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(t.duration_since(t0).as_micros() as i64)
}

#[test]
fn tcp_bytes_cross_the_engine_and_the_connector_core_both_ways() {
    let mut w = World::new("tcp/7", "tcp/7", false);
    let t0 = w.now;
    w.until_registered();
    let mut app = App::connect(ECHO, w.now, t0);
    let msg = b"hello through the sluice";
    let (mut sent, mut got) = (false, Vec::new());
    for _ in 0..600 {
        app.poll(&mut w, t0);
        let mut to_app = Vec::new();
        w.tick(&mut |p| to_app.push(p.to_vec()));
        app.dev.rx.extend(to_app);
        let s = app.socket();
        if s.may_send() && !sent {
            s.send_slice(msg).expect("room");
            sent = true;
        }
        while s.can_recv() {
            let mut b = [0u8; 1024];
            let n = s.recv_slice(&mut b).expect("reads");
            got.extend_from_slice(&b[..n]);
        }
        if got.len() >= msg.len() {
            break;
        }
    }
    assert!(sent, "the connection never opened");
    assert_eq!(got, msg, "the echo came back");
    assert_eq!(
        w.services.dialed,
        vec![SocketAddr::new(SERVICE.into(), ECHO)]
    );
    let audit = w.connector_audit();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].contains(r#""protocol":"tcp""#) && audit[0].contains(r#""decision":"allow""#));
}

#[test]
fn a_flow_the_connectors_own_policy_denies_is_reset_and_audited_there() {
    // The agent's policy allows port 8, the connector's does not: the connector decides.
    let mut w = World::new("tcp/7, tcp/8", "tcp/7", false);
    w.until_registered();
    let mut syn = Vec::new();
    etherparse::PacketBuilder::ipv4(APP.octets(), SERVICE.octets(), 64)
        .tcp(43001, 8, 1, 65535)
        .syn()
        .write(&mut syn, &[])
        .expect("builds");
    w.device_packet(&syn);
    let mut back = Vec::new();
    for _ in 0..400 {
        w.tick(&mut |p| back.push(p.to_vec()));
        if !back.is_empty() {
            break;
        }
    }
    assert_eq!(back.len(), 1, "one answer to the SYN");
    let info = packet::inspect(&back[0]).expect("ip");
    assert_eq!(info.proto, PROTO_TCP);
    assert!(info.tcp.rst, "a reset: {info:?}");
    assert!(w.services.dialed.is_empty(), "no dial for a denied flow");
    let audit = w.connector_audit();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].contains(r#""decision":"deny""#), "{}", audit[0]);
    assert!(audit[0].contains(r#""port":8"#), "{}", audit[0]);
}

#[test]
fn a_resource_names_mx_query_is_looked_up_by_the_connector_hosts_resolver() {
    let mut w = World::new("tcp/25", "tcp/25", true);
    w.until_registered();
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii("mail.corp.internal.").expect("name"),
        RecordType::MX,
    ));
    let q = m.to_vec().expect("encodes");
    let mut pkt = Vec::new();
    etherparse::PacketBuilder::ipv4(APP.octets(), DNS.octets(), 64)
        .udp(45000, 53)
        .write(&mut pkt, &q)
        .expect("builds");
    w.device_packet(&pkt);
    let mut back = Vec::new();
    let mut answered = false;
    for _ in 0..400 {
        w.tick(&mut |p| back.push(p.to_vec()));
        // The host's resolver answers (here: NXDOMAIN) what the core asked for.
        let lookups: Vec<(PeerId, u32, Vec<u8>)> = w
            .connector_events
            .iter()
            .filter_map(|e| match e {
                connector::Event::DnsLookup {
                    agent,
                    id,
                    name,
                    rtype,
                    query,
                } => {
                    assert_eq!(
                        (name.as_str(), *rtype),
                        ("mail.corp.internal", RecordType::MX)
                    );
                    Some((*agent, *id, query.clone()))
                }
                _ => None,
            })
            .collect();
        if !answered {
            if let Some((agent, id, query)) = lookups.first() {
                let answer =
                    sluice_dataplane::dns::records::answer(query, ResponseCode::NXDomain, &[], &[])
                        .expect("answer");
                w.connector
                    .handle_dns_answer(*agent, *id, answer, Instant::now());
                answered = true;
            }
        }
        if !back.is_empty() {
            break;
        }
    }
    assert!(answered, "the connector core asked for the lookup");
    assert_eq!(back.len(), 1, "one DNS answer for the app");
    let info = packet::inspect(&back[0]).expect("ip");
    assert_eq!(info.src, IpAddr::V4(DNS));
    let payload = &back[0][28..];
    let a = Message::from_vec(payload).expect("a DNS answer");
    assert_eq!(a.metadata.id, 0x4242);
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
}

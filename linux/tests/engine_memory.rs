//! The agent engine meets a relay and a connector in memory: no sockets, no TUN device, the
//! engine's clock given by the test. The relay is the real relay core; the connector is its
//! control link and an accepted tunnel that answers pings. An ICMP echo request from the
//! "device" opens the tunnel (lookup through the relay, handshake end to end) and its reply
//! comes back out of the engine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_dataplane::control_link::ControlLink;
use sluice_dataplane::datagram::TransmitRound;
use sluice_dataplane::engine::{
    DnsConfig, Engine, EngineConfig, Event, SocketKind, DEVICE_HEADROOM,
};
use sluice_dataplane::identity::{self, Role};
use sluice_dataplane::packet;
use sluice_dataplane::status::{PathKind, TunnelState};
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_dataplane::tunnel::{Tunnel, VirtualPaths};
use sluice_dataplane::wire::TUNNEL_IP_OVERHEAD;
use sluice_relay::server::Relay;

const RELAY: &str = "192.0.2.1:4433";
const AGENT: &str = "192.0.2.10:40000";
const CONNECTOR: &str = "192.0.2.20:40001";

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

/// The connector's side, as small as a connector can be: a control link and the tunnels it
/// accepted, each answering pings.
struct Connector {
    link: ControlLink,
    tunnel_cfg: quiche::Config,
    tunnels: Vec<Tunnel>,
    paths: VirtualPaths,
}

impl Connector {
    fn recv(&mut self, pkt: &mut [u8], from: SocketAddr, now: Instant) {
        self.link.recv(pkt, from, now);
        let mut buf = vec![0u8; 65_536];
        while let Some((peer, data)) = self.link.connected().and_then(|c| c.recv_forward(&mut buf))
        {
            let i = match self.tunnels.iter().position(|t| t.peer() == peer) {
                Some(i) => i,
                None => {
                    let path = self.paths.addr_of(peer);
                    let t = Tunnel::accept(&mut self.tunnel_cfg, peer, path).expect("accepts");
                    self.tunnels.push(t);
                    self.tunnels.len() - 1
                }
            };
            let t = &mut self.tunnels[i];
            t.recv_relayed(data);
            let mut ip = [0u8; 2048];
            while let Some(r) = t.recv_ip(&mut ip) {
                let pkt = &ip[r.packet];
                let info = packet::inspect(pkt).expect("an IP packet");
                if let Some(reply) = packet::icmp_echo_reply(pkt, &info) {
                    let mut b = vec![0u8; TUNNEL_IP_OVERHEAD];
                    b.extend_from_slice(&reply);
                    t.send_ip(&mut b).expect("room");
                }
            }
        }
    }
}

#[test]
fn a_ping_opens_a_tunnel_through_the_relay_and_its_reply_comes_back() {
    let ca = identity::create_ca("test", Duration::from_secs(3600)).expect("ca");
    let relay_creds = creds(&ca, Role::Relay, "relay");
    let agent_creds = creds(&ca, Role::Agent, "alice");
    let conn_creds = creds(&ca, Role::Connector, "office");
    let mut relay = Relay::new(
        tls::quic_config(
            &relay_creds,
            &[Role::Agent, Role::Connector],
            &QuicParams::control(),
        )
        .expect("relay config"),
        addr(RELAY),
    );
    let t0 = Instant::now();
    let mut connector = Connector {
        link: ControlLink::new(
            tls::quic_config(&conn_creds, &[Role::Relay], &QuicParams::control()).expect("cfg"),
            addr(CONNECTOR),
            RELAY.parse().expect("target"),
            7,
            t0,
        ),
        tunnel_cfg: tls::quic_config(&conn_creds, &[Role::Agent], &QuicParams::tunnel())
            .expect("cfg"),
        tunnels: Vec::new(),
        paths: VirtualPaths::default(),
    };
    let policy = sluice_policy::compile::compile(
        "version: 1\nresources:\n  - name: web\n    connector: office\n    addresses: [10.1.0.0/24]\n    ports: [icmp]\nrules:\n  - name: staff\n    action: allow\n    who: [user:alice]\n    to: [web]\n",
        "test.yaml",
        0,
    )
    .expect("policy")
    .policy;
    let cfg = EngineConfig {
        relay: RELAY.parse().expect("target"),
        local: addr(AGENT),
        ipv4: "100.96.0.1/32".parse().expect("v4"),
        ipv6: None,
        mtu: 1280,
        dns: DnsConfig {
            enabled: false,
            address: IpAddr::V4(Ipv4Addr::new(100, 96, 0, 1)),
            pool_v4: "198.18.0.0/15".parse().expect("pool"),
            pool_v6: "fd5c:1ce0:d5::/96".parse().expect("pool6"),
            max_names: 64,
            upstreams: Vec::new(),
        },
        direct_paths: false,
        interface_ips: Vec::new(),
        instance: 9,
    };
    let mut engine = Engine::new(cfg, &agent_creds, Arc::new(policy), t0, 0).expect("engine");

    // The ping, from the device.
    let mut ping = Vec::new();
    etherparse::PacketBuilder::ipv4([100, 96, 0, 1], [10, 1, 0, 5], 64)
        .icmpv4_echo_request(0x77, 1)
        .write(&mut ping, b"hello")
        .expect("builds");
    let mut buf = vec![0u8; DEVICE_HEADROOM];
    buf.extend_from_slice(&ping);

    let mut out = vec![0u8; 65_536];
    let mut replies = Vec::new();
    let mut tunnel_events = Vec::new();
    let mut pinged = false;
    let mut now = t0;
    for _ in 0..400 {
        now += Duration::from_millis(5);
        engine.handle_timeout(now);
        connector.link.on_timeout(now);
        relay.on_timeout();
        // Once the connector is registered, the app pings.
        if !pinged && relay.connectors().count() == 1 {
            engine.handle_device_packet(&mut buf, now);
            pinged = true;
        }
        // Agent → relay.
        while let Some(t) = engine.poll_transmit(&mut out, now) {
            assert_eq!((t.socket, t.to), (SocketKind::Peer, addr(RELAY)));
            relay.recv(&mut out[..t.len], addr(AGENT));
        }
        // Connector → relay.
        let mut round = TransmitRound::default();
        loop {
            let mut tunnels: Vec<&mut Tunnel> = connector.tunnels.iter_mut().collect();
            let Some((n, to)) =
                round.next(&mut connector.link, tunnels.as_mut_slice(), &mut out, now)
            else {
                break;
            };
            assert_eq!(to, addr(RELAY));
            relay.recv(&mut out[..n], addr(CONNECTOR));
        }
        // Relay → both.
        while let Some((n, to)) = relay.send(&mut out) {
            if to == addr(AGENT) {
                engine.handle_datagram(SocketKind::Peer, addr(RELAY), &mut out[..n], now);
            } else if to == addr(CONNECTOR) {
                connector.recv(&mut out[..n], addr(RELAY), now);
            }
        }
        engine.drain_device(|p| replies.push(p.to_vec()));
        while let Some(e) = engine.poll_event() {
            if let Event::Tunnel {
                connector,
                state,
                path,
            } = e
            {
                tunnel_events.push((connector, state, path));
            }
        }
        if !replies.is_empty() {
            break;
        }
    }
    assert!(pinged, "the connector never registered with the relay");
    assert_eq!(
        replies.len(),
        1,
        "the echo reply came back out of the engine"
    );
    let info = packet::inspect(&replies[0]).expect("ip");
    assert_eq!(info.src, IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)));
    assert_eq!(info.dst, IpAddr::V4(Ipv4Addr::new(100, 96, 0, 1)));
    assert_eq!(info.echo.map(|e| e.id), Some(0x77));
    assert!(
        tunnel_events.contains(&("office".into(), TunnelState::Up, PathKind::Relay)),
        "a tunnel-up event: {tunnel_events:?}"
    );
    let st = engine.status(now);
    assert!(st.relay.connected);
    assert_eq!(st.tunnels.len(), 1);
    assert_eq!(st.tunnels[0].state, TunnelState::Up);
    assert_eq!(
        st.tunnels[0].peer_id.as_deref(),
        Some(conn_creds.identity.peer_id.to_string().as_str())
    );
}

//! The engine in memory: no sockets, the clock advanced by hand. DNS over UDP and over TCP in
//! the packet path (the TCP client is a real smoltcp stack on the "app" side), a denied flow,
//! and settings events when the policy changes. The tunnel to a connector through a relay is
//! tested in `linux/tests/engine_memory.rs`, which has the relay core at hand.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::*;
use crate::identity::{self, Role};
use crate::queue_device::QueueDevice;

const APP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
const DNS: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 53);

fn policy(extra: &str) -> Arc<Policy> {
    let text = format!(
        r#"version: 1
resources:
  - name: web
    connector: office
    addresses: [10.1.0.0/24, "wiki.corp.internal"]
    ports: [tcp/443]
{extra}rules:
  - name: staff
    action: allow
    who: [user:alice]
    to: [web]
"#
    );
    let c = sluice_policy::compile::compile(&text, "test.yaml", 0).expect("policy compiles");
    Arc::new(c.policy)
}

fn engine(p: Arc<Policy>, t0: Instant) -> Engine {
    let ca = identity::create_ca("test", Duration::from_secs(3600)).expect("ca");
    let node =
        identity::issue(&ca, Role::Agent, "alice", &[], Duration::from_secs(3600)).expect("issued");
    let creds = Credentials::from_pem(
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
        ca.cert_pem.as_bytes(),
        ["cert", "key", "ca"],
    )
    .expect("credentials");
    Engine::new(config(), &creds, p, t0, 1_700_000_000_000_000_000).expect("engine")
}

fn config() -> EngineConfig {
    EngineConfig {
        relay: "192.0.2.1:4433".parse().expect("relay"),
        local: "0.0.0.0:40000".parse().expect("local"),
        ipv4: "100.96.0.1/32".parse().expect("v4"),
        ipv6: None,
        mtu: 1280,
        dns: DnsConfig {
            enabled: true,
            address: IpAddr::V4(DNS),
            pool_v4: "198.18.0.0/15".parse().expect("pool"),
            pool_v6: "fd5c:1ce0:d5::/96".parse().expect("pool6"),
            max_names: 1024,
            upstreams: vec!["192.0.2.53:53".parse().expect("upstream")],
        },
        direct_paths: false,
        interface_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))],
        instance: 1,
    }
}

fn events(e: &mut Engine) -> Vec<Event> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

fn device_packets(e: &mut Engine) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    e.drain_device(|p| v.push(p.to_vec()));
    v
}

/// `pkt` with the headroom the engine wants in front.
fn with_headroom(pkt: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; DEVICE_HEADROOM];
    b.extend_from_slice(pkt);
    b
}

fn a_query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    m.to_vec().expect("encodes")
}

fn first_a(answer: &[u8]) -> Option<Ipv4Addr> {
    let m = Message::from_vec(answer).ok()?;
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

#[test]
fn the_first_settings_route_resources_pools_and_the_dns_address() {
    let t0 = Instant::now();
    let mut e = engine(policy(""), t0);
    let ev = events(&mut e);
    let Some(Event::Settings(s)) = ev.iter().find(|e| matches!(e, Event::Settings(_))) else {
        panic!("no settings event in {ev:?}");
    };
    let want: Vec<IpNet> = [
        "10.1.0.0/24",
        "100.96.0.53/32",
        "198.18.0.0/15",
        "fd5c:1ce0:d5::/96",
    ]
    .iter()
    .map(|n| n.parse().expect("net"))
    .collect();
    assert_eq!(s.routes, want);
    assert_eq!(s.dns_servers, vec![IpAddr::V4(DNS)]);
    assert_eq!(s.match_domains, vec!["wiki.corp.internal".to_string()]);
    assert_eq!(s.mtu, 1280);
    // A host can read the same before it starts an engine.
    assert_eq!(&Settings::initial(&config(), &policy("")), s);
}

#[test]
fn a_policy_that_adds_a_resource_sends_new_settings_and_an_unchanged_one_sends_none() {
    let t0 = Instant::now();
    let mut e = engine(policy(""), t0);
    let first = events(&mut e);
    let gen = first
        .iter()
        .find_map(|e| match e {
            Event::Settings(s) => Some(s.generation),
            _ => None,
        })
        .expect("settings");
    let more = "  - name: db\n    connector: office\n    addresses: [10.2.0.0/16]\n    ports: [tcp/5432]\n";
    e.set_policy(policy(more), t0).expect("accepted");
    let ev = events(&mut e);
    let Some(Event::Settings(s)) = ev.iter().find(|e| matches!(e, Event::Settings(_))) else {
        panic!("no settings after the policy grew: {ev:?}");
    };
    assert_eq!(s.generation, gen + 1);
    assert!(s.routes.contains(&"10.2.0.0/16".parse().expect("net")));
    e.set_policy(policy(more), t0).expect("accepted");
    assert!(
        !events(&mut e)
            .iter()
            .any(|e| matches!(e, Event::Settings(_))),
        "the same routes again: no event"
    );
}

#[test]
fn a_denied_port_is_refused_at_once_with_a_reset_and_an_audit_line() {
    let t0 = Instant::now();
    let mut e = engine(policy(""), t0);
    let _ = events(&mut e);
    // A SYN to 10.1.0.5:22: the resource allows tcp/443 only.
    let syn = etherparse::PacketBuilder::ipv4(APP.octets(), [10, 1, 0, 5], 64)
        .tcp(50000, 22, 1, 65535)
        .syn();
    let mut pkt = Vec::new();
    syn.write(&mut pkt, &[]).expect("builds");
    let mut buf = with_headroom(&pkt);
    e.handle_device_packet(&mut buf, t0);
    let out = device_packets(&mut e);
    assert_eq!(out.len(), 1, "one answer: {out:?}");
    let info = packet::inspect(&out[0]).expect("an IP packet");
    assert_eq!(info.proto, PROTO_TCP);
    assert!(info.tcp.rst, "a reset");
    assert_eq!(info.dst_socket(), SocketAddr::from((APP, 50000)));
    assert_eq!(e.stats().drops.get(crate::metrics::DropReason::Policy), 1);
    assert_eq!(e.stats().decisions.denied, 1);
    let audit: Vec<String> = events(&mut e)
        .into_iter()
        .filter_map(|e| match e {
            Event::Audit(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(audit.len(), 1);
    assert!(audit[0].contains(r#""decision":"deny""#), "{}", audit[0]);
    assert!(
        audit[0].contains("2023-11-14T22:13:20"),
        "the host's clock: {}",
        audit[0]
    );
}

#[test]
fn dns_over_udp_in_the_packet_path_gives_synthetic_and_upstream_answers() {
    let t0 = Instant::now();
    let mut e = engine(policy(""), t0);
    let _ = events(&mut e);
    let client = SocketAddr::from((APP, 41000));
    let server = SocketAddr::from((DNS, 53));
    let q = a_query(7, "wiki.corp.internal.", RecordType::A);
    let mut buf = with_headroom(&packet::udp_packet(client, server, &q).expect("udp"));
    e.handle_device_packet(&mut buf, t0);
    let out = device_packets(&mut e);
    assert_eq!(out.len(), 1);
    let info = packet::inspect(&out[0]).expect("ip");
    assert_eq!((info.src_socket(), info.dst_socket()), (server, client));
    let a = first_a(info.payload(&out[0])).expect("an A record");
    assert!(
        "198.18.0.0/15"
            .parse::<ipnet::Ipv4Net>()
            .expect("net")
            .contains(&a),
        "{a} is synthetic"
    );

    // Any other name goes upstream as a datagram, and its answer comes back to the client.
    let q = a_query(8, "www.example.test.", RecordType::A);
    let mut buf = with_headroom(&packet::udp_packet(client, server, &q).expect("udp"));
    e.handle_device_packet(&mut buf, t0);
    assert!(device_packets(&mut e).is_empty());
    let mut out = vec![0u8; 65_536];
    let t = e.poll_transmit(&mut out, t0).expect("a query upstream");
    assert_eq!(t.socket, SocketKind::Dns);
    assert_eq!(t.to, "192.0.2.53:53".parse::<SocketAddr>().expect("addr"));
    let mut answer = Message::from_vec(&out[..t.len]).expect("the query");
    answer.metadata.message_type = hickory_proto::op::MessageType::Response;
    answer.add_answer(hickory_proto::rr::Record::from_rdata(
        Name::from_ascii("www.example.test.").expect("name"),
        60,
        RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, 80))),
    ));
    let mut bytes = answer.to_vec().expect("encodes");
    e.handle_datagram(SocketKind::Dns, t.to, &mut bytes, t0);
    let out = device_packets(&mut e);
    assert_eq!(out.len(), 1);
    let info = packet::inspect(&out[0]).expect("ip");
    let m = Message::from_vec(info.payload(&out[0])).expect("dns");
    assert_eq!(m.metadata.id, 8, "the client's id restored");
    assert_eq!(
        first_a(info.payload(&out[0])),
        Some(Ipv4Addr::new(192, 0, 2, 80))
    );
}

#[test]
fn dns_over_tcp_in_the_packet_path_answers_a_real_tcp_client() {
    let t0 = Instant::now();
    let mut e = engine(policy(""), t0);
    let _ = events(&mut e);
    // The app's side: a smoltcp stack at the agent's address.
    let mut dev = QueueDevice::new(1280);
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ip),
        &mut dev,
        smoltcp::time::Instant::from_millis(0),
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(APP), 32));
    });
    let _ = iface.routes_mut().add_default_ipv4_route(APP);
    let mut sockets = SocketSet::new(Vec::new());
    let sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    let h = sockets.add(sock);
    sockets
        .get_mut::<tcp::Socket>(h)
        .connect(iface.context(), (IpAddress::Ipv4(DNS), 53), 42000)
        .expect("connects");
    let q = a_query(9, "wiki.corp.internal.", RecordType::A);
    let mut sent = false;
    let mut got = Vec::new();
    for step in 0..200u64 {
        let now = t0 + Duration::from_millis(step * 10);
        let ts = smoltcp::time::Instant::from_millis((step * 10) as i64);
        iface.poll(ts, &mut dev, &mut sockets);
        while let Some(p) = dev.tx.pop_front() {
            let mut b = with_headroom(&p);
            e.handle_device_packet(&mut b, now);
        }
        e.handle_timeout(now);
        e.drain_device(|p| dev.rx.push_back(p.to_vec()));
        let s = sockets.get_mut::<tcp::Socket>(h);
        if s.may_send() && !sent {
            let len = (q.len() as u16).to_be_bytes();
            s.send_slice(&len).expect("room");
            s.send_slice(&q).expect("room");
            sent = true;
        }
        while s.can_recv() {
            let mut b = [0u8; 1024];
            let n = s.recv_slice(&mut b).expect("reads");
            got.extend_from_slice(&b[..n]);
        }
        if got.len() >= 2 && got.len() >= 2 + usize::from(u16::from_be_bytes([got[0], got[1]])) {
            break;
        }
    }
    assert!(got.len() > 2, "an answer over TCP");
    let a = first_a(&got[2..]).expect("an A record");
    assert!("198.18.0.0/15"
        .parse::<ipnet::Ipv4Net>()
        .expect("net")
        .contains(&a));
}

#[test]
fn a_packet_to_a_resource_waits_for_the_relay_and_asks_for_nothing_else() {
    let t0 = Instant::now();
    let mut e = engine(policy(""), t0);
    let _ = events(&mut e);
    // No relay answers in this test: the packet is held, nothing goes to the device, and the
    // engine keeps dialling the relay (its Initial is the only datagram).
    let syn = etherparse::PacketBuilder::ipv4(APP.octets(), [10, 1, 0, 5], 64)
        .tcp(50001, 443, 1, 65535)
        .syn();
    let mut pkt = Vec::new();
    syn.write(&mut pkt, &[]).expect("builds");
    let mut buf = with_headroom(&pkt);
    e.handle_device_packet(&mut buf, t0);
    assert!(device_packets(&mut e).is_empty());
    let mut out = vec![0u8; 65_536];
    let t = e.poll_transmit(&mut out, t0).expect("the relay Initial");
    assert_eq!(
        (t.socket, t.to),
        (SocketKind::Peer, "192.0.2.1:4433".parse().expect("addr"))
    );
    assert!(e.poll_timeout(t0) > t0);
    let status = e.status(t0);
    assert_eq!(status.tunnels.len(), 1);
    assert_eq!(status.tunnels[0].state, TunnelState::Connecting);
}

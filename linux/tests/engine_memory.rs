//! The agent engine meets the relay core and the connector core in memory: no sockets, no TUN
//! device, every clock given by the test. The connector core terminates packets in netstack's
//! real smoltcp stack; its services are in memory too (an echo service on port 7, pings
//! answered, other ports refused). The app's side of TCP is a smoltcp stack as well. The
//! nodes and the network between them are in `memory/`, shared with `tunnel_model.rs`.

mod memory;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use memory::{World, WorldConfig, APP, DNS};
use sluice_dataplane::connector;
use sluice_dataplane::identity::PeerId;
use sluice_dataplane::packet::{self, PROTO_TCP};
use sluice_dataplane::status::{PathKind, TunnelState};

const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
/// The echo service's port.
const ECHO: u16 = 7;

#[test]
fn a_ping_opens_a_tunnel_through_the_relay_and_its_reply_comes_back() {
    let mut w = World::new(&WorldConfig::relayed("icmp", "icmp", false));
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

#[test]
fn tcp_bytes_cross_the_engine_and_the_connector_core_both_ways() {
    let mut w = World::new(&WorldConfig::relayed("tcp/7", "tcp/7", false));
    w.until_registered();
    let mut app = memory::App::new(w.now, 8192);
    let h = app.connect(SocketAddr::new(SERVICE.into(), ECHO), 43000);
    let msg = b"hello through the sluice";
    let (mut sent, mut got) = (false, Vec::new());
    for _ in 0..600 {
        app.poll(w.now, &mut |p| w.device_packet(&p));
        let mut to_app = Vec::new();
        w.tick(&mut |p| to_app.push(p.to_vec()));
        app.dev.rx.extend(to_app);
        let s = app.socket(h);
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
    let mut w = World::new(&WorldConfig::relayed("tcp/7, tcp/8", "tcp/7", false));
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
    let mut w = World::new(&WorldConfig::relayed("tcp/25", "tcp/25", true));
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

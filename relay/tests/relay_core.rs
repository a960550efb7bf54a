//! The relay core with real control clients, in memory: retry (address validation), QUIC
//! Address Discovery, connector lookup, opaque forwarding with the source's peer id, refusal of
//! agent-to-agent forwarding, and indifference to garbage.

mod common;
use common::{load, params, pump, RELAY};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use sluice_dataplane::control::{ControlClient, ControlEvent};
use sluice_dataplane::identity::{self, PemPair, Role};
use sluice_dataplane::rate::Rate;
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, Credentials};
use sluice_dataplane::wire::RELAY_FORWARD_OVERHEAD;
use sluice_relay::limits::Limits;
use sluice_relay::server::{Refusal, Relay};

fn creds(dir: &Path, ca: &PemPair, role: Role, name: &str) -> Credentials {
    let node = identity::issue(ca, role, name, &[], Duration::from_secs(3600)).unwrap();
    load(dir, ca, name, &node)
}

struct Net {
    relay: Relay,
    clients: Vec<(SocketAddr, ControlClient)>,
}

impl Net {
    /// Moves packets until nobody has anything to send.
    fn pump(&mut self) {
        pump(&mut self.relay, &mut self.clients, 500);
    }

    fn events(&mut self, i: usize) -> Vec<ControlEvent> {
        std::iter::from_fn(|| self.clients[i].1.poll_event()).collect()
    }
}

fn setup(tag: &str) -> (Net, Vec<Credentials>) {
    let dir = std::env::temp_dir().join(format!("sluice-relay-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = identity::create_ca("acme", Duration::from_secs(3600)).unwrap();
    let relay = creds(&dir, &ca, Role::Relay, "relay-1");
    let nodes = vec![
        creds(&dir, &ca, Role::Agent, "alice"),
        creds(&dir, &ca, Role::Connector, "conn-1"),
        creds(&dir, &ca, Role::Agent, "bob"),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    let rcfg = tls::quic_config(&relay, &[Role::Agent, Role::Connector], &params(5_000)).unwrap();
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut cfg = tls::quic_config(n, &[Role::Relay], &params(5_000)).unwrap();
        let addr: SocketAddr = format!("198.51.100.{}:{}", i + 1, 5000 + i)
            .parse()
            .unwrap();
        clients.push((
            addr,
            ControlClient::connect(&mut cfg, addr, RELAY.parse().unwrap(), i as u64 + 1).unwrap(),
        ));
    }
    let net = Net {
        relay: Relay::new(rcfg, RELAY.parse().unwrap()),
        clients,
    };
    (net, nodes)
}

#[test]
fn clients_connect_learn_their_address_and_forward_opaquely() {
    let (mut net, nodes) = setup("fwd");
    net.pump();
    // Every client validated its address first (the post-quantum first flight is two Initial
    // packets, and a stateless relay answers each with a Retry).
    assert!(
        net.relay.stats().retries_sent >= 3,
        "{:?}",
        net.relay.stats()
    );
    for i in 0..3 {
        let ev = net.events(i);
        assert!(
            ev.contains(&ControlEvent::Connected {
                relay: "relay-1".into()
            }),
            "{ev:?}"
        );
        let me = net.clients[i].0;
        assert!(ev.contains(&ControlEvent::ObservedAddr(me)), "{ev:?}");
    }
    assert_eq!(net.relay.stats().connectors, 1);

    // Lookup by name.
    net.clients[0].1.lookup("conn-1").unwrap();
    net.clients[0].1.lookup("nobody").unwrap();
    net.pump();
    let ev = net.events(0);
    let conn_id = nodes[1].identity.peer_id;
    assert!(
        ev.contains(&ControlEvent::LookupReply {
            name: "conn-1".into(),
            peer: Some(conn_id)
        }),
        "{ev:?}"
    );
    assert!(
        ev.contains(&ControlEvent::LookupReply {
            name: "nobody".into(),
            peer: None
        }),
        "{ev:?}"
    );

    // Forwarding: the connector receives the bytes unchanged, labelled with alice's peer id.
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let mut buf = vec![0u8; RELAY_FORWARD_OVERHEAD + payload.len()];
    buf[RELAY_FORWARD_OVERHEAD..].copy_from_slice(&payload);
    net.clients[0].1.send_forward(&conn_id, &mut buf).unwrap();
    net.pump();
    let mut rx = vec![0u8; 2048];
    let (src, data) = net.clients[1].1.recv_forward(&mut rx).expect("forwarded");
    assert_eq!(src, nodes[0].identity.peer_id);
    assert_eq!(data, &payload[..]);
    assert_eq!(net.relay.stats().forwarded_packets, 1);
    assert_eq!(net.relay.stats().forwarded_bytes, payload.len() as u64);

    // Agent to agent is not a tunnel: dropped.
    let bob = nodes[2].identity.peer_id;
    let mut buf = vec![0u8; RELAY_FORWARD_OVERHEAD + 10];
    net.clients[0].1.send_forward(&bob, &mut buf).unwrap();
    net.pump();
    assert!(net.clients[2].1.recv_forward(&mut rx).is_none());
    assert_eq!(net.relay.stats().dropped_packets, 1);
}

#[test]
fn a_connector_that_leaves_is_removed_from_the_registry() {
    let (mut net, _) = setup("leave");
    net.pump();
    assert_eq!(net.relay.stats().connectors, 1);
    net.clients[1].1.close("bye");
    net.pump();
    let t0 = std::time::Instant::now();
    while net.relay.stats().connectors == 1 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        net.relay.on_timeout();
        net.pump();
    }
    assert_eq!(net.relay.stats().connectors, 0);
    assert_eq!(net.relay.stats().clients, 2);
    net.clients[0].1.lookup("conn-1").unwrap();
    net.pump();
    let ev = net.events(0);
    assert!(
        ev.contains(&ControlEvent::LookupReply {
            name: "conn-1".into(),
            peer: None
        }),
        "{ev:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn garbage_never_disturbs_the_relay(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1300), 1..20)) {
        let (mut net, _) = setup("garbage");
        net.pump();
        let from: SocketAddr = "203.0.113.9:9".parse().unwrap();
        for mut p in packets {
            net.relay.recv(&mut p, from);
            // Also from a connected client's address.
            let a = net.clients[0].0;
            net.relay.recv(&mut p, a);
        }
        net.pump();
        prop_assert_eq!(net.relay.stats().clients, 3);
        net.clients[0].1.lookup("conn-1").unwrap();
        net.pump();
        let ev = net.events(0);
        let answered = ev.iter().any(|e| matches!(e, ControlEvent::LookupReply { .. }));
        prop_assert!(answered);
    }
}

/// Flood limits: a peer over its rate loses only the excess (dropped before decryption);
/// another peer sending at the same time loses nothing; the flooder's connection stays up.
#[test]
fn a_peer_over_its_rate_loses_only_the_excess_and_slows_no_one_else() {
    let (mut net, nodes) = setup("flood");
    net.relay.set_limits(Limits {
        peer_packets: Some(Rate::new(20, 10)),
        ..Limits::default()
    });
    net.pump();
    let conn_id = nodes[1].identity.peer_id;
    // 1100 bytes: one tunnel packet per QUIC packet.
    let mut buf = vec![0u8; RELAY_FORWARD_OVERHEAD + 1100];
    // alice floods (50 packets at once, her burst is 10); bob sends 8 in between.
    for i in 0..50 {
        net.clients[0].1.send_forward(&conn_id, &mut buf).unwrap();
        if i % 6 == 0 && i < 48 {
            net.clients[2].1.send_forward(&conn_id, &mut buf).unwrap();
        }
    }
    net.pump();
    let (mut from_alice, mut from_bob) = (0u64, 0);
    let mut rx = vec![0u8; 2048];
    while let Some((src, _)) = net.clients[1].1.recv_forward(&mut rx) {
        if src == nodes[0].identity.peer_id {
            from_alice += 1;
        } else if src == nodes[2].identity.peer_id {
            from_bob += 1;
        }
    }
    let s = net.relay.stats();
    // At most her burst (a token or two more that the run's own time refilled).
    assert!(
        (1..=12).contains(&from_alice),
        "{from_alice} of alice's 50 passed; {s:?}"
    );
    assert_eq!(from_bob, 8, "{s:?}");
    assert!(s.rate_limited_packets >= 50 - from_alice, "{s:?}");
    assert!(
        s.rate_limited_bytes >= s.rate_limited_packets * 1100,
        "{s:?}"
    );
    // Her connection is up: once her rate allows, a lookup is answered (QUIC retransmits
    // what was dropped).
    net.clients[0].1.lookup("conn-1").unwrap();
    let t0 = std::time::Instant::now();
    let mut answered = false;
    while !answered && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        for (_, c) in &mut net.clients {
            c.on_timeout();
        }
        net.relay.on_timeout();
        net.pump();
        answered = net
            .events(0)
            .iter()
            .any(|e| matches!(e, ControlEvent::LookupReply { .. }));
    }
    assert!(answered, "{:?}", net.relay.stats());
    assert_eq!(net.relay.stats().clients, 3);
}

/// One address may hold `connections_per_address` connections and open them at
/// `connections_per_source`; what is beyond is refused and counted, other addresses are not.
#[test]
fn one_address_is_limited_in_connections_held_and_opened() {
    for (limits, why) in [
        (
            Limits {
                connections_per_address: 2,
                ..Limits::default()
            },
            Refusal::TooManyConnections,
        ),
        (
            Limits {
                connections_per_source: Rate::new(1, 2),
                ..Limits::default()
            },
            Refusal::ConnectionRate,
        ),
    ] {
        let (mut net, _) = setup("per-address");
        net.relay.set_limits(limits);
        // All three behind one NAT address.
        for (i, c) in net.clients.iter_mut().enumerate() {
            c.0 = format!("198.51.100.9:{}", 6000 + i).parse().unwrap();
        }
        net.pump();
        let s = net.relay.stats();
        assert_eq!(s.clients, 2, "{why:?}: {s:?}");
        assert!(s.refused(why) >= 1, "{why:?}: {s:?}");
        let connected: Vec<bool> = (0..3)
            .map(|i| {
                net.events(i)
                    .iter()
                    .any(|e| matches!(e, ControlEvent::Connected { .. }))
            })
            .collect();
        assert_eq!(connected, [true, true, false], "{why:?}");
    }
}

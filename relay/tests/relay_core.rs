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

/// A relay sharing a registry: it asks its connector for its record, puts the verified record
/// (and only one naming this relay), puts it back when the registry loses it, and closes its
/// connector when a newer record homes that connector on another relay, without deleting the
/// newer record.
#[test]
fn a_relay_sharing_a_registry_puts_records_and_yields_to_a_newer_registration() {
    use sluice_dataplane::connector_record::{ConnectorRecord, RecordDraft};
    use sluice_relay::registry::{Event, Registry};
    use sluice_relay::server::RegistryWrite;

    let dir = std::env::temp_dir().join(format!("sluice-relay-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = identity::create_ca("acme", Duration::from_secs(3600)).unwrap();
    let relay_creds = creds(&dir, &ca, Role::Relay, "relay-1");
    let conn = creds(&dir, &ca, Role::Connector, "conn-1");
    let _ = std::fs::remove_dir_all(&dir);
    let rcfg = tls::quic_config(
        &relay_creds,
        &[Role::Agent, Role::Connector],
        &params(5_000),
    )
    .unwrap();
    let mut relay = Relay::new(rcfg, RELAY.parse().unwrap());
    let check = relay_creds.peer_check().unwrap();
    relay.set_peer_check(check.clone());
    let dial = tls::quic_config(&relay_creds, &[Role::Relay], &params(5_000)).unwrap();
    relay.share_registry("relay-1", Registry::new("/sluice/", check), dial);
    let mut cfg = tls::quic_config(&conn, &[Role::Relay], &params(5_000)).unwrap();
    let addr: SocketAddr = "198.51.100.2:5001".parse().unwrap();
    let client = ControlClient::connect(&mut cfg, addr, RELAY.parse().unwrap(), 7).unwrap();
    let mut net = Net {
        relay,
        clients: vec![(addr, client)],
    };
    net.pump();
    assert_eq!(net.relay.stats().connectors, 1);
    // A relay sharing a registry asks its connectors for their records.
    let ev = net.events(0);
    assert!(ev.contains(&ControlEvent::RecordWanted), "{ev:?}");
    let now = identity::unix_now();
    let sign = |home: &str, sequence: u64| {
        ConnectorRecord::sign(
            &RecordDraft {
                name: "conn-1".into(),
                home_relay: home.into(),
                sequence,
                expires_at: now + 600,
            },
            &conn,
        )
        .unwrap()
    };
    let key = "/sluice/connectors/conn-1".to_string();

    let ours = sign("relay-1", 10);
    net.clients[0]
        .1
        .publish_record(ours.encoded().to_vec())
        .unwrap();
    net.pump();
    let put = RegistryWrite::Put {
        key: key.clone(),
        value: ours.encoded().to_vec(),
    };
    assert_eq!(net.relay.poll_registry_write(), Some(put.clone()));
    assert_eq!(net.relay.poll_registry_write(), None);

    // One naming another relay, or an older one, is not put.
    for bad in [sign("relay-2", 11), sign("relay-1", 9)] {
        net.clients[0]
            .1
            .publish_record(bad.encoded().to_vec())
            .unwrap();
        net.pump();
        assert_eq!(net.relay.poll_registry_write(), None);
    }

    // A read of the registry without it (lost while etcd was away): it is put back.
    net.relay.registry_loaded(Vec::new(), 3);
    assert_eq!(net.relay.poll_registry_write(), Some(put));
    // Its echo from the watch changes nothing.
    net.relay.registry_event(Event::Put {
        key: key.clone().into_bytes(),
        value: ours.encoded().to_vec(),
        mod_revision: 4,
    });
    assert_eq!(net.relay.poll_registry_write(), None);
    assert_eq!(
        net.relay
            .registry()
            .unwrap()
            .record_of("conn-1", now)
            .unwrap()
            .sequence,
        10
    );

    // A newer record, put by relay-2: the connector registered anew there.
    let newer = sign("relay-2", 20);
    net.relay.registry_event(Event::Put {
        key: key.clone().into_bytes(),
        value: newer.encoded().to_vec(),
        mod_revision: 5,
    });
    net.pump();
    assert_eq!(net.relay.stats().connectors, 0);
    // Nothing to delete: the key holds relay-2's record now.
    assert_eq!(net.relay.poll_registry_write(), None);
    let ev = net.events(0);
    assert!(
        ev.iter().any(|e| matches!(e, ControlEvent::Closed(why)
            if why.contains("replaced by a newer registration on relay relay-2"))),
        "{ev:?}"
    );
}

/// Two relays sharing a registry: the first dials the second when it learns of it, an agent on
/// the first finds a connector on the second by name, and packets go both ways over the link
/// (one hop, each side labelled with the other's peer id, unchanged); a destination no relay
/// has gets an explicit "gone".
#[test]
fn an_agent_on_one_relay_reaches_a_connector_on_another_over_their_link() {
    use sluice_dataplane::connector_record::{ConnectorRecord, RecordDraft};
    use sluice_dataplane::identity::PeerId;
    use sluice_relay::registry::{Event, Registry, RelayRecord, RELAY_RECORD_VERSION};
    use sluice_relay::server::RegistryWrite;

    let dir = std::env::temp_dir().join(format!("sluice-relay-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = identity::create_ca("acme", Duration::from_secs(3600)).unwrap();
    let relay_creds = [
        creds(&dir, &ca, Role::Relay, "relay-1"),
        creds(&dir, &ca, Role::Relay, "relay-2"),
    ];
    let agent = creds(&dir, &ca, Role::Agent, "alice");
    let conn = creds(&dir, &ca, Role::Connector, "conn-1");
    let _ = std::fs::remove_dir_all(&dir);
    let addrs: [SocketAddr; 2] = [
        "192.0.2.1:4433".parse().unwrap(),
        "192.0.2.2:4433".parse().unwrap(),
    ];
    let mut relays: Vec<(SocketAddr, Relay)> = Vec::new();
    for (i, rc) in relay_creds.iter().enumerate() {
        let accept = &[Role::Agent, Role::Connector, Role::Relay];
        let cfg = tls::quic_config(rc, accept, &params(5_000)).unwrap();
        let dial = tls::quic_config(rc, &[Role::Relay], &params(5_000)).unwrap();
        // The first listens on the unspecified address, as a relay usually does.
        let local = match i {
            0 => "0.0.0.0:4433".parse().unwrap(),
            _ => addrs[i],
        };
        let mut r = Relay::new(cfg, local);
        let check = rc.peer_check().unwrap();
        r.set_peer_check(check.clone());
        r.share_registry(&rc.identity.name, Registry::new("/sluice/", check), dial);
        relays.push((addrs[i], r));
    }
    // Both relays read the same registry: every write is an event for both.
    let mut rev = 0;
    let mut feed = |relays: &mut Vec<(SocketAddr, Relay)>, key: String, value: Vec<u8>| {
        rev += 1;
        for (_, r) in relays.iter_mut() {
            r.registry_event(Event::Put {
                key: key.clone().into_bytes(),
                value: value.clone(),
                mod_revision: rev,
            });
        }
    };
    for (i, rc) in relay_creds.iter().enumerate() {
        let rec = RelayRecord {
            version: RELAY_RECORD_VERSION,
            name: rc.identity.name.clone(),
            region: "lab".into(),
            mesh_addr: addrs[i],
            client_addr: addrs[i],
            peer_id: rc.identity.peer_id.to_string(),
        };
        feed(
            &mut relays,
            format!("/sluice/relays/{}", rec.name),
            rec.encode(),
        );
    }
    let mut clients = Vec::new();
    for (i, (n, relay)) in [(&agent, 0usize), (&conn, 1)].into_iter().enumerate() {
        let mut cfg = tls::quic_config(n, &[Role::Relay], &params(5_000)).unwrap();
        let addr: SocketAddr = format!("198.51.100.{}:5000", i + 1).parse().unwrap();
        let c = ControlClient::connect(&mut cfg, addr, addrs[relay], i as u64 + 1).unwrap();
        clients.push((addr, c));
    }
    let pump = |relays: &mut Vec<(SocketAddr, Relay)>,
                clients: &mut Vec<(SocketAddr, ControlClient)>| {
        let mut buf = vec![0u8; 2048];
        for _ in 0..500 {
            let mut moved = Vec::new();
            for (addr, c) in clients.iter_mut() {
                while let Some((n, to)) = c.send(&mut buf) {
                    moved.push((*addr, to, buf[..n].to_vec()));
                }
            }
            for (addr, r) in relays.iter_mut() {
                while let Some((n, to)) = r.send(&mut buf) {
                    moved.push((*addr, to, buf[..n].to_vec()));
                }
            }
            if moved.is_empty() {
                return;
            }
            for (from, to, mut p) in moved {
                if let Some((_, r)) = relays.iter_mut().find(|(a, _)| *a == to) {
                    r.recv(&mut p, from);
                } else if let Some((_, c)) = clients.iter_mut().find(|(a, _)| *a == to) {
                    c.recv(&mut p, from);
                }
            }
        }
    };
    pump(&mut relays, &mut clients);
    // The connector's record, as relay-2 puts it.
    let evs: Vec<ControlEvent> = std::iter::from_fn(|| clients[1].1.poll_event()).collect();
    assert!(evs.contains(&ControlEvent::RecordWanted), "{evs:?}");
    let rec = ConnectorRecord::sign(
        &RecordDraft {
            name: "conn-1".into(),
            home_relay: "relay-2".into(),
            sequence: 1,
            expires_at: identity::unix_now() + 600,
        },
        &conn,
    )
    .unwrap();
    clients[1].1.publish_record(rec.encoded().to_vec()).unwrap();
    pump(&mut relays, &mut clients);
    let Some(RegistryWrite::Put { key, value }) = relays[1].1.poll_registry_write() else {
        panic!("relay-2 puts the record");
    };
    feed(&mut relays, key, value);
    pump(&mut relays, &mut clients);

    // The agent finds the connector through relay-1.
    let conn_id = conn.identity.peer_id;
    let agent_id = agent.identity.peer_id;
    clients[0].1.lookup("conn-1").unwrap();
    pump(&mut relays, &mut clients);
    let evs: Vec<ControlEvent> = std::iter::from_fn(|| clients[0].1.poll_event()).collect();
    assert!(
        evs.contains(&ControlEvent::LookupReply {
            name: "conn-1".into(),
            peer: Some(conn_id)
        }),
        "{evs:?}"
    );

    // Agent to connector, then back, each over the link.
    let mut rx = vec![0u8; 2048];
    for (from, to, to_id, from_id) in [
        (0usize, 1usize, conn_id, agent_id),
        (1, 0, agent_id, conn_id),
    ] {
        let payload: Vec<u8> = (0..1200u32).map(|i| (i * 13 + from as u32) as u8).collect();
        let mut got = None;
        // The first packet of a pair may race its route's announcement (the tunnel resends).
        for _ in 0..3 {
            let mut buf = vec![0u8; RELAY_FORWARD_OVERHEAD + payload.len()];
            buf[RELAY_FORWARD_OVERHEAD..].copy_from_slice(&payload);
            clients[from].1.send_forward(&to_id, &mut buf).unwrap();
            pump(&mut relays, &mut clients);
            if let Some((src, data)) = clients[to].1.recv_forward(&mut rx) {
                got = Some((src, data.to_vec()));
                break;
            }
        }
        let (src, data) = got.expect("forwarded over the link");
        assert_eq!(src, from_id);
        assert_eq!(data, payload);
    }
    assert!(relays[0].1.stats().forwarded_packets >= 2);
    assert!(relays[1].1.stats().forwarded_packets >= 2);

    // Nobody has this peer: the agent is told, not left to guess.
    let nobody = PeerId([9; 32]);
    let mut buf = vec![0u8; RELAY_FORWARD_OVERHEAD + 10];
    clients[0].1.send_forward(&nobody, &mut buf).unwrap();
    pump(&mut relays, &mut clients);
    let evs: Vec<ControlEvent> = std::iter::from_fn(|| clients[0].1.poll_event()).collect();
    assert!(evs.contains(&ControlEvent::PeerGone(nobody)), "{evs:?}");
}

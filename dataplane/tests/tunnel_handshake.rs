//! End-to-end tunnels between an agent and a connector, in memory: mutual authentication against
//! the CA (other CA, wrong role, expired, wrong name, wrong key all refused with a reason on
//! each side) and IP packets in DATAGRAMs once up.

use std::path::PathBuf;
use std::time::Duration;

use sluice_dataplane::identity::{self, OffsetDateTime, PeerId, PemPair, Role};
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_dataplane::tunnel::{Path, Tunnel, TunnelEvent, VirtualPaths};
use sluice_dataplane::wire::{self, ControlMessage};

fn params() -> QuicParams {
    params_with(1350)
}

fn params_with(max_udp_payload: usize) -> QuicParams {
    QuicParams {
        alpn: tls::ALPN_TUNNEL,
        max_udp_payload,
        idle_timeout_ms: 5_000,
        dgram_queue: 64,
        streams: true,
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("sluice-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    /// Writes a node's files and loads them as credentials.
    fn creds(&self, ca: &PemPair, node: &PemPair, name: &str) -> Credentials {
        let c = self.0.join(format!("{name}.pem"));
        let k = self.0.join(format!("{name}.key"));
        let a = self.0.join(format!("{name}-ca.pem"));
        std::fs::write(&c, &node.cert_pem).unwrap();
        std::fs::write(&k, &node.key_pem).unwrap();
        std::fs::write(&a, &ca.cert_pem).unwrap();
        Credentials::load(
            c.to_str().unwrap(),
            k.to_str().unwrap(),
            a.to_str().unwrap(),
        )
        .unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn day() -> Duration {
    Duration::from_secs(86_400)
}

struct Pair {
    agent: Tunnel,
    conn: Tunnel,
}

/// Moves packets both ways until neither side has anything to send.
fn pump(p: &mut Pair) {
    let mut buf = vec![0u8; 2048];
    for _ in 0..200 {
        let mut moved = false;
        while let Some((n, direct)) = p.agent.send(&mut buf) {
            assert!(direct.is_none(), "relayed path only");
            p.conn.recv_relayed(&mut buf[..n]);
            moved = true;
        }
        while let Some((n, _)) = p.conn.send(&mut buf) {
            p.agent.recv_relayed(&mut buf[..n]);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn events(t: &mut Tunnel) -> Vec<TunnelEvent> {
    std::iter::from_fn(|| t.poll_event()).collect()
}

/// Builds a pair: the agent dials `expect_name` expecting key `expect_peer` (default: the
/// connector's real one).
fn pair(
    agent: &Credentials,
    conn: &Credentials,
    expect_name: &str,
    expect_peer: Option<PeerId>,
) -> Pair {
    pair_with(agent, conn, expect_name, expect_peer, &params())
}

fn pair_with(
    agent: &Credentials,
    conn: &Credentials,
    expect_name: &str,
    expect_peer: Option<PeerId>,
    params: &QuicParams,
) -> Pair {
    let mut paths = VirtualPaths::default();
    let mut acfg = tls::quic_config(agent, &[Role::Connector], params).unwrap();
    let mut ccfg = tls::quic_config(conn, &[Role::Agent], params).unwrap();
    let conn_peer = expect_peer.unwrap_or(conn.identity.peer_id);
    let a = Tunnel::connect(&mut acfg, conn_peer, expect_name, paths.addr_of(conn_peer)).unwrap();
    let c = Tunnel::accept(
        &mut ccfg,
        agent.identity.peer_id,
        paths.addr_of(agent.identity.peer_id),
    )
    .unwrap();
    Pair { agent: a, conn: c }
}

fn closed_reason(evs: &[TunnelEvent]) -> Option<String> {
    evs.iter().find_map(|e| match e {
        TunnelEvent::Closed(w) => Some(w.clone()),
        _ => None,
    })
}

/// A whole end-to-end packet must fit one relay forward DATAGRAM of a control connection,
/// whatever the packet number length: a connection sized like a control connection, once up,
/// takes a forward header plus `TUNNEL_UDP_PAYLOAD` bytes in one DATAGRAM.
#[test]
fn a_full_tunnel_packet_fits_a_relay_forward_datagram() {
    let d = Dir::new("fit");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair_with(
        &agent,
        &conn,
        "conn-1",
        None,
        &params_with(wire::CONTROL_UDP_PAYLOAD),
    );
    pump(&mut p);
    assert!(p.agent.is_up());
    for t in [&p.agent, &p.conn] {
        let dgram = t.max_ip_len().unwrap() + wire::TUNNEL_IP_OVERHEAD;
        assert!(
            dgram >= wire::RELAY_FORWARD_OVERHEAD + wire::TUNNEL_UDP_PAYLOAD,
            "a control DATAGRAM takes {dgram} bytes; a forward needs {}",
            wire::RELAY_FORWARD_OVERHEAD + wire::TUNNEL_UDP_PAYLOAD
        );
        // quiche's reserve is exactly ours: no byte of the control packet is wasted either.
        assert_eq!(
            dgram,
            wire::RELAY_FORWARD_OVERHEAD + wire::TUNNEL_UDP_PAYLOAD
        );
    }
}

#[test]
fn tunnel_comes_up_and_carries_ip_packets() {
    let d = Dir::new("up");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &["eng".into()], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    pump(&mut p);
    assert!(p.agent.is_up() && p.conn.is_up());
    assert!(matches!(&events(&mut p.agent)[..], [TunnelEvent::Up(id)] if id.name == "conn-1"));
    let ev = events(&mut p.conn);
    assert!(
        matches!(&ev[..], [TunnelEvent::Up(id)] if id.name == "alice" && id.groups == ["eng"]),
        "{ev:?}"
    );

    // An IP packet, with one byte of headroom for the tunnel header.
    let ip = [
        0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let mut buf = vec![0u8];
    buf.extend_from_slice(&ip);
    p.agent.send_ip(&mut buf).unwrap();
    pump(&mut p);
    let mut rx = [0u8; 2048];
    let r = p.conn.recv_ip(&mut rx).expect("packet arrives");
    assert_eq!(r.name, None);
    assert_eq!(&rx[r.packet], &ip[..]);

    // The same packet addressed to a name: the name travels in front of it.
    let name = "wiki.corp.internal";
    let head = sluice_dataplane::wire::named_ip_overhead(name);
    let mut buf = vec![0u8; head];
    buf.extend_from_slice(&ip);
    p.agent.send_named_ip(&mut buf, name).unwrap();
    pump(&mut p);
    let r = p.conn.recv_ip(&mut rx).expect("named packet arrives");
    assert_eq!(&rx[r.name.unwrap()], name.as_bytes());
    assert_eq!(&rx[r.packet], &ip[..]);
    // The largest packet the tunnel takes fits a 1280-byte MTU.
    assert!(p.agent.max_ip_len().unwrap() >= 1280);
    let mut big = vec![0u8; 1 + p.agent.max_ip_len().unwrap() + 1];
    assert!(p.agent.send_ip(&mut big).is_err());

    // Messages ride the tunnel's stream, reliably and whole, however large (a DNS answer can
    // be 64 KiB): the agent's query opens the stream, the connector answers on it.
    let query = ControlMessage::DnsQuery {
        id: 1,
        message: vec![7; 300],
    };
    p.agent.send_message(&query).unwrap();
    pump(&mut p);
    assert_eq!(events(&mut p.conn), vec![TunnelEvent::Message(query)]);
    let answer = ControlMessage::DnsAnswer {
        id: 1,
        message: (0..60_000u32).map(|i| i as u8).collect(),
    };
    p.conn.send_message(&answer).unwrap();
    pump(&mut p);
    assert_eq!(events(&mut p.agent), vec![TunnelEvent::Message(answer)]);
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let d = Dir::new("ca");
    let ca = identity::create_ca("acme", day()).unwrap();
    let evil = identity::create_ca("evil", day()).unwrap();
    // The intruder trusts acme's CA but holds a certificate from its own.
    let agent = d.creds(
        &ca,
        &identity::issue(&evil, Role::Agent, "mallory", &[], day()).unwrap(),
        "mallory",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    pump(&mut p);
    assert!(!p.agent.is_up() && !p.conn.is_up());
    let why = closed_reason(&events(&mut p.agent)).unwrap();
    assert!(
        why.contains("the peer refused us") && why.contains("unknown CA"),
        "{why}"
    );
    let why = closed_reason(&events(&mut p.conn)).unwrap();
    assert!(why.contains("we refused the peer"), "{why}");
}

#[test]
fn wrong_role_is_refused() {
    let d = Dir::new("role");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    // Another agent posing as a connector.
    let fake = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "conn-1", &[], day()).unwrap(),
        "fake",
    );
    let mut p = pair(&agent, &fake, "conn-1", None);
    pump(&mut p);
    assert!(!p.agent.is_up());
    let why = closed_reason(&events(&mut p.agent)).unwrap();
    assert!(why.contains("we refused the peer"), "{why}");
}

#[test]
fn expired_certificate_is_refused() {
    let d = Dir::new("exp");
    let ca = identity::create_ca("acme", day()).unwrap();
    let now = OffsetDateTime::now_utc();
    let old = identity::issue_between(
        &ca,
        Role::Agent,
        "alice",
        &[],
        now - time_days(3),
        now - time_days(1),
    )
    .unwrap();
    let agent = d.creds(&ca, &old, "alice");
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    pump(&mut p);
    assert!(!p.conn.is_up());
    let why = closed_reason(&events(&mut p.agent)).unwrap();
    assert!(why.contains("certificate expired"), "{why}");
}

fn time_days(n: i64) -> identity::TimeDuration {
    identity::TimeDuration::days(n)
}

#[test]
fn wrong_name_or_key_is_refused_after_the_handshake() {
    let d = Dir::new("name");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    // The agent meant conn-2: a valid connector, but not the one asked for.
    let mut p = pair(&agent, &conn, "conn-2", None);
    pump(&mut p);
    assert!(!p.agent.is_up());
    let why = closed_reason(&events(&mut p.agent)).expect("agent closed");
    assert!(
        why.contains("we refused the peer") && why.contains("name mismatch"),
        "{why}"
    );
    let why = closed_reason(&events(&mut p.conn)).expect("connector told");
    assert!(
        why.contains("the peer refused us") && why.contains("name mismatch"),
        "{why}"
    );
    // The relay routed to key X but the connector answering holds key Y (NAT collision, or a
    // relay lying): refused.
    let mut p = pair(&agent, &conn, "conn-1", Some(PeerId([9; 32])));
    pump(&mut p);
    assert!(!p.agent.is_up());
    let why = closed_reason(&events(&mut p.agent)).expect("agent closed");
    assert!(why.contains("peer id mismatch"), "{why}");
}

/// The agent's socket address and the connector's, for direct packets in memory.
const A_LOCAL: &str = "192.0.2.10:5000";
const C_LOCAL: &str = "192.0.2.20:6000";

/// Like [`pump`], with direct packets delivered between the two local addresses unless
/// `direct_up` is false (a NAT dropping them).
fn pump_paths(p: &mut Pair, direct_up: bool) -> (usize, usize) {
    let (a, c): (std::net::SocketAddr, std::net::SocketAddr) =
        (A_LOCAL.parse().unwrap(), C_LOCAL.parse().unwrap());
    let (mut relayed, mut direct) = (0, 0);
    let mut buf = vec![0u8; 2048];
    for _ in 0..200 {
        let mut moved = false;
        while let Some((n, to)) = p.agent.send(&mut buf) {
            moved = true;
            match to {
                None => {
                    relayed += 1;
                    p.conn.recv_relayed(&mut buf[..n]);
                }
                Some(to) => {
                    direct += 1;
                    if direct_up && to == c {
                        p.conn.recv_direct(&mut buf[..n], a, c);
                    }
                }
            }
        }
        while let Some((n, to)) = p.conn.send(&mut buf) {
            moved = true;
            match to {
                None => {
                    relayed += 1;
                    p.agent.recv_relayed(&mut buf[..n]);
                }
                Some(to) => {
                    direct += 1;
                    if direct_up && to == a {
                        p.agent.recv_direct(&mut buf[..n], c, a);
                    }
                }
            }
        }
        if !moved {
            break;
        }
    }
    (relayed, direct)
}

fn path_events(t: &mut Tunnel) -> Vec<TunnelEvent> {
    events(t)
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                TunnelEvent::PathChanged(_) | TunnelEvent::DirectFailed(_)
            )
        })
        .collect()
}

/// The one connection moves from the relay to a direct path once QUIC validated it, carries
/// packets there only, and moves back to the relay on demand; datagrams flow all along.
#[test]
fn the_connection_migrates_to_a_direct_path_and_back() {
    let d = Dir::new("migrate");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    pump(&mut p);
    assert!(p.agent.is_up() && p.conn.is_up());
    events(&mut p.agent);
    events(&mut p.conn);
    assert_eq!(p.agent.path(), Path::Relay);

    let (a, c) = (A_LOCAL.parse().unwrap(), C_LOCAL.parse().unwrap());
    p.agent.probe_direct(a, c).unwrap();
    pump_paths(&mut p, true);
    assert_eq!(
        path_events(&mut p.agent),
        [TunnelEvent::PathChanged(Path::Direct(c))]
    );
    assert_eq!(p.agent.path(), Path::Direct(c));

    let ip = [
        0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let mut rx = [0u8; 2048];
    for _ in 0..3 {
        let mut buf = vec![0u8];
        buf.extend_from_slice(&ip);
        p.agent.send_ip(&mut buf).unwrap();
        let (relayed, direct) = pump_paths(&mut p, true);
        assert_eq!(relayed, 0, "nothing goes over the relay once direct");
        assert!(direct > 0);
        let r = p.conn.recv_ip(&mut rx).expect("packet arrives directly");
        assert_eq!(&rx[r.packet], &ip[..]);
    }
    // The connector saw the agent migrate.
    assert_eq!(p.conn.path(), Path::Direct(a));

    // Back to the relay (the direct path died): the same connection carries on.
    p.agent.use_relay().unwrap();
    let mut buf = vec![0u8];
    buf.extend_from_slice(&ip);
    p.agent.send_ip(&mut buf).unwrap();
    let (relayed, _) = pump_paths(&mut p, false);
    assert!(relayed > 0);
    let r = p
        .conn
        .recv_ip(&mut rx)
        .expect("packet arrives over the relay");
    assert_eq!(&rx[r.packet], &ip[..]);
    assert_eq!(p.conn.path(), Path::Relay);
    assert!(p.agent.is_up() && p.conn.is_up());
}

/// One side's direct-path plumbing in memory: its UDP socket's address.
fn deliver_direct(
    from: &mut Tunnel,
    from_addr: std::net::SocketAddr,
    to: &mut Tunnel,
    to_addr: std::net::SocketAddr,
    direct_up: bool,
    now: std::time::Instant,
) -> (bool, usize) {
    let mut buf = vec![0u8; 2048];
    let mut moved = false;
    let mut relayed = 0;
    while let Some(n) = from.send_relayed(&mut buf) {
        moved = true;
        relayed += 1;
        to.recv_relayed(&mut buf[..n]);
    }
    while let Some((n, dst)) = from.send_direct(&mut buf) {
        moved = true;
        if direct_up && dst == to_addr {
            to.recv_direct(&mut buf[..n], from_addr, to_addr);
        }
    }
    while let Some((dst, punch)) = from.poll_punch() {
        moved = true;
        if direct_up && dst == to_addr {
            let p = wire::Punch::parse(&punch).unwrap();
            to.on_punch(from_addr, &p, now).unwrap();
        }
    }
    (moved, relayed)
}

/// Moves everything both ways (relayed, direct, punches) until quiet; returns the relayed
/// packet count.
fn pump_all(p: &mut Pair, direct_up: bool, now: std::time::Instant) -> usize {
    let (a, c) = (A_LOCAL.parse().unwrap(), C_LOCAL.parse().unwrap());
    let mut relayed = 0;
    for _ in 0..200 {
        let (m1, r1) = deliver_direct(&mut p.agent, a, &mut p.conn, c, direct_up, now);
        let (m2, r2) = deliver_direct(&mut p.conn, c, &mut p.agent, a, direct_up, now);
        relayed += r1 + r2;
        if !m1 && !m2 {
            break;
        }
    }
    relayed
}

/// The whole direct-path cycle of a tunnel, in memory: candidates exchanged inside the tunnel,
/// punches both ways, the agent nominates, QUIC validates and migrates; when the direct path
/// falls silent the agent goes back to the relay (no packet lost for the flow), and the retry
/// 30 s later finds the path again.
#[test]
fn checks_find_the_direct_path_and_silence_sends_the_tunnel_back_to_the_relay() {
    use sluice_dataplane::nat::candidate::{gather, Kind};
    use sluice_dataplane::nat::liveness::DIRECT_SILENCE;
    use sluice_dataplane::nat::traversal::{PunchRefused, RETRY_AFTER};

    let d = Dir::new("checks");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    pump(&mut p);
    assert!(p.agent.is_up() && p.conn.is_up());
    events(&mut p.agent);
    events(&mut p.conn);

    let (a, c): (std::net::SocketAddr, std::net::SocketAddr) =
        (A_LOCAL.parse().unwrap(), C_LOCAL.parse().unwrap());
    let now = std::time::Instant::now();
    // The connector first, as in life: the agent's candidates may reach it at any time.
    p.conn.enable_direct(
        conn.identity.peer_id,
        c,
        gather(&[c.ip()], c.port(), None),
        Vec::new(),
        now,
    );
    p.agent.enable_direct(
        agent.identity.peer_id,
        a,
        gather(&[a.ip()], a.port(), None),
        vec!["198.51.100.0/24".parse().unwrap()],
        now,
    );
    pump_all(&mut p, true, now);
    assert_eq!(
        p.agent.path(),
        Path::Direct(c),
        "{:?}",
        events(&mut p.agent)
    );
    assert_eq!(p.conn.path(), Path::Direct(a));
    let (local, remote) = p.agent.candidates().unwrap();
    assert_eq!(local[0].kind, Kind::Host);
    assert_eq!(remote[0].addr, c);

    // Packets go direct only.
    let ip = [
        0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let mut rx = [0u8; 2048];
    let mut buf = vec![0u8];
    buf.extend_from_slice(&ip);
    p.agent.send_ip(&mut buf.clone()).unwrap();
    assert_eq!(pump_all(&mut p, true, now), 0);
    assert!(p.conn.recv_ip(&mut rx).is_some());
    events(&mut p.agent);

    // A punch naming another peer (a NAT gave two peers one address) is refused.
    let stranger = identity::issue(&ca, Role::Connector, "conn-2", &[], day()).unwrap();
    let stranger = d.creds(&ca, &stranger, "conn-2").identity.peer_id;
    let forged = wire::Punch {
        ack: false,
        to: agent.identity.peer_id,
        from: stranger,
        secret: 0,
        txid: 1,
    };
    assert_eq!(
        p.agent.on_punch(c, &forged, now),
        Err(PunchRefused::WrongPeer)
    );

    // The direct path goes dark while a packet is in flight: quiche's probe timeout fires
    // (real time: the pair's PTO is some 30 ms), and the silence is then watched.
    p.agent.send_ip(&mut buf.clone()).unwrap();
    pump_all(&mut p, false, now);
    assert_eq!(p.agent.direct_deadline(), None, "no probe timed out yet");
    std::thread::sleep(Duration::from_millis(150));
    p.agent.on_timeout();
    pump_all(&mut p, false, now);
    let dead_at = p.agent.direct_deadline().expect("silence is watched");
    assert!(dead_at <= std::time::Instant::now() + DIRECT_SILENCE);
    p.agent.on_direct_timeout(dead_at);
    assert_eq!(p.agent.path(), Path::Relay);
    assert_eq!(
        path_events(&mut p.agent),
        [
            TunnelEvent::DirectFailed(c),
            TunnelEvent::PathChanged(Path::Relay)
        ]
    );
    // The lost packet is the application's to resend; the next one arrives over the relay.
    p.agent.send_ip(&mut buf.clone()).unwrap();
    assert!(pump_all(&mut p, false, dead_at) > 0);
    let mut got = 0;
    while p.conn.recv_ip(&mut rx).is_some() {
        got += 1;
    }
    assert!(got >= 1);
    assert_eq!(p.conn.path(), Path::Relay);

    // The path comes back; the retry (30 s later) finds it again.
    let retry = p.agent.direct_deadline().expect("a retry is scheduled");
    assert!(retry >= dead_at + RETRY_AFTER);
    p.agent.on_direct_timeout(retry);
    pump_all(&mut p, true, retry);
    assert_eq!(
        p.agent.path(),
        Path::Direct(c),
        "{:?}",
        events(&mut p.agent)
    );
    // The connector follows with the agent's next packet on the path.
    p.agent.send_ip(&mut buf.clone()).unwrap();
    assert_eq!(pump_all(&mut p, true, retry), 0);
    assert!(p.conn.recv_ip(&mut rx).is_some());
    assert_eq!(p.conn.path(), Path::Direct(a));
    assert!(p.agent.is_up() && p.conn.is_up());
}

/// `stats()` counts what the connection carried and remembers when the path last changed.
#[test]
fn stats_count_traffic_and_path_switches() {
    let d = Dir::new("stats");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    let before = p.agent.stats();
    assert_eq!(before.up_at, None);
    pump(&mut p);
    let up = p.agent.stats();
    assert!(up.up_at.is_some());
    assert_eq!(up.path, Path::Relay);
    assert_eq!(up.path_changed_at, None, "never switched yet");
    assert!(up.rtt.is_some());
    assert!(up.bytes_sent > 0 && up.bytes_received > 0);
    assert!(up.packets_sent > 0 && up.packets_received > 0);

    let ip = [
        0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let mut buf = vec![0u8];
    buf.extend_from_slice(&ip);
    p.agent.send_ip(&mut buf).unwrap();
    pump(&mut p);
    let after = p.agent.stats();
    assert!(after.bytes_sent > up.bytes_sent);
    assert!(after.packets_sent > up.packets_sent);
    assert!(p.conn.stats().bytes_received >= after.bytes_sent - up.bytes_sent);

    let (a, c) = (A_LOCAL.parse().unwrap(), C_LOCAL.parse().unwrap());
    p.agent.probe_direct(a, c).unwrap();
    pump_paths(&mut p, true);
    let direct = p.agent.stats();
    assert_eq!(direct.path, Path::Direct(c));
    let switched = direct.path_changed_at.expect("switch to direct recorded");
    // The connector follows the agent's migration and records it too.
    assert!(p.conn.stats().path_changed_at.is_some());

    std::thread::sleep(std::time::Duration::from_millis(5));
    p.agent.use_relay().unwrap();
    let back = p.agent.stats();
    assert_eq!(back.path, Path::Relay);
    assert!(back.path_changed_at.expect("switch back recorded") > switched);
}

/// An ACK alone waits for a packet of ours to ride on (a reply), or for its short deadline;
/// never longer.
#[test]
fn an_ack_waits_for_the_answer_it_can_ride_on() {
    use sluice_dataplane::ack_hold::ACK_HOLD;
    let d = Dir::new("ackhold");
    let ca = identity::create_ca("acme", day()).unwrap();
    let agent = d.creds(
        &ca,
        &identity::issue(&ca, Role::Agent, "alice", &[], day()).unwrap(),
        "alice",
    );
    let conn = d.creds(
        &ca,
        &identity::issue(&ca, Role::Connector, "conn-1", &[], day()).unwrap(),
        "conn-1",
    );
    let mut p = pair(&agent, &conn, "conn-1", None);
    pump(&mut p);
    assert!(p.agent.is_up() && p.conn.is_up());
    // Let anything the handshake left (its held ACKs) go first.
    std::thread::sleep(ACK_HOLD);
    for t in [&mut p.agent, &mut p.conn] {
        if t.timeout() == Some(Duration::ZERO) {
            t.on_timeout();
        }
    }
    pump(&mut p);

    let ip = [
        0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let mut pkt = vec![0u8];
    pkt.extend_from_slice(&ip);
    let mut buf = vec![0u8; 2048];
    p.agent.send_ip(&mut pkt.clone()).unwrap();
    let (n, _) = p.agent.send(&mut buf).expect("the datagram goes at once");
    p.conn.recv_relayed(&mut buf[..n]);
    assert!(p.agent.send(&mut buf).is_none());

    // The connector holds the ACK, with a timer no later than the hold.
    assert!(p.conn.send(&mut buf).is_none(), "no ACK-only packet");
    assert!(p.conn.timeout().is_some_and(|t| t <= ACK_HOLD));

    // Its reply carries the ACK: one packet, not two.
    p.conn.send_ip(&mut pkt.clone()).unwrap();
    let (n, _) = p.conn.send(&mut buf).expect("the reply goes at once");
    assert!(p.conn.send(&mut buf).is_none(), "and nothing else");
    p.agent.recv_relayed(&mut buf[..n]);
    let mut rx = [0u8; 2048];
    assert!(p.agent.recv_ip(&mut rx).is_some());

    // Nothing to answer with on the agent's side: the ACK goes when its deadline passes.
    assert!(p.agent.send(&mut buf).is_none());
    std::thread::sleep(ACK_HOLD);
    assert_eq!(p.agent.timeout(), Some(Duration::ZERO));
    p.agent.on_timeout();
    let (n, _) = p
        .agent
        .send(&mut buf)
        .expect("the ACK goes at its deadline");
    assert!(
        n < sluice_dataplane::ack_hold::MIN_DATA_PACKET,
        "ACK-only: {n} bytes"
    );
    p.conn.recv_relayed(&mut buf[..n]);
    assert!(p.conn.send(&mut buf).is_none(), "an ACK is not answered");
    assert!(
        p.conn.timeout().is_none_or(|t| t > ACK_HOLD),
        "and arms no ACK timer"
    );
}

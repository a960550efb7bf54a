//! What the tunnel's packet path costs on the CPU, in memory (no sockets, no event loop): IP
//! packets through a [`Tunnel`] pair, and as the baseline measured in the same run, the same
//! packets as bare quiche DATAGRAMs between two connections with the same configuration.
//! The ratio is what Sluice's tunnel adds to quiche (framing, ACK holding, CoDel, identity and
//! path bookkeeping).
//!
//! - `bulk`: 32 IP packets of 1,280 bytes (the TUN device's default MTU) from agent to
//!   connector, then the connector's ACK back; throughput per core of the tunnel alone.
//! - `ping`: an 84-byte echo from agent to connector and its reply back, one QUIC packet each
//!   way, as a ping through the tunnel goes; what one exchange costs when the caches are warm
//!   (bench/README.md compares it with what a ping costs the running processes).
//!
//! Run: `cargo bench -p sluice-dataplane --bench tunnel -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_dataplane::identity::{self, PeerId, PemPair, Role};
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_dataplane::tunnel::{Tunnel, VirtualPaths};
use sluice_dataplane::wire::TUNNEL_IP_OVERHEAD;

const BULK_PACKETS: usize = 32;
const BULK_LEN: usize = 1280;
const PING_LEN: usize = 84;

/// The agent's and the connector's credentials from a fresh CA, written to a scratch directory
/// (credentials load from files, as the binaries do).
fn credentials() -> (Credentials, Credentials) {
    let dir: PathBuf = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let day = Duration::from_secs(86_400);
    let ca = identity::create_ca("bench", day).expect("CA");
    let load = |node: &PemPair, name: &str| {
        let path = |ext: &str| dir.join(format!("{name}.{ext}"));
        std::fs::write(path("pem"), &node.cert_pem).expect("write cert");
        std::fs::write(path("key"), &node.key_pem).expect("write key");
        std::fs::write(path("ca"), &ca.cert_pem).expect("write CA");
        let s = |ext: &str| path(ext).to_string_lossy().into_owned();
        Credentials::load(&s("pem"), &s("key"), &s("ca")).expect("load credentials")
    };
    let agent = identity::issue(&ca, Role::Agent, "alice", &[], day).expect("agent cert");
    let conn = identity::issue(&ca, Role::Connector, "conn-1", &[], day).expect("conn cert");
    let creds = (load(&agent, "alice"), load(&conn, "conn-1"));
    let _ = std::fs::remove_dir_all(&dir);
    creds
}

/// The agent's and the connector's QUIC configurations, and their peer ids.
struct Configs {
    agent: quiche::Config,
    conn: quiche::Config,
    agent_id: PeerId,
    conn_id: PeerId,
}

fn configs() -> Configs {
    let (agent, conn) = credentials();
    Configs {
        agent: tls::quic_config(&agent, &[Role::Connector], &QuicParams::tunnel())
            .expect("agent config"),
        conn: tls::quic_config(&conn, &[Role::Agent], &QuicParams::tunnel())
            .expect("connector config"),
        agent_id: agent.identity.peer_id,
        conn_id: conn.identity.peer_id,
    }
}

struct TunnelPair {
    agent: Tunnel,
    conn: Tunnel,
    wire: Vec<u8>,
    ip: Vec<u8>,
}

impl TunnelPair {
    fn new() -> Self {
        let mut cfg = configs();
        let mut paths = VirtualPaths::default();
        let (aid, cid) = (cfg.agent_id, cfg.conn_id);
        let agent =
            Tunnel::connect(&mut cfg.agent, cid, "conn-1", paths.addr_of(cid)).expect("connect");
        let conn = Tunnel::accept(&mut cfg.conn, aid, paths.addr_of(aid)).expect("accept");
        let mut p = TunnelPair {
            agent,
            conn,
            wire: vec![0; 2048],
            ip: vec![0; 2048],
        };
        for _ in 0..50 {
            p.carry_to_conn();
            p.carry_to_agent();
        }
        assert!(p.agent.is_up() && p.conn.is_up(), "tunnel handshake");
        p
    }

    /// Moves every packet the agent has to the connector; returns the IP bytes delivered.
    fn carry_to_conn(&mut self) -> usize {
        carry(
            &mut self.agent,
            &mut self.conn,
            &mut self.wire,
            &mut self.ip,
        )
    }

    fn carry_to_agent(&mut self) -> usize {
        carry(
            &mut self.conn,
            &mut self.agent,
            &mut self.wire,
            &mut self.ip,
        )
    }
}

/// Every packet `from` has goes into `to`, which gives up its IP packets: their bytes.
fn carry(from: &mut Tunnel, to: &mut Tunnel, wire: &mut [u8], ip: &mut [u8]) -> usize {
    while let Some((n, _)) = from.send(wire) {
        to.recv_relayed(&mut wire[..n]);
    }
    let mut got = 0;
    while let Some(r) = to.recv_ip(ip) {
        got += r.packet.len();
    }
    got
}

struct QuichePair {
    agent: quiche::Connection,
    conn: quiche::Connection,
    wire: Vec<u8>,
    ip: Vec<u8>,
}

const A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
const C: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2);

/// Every packet `from` has goes into `to`.
fn deliver(from: &mut quiche::Connection, to: &mut quiche::Connection, wire: &mut [u8]) {
    while let Ok((n, info)) = from.send(wire) {
        let recv = quiche::RecvInfo {
            from: info.from,
            to: info.to,
        };
        let _ = to.recv(&mut wire[..n], recv);
    }
}

fn drain(conn: &mut quiche::Connection, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while let Ok(n) = conn.dgram_recv(buf) {
        got += n - TUNNEL_IP_OVERHEAD;
    }
    got
}

impl QuichePair {
    fn new() -> Self {
        let mut cfg = configs();
        let scid = |b: u8| [b; quiche::MAX_CONN_ID_LEN];
        let (a, c) = (scid(1), scid(2));
        let agent = quiche::connect(
            None,
            &quiche::ConnectionId::from_ref(&a),
            A,
            C,
            &mut cfg.agent,
        )
        .expect("connect");
        let conn = quiche::accept(
            &quiche::ConnectionId::from_ref(&c),
            None,
            C,
            A,
            &mut cfg.conn,
        )
        .expect("accept");
        let mut p = QuichePair {
            agent,
            conn,
            wire: vec![0; 2048],
            ip: vec![0; 2048],
        };
        for _ in 0..50 {
            deliver(&mut p.agent, &mut p.conn, &mut p.wire);
            deliver(&mut p.conn, &mut p.agent, &mut p.wire);
        }
        assert!(
            p.agent.is_established() && p.conn.is_established(),
            "quiche handshake"
        );
        p
    }
}

/// An IP packet of `len` bytes behind the tunnel header's headroom, as the agent reads one
/// from the TUN device.
fn packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; TUNNEL_IP_OVERHEAD + len];
    p[TUNNEL_IP_OVERHEAD] = 0x45;
    p
}

fn bulk(c: &mut Criterion) {
    let mut g = c.benchmark_group("bulk");
    g.throughput(Throughput::Bytes((BULK_PACKETS * BULK_LEN) as u64));
    let mut pkt = packet(BULK_LEN);

    let mut q = QuichePair::new();
    g.bench_function("bare_quiche", |b| {
        b.iter(|| {
            for _ in 0..BULK_PACKETS {
                q.agent.dgram_send(&pkt).expect("dgram_send");
            }
            deliver(&mut q.agent, &mut q.conn, &mut q.wire);
            let got = drain(&mut q.conn, &mut q.ip);
            deliver(&mut q.conn, &mut q.agent, &mut q.wire);
            assert_eq!(got, BULK_PACKETS * BULK_LEN);
            black_box(got)
        })
    });

    let mut t = TunnelPair::new();
    g.bench_function("tunnel", |b| {
        b.iter(|| {
            for _ in 0..BULK_PACKETS {
                t.agent.send_ip(&mut pkt).expect("send_ip");
            }
            let got = t.carry_to_conn();
            t.carry_to_agent();
            assert_eq!(got, BULK_PACKETS * BULK_LEN);
            black_box(got)
        })
    });
    g.finish();
}

fn ping(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping");
    let mut echo = packet(PING_LEN);
    let mut reply = packet(PING_LEN);

    let mut q = QuichePair::new();
    g.bench_function("bare_quiche", |b| {
        b.iter(|| {
            q.agent.dgram_send(&echo).expect("dgram_send");
            deliver(&mut q.agent, &mut q.conn, &mut q.wire);
            let got = drain(&mut q.conn, &mut q.ip);
            q.conn.dgram_send(&reply).expect("dgram_send");
            deliver(&mut q.conn, &mut q.agent, &mut q.wire);
            let back = drain(&mut q.agent, &mut q.ip);
            assert_eq!((got, back), (PING_LEN, PING_LEN));
            black_box(back)
        })
    });

    let mut t = TunnelPair::new();
    g.bench_function("tunnel", |b| {
        b.iter(|| {
            t.agent.send_ip(&mut echo).expect("send_ip");
            let got = t.carry_to_conn();
            t.conn.send_ip(&mut reply).expect("send_ip");
            let back = t.carry_to_agent();
            assert_eq!((got, back), (PING_LEN, PING_LEN));
            black_box(back)
        })
    });
    g.finish();
}

criterion_group!(benches, bulk, ping);
criterion_main!(benches);

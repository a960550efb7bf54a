//! Writes the seed corpora, `fuzz/corpus/TARGET/seed-*`, from the test fixtures (configs/,
//! the policy tests' files, messages our own encoders build, DNS messages built with
//! hickory-proto) and, given `--pcap DIR`, from a lab capture (fuzz/capture-lab.sh makes one:
//! `agent-tun.pcap`, `agent-lo.pcap`, `relay.pcap`, `conn.pcap`).
//!
//! cargo run --profile bench -p sluice-fuzz-targets --example seeds [-- --pcap DIR]
//! (the bench profile: the release build without its minutes of link-time optimisation)
//!
//! Seeds are a starting point: scripts/fuzz.sh grows and minimises the corpora from them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use sluice_dataplane::connector_record::{ConnectorRecord, RecordDraft};
use sluice_dataplane::identity::PeerId;
use sluice_dataplane::nat::candidate::{Candidate, Kind};
use sluice_dataplane::packet;
use sluice_dataplane::revocation::{Draft, RevocationList};
use sluice_dataplane::wire::{self, ControlMessage, Punch};
use sluice_fuzz_targets::{fixtures, put_op};

struct Seeds {
    dir: PathBuf,
    written: BTreeMap<&'static str, usize>,
}

impl Seeds {
    fn add(&mut self, target: &'static str, label: &str, data: &[u8]) {
        let dir = self.dir.join(target);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        std::fs::write(dir.join(format!("seed-{label}")), data).expect("write seed");
        *self.written.entry(target).or_default() += 1;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let repo = fuzz.join("..");
    let mut s = Seeds {
        dir: fuzz.join("corpus"),
        written: BTreeMap::new(),
    };
    files(&mut s, &repo);
    messages(&mut s);
    dns(&mut s);
    packets(&mut s);
    revocation(&mut s);
    connector_records(&mut s);
    if let Some(i) = args.iter().position(|a| a == "--pcap") {
        let dir = PathBuf::from(args.get(i + 1).expect("--pcap DIR"));
        lab(&mut s, &dir);
    }
    for (t, n) in &s.written {
        println!("{t}: {n} seeds");
    }
}

/// The policy and config files the repository ships and tests with.
fn files(s: &mut Seeds, repo: &Path) {
    let mut policies = vec![repo.join("configs/policy.yaml")];
    for dir in ["policy/tests/fixtures", "policy/tests/fixtures/broken"] {
        if let Ok(rd) = std::fs::read_dir(repo.join(dir)) {
            policies.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    for p in policies
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let name = p.file_stem().unwrap_or_default().to_string_lossy();
        s.add("policy", &name, &std::fs::read(p).expect("policy file"));
    }
    s.add("policy", "fixture", fixtures::POLICY.as_bytes());
    for role in ["agent", "connector", "relay"] {
        let p = repo.join(format!("configs/{role}.yaml"));
        s.add("config", role, &std::fs::read(p).expect("config file"));
    }
}

fn framed(m: &ControlMessage) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut out).expect("encodes");
    out
}

/// Control and tunnel messages, datagram headers and punches, as our encoders write them.
fn messages(s: &mut Seeds) {
    let peer = PeerId([0x5c; 32]);
    let all = [
        (
            "hello",
            ControlMessage::Hello {
                software: "sluice 0.1.0".into(),
                instance: 0x0102_0304_0506_0708,
            },
        ),
        (
            "observed4",
            ControlMessage::ObservedAddr("192.0.2.10:40000".parse().expect("addr")),
        ),
        (
            "observed6",
            ControlMessage::ObservedAddr("[2001:db8::10]:40000".parse().expect("addr")),
        ),
        (
            "lookup",
            ControlMessage::Lookup {
                name: "lab-connector".into(),
            },
        ),
        (
            "lookup-reply",
            ControlMessage::LookupReply {
                name: "lab-connector".into(),
                peer: Some(peer),
            },
        ),
        (
            "lookup-miss",
            ControlMessage::LookupReply {
                name: "nobody".into(),
                peer: None,
            },
        ),
        (
            "dns-query",
            ControlMessage::DnsQuery {
                id: 7,
                message: query("wiki.corp.internal.", RecordType::MX, false),
            },
        ),
        (
            "dns-answer",
            ControlMessage::DnsAnswer {
                id: 7,
                message: query("wiki.corp.internal.", RecordType::TXT, true),
            },
        ),
        (
            "candidates",
            ControlMessage::Candidates {
                generation: 3,
                secret: 0x0123_4567_89ab_cdef,
                list: vec![
                    Candidate {
                        kind: Kind::Host,
                        addr: "192.0.2.10:40000".parse().expect("addr"),
                        priority: 2_130_706_431,
                    },
                    Candidate {
                        kind: Kind::ServerReflexive,
                        addr: "[2001:db8::10]:40000".parse().expect("addr"),
                        priority: 1_694_498_815,
                    },
                ],
            },
        ),
        (
            "revocations",
            ControlMessage::Revocations(revocation_list(2)),
        ),
    ];
    let mut relay_stream = Vec::new();
    let mut tunnel_stream = Vec::new();
    for (label, m) in &all {
        let f = framed(m);
        s.add("control_message", label, &f[2..]);
        if matches!(
            m,
            ControlMessage::Hello { .. } | ControlMessage::Lookup { .. }
        ) {
            relay_stream.extend_from_slice(&f);
        } else {
            tunnel_stream.extend_from_slice(&f);
        }
    }
    // [mode][piece size][stream]: a relay's stream whole, a tunnel's in small pieces.
    let with = |mode: u8, chunk: u8, b: &[u8]| [&[mode, chunk][..], b].concat();
    s.add("control_stream", "relay", &with(0, 255, &relay_stream));
    s.add("control_stream", "tunnel", &with(1, 7, &tunnel_stream));

    // The relay's clients: the agent (even tags) and the connector (odd), each saying hello,
    // the agent looking the connector up, both forwarding to the other, timers, a close.
    let mut r = Vec::new();
    let hello = |i| {
        framed(&ControlMessage::Hello {
            software: "sluice 0.1.0".into(),
            instance: i,
        })
    };
    put_op(&mut r, 2 << 1 | 1, &hello(2));
    put_op(&mut r, 2 << 1, &hello(1));
    put_op(
        &mut r,
        2 << 1,
        &framed(&ControlMessage::Lookup {
            name: "lab-connector".into(),
        }),
    );
    put_op(&mut r, 6 << 1, b"\x40end-to-end QUIC, opaque to the relay");
    put_op(&mut r, 6 << 1 | 1, b"\x40and back");
    put_op(&mut r, 3 << 1, &[wire::DGRAM_RELAY_FORWARD; 40]);
    put_op(&mut r, 4 << 1, b"");
    put_op(&mut r, 5 << 1 | 1, b"");
    put_op(&mut r, 2 << 1 | 1, &hello(3));
    s.add("relay", "clients", &r);
    let mut r = Vec::new();
    put_op(&mut r, 2 << 1, &[0xff, 0xff, 0x24]);
    s.add("relay", "bad-frame", &r);

    let ip = udp4([100, 96, 0, 1], [198, 51, 100, 10], 5000, 7, b"hello");
    s.add(
        "datagram",
        "tunnel-ip",
        &[&[wire::DGRAM_TUNNEL_IP][..], &ip].concat(),
    );
    let name = "wiki.corp.internal";
    let mut b = vec![0u8; wire::named_ip_overhead(name) + ip.len()];
    wire::put_named_ip_header(&mut b, name).expect("header");
    b[wire::named_ip_overhead(name)..].copy_from_slice(&ip);
    s.add("datagram", "named-ip", &b);
    let mut b = vec![0u8; wire::RELAY_FORWARD_OVERHEAD + 40];
    wire::put_relay_forward_header(&mut b, &peer);
    b[wire::RELAY_FORWARD_OVERHEAD] = 0x40;
    s.add("datagram", "relay-forward", &b);

    for ack in [false, true] {
        let p = Punch {
            ack,
            to: PeerId([1; 32]),
            from: PeerId([2; 32]),
            secret: 0x0123_4567_89ab_cdef,
            txid: 42,
        };
        s.add("punch", if ack { "ack" } else { "punch" }, &p.encode());
    }
}

fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x5c1c;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).expect("name"), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.edns = Some(e);
    }
    m.to_vec().expect("encodes")
}

/// DNS queries of every kind the agent tells apart: resource names (A, AAAA, the records the
/// connector resolves, HTTPS), other names (forwarded), and messages that are no query.
fn dns(s: &mut Seeds) {
    let cases = [
        ("wiki-a", "wiki.corp.internal.", RecordType::A, false),
        ("wiki-aaaa", "wiki.corp.internal.", RecordType::AAAA, true),
        ("wiki-mx", "wiki.corp.internal.", RecordType::MX, false),
        (
            "wiki-https",
            "wiki.corp.internal.",
            RecordType::HTTPS,
            false,
        ),
        ("wiki-upper", "WIKI.Corp.Internal.", RecordType::A, false),
        ("secret-txt", "secret.corp.internal.", RecordType::TXT, true),
        ("www-a", "www.example.test.", RecordType::A, false),
        ("root-ns", ".", RecordType::NS, false),
    ];
    let mut tun = Vec::new();
    for (label, name, t, edns) in cases {
        let q = query(name, t, edns);
        s.add("dns", label, &q);
        put_op(
            &mut tun,
            0,
            &udp4([100, 96, 0, 1], [100, 96, 0, 1], 40001, 53, &q),
        );
        put_op(&mut tun, 2, &q);
    }
    let mut m = Message::query();
    m.metadata.message_type = MessageType::Response;
    m.metadata.op_code = OpCode::Status;
    s.add("dns", "status-response", &m.to_vec().expect("encodes"));
    s.add(
        "dns",
        "header-only",
        &[0x12, 0x34, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    s.add("engine_device", "dns-queries", &tun);
}

fn udp4(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let (a, b) = (SocketAddr::from((src, sp)), SocketAddr::from((dst, dp)));
    packet::udp_packet(a, b, payload).expect("packet")
}

/// IP packets an app sends: TCP to an allowed and a denied port, UDP, pings, IPv6.
fn packets(s: &mut Seeds) {
    use build::*;
    let syn = tcp4_syn([100, 96, 0, 1], [198, 51, 100, 10], 41000, 80);
    let denied = tcp4_syn([100, 96, 0, 1], [198, 51, 100, 99], 41001, 22);
    let ping = icmp4_echo([100, 96, 0, 1], [198, 51, 100, 10]);
    let udp = udp4([100, 96, 0, 1], [198, 51, 100, 10], 41002, 5353, b"ping");
    let v6 = packet::udp_packet(
        "[fd5c:1ce0:1::1]:41003".parse().expect("a"),
        "[fd00:5c1c:5c::10]:7".parse().expect("b"),
        b"six",
    )
    .expect("v6");
    let big = udp4([100, 96, 0, 1], [198, 51, 100, 10], 41004, 9, &[0x55; 1400]);
    for (label, p) in [
        ("syn", &syn),
        ("denied", &denied),
        ("ping", &ping),
        ("udp", &udp),
        ("udp6", &v6),
        ("big", &big),
    ] {
        s.add("packet", label, p);
    }
    let mut e = Vec::new();
    for p in [&syn, &denied, &ping, &udp, &v6, &big] {
        put_op(&mut e, 0, p);
    }
    put_op(&mut e, 1, &[0x13, 0x88]);
    put_op(&mut e, 0, &syn);
    s.add("engine_device", "flows", &e);
    // The terminator: dials accepted, a TCP handshake, data, the service's answer and EOF.
    let mut t = vec![0];
    put_op(&mut t, 0, &syn);
    put_op(&mut t, 0, &ping);
    put_op(&mut t, 0, &udp);
    put_op(&mut t, 0, &v6);
    put_op(&mut t, 4, b"from the service");
    put_op(&mut t, 3, b"HTTP/1.0 200 OK\r\n\r\n");
    put_op(&mut t, 5, b"");
    put_op(&mut t, 2, &[0x10, 0x00]);
    put_op(&mut t, 7, b"");
    s.add("terminator", "flows", &t);
    let mut t = vec![1];
    let mut named = vec![18];
    named.extend_from_slice(b"wiki.corp.internal");
    named.extend_from_slice(&tcp4_syn([100, 96, 0, 1], [198, 18, 0, 1], 41005, 443));
    put_op(&mut t, 1, &named);
    s.add("terminator", "named-refused", &t);
}

/// Packets the dataplane has no builder for, written out by hand.
mod build {
    /// A TCP SYN (with an MSS option, as a kernel sends it).
    pub fn tcp4_syn(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        let mut t = vec![0u8; 24];
        t[0..2].copy_from_slice(&sp.to_be_bytes());
        t[2..4].copy_from_slice(&dp.to_be_bytes());
        t[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
        t[12] = 6 << 4;
        t[13] = 0x02;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t[20..24].copy_from_slice(&[2, 4, 0x05, 0x10]);
        ip4(src, dst, 6, &t, Some(12..20))
    }

    /// An ICMP echo request, id 0x5c1c, seq 1.
    pub fn icmp4_echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut i = vec![8, 0, 0, 0, 0x5c, 0x1c, 0, 1];
        i.extend_from_slice(b"abcdefgh");
        let c = checksum(&i, 0);
        i[2..4].copy_from_slice(&c.to_be_bytes());
        ip4(src, dst, 1, &i, None)
    }

    /// An IPv4 packet around `payload`; `tcp` says where a TCP checksum goes (offset 16 of
    /// the segment) with the pseudo-header.
    fn ip4(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        payload: &[u8],
        tcp: Option<std::ops::Range<usize>>,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        let len = (20 + payload.len()) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = checksum(&p, 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut seg = payload.to_vec();
        if tcp.is_some() {
            let mut pseudo = 0u32;
            for w in [src, dst] {
                pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
                pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
            }
            pseudo += u32::from(proto) + seg.len() as u32;
            let c = checksum(&seg, pseudo);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
        }
        p.extend_from_slice(&seg);
        p
    }

    fn checksum(b: &[u8], start: u32) -> u16 {
        let mut sum = start;
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

fn revocation_list(peers: u8) -> Vec<u8> {
    let f = fixtures::get();
    let draft = Draft {
        sequence: 3,
        issued_at: 1_800_000_000,
        expires_at: 1_800_086_400,
        peers: (0..peers).map(|i| PeerId([i; 32])).collect(),
        names: ["lab-agent".to_string(), "mallory".to_string()].into(),
    };
    RevocationList::sign(&draft, &f.ca.cert_pem, &f.ca.key_pem)
        .expect("signs")
        .encoded()
        .to_vec()
}

fn revocation(s: &mut Seeds) {
    s.add("revocation", "two-peers", &revocation_list(2));
    s.add("revocation", "empty", &revocation_list(0));
}

fn connector_records(s: &mut Seeds) {
    let f = fixtures::get();
    for (label, relay, sequence) in [
        ("home-a", "relay-a", 1),
        ("home-b", "relay-eu-2.example", 1_800_000_000_000_000),
    ] {
        let draft = RecordDraft {
            name: f.connector.identity.name.clone(),
            home_relay: relay.into(),
            sequence,
            // Far ahead: the seed verifies for as long as the fixtures' certificates do.
            expires_at: 4_000_000_000,
        };
        let rec = ConnectorRecord::sign(&draft, &f.connector).expect("signs");
        s.add("connector_record", label, rec.encoded());
    }
}

/// Packets from a lab capture (fuzz/capture-lab.sh).
fn lab(s: &mut Seeds, dir: &Path) {
    // The agent's TUN: what apps sent into the tunnel, and what came back.
    let tun = read_pcap(&dir.join("agent-tun.pcap"));
    let mut flows: BTreeMap<(u8, u16), Vec<u8>> = BTreeMap::new();
    let mut to_conn = Vec::new();
    for (i, p) in tun.iter().enumerate() {
        s.add("packet", &format!("lab-tun-{i:03}"), p);
        let Ok(info) = packet::inspect(p) else {
            continue;
        };
        // One engine seed per flow (by protocol and the app's port), in order.
        let key = (info.proto, info.src_port);
        let from_app = match info.src {
            std::net::IpAddr::V4(a) => a.octets()[..2] == [100, 96],
            std::net::IpAddr::V6(a) => a.segments()[..2] == [0xfd5c, 0x1ce0],
        };
        if from_app {
            put_op(flows.entry(key).or_default(), 0, p);
            put_op(&mut to_conn, 0, p);
        }
    }
    for ((proto, port), ops) in &flows {
        s.add("engine_device", &format!("lab-flow-{proto}-{port}"), ops);
    }
    if !to_conn.is_empty() {
        let t = [&[0u8][..], &to_conn].concat();
        s.add("terminator", "lab-agent-packets", &t);
    }
    // DNS the apps asked the agent (over loopback in the lab: the agent's address is its own).
    let mut dns_ops = Vec::new();
    for (i, p) in read_pcap(&dir.join("agent-lo.pcap")).iter().enumerate() {
        let Ok(info) = packet::inspect(p) else {
            continue;
        };
        if info.proto == packet::PROTO_UDP && info.dst_port == 53 {
            s.add("dns", &format!("lab-query-{i:03}"), info.payload(p));
            put_op(&mut dns_ops, 0, p);
        }
    }
    if !dns_ops.is_empty() {
        s.add("engine_device", "lab-dns", &dns_ops);
    }
    // The relay's socket: every datagram a client sent it, one seed per client, in order.
    let mut by_src: BTreeMap<(Vec<u8>, u16), Vec<u8>> = BTreeMap::new();
    for p in read_pcap(&dir.join("relay.pcap")) {
        let Ok(info) = packet::inspect(&p) else {
            continue;
        };
        if info.proto == packet::PROTO_UDP && info.dst_port == 4433 {
            let src = (info.src.to_string().into_bytes(), info.src_port);
            put_op(by_src.entry(src).or_default(), 0, info.payload(&p));
        }
    }
    for (i, ops) in by_src.values().enumerate() {
        s.add("relay", &format!("lab-client-{i}"), ops);
    }
    // The connector's socket: punches on the direct path.
    for (i, p) in read_pcap(&dir.join("conn.pcap")).iter().enumerate() {
        let Ok(info) = packet::inspect(p) else {
            continue;
        };
        let payload = info.payload(p);
        if info.proto == packet::PROTO_UDP && Punch::is_punch(payload) {
            s.add("punch", &format!("lab-{i:03}"), payload);
        }
    }
}

/// The IP packets of a pcap file (link types: Ethernet, raw IP, Linux cooked v1 and v2).
fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let Ok(b) = std::fs::read(path) else {
        eprintln!("seeds: no {}", path.display());
        return Vec::new();
    };
    if b.len() < 24 {
        return Vec::new();
    }
    let le = b[..4] == [0xd4, 0xc3, 0xb2, 0xa1] || b[..4] == [0x4d, 0x3c, 0xb2, 0xa1];
    let u32_at = |i: usize| {
        let w = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let link = u32_at(20);
    let strip = match link {
        1 => 14,
        101 | 12 | 228 | 229 => 0,
        113 => 16,
        276 => 20,
        _ => {
            eprintln!("seeds: {}: link type {link} not read", path.display());
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    let mut i = 24;
    while i + 16 <= b.len() {
        let caplen = u32_at(i + 8) as usize;
        let start = i + 16;
        let Some(frame) = b.get(start..start + caplen) else {
            break;
        };
        if let Some(p) = frame.get(strip..) {
            if !p.is_empty() {
                out.push(p.to_vec());
            }
        }
        i = start + caplen;
    }
    out
}

//! The lab's NAT routers and the probe that measures them.
//!
//! With `--nat-agent TYPE` (or `--nat-connector TYPE`) that side's namespace leaves the bridge:
//! it gets a LAN veth to a router namespace whose WAN port sits on the bridge instead.
//!
//! ```text
//!   {p}agent eth0 10.0.1.10/24 ── lan 10.0.1.1/24 {p}nat-agent wan 192.0.2.11/24 ── br0
//!   {p}conn  eth0 10.0.2.20/24 ── lan 10.0.2.1/24 {p}nat-conn  wan 192.0.2.21/24 ── br0
//! ```
//!
//! The NAT itself is an nftables ruleset in the router namespace (see [`ruleset`]). The probe
//! ([`probe`]) measures what a router really does in RFC 4787 terms: a responder in `{p}relay`
//! on 192.0.2.1 and 192.0.2.2 echoes the source address it saw, and can answer from another of
//! its addresses; a client inside the NATed namespace queries it from one socket.
//! docs/lab.md documents the recipes and the measured results.

use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::lab::{self, Lab};

/// What a side's router does (`none`: no router, the namespace sits on the bridge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatType {
    #[default]
    None,
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
}

impl NatType {
    pub fn as_str(self) -> &'static str {
        match self {
            NatType::None => "none",
            NatType::FullCone => "full-cone",
            NatType::AddressRestricted => "address-restricted",
            NatType::PortRestricted => "port-restricted",
            NatType::Symmetric => "symmetric",
        }
    }

    /// The RFC 4787 behaviour this type stands for: (mapping, filtering).
    pub fn expected(self) -> (Dependence, Dependence) {
        use Dependence::*;
        match self {
            NatType::None | NatType::FullCone => (EndpointIndependent, EndpointIndependent),
            NatType::AddressRestricted => (EndpointIndependent, AddressDependent),
            NatType::PortRestricted => (EndpointIndependent, AddressAndPortDependent),
            NatType::Symmetric => (AddressAndPortDependent, AddressAndPortDependent),
        }
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lab's NAT configuration, kept in DIR/nat.yaml so `status` and `nat-probe` know it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatConfig {
    pub agent: NatType,
    pub connector: NatType,
}

pub const NAT_FILE: &str = "nat.yaml";

impl NatConfig {
    pub fn of(&self, side: Side) -> NatType {
        match side {
            Side::Agent => self.agent,
            Side::Connector => self.connector,
        }
    }

    pub fn write(&self, lab: &Lab) -> Result<()> {
        let p = lab.dir.join(NAT_FILE);
        let text = format!(
            "# Written by `sluice lab up`: the NAT type of each side.\n{}",
            serde_yaml::to_string(self)?
        );
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    }

    /// None when the lab has no such file (not up, or made before NAT routers existed).
    pub fn read(lab: &Lab) -> Option<NatConfig> {
        let text = fs::read_to_string(lab.dir.join(NAT_FILE)).ok()?;
        serde_yaml::from_str(&text).ok()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Side {
    Agent,
    Connector,
}

pub const SIDES: [Side; 2] = [Side::Agent, Side::Connector];

/// Where one side lives, with and without its router.
pub struct Site {
    /// The side's own namespace (short name).
    pub inside: &'static str,
    /// The router's namespace (short name).
    pub router: &'static str,
    /// The veth end on the bridge in `{p}inet` (the side's uplink, router or not).
    pub bridge_port: &'static str,
    /// The side's address on the bridge when it has no router.
    pub direct: &'static str,
    /// Behind a router: the side's LAN address, the router's LAN and WAN addresses.
    pub host: &'static str,
    pub gateway: &'static str,
    pub wan: &'static str,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Agent => "agent",
            Side::Connector => "connector",
        }
    }

    pub fn site(self) -> Site {
        match self {
            Side::Agent => Site {
                inside: "agent",
                router: "nat-agent",
                bridge_port: "agent",
                direct: lab::AGENT_ADDR,
                host: "10.0.1.10",
                gateway: "10.0.1.1",
                wan: "192.0.2.11",
            },
            Side::Connector => Site {
                inside: "conn",
                router: "nat-conn",
                bridge_port: "conn",
                direct: lab::CONN_ADDR,
                host: "10.0.2.20",
                gateway: "10.0.2.1",
                wan: "192.0.2.21",
            },
        }
    }
}

/// Puts `side`'s namespace behind a new router namespace of type `nat` (not `none`).
pub fn build_router(lab: &Lab, side: Side, nat: NatType) -> Result<()> {
    let s = side.site();
    let inet = lab.ns("inet");
    let router = lab.ns(s.router);
    let inside = lab.ns(s.inside);
    // WAN: the router takes the side's place on the bridge.
    lab::ipn(
        &router,
        &[
            "link",
            "add",
            "wan",
            "type",
            "veth",
            "peer",
            "name",
            s.bridge_port,
            "netns",
            &inet,
        ],
    )?;
    lab::ipn(
        &inet,
        &["link", "set", s.bridge_port, "master", "br0", "up"],
    )?;
    lab::ipn(
        &router,
        &["addr", "add", &format!("{}/24", s.wan), "dev", "wan"],
    )?;
    lab::ipn(&router, &["link", "set", "wan", "up"])?;
    // LAN: the side keeps its interface name eth0, now with a private address.
    lab::ipn(
        &inside,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "lan", "netns", &router,
        ],
    )?;
    lab::ipn(
        &router,
        &["addr", "add", &format!("{}/24", s.gateway), "dev", "lan"],
    )?;
    lab::ipn(&router, &["link", "set", "lan", "up"])?;
    lab::ipn(
        &inside,
        &["addr", "add", &format!("{}/24", s.host), "dev", "eth0"],
    )?;
    lab::ipn(&inside, &["link", "set", "eth0", "up"])?;
    lab::ipn(&inside, &["route", "add", "default", "via", s.gateway])?;
    lab::sysctl(&router, "net.ipv4.ip_forward", "1")?;
    // Kept in DIR: the exact rules each router runs, for whoever wonders what it does.
    let file = lab.dir.join(format!("{}.nft", s.router));
    fs::write(&file, ruleset(nat, s.host))
        .with_context(|| format!("cannot write {}", file.display()))?;
    lab::run(
        "ip",
        &[
            "netns",
            "exec",
            &router,
            "nft",
            "-f",
            &file.to_string_lossy(),
        ],
    )
    .context("loading the NAT ruleset (is nftables installed?)")
}

/// The nftables ruleset of a router of type `nat` in front of `host`.
///
/// Every type: outbound traffic is masqueraded to the WAN address; inbound traffic that belongs
/// to a connection conntrack already knows is let through; the router itself answers nothing
/// on the WAN (silently, like a home router, and so that an unsolicited packet never leaves a
/// conntrack entry that would steal the port of a later outbound mapping).
/// - full-cone: every inbound UDP packet is DNATed to the host, same port (Linux keeps the
///   source port when masquerading a single host, so WAN port X is the host's port X).
/// - address-restricted: the same DNAT, but let through only from an address the host's port
///   has sent to (a dynamic set of remote address . inside port, refreshed by every outbound
///   packet, 120 s like conntrack's UDP stream timeout).
/// - port-restricted: nothing but masquerade and conntrack.
/// - symmetric: masquerade with fully random ports, so each destination gets its own mapping.
pub fn ruleset(nat: NatType, host: &str) -> String {
    let dnat = matches!(nat, NatType::FullCone | NatType::AddressRestricted);
    let mut r = format!(
        "# Written by `sluice lab up`: NAT type {nat}, in front of {host}.\ntable ip sluice_nat {{\n"
    );
    if nat == NatType::AddressRestricted {
        r.push_str(
            "    set contacted {\n        type ipv4_addr . inet_service\n        flags dynamic,timeout\n        timeout 120s\n    }\n",
        );
    }
    if dnat {
        r.push_str(&format!(
            "    chain prerouting {{\n        type nat hook prerouting priority dstnat; policy accept;\n        iifname \"wan\" meta l4proto udp dnat to {host}\n    }}\n"
        ));
    }
    let masquerade = if nat == NatType::Symmetric {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    r.push_str(&format!(
        "    chain postrouting {{\n        type nat hook postrouting priority srcnat; policy accept;\n        oifname \"wan\" {masquerade}\n    }}\n"
    ));
    r.push_str(
        "    chain input {\n        type filter hook input priority filter; policy accept;\n        iifname \"wan\" ct state established,related accept\n        iifname \"wan\" drop\n    }\n",
    );
    r.push_str(
        "    chain forward {\n        type filter hook forward priority filter; policy drop;\n",
    );
    if nat == NatType::AddressRestricted {
        r.push_str(
            "        iifname \"lan\" oifname \"wan\" meta l4proto udp update @contacted { ip daddr . udp sport }\n",
        );
    }
    r.push_str("        iifname \"lan\" oifname \"wan\" accept\n");
    r.push_str("        iifname \"wan\" oifname \"lan\" ct state established,related accept\n");
    match nat {
        NatType::FullCone => {
            r.push_str("        iifname \"wan\" oifname \"lan\" ct status dnat accept\n")
        }
        NatType::AddressRestricted => r.push_str(
            "        iifname \"wan\" oifname \"lan\" ct status dnat ip saddr . udp dport @contacted accept\n",
        ),
        _ => {}
    }
    r.push_str("    }\n}\n");
    r
}

// ---------------------------------------------------------------------------------------------
// The probe

/// RFC 4787's three degrees of dependence, for mapping (§4.1) and filtering (§5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dependence {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl Dependence {
    pub fn as_str(self) -> &'static str {
        match self {
            Dependence::EndpointIndependent => "endpoint-independent",
            Dependence::AddressDependent => "address-dependent",
            Dependence::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

impl fmt::Display for Dependence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The responder's addresses on the internet segment: the relay's own (`lab::RELAY_ADDR`) and
/// a second one the lab adds to the relay host for the probe.
const PROBE_ADDR_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PROBE_ADDR_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PROBE_PORTS: [u16; 2] = [3478, 3479];

/// The responder's endpoints, by index: (A,p1), (A,p2), (B,p1).
fn endpoints() -> [SocketAddrV4; 3] {
    [
        SocketAddrV4::new(PROBE_ADDR_A, PROBE_PORTS[0]),
        SocketAddrV4::new(PROBE_ADDR_A, PROBE_PORTS[1]),
        SocketAddrV4::new(PROBE_ADDR_B, PROBE_PORTS[0]),
    ]
}
const A1: usize = 0;
const A2: usize = 1;
const B1: usize = 2;

/// What the client saw: the input of the classification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observations {
    /// The client socket's own address.
    pub local: SocketAddrV4,
    /// The source address each responder endpoint saw, indexed like [`endpoints`].
    pub seen: [SocketAddrV4; 3],
    /// Whether an answer from (A,p2) and from (B,p1) got in before the client had sent to them
    /// (asked for through (A,p1)).
    pub unsolicited_a2: bool,
    pub unsolicited_b1: bool,
}

/// Mapping behaviour from the addresses seen by (A,p1), (A,p2), (B,p1) for one socket.
/// The categories nest, so the finest dependence shown wins: a new mapping for another port of
/// the same address is port dependence, whatever (B,p1) saw.
pub fn classify_mapping(a1: SocketAddrV4, a2: SocketAddrV4, b1: SocketAddrV4) -> Dependence {
    if a1 != a2 {
        Dependence::AddressAndPortDependent
    } else if a1 != b1 {
        Dependence::AddressDependent
    } else {
        Dependence::EndpointIndependent
    }
}

/// Filtering behaviour from which unsolicited answers got in: one from an address never
/// contacted means no filtering by address; one from a contacted address but another port means
/// filtering by address only.
pub fn classify_filtering(from_a2: bool, from_b1: bool) -> Dependence {
    if from_b1 {
        Dependence::EndpointIndependent
    } else if from_a2 {
        Dependence::AddressDependent
    } else {
        Dependence::AddressAndPortDependent
    }
}

/// Wire format, request: "SLNP" 1 id:u32 via:u8; reply: "SLNP" 2 id:u32 ip:[u8;4] port:u16.
/// `via` is the index of the responder endpoint to answer from, or [`VIA_SAME`].
const MAGIC: &[u8; 4] = b"SLNP";
const VIA_SAME: u8 = 0xff;

fn encode_request(id: u32, via: u8) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..4].copy_from_slice(MAGIC);
    b[4] = 1;
    b[5..9].copy_from_slice(&id.to_be_bytes());
    b[9] = via;
    b
}

fn decode_request(b: &[u8]) -> Option<(u32, u8)> {
    if b.len() != 10 || &b[..4] != MAGIC || b[4] != 1 {
        return None;
    }
    Some((u32::from_be_bytes([b[5], b[6], b[7], b[8]]), b[9]))
}

fn encode_reply(id: u32, seen: SocketAddrV4) -> [u8; 15] {
    let mut b = [0u8; 15];
    b[..4].copy_from_slice(MAGIC);
    b[4] = 2;
    b[5..9].copy_from_slice(&id.to_be_bytes());
    b[9..13].copy_from_slice(&seen.ip().octets());
    b[13..15].copy_from_slice(&seen.port().to_be_bytes());
    b
}

fn decode_reply(b: &[u8]) -> Option<(u32, SocketAddrV4)> {
    if b.len() != 15 || &b[..4] != MAGIC || b[4] != 2 {
        return None;
    }
    let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
    let ip = Ipv4Addr::new(b[9], b[10], b[11], b[12]);
    Some((
        id,
        SocketAddrV4::new(ip, u16::from_be_bytes([b[13], b[14]])),
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot enter namespace {ns}: {source}")]
    Netns { ns: String, source: io::Error },
    #[error("UDP socket on {addr}: {source}")]
    Socket { addr: String, source: io::Error },
    #[error("no answer from the probe responder at {0} (is the lab up?)")]
    NoAnswer(SocketAddrV4),
    #[error("a probe thread panicked")]
    Panicked,
}

/// Starts `f` on a thread that has entered network namespace `ns`; its sockets live there.
fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, ProbeError> + Send + 'static,
) -> JoinHandle<Result<T, ProbeError>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let enter = || -> io::Result<()> {
            let fd = fs::File::open(format!("/run/netns/{ns}"))?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        };
        enter().map_err(|source| ProbeError::Netns { ns, source })?;
        f()
    })
}

fn join<T>(h: JoinHandle<Result<T, ProbeError>>) -> Result<T, ProbeError> {
    h.join().map_err(|_| ProbeError::Panicked)?
}

/// The responder: one socket per endpoint in the relay's namespace, each on its own thread,
/// until dropped.
struct Responder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Responder {
    fn start(relay_ns: &str) -> Result<Responder, ProbeError> {
        let socks = join(spawn_in_netns(relay_ns, || {
            endpoints()
                .iter()
                .map(|&e| {
                    let sock_err = |source| ProbeError::Socket {
                        addr: e.to_string(),
                        source,
                    };
                    let s = UdpSocket::bind(e).map_err(sock_err)?;
                    // Short, so the threads notice the stop flag promptly.
                    s.set_read_timeout(Some(Duration::from_millis(50)))
                        .map_err(sock_err)?;
                    Ok(s)
                })
                .collect::<Result<Vec<_>, _>>()
        }))?;
        let socks = Arc::new(socks);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..socks.len())
            .map(|i| {
                let (socks, stop) = (socks.clone(), stop.clone());
                std::thread::spawn(move || respond(&socks, i, &stop))
            })
            .collect();
        Ok(Responder { stop, threads })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn respond(socks: &[UdpSocket], i: usize, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        // Errors are the read timeout (to look at the stop flag) or a stray ICMP error.
        let Ok((n, from)) = socks[i].recv_from(&mut buf) else {
            continue;
        };
        let (Some((id, via)), SocketAddr::V4(from)) = (decode_request(&buf[..n]), from) else {
            continue;
        };
        let out = if via == VIA_SAME {
            &socks[i]
        } else {
            match socks.get(usize::from(via)) {
                Some(s) => s,
                None => continue,
            }
        };
        let _ = out.send_to(&encode_reply(id, from), from);
    }
}

/// How long the client waits for answers, and how often it asks. In the lab's namespaces an
/// answer takes well under a millisecond; a missing one is filtering, not loss.
const REPLY_WAIT: Duration = Duration::from_millis(250);
const ATTEMPTS: u32 = 2;

/// One question to the responder: send to endpoint `to`, ask for the answer from `via`.
#[derive(Clone, Copy)]
struct Query {
    to: usize,
    via: Option<usize>,
}

/// The client's socket and its questions.
struct Client {
    sock: UdpSocket,
    next_id: u32,
}

fn client_err(source: io::Error) -> ProbeError {
    ProbeError::Socket {
        addr: "the client's".into(),
        source,
    }
}

impl Client {
    /// Asks every query (again, up to [`ATTEMPTS`] times, for those not answered yet) and
    /// returns what each answer said, None for no answer.
    fn ask(&mut self, queries: &[Query]) -> Result<Vec<Option<SocketAddrV4>>, ProbeError> {
        let ep = endpoints();
        let base = self.next_id;
        self.next_id += queries.len() as u32;
        let mut got: Vec<Option<SocketAddrV4>> = vec![None; queries.len()];
        let mut buf = [0u8; 64];
        for _ in 0..ATTEMPTS {
            for (i, q) in queries.iter().enumerate() {
                if got[i].is_none() {
                    let via = q.via.map_or(VIA_SAME, |v| v as u8);
                    self.sock
                        .send_to(&encode_request(base + i as u32, via), ep[q.to])
                        .map_err(client_err)?;
                }
            }
            let deadline = Instant::now() + REPLY_WAIT;
            while got.iter().any(Option::is_none) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                self.sock.set_read_timeout(Some(left)).map_err(client_err)?;
                let (n, from) = match self.sock.recv_from(&mut buf) {
                    Ok((n, SocketAddr::V4(from))) => (n, from),
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(client_err(e)),
                };
                // Only an answer to this round's question, from the endpoint asked to send it.
                let Some((id, seen)) = decode_reply(&buf[..n]) else {
                    continue;
                };
                let Some(i) = id.checked_sub(base).map(|i| i as usize) else {
                    continue;
                };
                if let Some(q) = queries.get(i) {
                    if from == ep[q.via.unwrap_or(q.to)] {
                        got[i] = Some(seen);
                    }
                }
            }
            if got.iter().all(Option::is_some) {
                break;
            }
        }
        Ok(got)
    }

    fn must(&mut self, to: usize) -> Result<SocketAddrV4, ProbeError> {
        self.ask(&[Query { to, via: None }])?[0].ok_or(ProbeError::NoAnswer(endpoints()[to]))
    }
}

/// The client, in the NATed namespace: one socket for every query.
fn client() -> Result<Observations, ProbeError> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(client_err)?;
    // The address the NAT sees the socket at: the source address routing picks (the socket,
    // bound to 0.0.0.0, does not know it), learnt by connecting a throwaway socket.
    let local_ip = {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(client_err)?;
        s.connect(endpoints()[A1]).map_err(client_err)?;
        match s.local_addr().map_err(client_err)? {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        }
    };
    let port = sock.local_addr().map_err(client_err)?.port();
    let mut c = Client { sock, next_id: 1 };
    // Filtering first, while the socket has sent to (A,p1) only: afterwards the NAT would let
    // (A,p2) and (B,p1) in anyway.
    let seen_a1 = c.must(A1)?;
    let unsolicited = c.ask(&[
        Query {
            to: A1,
            via: Some(A2),
        },
        Query {
            to: A1,
            via: Some(B1),
        },
    ])?;
    let seen_a2 = c.must(A2)?;
    let seen_b1 = c.must(B1)?;
    Ok(Observations {
        local: SocketAddrV4::new(local_ip, port),
        seen: [seen_a1, seen_a2, seen_b1],
        unsolicited_a2: unsolicited[0].is_some(),
        unsolicited_b1: unsolicited[1].is_some(),
    })
}

/// One side's result, as printed and as JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    pub side: &'static str,
    /// The type the lab was built with; None when the lab's nat.yaml is missing.
    pub nat: Option<NatType>,
    pub namespace: String,
    pub local: String,
    /// Each responder endpoint and the source address it saw.
    pub seen: Vec<Seen>,
    /// Each endpoint asked to answer unsolicited and whether its answer got in.
    pub unsolicited: Vec<Unsolicited>,
    pub translated: bool,
    pub mapping: Dependence,
    pub filtering: Dependence,
    /// Whether the measured behaviour is what `nat` stands for.
    pub as_configured: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Seen {
    pub responder: String,
    pub mapped: String,
}

#[derive(Debug, Serialize)]
pub struct Unsolicited {
    pub from: String,
    pub let_in: bool,
}

impl Report {
    fn new(side: Side, nat: Option<NatType>, namespace: String, o: &Observations) -> Report {
        let ep = endpoints();
        let mapping = classify_mapping(o.seen[A1], o.seen[A2], o.seen[B1]);
        let filtering = classify_filtering(o.unsolicited_a2, o.unsolicited_b1);
        Report {
            side: side.as_str(),
            nat,
            namespace,
            local: o.local.to_string(),
            seen: ep
                .iter()
                .zip(o.seen)
                .map(|(e, s)| Seen {
                    responder: e.to_string(),
                    mapped: s.to_string(),
                })
                .collect(),
            unsolicited: [(A2, o.unsolicited_a2), (B1, o.unsolicited_b1)]
                .into_iter()
                .map(|(i, let_in)| Unsolicited {
                    from: ep[i].to_string(),
                    let_in,
                })
                .collect(),
            translated: o.seen[A1] != o.local,
            mapping,
            filtering,
            as_configured: nat.map(|n| n.expected() == (mapping, filtering)),
        }
    }

    /// "agent NAT port-restricted: mapping endpoint-independent, filtering address-and-port-dependent"
    pub fn line(&self) -> String {
        let nat = self.nat.map_or("unknown", NatType::as_str);
        let mut l = format!(
            "{} NAT {nat}: mapping {}, filtering {}",
            self.side, self.mapping, self.filtering
        );
        if self.as_configured == Some(false) {
            if let Some(n) = self.nat {
                let (m, f) = n.expected();
                l.push_str(&format!(
                    " (NOT AS CONFIGURED: {nat} is mapping {m}, filtering {f})"
                ));
            }
        }
        l
    }

    /// The evidence behind the line, two indented lines: which public address each responder
    /// saw (responders that saw the same one grouped), and which unsolicited answers got in.
    pub fn detail(&self) -> String {
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        for s in &self.seen {
            match groups.iter_mut().find(|(m, _)| *m == s.mapped) {
                Some((_, to)) => to.push(&s.responder),
                None => groups.push((&s.mapped, vec![&s.responder])),
            }
        }
        let mapped: Vec<String> = groups
            .iter()
            .map(|(m, to)| format!("{m} to {}", to.join(", ")))
            .collect();
        let unsol: Vec<String> = self
            .unsolicited
            .iter()
            .map(|u| format!("{} {}", u.from, if u.let_in { "let in" } else { "dropped" }))
            .collect();
        format!(
            "  mapped: {} in {} -> {}\n  unsolicited: {}",
            self.local,
            self.namespace,
            mapped.join("; "),
            unsol.join(", ")
        )
    }
}

/// Measures the given sides of a running lab (the responder runs while this does).
pub fn probe(lab: &Lab, sides: &[Side], nat: Option<NatConfig>) -> Result<Vec<Report>> {
    let _responder = Responder::start(&lab.ns("relay"))
        .context("starting the probe responder in the relay's namespace")?;
    // The sides at once: most of the time goes into waiting for answers that never come.
    let clients: Vec<_> = sides
        .iter()
        .map(|&side| {
            let ns = lab.ns(side.site().inside);
            (side, ns.clone(), spawn_in_netns(&ns, client))
        })
        .collect();
    let mut reports = Vec::new();
    for (side, ns, h) in clients {
        let obs = join(h).with_context(|| format!("probing from {ns}"))?;
        reports.push(Report::new(side, nat.map(|n| n.of(side)), ns, &obs));
    }
    Ok(reports)
}

#[derive(Args)]
pub struct ProbeOpts {
    /// Prefix of the lab's namespace names.
    #[arg(long, default_value = "sl-")]
    pub prefix: String,
    /// The lab's directory (default: /run/sluice-lab/PREFIX); its nat.yaml names the types.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Probe one side only (default: both).
    #[arg(long, value_enum)]
    pub side: Option<Side>,
    /// Print a JSON array of results instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sluice lab nat-probe`: exit status 1 when a router does not behave as its type says.
pub fn probe_cmd(o: &ProbeOpts) -> Result<()> {
    let lab = Lab::new(&o.prefix, o.dir.clone())?;
    if !lab.ns_exists("relay") {
        bail!(
            "lab {} is not up (start it with `sluice lab up`)",
            lab.prefix
        );
    }
    let sides = match o.side {
        Some(s) => vec![s],
        None => SIDES.to_vec(),
    };
    let reports = probe(&lab, &sides, NatConfig::read(&lab))?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            println!("{}", r.line());
            println!("{}", r.detail());
        }
    }
    if reports.iter().any(|r| r.as_configured == Some(false)) {
        bail!("a NAT router does not behave as its type says");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Dependence::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_are_distinct_real_addresses() {
        let ep = endpoints();
        assert_eq!(PROBE_ADDR_A.to_string(), lab::RELAY_ADDR);
        assert_eq!(ep[A1].ip(), ep[A2].ip());
        assert_ne!(ep[A1].port(), ep[A2].port());
        assert_ne!(ep[A1].ip(), ep[B1].ip());
        assert_eq!(ep[A1].port(), ep[B1].port());
    }

    #[test]
    fn mapping() {
        let x = a("192.0.2.11:40000");
        let y = a("192.0.2.11:51234");
        let z = a("192.0.2.11:60001");
        assert_eq!(classify_mapping(x, x, x), EndpointIndependent);
        assert_eq!(classify_mapping(x, x, y), AddressDependent);
        assert_eq!(classify_mapping(x, y, z), AddressAndPortDependent);
        // Port dependence is the finest shown, even if (B,p1) happened to get x again.
        assert_eq!(classify_mapping(x, y, x), AddressAndPortDependent);
        // Another public address counts as another mapping.
        assert_eq!(
            classify_mapping(x, x, a("192.0.2.12:40000")),
            AddressDependent
        );
    }

    #[test]
    fn filtering() {
        assert_eq!(classify_filtering(true, true), EndpointIndependent);
        assert_eq!(classify_filtering(false, true), EndpointIndependent);
        assert_eq!(classify_filtering(true, false), AddressDependent);
        assert_eq!(classify_filtering(false, false), AddressAndPortDependent);
    }

    #[test]
    fn every_type_expects_what_rfc_4787_says() {
        assert_eq!(
            NatType::PortRestricted.expected(),
            (EndpointIndependent, AddressAndPortDependent)
        );
        assert_eq!(
            NatType::Symmetric.expected(),
            (AddressAndPortDependent, AddressAndPortDependent)
        );
        assert_eq!(
            NatType::AddressRestricted.expected(),
            (EndpointIndependent, AddressDependent)
        );
        assert_eq!(
            NatType::FullCone.expected(),
            (EndpointIndependent, EndpointIndependent)
        );
    }

    #[test]
    fn wire_round_trip_and_rejects() {
        let r = encode_request(7, VIA_SAME);
        assert_eq!(decode_request(&r), Some((7, VIA_SAME)));
        assert_eq!(decode_reply(&r), None);
        let p = encode_reply(9, a("192.0.2.21:3333"));
        assert_eq!(decode_reply(&p), Some((9, a("192.0.2.21:3333"))));
        assert_eq!(decode_request(&p), None);
        assert_eq!(decode_request(&r[..9]), None);
        let mut bad = r;
        bad[0] = b'X';
        assert_eq!(decode_request(&bad), None);
    }

    #[test]
    fn report_line_and_mismatch() {
        let o = Observations {
            local: a("10.0.1.10:40000"),
            seen: [a("192.0.2.11:40000"); 3],
            unsolicited_a2: false,
            unsolicited_b1: false,
        };
        let r = Report::new(
            Side::Agent,
            Some(NatType::PortRestricted),
            "sl-agent".into(),
            &o,
        );
        assert_eq!(
            r.line(),
            "agent NAT port-restricted: mapping endpoint-independent, filtering address-and-port-dependent"
        );
        assert!(r.translated);
        assert_eq!(
            r.detail(),
            "  mapped: 10.0.1.10:40000 in sl-agent -> 192.0.2.11:40000 to 192.0.2.1:3478, 192.0.2.1:3479, 192.0.2.2:3478\n  unsolicited: 192.0.2.1:3479 dropped, 192.0.2.2:3478 dropped"
        );
        let sym = Observations {
            seen: [
                a("192.0.2.11:1111"),
                a("192.0.2.11:2222"),
                a("192.0.2.11:1111"),
            ],
            ..o.clone()
        };
        let r = Report::new(
            Side::Agent,
            Some(NatType::Symmetric),
            "sl-agent".into(),
            &sym,
        );
        assert!(
            r.detail().contains("192.0.2.11:1111 to 192.0.2.1:3478, 192.0.2.2:3478; 192.0.2.11:2222 to 192.0.2.1:3479"),
            "{}",
            r.detail()
        );
        let r = Report::new(Side::Agent, Some(NatType::FullCone), "sl-agent".into(), &o);
        assert_eq!(r.as_configured, Some(false));
        assert!(r.line().contains("NOT AS CONFIGURED"));
    }

    #[test]
    fn config_file_round_trip() {
        let c = NatConfig {
            agent: NatType::AddressRestricted,
            connector: NatType::None,
        };
        let text = serde_yaml::to_string(&c).unwrap();
        assert!(text.contains("agent: address-restricted"), "{text}");
        assert_eq!(serde_yaml::from_str::<NatConfig>(&text).unwrap(), c);
    }

    #[test]
    fn rulesets() {
        let pr = ruleset(NatType::PortRestricted, "10.0.1.10");
        assert!(!pr.contains("dnat") && !pr.contains("random"));
        assert!(ruleset(NatType::Symmetric, "10.0.1.10").contains("masquerade fully-random"));
        let fc = ruleset(NatType::FullCone, "10.0.1.10");
        assert!(fc.contains("dnat to 10.0.1.10") && !fc.contains("@contacted"));
        let ar = ruleset(NatType::AddressRestricted, "10.0.2.20");
        assert!(ar.contains("dnat to 10.0.2.20") && ar.contains("update @contacted"));
    }
}

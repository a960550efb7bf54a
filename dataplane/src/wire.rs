//! Sluice's own wire formats. Every DATAGRAM and every control message starts with one byte whose
//! high nibble is the format version and low nibble the type, so a peer of another version is
//! refused cleanly instead of misparsed.
//!
//! DATAGRAMs
//! - `0x11` tunnel IP packet (end-to-end connection): `[0x11][IP packet]`
//! - `0x13` tunnel IP packet to a name (end-to-end connection): `[0x13][name len u8][name]
//!   [IP packet]`; the packet's destination is a synthetic address the agent handed out for
//!   that hostname, which the connector resolves in its own network
//! - `0x12` relay forward (control connection): `[0x12][peer id: 32][opaque end-to-end QUIC packet]`.
//!   From a client the peer id names the destination; from the relay it names the source.
//!
//! Control messages travel on the control connection's first bidirectional stream, each framed
//! as `[length: u16 BE][version/type][body]`:
//! - `0x21` observed address (relay → client): `[family 4|6][address][port u16]`
//! - `0x22` lookup (client → relay): `[name len u8][name]`
//! - `0x23` lookup reply: `[name len u8][name][found 0|1][peer id: 32 if found]`
//! - `0x24` hello (client → relay, first message; opens the stream): `[software len u8][software]`
//!
//! End-to-end tunnels carry messages in the same framing on the agent's first bidirectional
//! stream (opened by the agent's first message):
//! - `0x25` DNS query (agent → connector): `[request id u32][DNS message]`, a query for a
//!   resource name's records other than A/AAAA, resolved in the connector's network
//! - `0x26` DNS answer (connector → agent): `[request id u32][DNS message]`
//! - `0x27` candidates (both ways), the sender's addresses for a direct path: `[generation u32]
//!   [punch secret u64][count u8]` then per candidate `[kind u8][family 4|6][address][port u16]
//!   [priority u32]`. Receiving the peer's candidates is the signal to start punching.
//!
//! Punch packets are plain UDP between the peers' tunnel sockets (connectivity checks), told
//! apart from QUIC by their first byte (QUIC always sets bit 0x40):
//! - `0x14` punch, `0x15` punch ack: `[to peer id: 32][from peer id: 32][secret u64][txid u64]`,
//!   where the secret is the one the *receiver* announced in its candidates (so only the peer
//!   at the other end of the authenticated tunnel can make one), and an ack echoes the txid.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::identity::PeerId;
use crate::nat::candidate::{Candidate, Kind};

pub const VERSION: u8 = 1;
pub const DGRAM_TUNNEL_IP: u8 = 0x11;
pub const DGRAM_RELAY_FORWARD: u8 = 0x12;
pub const DGRAM_TUNNEL_NAMED_IP: u8 = 0x13;
/// On a relay-to-relay link: route number (u32), then the end-to-end packet (relay/src/mesh.rs).
pub const DGRAM_MESH_FORWARD: u8 = 0x16;
/// Its header: the type and the route number.
pub const MESH_FORWARD_OVERHEAD: usize = 1 + 4;
pub const MSG_OBSERVED_ADDR: u8 = 0x21;
pub const MSG_LOOKUP: u8 = 0x22;
pub const MSG_LOOKUP_REPLY: u8 = 0x23;
pub const MSG_HELLO: u8 = 0x24;
pub const MSG_DNS_QUERY: u8 = 0x25;
pub const MSG_DNS_ANSWER: u8 = 0x26;
pub const MSG_CANDIDATES: u8 = 0x27;
pub const MSG_REVOCATIONS: u8 = 0x28;
pub const MSG_CERTIFICATE: u8 = 0x29;
pub const MSG_CONNECTOR_RECORD: u8 = 0x2a;
pub const MSG_PEER_GONE: u8 = 0x2b;
pub const MSG_MESH_ROUTE: u8 = 0x2c;
pub const MSG_MESH_UNROUTE: u8 = 0x2d;
pub const MSG_MESH_GONE: u8 = 0x2e;
pub const PUNCH: u8 = 0x14;
pub const PUNCH_ACK: u8 = 0x15;
/// Length of a punch packet.
pub const PUNCH_LEN: usize = 1 + 2 * PeerId::LEN + 8 + 8;
/// Most candidates one message carries.
pub const MAX_CANDIDATES: usize = 32;

/// Bytes a relay forward header adds in front of an end-to-end packet.
pub const RELAY_FORWARD_OVERHEAD: usize = 1 + PeerId::LEN;

/// A connector's "I hold no tunnel of yours", sent through the relay to an agent whose
/// packets (not Initials) reach it with no tunnel to take them: the connector restarted, and
/// the agent's tunnel is dead. The relay stamps the connector's peer id on it, so only that
/// connector can say it. Not a QUIC packet (its fixed bit is clear); version 1.
pub const TUNNEL_GONE: [u8; 8] = [0x00, 0x01, b'S', b'L', b'G', b'O', b'N', b'E'];
/// UDP payload of control connections (to and from the relay): fits a 1500-byte link with
/// IPv6 and room to spare.
pub const CONTROL_UDP_PAYLOAD: usize = 1452;
/// What quiche reserves around one DATAGRAM frame when it checks the frame fits
/// (`dgram_max_writable_len`): short header byte, a 20-byte connection id, the longest packet
/// number (4), the AEAD tag (16), frame type and a 2-byte length. Its worst case, since the
/// packet number grows with packets in flight.
pub const QUIC_DGRAM_OVERHEAD: usize = 1 + 20 + 4 + 16 + 1 + 2;
/// UDP payload of end-to-end packets: a whole one must fit a relay forward DATAGRAM of a
/// control connection, or the relayed path drops it (and loses every packet quiche coalesced
/// into it).
pub const TUNNEL_UDP_PAYLOAD: usize =
    CONTROL_UDP_PAYLOAD - QUIC_DGRAM_OVERHEAD - RELAY_FORWARD_OVERHEAD;
/// Bytes the tunnel header adds in front of an IP packet.
pub const TUNNEL_IP_OVERHEAD: usize = 1;
/// Largest message body a relay accepts on a control stream: a renewed certificate with
/// dozens of groups fits, and so does a connector record of its largest size.
pub const MAX_CONTROL_MESSAGE: usize = 1 + crate::connector_record::MAX_ENCODED;
/// Largest message body on a tunnel's stream: a whole DNS message (64 KiB, as over TCP) fits.
pub const MAX_TUNNEL_MESSAGE: usize = u16::MAX as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty message")]
    Empty,
    #[error("unsupported wire version {0} (this build speaks version {VERSION})")]
    Version(u8),
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message truncated")]
    Truncated,
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
    #[error("bad field: {0}")]
    BadField(&'static str),
    #[error("message too large ({0} bytes)")]
    TooLarge(usize),
}

fn check_type(b: u8) -> Result<u8, WireError> {
    if b >> 4 == 0 || b & 0x0f == 0 {
        return Err(WireError::UnknownType(b));
    }
    // Only version 1 exists; the type nibbles of v1 are 0x1? datagrams and 0x2? messages.
    match b {
        DGRAM_TUNNEL_IP
        | DGRAM_RELAY_FORWARD
        | DGRAM_TUNNEL_NAMED_IP
        | MSG_OBSERVED_ADDR
        | MSG_LOOKUP
        | MSG_LOOKUP_REPLY
        | MSG_HELLO
        | MSG_DNS_QUERY
        | MSG_DNS_ANSWER
        | MSG_CANDIDATES
        | MSG_REVOCATIONS
        | MSG_CERTIFICATE
        | MSG_CONNECTOR_RECORD
        | MSG_PEER_GONE
        | MSG_MESH_ROUTE
        | MSG_MESH_UNROUTE
        | MSG_MESH_GONE
        | DGRAM_MESH_FORWARD
        | PUNCH
        | PUNCH_ACK => Ok(b),
        _ if !(0x10..0x30).contains(&b) => Err(WireError::Version(b >> 4)),
        _ => Err(WireError::UnknownType(b)),
    }
}

/// A DATAGRAM as it arrives, borrowed from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    TunnelIp(&'a [u8]),
    NamedIp { name: &'a str, packet: &'a [u8] },
    RelayForward { peer: PeerId, packet: &'a [u8] },
    MeshForward { route: u32, packet: &'a [u8] },
}

impl<'a> Datagram<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let (&t, rest) = b.split_first().ok_or(WireError::Empty)?;
        match check_type(t)? {
            DGRAM_TUNNEL_IP => Ok(Datagram::TunnelIp(rest)),
            DGRAM_TUNNEL_NAMED_IP => {
                let (&len, rest) = rest.split_first().ok_or(WireError::Truncated)?;
                let len = usize::from(len);
                if len == 0 || rest.len() < len {
                    return Err(WireError::Truncated);
                }
                let (name, packet) = rest.split_at(len);
                let name = std::str::from_utf8(name)
                    .map_err(|_| WireError::BadField("name is not UTF-8"))?;
                Ok(Datagram::NamedIp { name, packet })
            }
            DGRAM_RELAY_FORWARD => {
                if rest.len() < PeerId::LEN {
                    return Err(WireError::Truncated);
                }
                let (id, packet) = rest.split_at(PeerId::LEN);
                let peer = PeerId::from_slice(id).ok_or(WireError::Truncated)?;
                Ok(Datagram::RelayForward { peer, packet })
            }
            DGRAM_MESH_FORWARD => {
                if rest.len() < 4 {
                    return Err(WireError::Truncated);
                }
                let (id, packet) = rest.split_at(4);
                let route = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                Ok(Datagram::MeshForward { route, packet })
            }
            other => Err(WireError::UnknownType(other)),
        }
    }
}

/// Bytes the named tunnel header adds in front of an IP packet to `name`.
pub fn named_ip_overhead(name: &str) -> usize {
    2 + name.len()
}

/// Writes `[0x13][len][name]` into the front of `buf` (which must have
/// [`named_ip_overhead`] bytes before the IP packet). None if the name is over 255 bytes.
pub fn put_named_ip_header(buf: &mut [u8], name: &str) -> Option<()> {
    let len = u8::try_from(name.len()).ok()?;
    let end = 2 + name.len();
    buf.get_mut(..end)?;
    buf[0] = DGRAM_TUNNEL_NAMED_IP;
    buf[1] = len;
    buf[2..end].copy_from_slice(name.as_bytes());
    Some(())
}

/// Writes a relay forward header into the first [`RELAY_FORWARD_OVERHEAD`] bytes of `buf`.
pub fn put_relay_forward_header(buf: &mut [u8], peer: &PeerId) {
    buf[0] = DGRAM_RELAY_FORWARD;
    buf[1..RELAY_FORWARD_OVERHEAD].copy_from_slice(&peer.0);
}

/// A control message on the control stream.
///
/// Its `Debug` leaves out the punch secret (and DNS payloads): messages are logged at debug
/// level, and the secret is what keeps a stranger from steering a tunnel's direct path.
#[derive(Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// The first message of a control connection. `instance` is random per process: the relay
    /// tells a node that reconnects from two nodes that share one certificate.
    Hello {
        software: String,
        instance: u64,
    },
    ObservedAddr(SocketAddr),
    Lookup {
        name: String,
    },
    LookupReply {
        name: String,
        peer: Option<PeerId>,
    },
    /// A DNS query message for the connector to resolve; `id` pairs it with its answer.
    DnsQuery {
        id: u32,
        message: Vec<u8>,
    },
    DnsAnswer {
        id: u32,
        message: Vec<u8>,
    },
    Candidates {
        generation: u32,
        secret: u64,
        list: Vec<Candidate>,
    },
    /// The relay hands its revocation list (signed by the CA, as in the file:
    /// [`crate::revocation`]) to every node it serves; they check the signature.
    Revocations(Vec<u8>),
    /// The sender's renewed certificate (DER), on a connection its previous one authenticated:
    /// the same key, a new validity (and maybe new groups).
    Certificate(Vec<u8>),
    /// A connector's signed record (`crate::connector_record`, SLCR), to its home relay,
    /// which puts it in the relays' shared registry. Empty, from a relay: the relay shares a
    /// registry and asks for the record (a relay on its own never sends it, so a connector
    /// of this version works with older relays; a relay sharing a registry needs connectors
    /// that know the message).
    ConnectorRecord(Vec<u8>),
    /// From a relay: it cannot reach this peer (no such peer is connected to it, nor to any
    /// relay it knows of), so packets to it are dropped. Said instead of silence, at most
    /// every half second per sender and peer.
    PeerGone(PeerId),
    /// Relay to relay: packets numbered `id` on this link go to `dst`, from `src`.
    MeshRoute {
        id: u32,
        dst: PeerId,
        src: PeerId,
    },
    /// Relay to relay: route `id` is withdrawn.
    MeshUnroute {
        id: u32,
    },
    /// Relay to relay: `dst` is not connected here, so packets from `src` to it are dropped.
    MeshGone {
        dst: PeerId,
        src: PeerId,
    },
}

/// A connectivity check (or its answer) between the peers of a tunnel. Its `Debug` leaves out
/// the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Punch {
    pub ack: bool,
    pub to: PeerId,
    pub from: PeerId,
    pub secret: u64,
    pub txid: u64,
}

impl fmt::Debug for ControlMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlMessage::Hello { software, instance } => f
                .debug_struct("Hello")
                .field("software", software)
                .field("instance", instance)
                .finish(),
            ControlMessage::ObservedAddr(a) => f.debug_tuple("ObservedAddr").field(a).finish(),
            ControlMessage::Lookup { name } => {
                f.debug_struct("Lookup").field("name", name).finish()
            }
            ControlMessage::LookupReply { name, peer } => f
                .debug_struct("LookupReply")
                .field("name", name)
                .field("peer", peer)
                .finish(),
            ControlMessage::DnsQuery { id, message } => f
                .debug_struct("DnsQuery")
                .field("id", id)
                .field("bytes", &message.len())
                .finish(),
            ControlMessage::DnsAnswer { id, message } => f
                .debug_struct("DnsAnswer")
                .field("id", id)
                .field("bytes", &message.len())
                .finish(),
            ControlMessage::Candidates {
                generation, list, ..
            } => f
                .debug_struct("Candidates")
                .field("generation", generation)
                .field("secret", &REDACTED)
                .field("list", list)
                .finish(),
            ControlMessage::Revocations(b) => f
                .debug_struct("Revocations")
                .field("bytes", &b.len())
                .finish(),
            ControlMessage::Certificate(b) => f
                .debug_struct("Certificate")
                .field("bytes", &b.len())
                .finish(),
            ControlMessage::ConnectorRecord(b) => f
                .debug_struct("ConnectorRecord")
                .field("bytes", &b.len())
                .finish(),
            ControlMessage::PeerGone(p) => f.debug_tuple("PeerGone").field(p).finish(),
            ControlMessage::MeshRoute { id, dst, src } => f
                .debug_struct("MeshRoute")
                .field("id", id)
                .field("dst", dst)
                .field("src", src)
                .finish(),
            ControlMessage::MeshUnroute { id } => {
                f.debug_struct("MeshUnroute").field("id", id).finish()
            }
            ControlMessage::MeshGone { dst, src } => f
                .debug_struct("MeshGone")
                .field("dst", dst)
                .field("src", src)
                .finish(),
        }
    }
}

impl fmt::Debug for Punch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Punch")
            .field("ack", &self.ack)
            .field("to", &self.to)
            .field("from", &self.from)
            .field("secret", &REDACTED)
            .field("txid", &self.txid)
            .finish()
    }
}

/// Stands in for a secret in `Debug` output.
struct Redacted;
const REDACTED: Redacted = Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Punch {
    pub fn encode(&self) -> [u8; PUNCH_LEN] {
        let mut b = [0u8; PUNCH_LEN];
        b[0] = if self.ack { PUNCH_ACK } else { PUNCH };
        b[1..33].copy_from_slice(&self.to.0);
        b[33..65].copy_from_slice(&self.from.0);
        b[65..73].copy_from_slice(&self.secret.to_be_bytes());
        b[73..81].copy_from_slice(&self.txid.to_be_bytes());
        b
    }

    /// Whether a UDP payload is a punch rather than QUIC (which always sets bit 0x40).
    pub fn is_punch(b: &[u8]) -> bool {
        matches!(b.first(), Some(&PUNCH) | Some(&PUNCH_ACK))
    }

    pub fn parse(b: &[u8]) -> Result<Punch, WireError> {
        let mut r = Reader(b);
        let ack = match check_type(r.u8().map_err(|_| WireError::Empty)?)? {
            PUNCH => false,
            PUNCH_ACK => true,
            other => return Err(WireError::UnknownType(other)),
        };
        let to = PeerId::from_slice(r.take(PeerId::LEN)?).ok_or(WireError::Truncated)?;
        let from = PeerId::from_slice(r.take(PeerId::LEN)?).ok_or(WireError::Truncated)?;
        let secret = r.u64()?;
        let txid = r.u64()?;
        r.finish()?;
        Ok(Punch {
            ack,
            to,
            from,
            secret,
            txid,
        })
    }
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), WireError> {
    let len = u8::try_from(name.len()).map_err(|_| WireError::BadField("name longer than 255"))?;
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| WireError::Truncated)?;
        Ok(u64::from_be_bytes(b))
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => {
                let o: [u8; 4] = self.take(4)?.try_into().map_err(|_| WireError::Truncated)?;
                IpAddr::V4(Ipv4Addr::from(o))
            }
            6 => {
                let o: [u8; 16] = self
                    .take(16)?
                    .try_into()
                    .map_err(|_| WireError::Truncated)?;
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(WireError::BadField("address family")),
        };
        let p = self.take(2)?;
        Ok(SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])))
    }
    fn peer(&mut self) -> Result<PeerId, WireError> {
        PeerId::from_slice(self.take(PeerId::LEN)?).ok_or(WireError::Truncated)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn name(&mut self) -> Result<String, WireError> {
        let n = self.u8()? as usize;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadField("name is not UTF-8"))
    }
    fn finish(self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

impl ControlMessage {
    /// Appends the framed message (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0]);
        match self {
            ControlMessage::Hello { software, instance } => {
                out.push(MSG_HELLO);
                put_name(out, software)?;
                out.extend_from_slice(&instance.to_be_bytes());
            }
            ControlMessage::ObservedAddr(addr) => {
                out.push(MSG_OBSERVED_ADDR);
                put_addr(out, addr);
            }
            ControlMessage::Candidates {
                generation,
                secret,
                list,
            } => {
                if list.len() > MAX_CANDIDATES {
                    out.truncate(start);
                    return Err(WireError::BadField("too many candidates"));
                }
                out.push(MSG_CANDIDATES);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&secret.to_be_bytes());
                out.push(list.len() as u8);
                for c in list {
                    out.push(c.kind.code());
                    put_addr(out, &c.addr);
                    out.extend_from_slice(&c.priority.to_be_bytes());
                }
            }
            ControlMessage::Lookup { name } => {
                out.push(MSG_LOOKUP);
                put_name(out, name)?;
            }
            ControlMessage::LookupReply { name, peer } => {
                out.push(MSG_LOOKUP_REPLY);
                put_name(out, name)?;
                match peer {
                    Some(p) => {
                        out.push(1);
                        out.extend_from_slice(&p.0);
                    }
                    None => out.push(0),
                }
            }
            ControlMessage::DnsQuery { id, message }
            | ControlMessage::DnsAnswer { id, message } => {
                out.push(if matches!(self, ControlMessage::DnsQuery { .. }) {
                    MSG_DNS_QUERY
                } else {
                    MSG_DNS_ANSWER
                });
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(message);
            }
            ControlMessage::Revocations(list) => {
                out.push(MSG_REVOCATIONS);
                out.extend_from_slice(list);
            }
            ControlMessage::Certificate(der) => {
                out.push(MSG_CERTIFICATE);
                out.extend_from_slice(der);
            }
            ControlMessage::ConnectorRecord(rec) => {
                out.push(MSG_CONNECTOR_RECORD);
                out.extend_from_slice(rec);
            }
            ControlMessage::PeerGone(p) => {
                out.push(MSG_PEER_GONE);
                out.extend_from_slice(&p.0);
            }
            ControlMessage::MeshRoute { id, dst, src } => {
                out.push(MSG_MESH_ROUTE);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&dst.0);
                out.extend_from_slice(&src.0);
            }
            ControlMessage::MeshUnroute { id } => {
                out.push(MSG_MESH_UNROUTE);
                out.extend_from_slice(&id.to_be_bytes());
            }
            ControlMessage::MeshGone { dst, src } => {
                out.push(MSG_MESH_GONE);
                out.extend_from_slice(&dst.0);
                out.extend_from_slice(&src.0);
            }
        }
        let len = out.len() - start - 2;
        if len > MAX_TUNNEL_MESSAGE {
            out.truncate(start);
            return Err(WireError::TooLarge(len));
        }
        out[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(())
    }

    /// Parses one message body (without its length prefix).
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(b);
        let t = check_type(r.u8().map_err(|_| WireError::Empty)?)?;
        let msg = match t {
            MSG_OBSERVED_ADDR => ControlMessage::ObservedAddr(r.addr()?),
            MSG_CANDIDATES => {
                let generation = r.u32()?;
                let secret = r.u64()?;
                let n = usize::from(r.u8()?);
                if n > MAX_CANDIDATES {
                    return Err(WireError::BadField("too many candidates"));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let kind = Kind::from_code(r.u8()?).ok_or(WireError::BadField("kind"))?;
                    let addr = r.addr()?;
                    let priority = r.u32()?;
                    list.push(Candidate {
                        kind,
                        addr,
                        priority,
                    });
                }
                ControlMessage::Candidates {
                    generation,
                    secret,
                    list,
                }
            }
            MSG_HELLO => {
                let software = r.name()?;
                // Added after the first version: a hello without it is from an older node.
                let instance = if r.0.is_empty() { 0 } else { r.u64()? };
                ControlMessage::Hello { software, instance }
            }
            MSG_LOOKUP => ControlMessage::Lookup { name: r.name()? },
            MSG_LOOKUP_REPLY => {
                let name = r.name()?;
                let peer = match r.u8()? {
                    0 => None,
                    1 => {
                        Some(PeerId::from_slice(r.take(PeerId::LEN)?).ok_or(WireError::Truncated)?)
                    }
                    _ => return Err(WireError::BadField("found flag")),
                };
                ControlMessage::LookupReply { name, peer }
            }
            MSG_DNS_QUERY => ControlMessage::DnsQuery {
                id: r.u32()?,
                message: r.rest().to_vec(),
            },
            MSG_DNS_ANSWER => ControlMessage::DnsAnswer {
                id: r.u32()?,
                message: r.rest().to_vec(),
            },
            MSG_REVOCATIONS => ControlMessage::Revocations(r.rest().to_vec()),
            MSG_CERTIFICATE => ControlMessage::Certificate(r.rest().to_vec()),
            MSG_CONNECTOR_RECORD => ControlMessage::ConnectorRecord(r.rest().to_vec()),
            MSG_PEER_GONE => ControlMessage::PeerGone(r.peer()?),
            MSG_MESH_ROUTE => ControlMessage::MeshRoute {
                id: r.u32()?,
                dst: r.peer()?,
                src: r.peer()?,
            },
            MSG_MESH_UNROUTE => ControlMessage::MeshUnroute { id: r.u32()? },
            MSG_MESH_GONE => ControlMessage::MeshGone {
                dst: r.peer()?,
                src: r.peer()?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Reassembles length-prefixed control messages from a byte stream.
#[derive(Debug)]
pub struct ControlDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl Default for ControlDecoder {
    /// A decoder for a relay's control stream: small messages only.
    fn default() -> Self {
        ControlDecoder::with_limit(MAX_CONTROL_MESSAGE)
    }
}

impl ControlDecoder {
    /// A decoder refusing message bodies over `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        ControlDecoder {
            buf: Vec::new(),
            limit,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, if one has arrived. An error poisons the stream: the caller
    /// should close the connection, since framing can no longer be trusted.
    pub fn next_message(&mut self) -> Option<Result<ControlMessage, WireError>> {
        if self.buf.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len > self.limit {
            return Some(Err(WireError::TooLarge(len)));
        }
        if self.buf.len() < 2 + len {
            return None;
        }
        let msg = ControlMessage::parse(&self.buf[2..2 + len]);
        self.buf.drain(..2 + len);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: ControlMessage) {
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        let mut d = ControlDecoder::with_limit(MAX_TUNNEL_MESSAGE);
        // Byte by byte: framing must not depend on how the stream is chunked.
        for b in &out {
            assert!(d.next_message().is_none());
            d.push(&[*b]);
        }
        assert_eq!(d.next_message(), Some(Ok(m)));
        assert!(d.next_message().is_none());
    }

    #[test]
    fn control_messages_roundtrip() {
        roundtrip(ControlMessage::ObservedAddr(
            "203.0.113.7:4433".parse().unwrap(),
        ));
        roundtrip(ControlMessage::ObservedAddr(
            "[2001:db8::1]:1".parse().unwrap(),
        ));
        roundtrip(ControlMessage::Lookup {
            name: "conn-eu".into(),
        });
        roundtrip(ControlMessage::Hello {
            software: "sluice 0.1.0".into(),
            instance: 0x0102_0304_0506_0708,
        });
        roundtrip(ControlMessage::LookupReply {
            name: "conn-eu".into(),
            peer: Some(PeerId([7; 32])),
        });
        roundtrip(ControlMessage::LookupReply {
            name: "x".into(),
            peer: None,
        });
        roundtrip(ControlMessage::DnsQuery {
            id: 7,
            message: vec![1, 2, 3],
        });
        roundtrip(ControlMessage::DnsAnswer {
            id: u32::MAX,
            message: Vec::new(),
        });
        roundtrip(ControlMessage::Revocations(vec![9; 60_000]));
        roundtrip(ControlMessage::Certificate(vec![0x30; 700]));
        roundtrip(ControlMessage::ConnectorRecord(b"SLCR\x01".to_vec()));
        roundtrip(ControlMessage::PeerGone(PeerId([3; 32])));
        roundtrip(ControlMessage::MeshRoute {
            id: 0xdead_beef,
            dst: PeerId([1; 32]),
            src: PeerId([2; 32]),
        });
        roundtrip(ControlMessage::MeshUnroute { id: 1 });
        roundtrip(ControlMessage::MeshGone {
            dst: PeerId([4; 32]),
            src: PeerId([5; 32]),
        });
        roundtrip(ControlMessage::Candidates {
            generation: 3,
            secret: 0x0123_4567_89ab_cdef,
            list: vec![
                Candidate {
                    kind: Kind::Host,
                    addr: "192.0.2.10:4500".parse().unwrap(),
                    priority: 7,
                },
                Candidate {
                    kind: Kind::ServerReflexive,
                    addr: "[2001:db8::1]:1".parse().unwrap(),
                    priority: u32::MAX,
                },
            ],
        });
    }

    #[test]
    fn debug_output_never_shows_the_punch_secret() {
        let secret = 0x0123_4567_89ab_cdef_u64;
        let msg = ControlMessage::Candidates {
            generation: 1,
            secret,
            list: Vec::new(),
        };
        let punch = Punch {
            ack: false,
            to: PeerId([1; 32]),
            from: PeerId([2; 32]),
            secret,
            txid: 9,
        };
        for text in [
            format!("{msg:?}"),
            format!("{msg:#?}"),
            format!("{punch:?}"),
        ] {
            assert!(text.contains("<redacted>"), "{text}");
            for shown in [
                secret.to_string(),
                format!("{secret:x}"),
                format!("{secret:X}"),
            ] {
                assert!(!text.contains(&shown), "{text}");
            }
        }
    }

    #[test]
    fn punches_roundtrip_and_never_look_like_quic() {
        let p = Punch {
            ack: true,
            to: PeerId([1; 32]),
            from: PeerId([2; 32]),
            secret: 42,
            txid: 7,
        };
        let b = p.encode();
        assert_eq!(Punch::parse(&b), Ok(p));
        assert!(Punch::is_punch(&b));
        assert_eq!(b[0] & 0x40, 0, "QUIC's fixed bit is clear");
        assert_eq!(Punch::parse(&b[..80]), Err(WireError::Truncated));
    }

    #[test]
    fn message_size_limits() {
        let big = ControlMessage::DnsAnswer {
            id: 1,
            message: vec![0; MAX_TUNNEL_MESSAGE - 5],
        };
        let mut out = Vec::new();
        big.encode(&mut out).unwrap();
        // A relay's decoder refuses it; a tunnel's takes it.
        let mut d = ControlDecoder::default();
        d.push(&out);
        assert!(matches!(
            d.next_message(),
            Some(Err(WireError::TooLarge(_)))
        ));
        let mut d = ControlDecoder::with_limit(MAX_TUNNEL_MESSAGE);
        d.push(&out);
        assert_eq!(d.next_message(), Some(Ok(big)));
        let too_big = ControlMessage::DnsAnswer {
            id: 1,
            message: vec![0; MAX_TUNNEL_MESSAGE],
        };
        let mut out = Vec::new();
        assert!(too_big.encode(&mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn versions_and_types_are_checked() {
        assert_eq!(Datagram::parse(&[]), Err(WireError::Empty));
        assert_eq!(Datagram::parse(&[0x31, 1]), Err(WireError::Version(3)));
        assert_eq!(Datagram::parse(&[0x1f]), Err(WireError::UnknownType(0x1f)));
        assert_eq!(Datagram::parse(&[0x12, 0, 0]), Err(WireError::Truncated));
        assert_eq!(
            Datagram::parse(&[0x11, 0x45]),
            Ok(Datagram::TunnelIp(&[0x45]))
        );
        assert_eq!(
            ControlMessage::parse(&[MSG_LOOKUP, 1, b'a', 0]),
            Err(WireError::Trailing(1))
        );
        let mut d = ControlDecoder::default();
        d.push(&[0xff, 0xff]);
        assert_eq!(d.next_message(), Some(Err(WireError::TooLarge(0xffff))));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Datagram::parse(&b);
            let _ = ControlMessage::parse(&b);
            let _ = Punch::parse(&b);
            let mut d = ControlDecoder::default();
            d.push(&b);
            while let Some(Ok(_)) = d.next_message() {}
        }

        #[test]
        fn relay_forward_roundtrip(id in any::<[u8; 32]>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut buf = vec![0u8; RELAY_FORWARD_OVERHEAD + payload.len()];
            put_relay_forward_header(&mut buf, &PeerId(id));
            buf[RELAY_FORWARD_OVERHEAD..].copy_from_slice(&payload);
            prop_assert_eq!(Datagram::parse(&buf), Ok(Datagram::RelayForward { peer: PeerId(id), packet: &payload[..] }));
        }
    }
}

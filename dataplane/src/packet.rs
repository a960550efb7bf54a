//! IP packets as the packet plane sees them: what a packet is (etherparse), and the packets the
//! plane answers with (ICMP errors, TCP resets, UDP replies).

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    icmpv4, icmpv6, IcmpEchoHeader, Icmpv4Type, Icmpv6Type, IpNumber, NetSlice, PacketBuilder,
    SlicedPacket, TransportSlice,
};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Largest ICMP error we send: RFC 1812 (IPv4) and RFC 4443 (IPv6) minimums.
const ICMPV4_ERROR_MAX: usize = 576;
const ICMPV6_ERROR_MAX: usize = 1280;
const TTL: u8 = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("not an IP packet: {0}")]
    Malformed(String),
    #[error("not IPv4 or IPv6")]
    NotIp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// ICMP echo fields (request or reply), for v4 and v6 alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    pub request: bool,
    pub id: u16,
    pub seq: u16,
}

/// The fields of a packet the plane decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number of the transport (after IPv6 extension headers).
    pub proto: u8,
    /// Ports for TCP and UDP, 0 otherwise.
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp: TcpFlags,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub echo: Option<Echo>,
    /// True for ICMP errors, which are never answered with ICMP errors.
    pub icmp_error: bool,
    /// A fragment other than the first carries no transport header.
    pub fragment: bool,
    /// Where the transport payload starts and how long it is.
    pub payload_offset: usize,
    pub payload_len: usize,
    pub total_len: usize,
}

impl PacketInfo {
    pub fn src_socket(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.src_port)
    }
    pub fn dst_socket(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dst_port)
    }
    pub fn payload<'a>(&self, pkt: &'a [u8]) -> &'a [u8] {
        &pkt[self.payload_offset..self.payload_offset + self.payload_len]
    }
}

fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize)
}

/// Parses the IP and transport headers of a packet read from a TUN device or a tunnel.
pub fn inspect(pkt: &[u8]) -> Result<PacketInfo, PacketError> {
    let sliced = SlicedPacket::from_ip(pkt).map_err(|e| PacketError::Malformed(e.to_string()))?;
    let (src, dst, ip_payload) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
            v4.payload(),
        ),
        Some(NetSlice::Ipv6(v6)) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
            v6.payload(),
        ),
        _ => return Err(PacketError::NotIp),
    };
    let mut info = PacketInfo {
        src,
        dst,
        proto: ip_payload.ip_number.0,
        src_port: 0,
        dst_port: 0,
        tcp: TcpFlags::default(),
        tcp_seq: 0,
        tcp_ack: 0,
        echo: None,
        icmp_error: false,
        fragment: ip_payload.fragmented,
        payload_offset: offset_in(pkt, ip_payload.payload),
        payload_len: ip_payload.payload.len(),
        total_len: pkt.len(),
    };
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            info.src_port = t.source_port();
            info.dst_port = t.destination_port();
            info.tcp = TcpFlags {
                syn: t.syn(),
                ack: t.ack(),
                fin: t.fin(),
                rst: t.rst(),
            };
            info.tcp_seq = t.sequence_number();
            info.tcp_ack = t.acknowledgment_number();
            info.payload_offset = offset_in(pkt, t.payload());
            info.payload_len = t.payload().len();
        }
        Some(TransportSlice::Udp(u)) => {
            info.src_port = u.source_port();
            info.dst_port = u.destination_port();
            info.payload_offset = offset_in(pkt, u.payload());
            info.payload_len = u.payload().len();
        }
        Some(TransportSlice::Icmpv4(i)) => match i.icmp_type() {
            Icmpv4Type::EchoRequest(e) => info.echo = Some(echo(true, e)),
            Icmpv4Type::EchoReply(e) => info.echo = Some(echo(false, e)),
            Icmpv4Type::DestinationUnreachable(_)
            | Icmpv4Type::TimeExceeded(_)
            | Icmpv4Type::ParameterProblem(_)
            | Icmpv4Type::Redirect(_) => info.icmp_error = true,
            _ => {}
        },
        Some(TransportSlice::Icmpv6(i)) => match i.icmp_type() {
            Icmpv6Type::EchoRequest(e) => info.echo = Some(echo(true, e)),
            Icmpv6Type::EchoReply(e) => info.echo = Some(echo(false, e)),
            Icmpv6Type::DestinationUnreachable(_)
            | Icmpv6Type::PacketTooBig { .. }
            | Icmpv6Type::TimeExceeded(_)
            | Icmpv6Type::ParameterProblem(_) => info.icmp_error = true,
            _ => {}
        },
        _ => {}
    }
    Ok(info)
}

fn echo(request: bool, e: IcmpEchoHeader) -> Echo {
    Echo {
        request,
        id: e.id,
        seq: e.seq,
    }
}

/// A builder for a packet from `src` to `dst` (same family), or None for mixed families.
fn ip_builder(
    src: IpAddr,
    dst: IpAddr,
) -> Option<etherparse::PacketBuilderStep<etherparse::IpHeaders>> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(PacketBuilder::ipv4(s.octets(), d.octets(), TTL)),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(PacketBuilder::ipv6(s.octets(), d.octets(), TTL)),
        _ => None,
    }
}

fn finish<B>(size: usize, write: impl FnOnce(&mut Vec<u8>) -> Result<(), B>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(size);
    write(&mut out).ok()?;
    Some(out)
}

/// Why a packet could not be delivered, for [`icmp_unreachable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    Net,
    Host,
    Port,
    /// Administratively prohibited (policy).
    Prohibited,
}

fn icmp_error(orig: &[u8], info: &PacketInfo, v4: Icmpv4Type, v6: Icmpv6Type) -> Option<Vec<u8>> {
    if info.icmp_error {
        return None;
    }
    // Sent as if from the destination, so the sender's stack matches it to its socket.
    let b = ip_builder(info.dst, info.src)?;
    match info.dst {
        IpAddr::V4(_) => {
            let quote = &orig[..orig.len().min(ICMPV4_ERROR_MAX - 28)];
            let b = b.icmpv4(v4);
            finish(b.size(quote.len()), |o| b.write(o, quote))
        }
        IpAddr::V6(_) => {
            let quote = &orig[..orig.len().min(ICMPV6_ERROR_MAX - 48)];
            let b = b.icmpv6(v6);
            finish(b.size(quote.len()), |o| b.write(o, quote))
        }
    }
}

/// ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) telling the sender of `orig`
/// that the path carries at most `mtu` bytes.
pub fn icmp_too_big(orig: &[u8], info: &PacketInfo, mtu: u16) -> Option<Vec<u8>> {
    icmp_error(
        orig,
        info,
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        }),
        Icmpv6Type::PacketTooBig {
            mtu: u32::from(mtu),
        },
    )
}

/// ICMP destination unreachable answering `orig`.
pub fn icmp_unreachable(orig: &[u8], info: &PacketInfo, why: Unreachable) -> Option<Vec<u8>> {
    use icmpv4::DestUnreachableHeader as V4;
    use icmpv6::DestUnreachableCode as V6;
    let (v4, v6) = match why {
        Unreachable::Net => (V4::Network, V6::NoRoute),
        Unreachable::Host => (V4::Host, V6::Address),
        Unreachable::Port => (V4::Port, V6::Port),
        Unreachable::Prohibited => (V4::HostProhibited, V6::Prohibited),
    };
    icmp_error(
        orig,
        info,
        Icmpv4Type::DestinationUnreachable(v4),
        Icmpv6Type::DestinationUnreachable(v6),
    )
}

/// A TCP RST answering the segment `info` describes (RFC 9293 §3.10.7.1).
pub fn tcp_rst(info: &PacketInfo) -> Option<Vec<u8>> {
    if info.proto != PROTO_TCP || info.tcp.rst {
        return None;
    }
    let answer = if info.tcp.ack {
        RstTo::Acked(info.tcp_ack)
    } else {
        let seg_len = info.payload_len as u32 + u32::from(info.tcp.syn) + u32::from(info.tcp.fin);
        RstTo::Unacked(info.tcp_seq.wrapping_add(seg_len))
    };
    tcp_reset(info.dst_socket(), info.src_socket(), answer)
}

/// What a reset must carry to be accepted by the side it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RstTo {
    /// That side acknowledged up to here: the reset's sequence number (RFC 5961 accepts an
    /// exact match at once).
    Acked(u32),
    /// That side acknowledged nothing yet (a SYN): the reset acknowledges up to here.
    Unacked(u32),
}

/// A TCP RST from `from` to `to` (RFC 9293 §3.10.7.1), or None for mixed families.
pub fn tcp_reset(from: SocketAddr, to: SocketAddr, answer: RstTo) -> Option<Vec<u8>> {
    let b = ip_builder(from.ip(), to.ip())?;
    let b = match answer {
        RstTo::Acked(seq) => b.tcp(from.port(), to.port(), seq, 0).rst(),
        RstTo::Unacked(ack) => b.tcp(from.port(), to.port(), 0, 0).rst().ack(ack),
    };
    finish(b.size(0), |o| b.write(o, &[]))
}

/// A UDP datagram from `src` to `dst` carrying `payload`, appended to `out`.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let b = ip_builder(src.ip(), dst.ip())?.udp(src.port(), dst.port());
    finish(b.size(payload.len()), |o| b.write(o, payload))
}

/// An ICMP echo reply answering the echo request `orig`.
pub fn icmp_echo_reply(orig: &[u8], info: &PacketInfo) -> Option<Vec<u8>> {
    let e = info.echo.filter(|e| e.request)?;
    let b = ip_builder(info.dst, info.src)?;
    let data = info.payload(orig).get(8..).unwrap_or(&[]);
    match info.proto {
        PROTO_ICMP => {
            let b = b.icmpv4_echo_reply(e.id, e.seq);
            finish(b.size(data.len()), |o| b.write(o, data))
        }
        PROTO_ICMPV6 => {
            let b = b.icmpv6_echo_reply(e.id, e.seq);
            finish(b.size(data.len()), |o| b.write(o, data))
        }
        _ => None,
    }
}

/// IP protocol number in words, for logs.
pub fn proto_name(p: u8) -> &'static str {
    match IpNumber(p) {
        IpNumber::TCP => "tcp",
        IpNumber::UDP => "udp",
        IpNumber::ICMP => "icmp",
        IpNumber::IPV6_ICMP => "icmpv6",
        _ => "ip",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn syn(src: &str, dst: &str) -> Vec<u8> {
        let s: SocketAddr = src.parse().unwrap();
        let d: SocketAddr = dst.parse().unwrap();
        let b = ip_builder(s.ip(), d.ip())
            .unwrap()
            .tcp(s.port(), d.port(), 1000, 64000)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, &[]).unwrap();
        v
    }

    #[test]
    fn rst_answers_a_syn() {
        let p = syn("100.96.0.1:40000", "198.51.100.10:22");
        let info = inspect(&p).unwrap();
        assert!(info.tcp.syn && !info.tcp.ack);
        let rst = tcp_rst(&info).unwrap();
        let r = inspect(&rst).unwrap();
        assert_eq!(r.src_socket(), info.dst_socket());
        assert_eq!(r.dst_socket(), info.src_socket());
        assert!(r.tcp.rst && r.tcp.ack);
        assert_eq!(r.tcp_ack, 1001);
        assert!(tcp_rst(&r).is_none(), "never answer a RST");
    }

    #[test]
    fn too_big_quotes_the_packet() {
        for (s, d) in [("10.0.0.1:1", "10.0.0.2:2"), ("[fd00::1]:1", "[fd00::2]:2")] {
            let p = syn(s, d);
            let info = inspect(&p).unwrap();
            let icmp = too_big_or_panic(&p, &info);
            let i = inspect(&icmp).unwrap();
            assert!(i.icmp_error);
            assert_eq!(i.dst, info.src);
            assert!(icmp.ends_with(&p));
            assert!(
                icmp_too_big(&icmp, &i, 1280).is_none(),
                "never answer an ICMP error"
            );
        }
    }

    fn too_big_or_panic(p: &[u8], info: &PacketInfo) -> Vec<u8> {
        icmp_too_big(p, info, 1280).unwrap()
    }

    #[test]
    fn udp_roundtrip() {
        let p = udp_packet(
            "192.0.2.1:53".parse().unwrap(),
            "100.96.0.1:5000".parse().unwrap(),
            b"hi",
        )
        .unwrap();
        let info = inspect(&p).unwrap();
        assert_eq!(info.proto, PROTO_UDP);
        assert_eq!(info.payload(&p), b"hi");
        assert!(udp_packet(
            "192.0.2.1:53".parse().unwrap(),
            "[::1]:1".parse().unwrap(),
            b""
        )
        .is_none());
    }

    proptest! {
        #[test]
        fn inspect_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(info) = inspect(&b) {
                let _ = info.payload(&b);
                let _ = icmp_unreachable(&b, &info, Unreachable::Host);
                let _ = tcp_rst(&info);
                let _ = icmp_echo_reply(&b, &info);
            }
        }

        #[test]
        fn inspect_never_panics_on_mangled_ip(mut b in proptest::collection::vec(any::<u8>(), 20..100), v6 in any::<bool>()) {
            b[0] = if v6 { 0x60 } else { 0x45 };
            if let Ok(info) = inspect(&b) {
                prop_assert!(info.payload_offset + info.payload_len <= b.len());
            }
        }
    }
}

//! `packet`: one IP packet as the TUN device (or a tunnel) hands it over: the inspector, and
//! every answer the packet plane builds from what it found. Each answer must be an IP packet
//! our own inspector reads, addressed back to the sender.

use sluice_dataplane::packet::{self, PacketInfo, Unreachable};

pub fn packet(data: &[u8]) {
    let Ok(info) = packet::inspect(data) else {
        return;
    };
    assert!(
        info.payload_offset + info.payload_len <= data.len(),
        "payload outside the packet: {info:?}"
    );
    assert_eq!(info.total_len, data.len());
    let _ = info.payload(data);
    let _ = packet::proto_name(info.proto);
    let _ = (info.src_socket(), info.dst_socket());
    if let Some(p) = packet::icmp_too_big(data, &info, 1280) {
        check_icmp_error(&info, &p);
    }
    for why in [
        Unreachable::Net,
        Unreachable::Host,
        Unreachable::Port,
        Unreachable::Prohibited,
    ] {
        if let Some(p) = packet::icmp_unreachable(data, &info, why) {
            check_icmp_error(&info, &p);
        }
    }
    if let Some(p) = packet::tcp_rst(&info) {
        let r = answer(&info, &p);
        assert!(r.tcp.rst, "a RST without the flag: {r:?}");
        assert_eq!((r.src_port, r.dst_port), (info.dst_port, info.src_port));
    }
    if let Some(p) = packet::icmp_echo_reply(data, &info) {
        let r = answer(&info, &p);
        let (e, q) = (r.echo, info.echo);
        assert!(e.is_some_and(|e| !e.request), "not an echo reply: {r:?}");
        assert_eq!(e.map(|e| (e.id, e.seq)), q.map(|q| (q.id, q.seq)));
    }
}

/// Parses an answer to `info`'s packet, which must go back from its destination to its source.
fn answer(info: &PacketInfo, p: &[u8]) -> PacketInfo {
    let r = packet::inspect(p).unwrap_or_else(|e| panic!("our answer does not parse: {e}"));
    assert_eq!((r.src, r.dst), (info.dst, info.src), "answer misaddressed");
    r
}

fn check_icmp_error(info: &PacketInfo, p: &[u8]) {
    assert!(
        !info.icmp_error,
        "an ICMP error answered with an ICMP error"
    );
    let r = answer(info, p);
    assert!(r.icmp_error, "not an ICMP error: {r:?}");
    assert!(p.len() <= 1280, "ICMP error of {} bytes", p.len());
}

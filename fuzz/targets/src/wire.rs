//! The tunnel and control wire formats (dataplane/src/wire.rs), in the spirit of hickory-dns's
//! `message` target: whatever parses must encode, and parse back to the same value.

use sluice_dataplane::identity::PeerId;
use sluice_dataplane::wire::{
    self, ControlDecoder, ControlMessage, Datagram, Punch, MAX_CONTROL_MESSAGE, MAX_TUNNEL_MESSAGE,
};

/// `control_message`: one control or tunnel message body (without its length prefix).
pub fn control_message(data: &[u8]) {
    if let Ok(m) = ControlMessage::parse(data) {
        roundtrip(&m, data.len());
    }
}

/// Encodes a parsed message (whose body was `len` bytes) and parses it back.
fn roundtrip(m: &ControlMessage, len: usize) {
    let _ = format!("{m:?}");
    let mut out = Vec::new();
    match m.encode(&mut out) {
        Ok(()) => {}
        // The parser takes bodies of any length; the encoder refuses what no stream carries.
        Err(_) if len > MAX_TUNNEL_MESSAGE - 16 => return,
        Err(e) => panic!("a parsed message does not encode: {e}: {m:?}"),
    }
    let framed = usize::from(u16::from_be_bytes([out[0], out[1]]));
    assert_eq!(framed, out.len() - 2, "length prefix");
    let back = ControlMessage::parse(&out[2..])
        .unwrap_or_else(|e| panic!("an encoded message does not parse: {e}: {m:?}"));
    assert_eq!(&back, m);
    // Canonical from here on: the encoding of what was parsed is stable.
    let mut again = Vec::new();
    back.encode(&mut again).expect("encodes twice");
    assert_eq!(again, out);
}

/// `control_stream`: a message stream as it arrives in pieces. The first byte picks the
/// decoder (bit 0: a relay's control stream, or a tunnel's message stream) and the second the
/// size of the pieces; the rest is the stream.
pub fn control_stream(data: &[u8]) {
    let [mode, chunk, stream @ ..] = data else {
        return;
    };
    let limit = if mode & 1 == 0 {
        MAX_CONTROL_MESSAGE
    } else {
        MAX_TUNNEL_MESSAGE
    };
    let mut d = ControlDecoder::with_limit(limit);
    for piece in stream.chunks(usize::from(*chunk).max(1)) {
        d.push(piece);
        loop {
            match d.next_message() {
                None => break,
                Some(Ok(m)) => roundtrip(&m, 0),
                // A broken frame poisons the stream: the caller closes the connection.
                Some(Err(_)) => return,
            }
        }
    }
}

/// `datagram`: a DATAGRAM of a tunnel, of a control connection or of a relay-to-relay link
/// (tunnel IP packet, tunnel IP packet to a name, relay forward, mesh forward). The headers our senders write must give back the same
/// datagram.
pub fn datagram(data: &[u8]) {
    match Datagram::parse(data) {
        Ok(Datagram::TunnelIp(p)) => assert_eq!(p, &data[1..]),
        Ok(Datagram::NamedIp { name, packet }) => {
            let mut b = vec![0u8; wire::named_ip_overhead(name) + packet.len()];
            wire::put_named_ip_header(&mut b, name).expect("a parsed name fits its header");
            b[wire::named_ip_overhead(name)..].copy_from_slice(packet);
            assert_eq!(b, data);
        }
        Ok(Datagram::RelayForward { peer, packet }) => {
            let mut b = vec![0u8; wire::RELAY_FORWARD_OVERHEAD + packet.len()];
            wire::put_relay_forward_header(&mut b, &peer);
            b[wire::RELAY_FORWARD_OVERHEAD..].copy_from_slice(packet);
            assert_eq!(b, data);
            assert_eq!(PeerId::from_slice(&data[1..33]), Some(peer));
        }
        Ok(Datagram::MeshForward { route, packet }) => {
            let mut b = vec![wire::DGRAM_MESH_FORWARD];
            b.extend_from_slice(&route.to_be_bytes());
            b.extend_from_slice(packet);
            assert_eq!(b, data);
        }
        Err(_) => {}
    }
}

/// `punch`: a UDP payload on a tunnel socket that may be a connectivity check. A punch has one
/// encoding: what parses re-encodes to the same bytes.
pub fn punch(data: &[u8]) {
    match Punch::parse(data) {
        Ok(p) => {
            assert!(
                Punch::is_punch(data),
                "parsed a punch that is_punch refuses"
            );
            assert_eq!(&p.encode()[..], data);
            let _ = format!("{p:?}");
        }
        Err(_) => assert!(
            !Punch::is_punch(data) || data.len() != wire::PUNCH_LEN,
            "a punch-sized packet with a punch type did not parse"
        ),
    }
}

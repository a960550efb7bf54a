//! ICMP echo toward a real destination, so a ping through the tunnel says whether the service's
//! host answers (the connector never answers on its behalf). Raw ICMP sockets need root or
//! CAP_NET_RAW, which the connector has anyway for nothing else; without them pings fail.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type};
use socket2::{Domain, Protocol, Socket, Type};

/// Sends one echo request to `dst` and waits up to `timeout` for its reply. The identifier on
/// the wire is random (raw sockets see every reply on the host); `id`/`seq` are the app's.
pub fn echo(dst: IpAddr, _id: u16, seq: u16, payload: &[u8], timeout: Duration) -> bool {
    match try_echo(dst, seq, payload, timeout) {
        Ok(answered) => answered,
        Err(e) => {
            tracing::debug!("ping {dst}: {e}");
            false
        }
    }
}

fn try_echo(dst: IpAddr, seq: u16, payload: &[u8], timeout: Duration) -> std::io::Result<bool> {
    let ident: u16 = rand::random();
    let (domain, proto) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let mut sock = Socket::new(domain, Type::RAW, Some(proto))?;
    let mut msg = Vec::with_capacity(8 + payload.len());
    match dst {
        IpAddr::V4(_) => {
            let h = Icmpv4Header::with_checksum(
                Icmpv4Type::EchoRequest(IcmpEchoHeader { id: ident, seq }),
                payload,
            );
            msg.extend_from_slice(&h.to_bytes());
        }
        IpAddr::V6(_) => {
            // The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
            msg.extend_from_slice(&[128, 0, 0, 0]);
            msg.extend_from_slice(&ident.to_be_bytes());
            msg.extend_from_slice(&seq.to_be_bytes());
        }
    }
    msg.extend_from_slice(payload);
    sock.send_to(&msg, &SocketAddr::new(dst, 0).into())?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        let icmp = match dst {
            // Raw IPv4 sockets deliver the IP header too.
            IpAddr::V4(_) => {
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                buf.get(ihl..n).unwrap_or(&[])
            }
            IpAddr::V6(_) => &buf[..n],
        };
        let reply_type = if dst.is_ipv4() { 0 } else { 129 };
        if icmp.len() >= 8
            && icmp[0] == reply_type
            && u16::from_be_bytes([icmp[4], icmp[5]]) == ident
            && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
        {
            return Ok(true);
        }
    }
}

//! Batched UDP on a node's socket: UDP GSO on send (one `sendmsg` carries up to 64 equal-size
//! packets to one destination, cut apart by the kernel or the receiver's GRO) and UDP GRO on
//! receive (one `recvmsg` returns a run of equal-size packets from one sender). One syscall per
//! batch instead of one per packet: the agent spent more than half its time in the kernel,
//! most of it on a `sendto` or `recvfrom` per QUIC packet.
//!
//! [`GsoBatch`] and [`segments`] are the plain logic (which packets may share a send, how a
//! coalesced read splits); [`UdpSender`] and [`UdpReceiver`] are the socket side.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most packets in one GSO send (the kernel's limit is 64).
pub const MAX_SEGMENTS: usize = 64;
/// Largest GSO send (an IP datagram's payload must fit 64 KiB).
const MAX_BATCH_BYTES: usize = 65_000;
/// Room for a coalesced read.
const RECV_BUFFER: usize = 65_536;

/// Equal-size packets to one destination, gathered for one send. The last one may be shorter;
/// after it, the batch is closed.
#[derive(Debug)]
pub struct GsoBatch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl Default for GsoBatch {
    fn default() -> Self {
        GsoBatch {
            buf: Vec::with_capacity(MAX_BATCH_BYTES),
            to: None,
            segment: 0,
            count: 0,
            closed: false,
        }
    }
}

impl GsoBatch {
    /// Whether a packet of `len` bytes to `to` can join this batch.
    pub fn fits(&self, to: SocketAddr, len: usize) -> bool {
        if self.count == 0 {
            return len > 0 && len <= MAX_BATCH_BYTES;
        }
        !self.closed
            && self.to == Some(to)
            && len > 0
            && len <= self.segment
            && self.count < MAX_SEGMENTS
            && self.buf.len() + len <= MAX_BATCH_BYTES
    }

    /// Adds a packet; the caller checked [`GsoBatch::fits`].
    pub fn push(&mut self, to: SocketAddr, pkt: &[u8]) {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = pkt.len();
        } else if pkt.len() < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(pkt);
        self.count += 1;
    }

    /// The packets so far, their destination and segment size; the batch is then empty.
    fn take(&mut self) -> Option<(SocketAddr, usize, usize)> {
        let to = self.to.take()?;
        let r = (to, self.segment, self.count);
        self.count = 0;
        self.segment = 0;
        self.closed = false;
        Some(r)
    }
}

/// The packets in a coalesced read of `len` bytes whose segment size the kernel reported as
/// `segment` (None: one packet): byte ranges in order, the last possibly shorter.
pub fn segments(
    len: usize,
    segment: Option<usize>,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = match segment {
        Some(s) if s > 0 && s < len => s,
        _ => len.max(1),
    };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// Sends through a socket in GSO batches, falling back to one packet per send for good when
/// the kernel refuses GSO (a device without checksum offload answers EIO).
pub struct UdpSender {
    batch: GsoBatch,
    gso: bool,
}

impl Default for UdpSender {
    fn default() -> Self {
        UdpSender {
            batch: GsoBatch::default(),
            gso: true,
        }
    }
}

impl UdpSender {
    /// Queues one packet, sending the batch first when the packet cannot join it.
    pub async fn send(&mut self, socket: &UdpSocket, pkt: &[u8], to: SocketAddr) {
        if !self.gso {
            return send_one(socket, pkt, to).await;
        }
        if !self.batch.fits(to, pkt.len()) {
            self.flush(socket).await;
        }
        self.batch.push(to, pkt);
    }

    /// Sends what is queued.
    pub async fn flush(&mut self, socket: &UdpSocket) {
        let Some((to, segment, count)) = self.batch.take() else {
            return;
        };
        let buf = std::mem::take(&mut self.batch.buf);
        if count == 1 {
            send_one(socket, &buf, to).await;
        } else {
            let seg = u16::try_from(segment).unwrap_or(u16::MAX);
            let addr = SockaddrStorage::from(to);
            let fd = socket.as_raw_fd();
            let r = socket
                .async_io(Interest::WRITABLE, || {
                    sendmsg(
                        fd,
                        &[IoSlice::new(&buf)],
                        &[ControlMessage::UdpGsoSegments(&seg)],
                        MsgFlags::empty(),
                        Some(&addr),
                    )
                    .map_err(io::Error::from)
                })
                .await;
            if let Err(e) = r {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                ) {
                    tracing::warn!("UDP GSO refused ({e}): sending one packet per syscall");
                    self.gso = false;
                    for r in segments(buf.len(), Some(segment)) {
                        send_one(socket, &buf[r], to).await;
                    }
                } else {
                    tracing::debug!("UDP send of {count} packets to {to} failed: {e}");
                }
            }
        }
        self.batch.buf = buf;
        self.batch.buf.clear();
    }
}

async fn send_one(socket: &UdpSocket, pkt: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(pkt, to).await {
        tracing::debug!("UDP send to {to} failed: {e}");
    }
}

/// Receives from a socket with GRO: each read may hold several packets from one sender.
pub struct UdpReceiver {
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    len: usize,
    from: Option<SocketAddr>,
    segment: Option<usize>,
}

impl UdpReceiver {
    /// Turns GRO on for `socket` (a kernel without it just delivers one packet per read).
    pub fn new(socket: &UdpSocket) -> Self {
        if let Err(e) = setsockopt(socket, sockopt::UdpGroSegment, &true) {
            tracing::debug!("UDP GRO unavailable: {e}");
        }
        UdpReceiver {
            buf: vec![0u8; RECV_BUFFER],
            cmsg: nix::cmsg_space!(i32),
            len: 0,
            from: None,
            segment: None,
        }
    }

    /// Waits for the next read.
    pub async fn recv(&mut self, socket: &UdpSocket) -> io::Result<()> {
        let fd = socket.as_raw_fd();
        let (buf, cmsg) = (&mut self.buf, &mut self.cmsg);
        let got = socket
            .async_io(Interest::READABLE, || read_one(fd, buf, cmsg))
            .await?;
        (self.len, self.from, self.segment) = got;
        Ok(())
    }

    /// The next read if one is waiting (`WouldBlock` if not).
    pub fn try_recv(&mut self, socket: &UdpSocket) -> io::Result<()> {
        let fd = socket.as_raw_fd();
        let (buf, cmsg) = (&mut self.buf, &mut self.cmsg);
        let got = socket.try_io(Interest::READABLE, || read_one(fd, buf, cmsg))?;
        (self.len, self.from, self.segment) = got;
        Ok(())
    }

    /// The sender of the last read.
    pub fn from(&self) -> Option<SocketAddr> {
        self.from
    }

    /// The last read's length and segment size: its packets are
    /// `segments(len, segment)` in [`UdpReceiver::buf_mut`].
    pub fn layout(&self) -> (usize, Option<usize>) {
        (self.len, self.segment)
    }

    pub fn buf_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

type Read = (usize, Option<SocketAddr>, Option<usize>);

fn read_one(fd: i32, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<Read> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())
        .map_err(io::Error::from)?;
    let mut segment = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(s) = c {
                segment = usize::try_from(s).ok();
            }
        }
    }
    let from = msg.address.and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
            .or_else(|| {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
            })
    });
    Ok((msg.bytes, from, segment))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn equal_packets_to_one_peer_share_a_batch_until_a_short_one() {
        let (a, b) = (addr("192.0.2.1:1"), addr("192.0.2.2:1"));
        let mut g = GsoBatch::default();
        assert!(g.fits(a, 1200));
        g.push(a, &[1; 1200]);
        assert!(g.fits(a, 1200));
        assert!(!g.fits(a, 1300), "bigger than the segment");
        assert!(!g.fits(b, 1200), "another destination");
        g.push(a, &[2; 1200]);
        assert!(g.fits(a, 500));
        g.push(a, &[3; 500]);
        assert!(!g.fits(a, 500), "nothing after a short one");
        assert_eq!(g.take(), Some((a, 1200, 3)));
        assert_eq!(g.take(), None, "empty again");
        assert!(g.fits(b, 1300), "and open to anything");
    }

    #[test]
    fn a_batch_holds_at_most_64_packets() {
        let a = addr("192.0.2.1:1");
        let mut g = GsoBatch::default();
        for _ in 0..MAX_SEGMENTS {
            assert!(g.fits(a, 100));
            g.push(a, &[0; 100]);
        }
        assert!(!g.fits(a, 100));
    }

    #[test]
    fn a_coalesced_read_splits_at_the_segment_size() {
        let r: Vec<_> = segments(2500, Some(1000)).collect();
        assert_eq!(r, vec![0..1000, 1000..2000, 2000..2500]);
        assert_eq!(segments(700, None).collect::<Vec<_>>(), vec![0..700]);
        assert_eq!(segments(700, Some(0)).collect::<Vec<_>>(), vec![0..700]);
        assert_eq!(segments(0, None).count(), 0);
    }

    proptest! {
        #[test]
        fn segments_cover_the_read_in_order(len in 0usize..70_000, seg in proptest::option::of(0usize..3000)) {
            let mut next = 0;
            for r in segments(len, seg) {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start);
                next = r.end;
            }
            prop_assert_eq!(next, len);
        }
    }

    /// A GSO batch between two real sockets arrives whole and in order, coalesced by GRO or
    /// not.
    #[tokio::test]
    async fn a_gso_batch_arrives_intact_through_gro() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let mut receiver = UdpReceiver::new(&rx);
        let mut sender = UdpSender::default();
        let packets: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; if i == 9 { 300 } else { 1200 }])
            .collect();
        for p in &packets {
            sender.send(&tx, p, to).await;
        }
        sender.flush(&tx).await;
        let mut got: Vec<Vec<u8>> = Vec::new();
        while got.len() < packets.len() {
            tokio::time::timeout(std::time::Duration::from_secs(5), receiver.recv(&rx))
                .await
                .expect("packets arrive")
                .unwrap();
            assert_eq!(receiver.from(), Some(tx.local_addr().unwrap()));
            let (len, seg) = receiver.layout();
            for r in segments(len, seg) {
                got.push(receiver.buf_mut()[r].to_vec());
            }
        }
        assert_eq!(got, packets);
    }
}

//! ICMP echo toward a real destination, so a ping through the tunnel says whether the service's
//! host answers (the connector never answers on its behalf).
//!
//! One raw socket per address family, opened on first use and kept: a ping costs one `sendto`
//! from the caller and, on the way back, a wake of that family's task, which matches the reply
//! and answers through the flow channel. No thread and no socket per ping. Raw ICMP sockets need
//! root or CAP_NET_RAW; without them every echo is answered as unanswered.
//!
//! [`EchoTable`] is the sans-IO core (ids on the wire, deadlines, matching, the bound);
//! [`Pinger`] is the tokio shell around the sockets.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};

use crate::splice::FlowMsg;

/// How long an ICMP echo waits for its reply.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(2);
/// Echoes waiting for a reply, per address family, at most: a ping flood cannot grow memory.
pub const MAX_PENDING: usize = 4096;
/// Replies read per wake before other tasks get a turn.
const RECV_BATCH: usize = 64;
/// Largest reply read (a reply echoes the request's payload, which fits the tunnel MTU).
const RECV_BUF: usize = 2048;

const ICMPV4_ECHO_REPLY: u8 = 0;
const ICMPV4_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// `ICMP_FILTER` (linux/icmp.h), at level `SOL_RAW`: a u32, bit N set = drop ICMP type N.
const ICMP_FILTER: libc::c_int = 1;
/// `ICMP6_FILTER` (netinet/icmp6.h), at level `IPPROTO_ICMPV6`: 256 bits, bit N set = drop type N.
const ICMP6_FILTER: libc::c_int = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Why an echo was not sent: the caller answers it as not answered at once.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("{MAX_PENDING} echoes are already waiting for replies")]
    Full,
    #[error("no raw ICMP socket for this address family")]
    NoSocket,
    #[error("sending the echo request: {0}")]
    Send(#[from] io::Error),
}

/// An echo request the pinger did not send, handed back to be answered as not answered.
#[derive(Debug)]
pub struct Refused {
    pub request: Vec<u8>,
    pub why: EchoError,
}

/// Identifier and sequence number of an echo on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireId {
    pub ident: u16,
    pub seq: u16,
}

/// What to tell agent `key` about its echo `request`.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer<K> {
    pub key: K,
    pub request: Vec<u8>,
    pub answered: bool,
}

/// Reads the id of an echo reply from what a raw ICMP socket of `family` delivered: IPv4 raw
/// sockets include the IP header, IPv6 ones start at the ICMPv6 header. Anything else is `None`.
pub fn parse_reply(family: Family, buf: &[u8]) -> Option<WireId> {
    let (icmp, reply_type) = match family {
        Family::V4 => {
            let first = *buf.first()?;
            if first >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            (buf.get(ihl..)?, ICMPV4_ECHO_REPLY)
        }
        Family::V6 => (buf, ICMPV6_ECHO_REPLY),
    };
    match icmp.get(..8)? {
        &[t, 0, _, _, i0, i1, s0, s1] if t == reply_type => Some(WireId {
            ident: u16::from_be_bytes([i0, i1]),
            seq: u16::from_be_bytes([s0, s1]),
        }),
        _ => None,
    }
}

/// The ICMP(v6) echo request header for `id`. The kernel fills in the ICMPv6 checksum on raw
/// ICMPv6 sockets; the ICMPv4 one is ours to compute.
pub fn request_header(family: Family, id: WireId, payload: &[u8]) -> [u8; 8] {
    let [i0, i1] = id.ident.to_be_bytes();
    let [s0, s1] = id.seq.to_be_bytes();
    match family {
        Family::V4 => {
            let h = Icmpv4Header::with_checksum(
                Icmpv4Type::EchoRequest(IcmpEchoHeader {
                    id: id.ident,
                    seq: id.seq,
                }),
                payload,
            );
            let b = h.to_bytes();
            let mut out = [ICMPV4_ECHO_REQUEST, 0, 0, 0, i0, i1, s0, s1];
            if let Some(sum) = b.get(2..4) {
                out[2..4].copy_from_slice(sum);
            }
            out
        }
        Family::V6 => [ICMPV6_ECHO_REQUEST, 0, 0, 0, i0, i1, s0, s1],
    }
}

struct Pending<K> {
    /// Which use of this sequence number it is (sequence numbers wrap).
    serial: u64,
    key: K,
    dst: IpAddr,
    request: Vec<u8>,
    deadline: Instant,
}

/// The echoes of one address family waiting for replies.
///
/// One random identifier per table and a rolling sequence number make each outstanding echo
/// unique on the wire (a raw socket sees every echo reply the host gets). Deadlines grow with
/// the sequence (one timeout for all), so the oldest entry is always the next to expire and
/// expiry walks the serials in order: no timer per echo, no sorted structure.
pub struct EchoTable<K> {
    ident: u16,
    timeout: Duration,
    /// By sequence number on the wire.
    pending: HashMap<u16, Pending<K>>,
    /// Serial of the next echo; its low 16 bits are its sequence number.
    next: u64,
    /// No pending echo has a serial below this.
    oldest: u64,
    last_deadline: Option<Instant>,
}

impl<K> EchoTable<K> {
    pub fn new(ident: u16, timeout: Duration) -> Self {
        EchoTable {
            ident,
            timeout,
            pending: HashMap::new(),
            next: 0,
            oldest: 0,
            last_deadline: None,
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Registers an echo of agent `key` to `dst` and gives its id on the wire, or gives the
    /// request back when [`MAX_PENDING`] echoes are waiting already.
    pub fn insert(
        &mut self,
        key: K,
        dst: IpAddr,
        request: Vec<u8>,
        now: Instant,
    ) -> Result<WireId, Vec<u8>> {
        if self.pending.len() >= MAX_PENDING {
            return Err(request);
        }
        // A sequence number still in use (an echo 65,536 serials old waits yet) is skipped;
        // fewer than 65,536 are in use, so this ends.
        let mut serial = self.next;
        while self.pending.contains_key(&(serial as u16)) {
            serial += 1;
        }
        self.next = serial + 1;
        // Never earlier than the last one, so oldest-first expiry stays exact.
        let deadline = (now + self.timeout).max(self.last_deadline.unwrap_or(now));
        self.last_deadline = Some(deadline);
        let seq = serial as u16;
        self.pending.insert(
            seq,
            Pending {
                serial,
                key,
                dst,
                request,
                deadline,
            },
        );
        Ok(WireId {
            ident: self.ident,
            seq,
        })
    }

    /// Forgets echo `id` (its request could not be sent) and gives its request back.
    pub fn cancel(&mut self, id: WireId) -> Option<Vec<u8>> {
        if id.ident != self.ident {
            return None;
        }
        self.pending.remove(&id.seq).map(|p| p.request)
    }

    /// An echo reply `id` came from `from`: the answer to the echo it matches, if any.
    pub fn on_reply(&mut self, from: IpAddr, id: WireId) -> Option<Answer<K>> {
        if id.ident != self.ident || self.pending.get(&id.seq)?.dst != from {
            return None;
        }
        let p = self.pending.remove(&id.seq)?;
        Some(Answer {
            key: p.key,
            request: p.request,
            answered: true,
        })
    }

    /// When the oldest echo gives up, if any waits.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.skip_answered();
        self.pending.get(&(self.oldest as u16)).map(|p| p.deadline)
    }

    /// The next echo whose deadline passed at `now`, answered as not answered; call until `None`.
    pub fn expire(&mut self, now: Instant) -> Option<Answer<K>> {
        let due = self.next_deadline()? <= now;
        if !due {
            return None;
        }
        let p = self.pending.remove(&(self.oldest as u16))?;
        self.oldest += 1;
        Some(Answer {
            key: p.key,
            request: p.request,
            answered: false,
        })
    }

    /// Moves `oldest` to the oldest serial still pending (each serial is passed once).
    fn skip_answered(&mut self) {
        if self.pending.is_empty() {
            self.oldest = self.next;
            return;
        }
        while self.oldest < self.next {
            match self.pending.get(&(self.oldest as u16)) {
                Some(p) if p.serial == self.oldest => return,
                _ => self.oldest += 1,
            }
        }
    }
}

/// One address family's raw socket and the echoes waiting on it.
struct Side<K> {
    family: Family,
    fd: AsyncFd<Socket>,
    table: Mutex<EchoTable<K>>,
    /// Signalled when the table gets its first echo, so the task arms its timer.
    armed: Notify,
}

impl<K> Side<K> {
    /// The answer a datagram read from the socket gives, if it replies to a waiting echo.
    fn on_datagram(&self, datagram: &[u8], from: IpAddr) -> Option<Answer<K>> {
        let id = parse_reply(self.family, datagram)?;
        self.table().on_reply(from, id)
    }

    /// Reads the replies queued already, while echoes wait: no readiness round, no task hop.
    /// Stops at the first read that finds nothing (the task gets the reply when it comes).
    fn take_queued(&self, buf: &mut [u8], answers: &mut Vec<Answer<K>>) {
        for _ in 0..RECV_BATCH {
            if self.table().is_empty() {
                return;
            }
            match recv_from(self.fd.get_ref(), buf) {
                Ok((n, from)) => {
                    if let Some(a) = buf.get(..n).and_then(|d| self.on_datagram(d, from)) {
                        answers.push(a);
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn table(&self) -> MutexGuard<'_, EchoTable<K>> {
        // Nothing panics while holding the lock; if something did, the table is still sound.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, key: K, dst: IpAddr, payload: &[u8], request: Vec<u8>) -> Result<(), Refused> {
        let mut table = self.table();
        let was_empty = table.is_empty();
        // Registered before sending, so a reply however fast finds it.
        let id = table
            .insert(key, dst, request, Instant::now())
            .map_err(|request| Refused {
                request,
                why: EchoError::Full,
            })?;
        let header = request_header(self.family, id, payload);
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        let sent = self
            .fd
            .get_ref()
            .send_to_vectored(&[IoSlice::new(&header), IoSlice::new(payload)], &to);
        if let Err(e) = sent {
            let request = table.cancel(id).unwrap_or_default();
            return Err(Refused {
                request,
                why: EchoError::Send(e),
            });
        }
        drop(table);
        if was_empty {
            self.armed.notify_one();
        }
        Ok(())
    }
}

/// Opens the raw ICMP socket of `family`, non-blocking, filtered in the kernel so that it only
/// wakes for echo replies.
pub fn open_socket(family: Family) -> io::Result<Socket> {
    let sock = match family {
        Family::V4 => Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
        Family::V6 => Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?,
    };
    sock.set_nonblocking(true)?;
    match family {
        Family::V4 => {
            let block_all_but_reply: u32 = !(1 << ICMPV4_ECHO_REPLY);
            setsockopt(&sock, libc::SOL_RAW, ICMP_FILTER, &block_all_but_reply)?;
        }
        Family::V6 => {
            // As ICMP6_FILTER_SETBLOCKALL then ICMP6_FILTER_SETPASS(129).
            let mut filter = [u32::MAX; 8];
            filter[usize::from(ICMPV6_ECHO_REPLY >> 5)] &= !(1 << (ICMPV6_ECHO_REPLY & 31));
            setsockopt(&sock, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &filter)?;
        }
    }
    Ok(sock)
}

fn setsockopt<T: Copy>(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` points to a live, plain `T` of exactly `len` bytes, which the kernel only
    // reads during the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads one datagram and the address it came from.
fn recv_from(sock: &Socket, buf: &mut [u8]) -> io::Result<(usize, IpAddr)> {
    // SAFETY: `buf` is initialised, and recvfrom writes only initialised bytes into it (socket2
    // documents the cast as sound for that reason), so it stays initialised.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    let (n, from) = sock.recv_from(uninit)?;
    let ip = from
        .as_socket()
        .map(|a| a.ip())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    Ok((n, ip))
}

/// Sends echoes from the caller's context (no task hop on the way out) and answers them from
/// one task per address family, through the channel the flow tasks use.
pub struct Pinger<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Pinger<K> {
    fn clone(&self) -> Self {
        Pinger {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K> {
    tx: mpsc::Sender<(K, FlowMsg)>,
    timeout: Duration,
    /// Opened on first use; `None` when that failed (no privilege), which is not retried.
    v4: OnceLock<Option<Arc<Side<K>>>>,
    v6: OnceLock<Option<Arc<Side<K>>>>,
}

impl<K: Copy + Send + 'static> Pinger<K> {
    /// Answers go to `tx`; an echo with no reply within `timeout` is answered as not answered.
    pub fn new(tx: mpsc::Sender<(K, FlowMsg)>, timeout: Duration) -> Self {
        Pinger {
            inner: Arc::new(Inner {
                tx,
                timeout,
                v4: OnceLock::new(),
                v6: OnceLock::new(),
            }),
        }
    }

    /// Sends an echo request with `payload` to `dst` for agent `key`; the answer comes later as
    /// [`FlowMsg::EchoReply`] with `request`. Must run inside the tokio runtime.
    pub fn echo(
        &self,
        key: K,
        dst: IpAddr,
        payload: &[u8],
        request: Vec<u8>,
    ) -> Result<(), Refused> {
        match self.side(Family::of(dst)) {
            Some(side) => side.send(key, dst, payload, request),
            None => Err(Refused {
                request,
                why: EchoError::NoSocket,
            }),
        }
    }

    /// Answers for the echoes whose replies are queued on the sockets already, taken without
    /// waiting. A service next to the connector answers before the send returns (the kernel
    /// delivers on the same CPU), so reading right after sending saves the reply a wake-up, a
    /// task and a channel on its way back; replies not there yet come through the channel.
    pub fn take_replies(&self, out: &mut Vec<(K, FlowMsg)>) {
        let mut buf = [0u8; RECV_BUF];
        let mut answers = Vec::new();
        for side in [self.inner.v4.get(), self.inner.v6.get()] {
            if let Some(Some(side)) = side {
                side.take_queued(&mut buf, &mut answers);
            }
        }
        out.extend(answers.into_iter().map(|a| {
            (
                a.key,
                FlowMsg::EchoReply {
                    request: a.request,
                    answered: a.answered,
                },
            )
        }));
    }

    fn side(&self, family: Family) -> Option<&Arc<Side<K>>> {
        let cell = match family {
            Family::V4 => &self.inner.v4,
            Family::V6 => &self.inner.v6,
        };
        cell.get_or_init(|| match self.start(family) {
            Ok(side) => Some(side),
            Err(e) => {
                tracing::warn!(
                    "ping through the tunnel to {family:?} addresses will fail: cannot open a raw \
                     ICMP socket ({e}); the connector needs root or CAP_NET_RAW"
                );
                None
            }
        })
        .as_ref()
    }

    fn start(&self, family: Family) -> io::Result<Arc<Side<K>>> {
        let rt = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let sock = open_socket(family)?;
        let fd = {
            let _entered = rt.enter();
            // Readable only: requests are sent at once, and a full send buffer drops the echo.
            // SAFETY: the `Socket` owns its descriptor, which stays open and the same until the
            // `AsyncFd` drops it (nothing replaces the socket inside).
            unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?
        };
        let side = Arc::new(Side {
            family,
            fd,
            table: Mutex::new(EchoTable::new(rand::random(), self.inner.timeout)),
            armed: Notify::new(),
        });
        rt.spawn(answer(side.clone(), self.inner.tx.clone()));
        Ok(side)
    }
}

/// Matches replies and expires echoes of one family, for as long as answers can be delivered.
async fn answer<K: Copy + Send + 'static>(side: Arc<Side<K>>, tx: mpsc::Sender<(K, FlowMsg)>) {
    let mut buf = vec![0u8; RECV_BUF];
    // One timer for the oldest deadline. It is moved only when it must fire sooner, which with
    // one timeout for every echo happens only after it fired: moving a tokio timer earlier wakes
    // the runtime's driver (an eventfd write and an epoll round per echo). Firing early is
    // harmless, `expire` checks the clock.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed = false;
    let mut answers = Vec::new();
    loop {
        if let Some(d) = side.table().next_deadline() {
            let d = tokio::time::Instant::from_std(d);
            if !armed || d < timer.deadline() {
                timer.as_mut().reset(d);
                armed = true;
            }
        }
        tokio::select! {
            ready = side.fd.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!("ping: {:?} socket failed: {e}", side.family);
                        return;
                    }
                };
                for _ in 0..RECV_BATCH {
                    match guard.try_io(|fd| recv_from(fd.get_ref(), &mut buf)) {
                        Ok(Ok((n, from))) => {
                            if let Some(a) = buf.get(..n).and_then(|d| side.on_datagram(d, from)) {
                                answers.push(a);
                            }
                        }
                        // A pending socket error is reported once; the next read goes on.
                        Ok(Err(e)) => {
                            tracing::debug!("ping: reading {:?} replies: {e}", side.family);
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
            () = &mut timer, if armed => {
                armed = false;
                let now = Instant::now();
                let mut table = side.table();
                while let Some(a) = table.expire(now) {
                    answers.push(a);
                }
            }
            () = side.armed.notified(), if !armed => {}
        }
        for a in answers.drain(..) {
            let msg = FlowMsg::EchoReply {
                request: a.request,
                answered: a.answered,
            };
            if tx.send((a.key, msg)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11));

    fn v4_reply(id: WireId, ihl: u8) -> Vec<u8> {
        let mut p = vec![0u8; usize::from(ihl) * 4];
        p[0] = 0x40 | ihl;
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(&id.ident.to_be_bytes());
        p.extend_from_slice(&id.seq.to_be_bytes());
        p.extend_from_slice(b"payload");
        p
    }

    #[test]
    fn parses_replies_and_nothing_else() {
        let id = WireId {
            ident: 0xbeef,
            seq: 7,
        };
        assert_eq!(parse_reply(Family::V4, &v4_reply(id, 5)), Some(id));
        // IP options: the ICMP header starts after IHL words.
        assert_eq!(parse_reply(Family::V4, &v4_reply(id, 7)), Some(id));
        let mut request = v4_reply(id, 5);
        request[20] = ICMPV4_ECHO_REQUEST;
        assert_eq!(parse_reply(Family::V4, &request), None);
        let mut short_ihl = v4_reply(id, 5);
        short_ihl[0] = 0x44;
        assert_eq!(parse_reply(Family::V4, &short_ihl), None);
        assert_eq!(parse_reply(Family::V4, &v4_reply(id, 5)[..27]), None);
        let v6 = [ICMPV6_ECHO_REPLY, 0, 0x12, 0x34, 0xbe, 0xef, 0, 7, 1, 2];
        assert_eq!(parse_reply(Family::V6, &v6), Some(id));
        let v6_request = [ICMPV6_ECHO_REQUEST, 0, 0, 0, 0xbe, 0xef, 0, 7];
        assert_eq!(parse_reply(Family::V6, &v6_request), None);
        assert_eq!(parse_reply(Family::V6, &v6[..7]), None);
    }

    #[test]
    fn v4_request_checksum_is_valid() {
        let payload = b"abcdefgh12345";
        let h = request_header(Family::V4, WireId { ident: 1, seq: 2 }, payload);
        let mut all = h.to_vec();
        all.extend_from_slice(payload);
        all.push(0);
        let sum: u32 = all
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!((folded & 0xffff) + (folded >> 16), 0xffff);
    }

    #[test]
    fn a_reply_answers_its_echo_once() {
        let t0 = Instant::now();
        let mut t = EchoTable::new(0x1234, ECHO_TIMEOUT);
        let a = t.insert(1u8, A, vec![1], t0).unwrap();
        let b = t.insert(2u8, B, vec![2], t0).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.ident, 0x1234);
        assert_eq!(
            t.on_reply(B, b),
            Some(Answer {
                key: 2,
                request: vec![2],
                answered: true
            })
        );
        assert_eq!(t.on_reply(B, b), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_reply_from_elsewhere_or_with_other_ids_is_ignored() {
        let t0 = Instant::now();
        let mut t = EchoTable::new(0x1234, ECHO_TIMEOUT);
        let a = t.insert(1u8, A, vec![1], t0).unwrap();
        assert_eq!(t.on_reply(B, a), None);
        let other_ident = WireId { ident: 0x4321, ..a };
        assert_eq!(t.on_reply(A, other_ident), None);
        let other_seq = WireId {
            seq: a.seq.wrapping_add(1),
            ..a
        };
        assert_eq!(t.on_reply(A, other_seq), None);
        assert!(t.on_reply(A, a).is_some());
    }

    #[test]
    fn echoes_expire_oldest_first_at_their_deadline() {
        let t0 = Instant::now();
        let mut t = EchoTable::new(9, ECHO_TIMEOUT);
        assert_eq!(t.next_deadline(), None);
        let a = t.insert(1u8, A, vec![1], t0).unwrap();
        t.insert(2u8, A, vec![2], t0 + Duration::from_secs(1))
            .unwrap();
        let c = t
            .insert(3u8, A, vec![3], t0 + Duration::from_millis(1500))
            .unwrap();
        assert_eq!(t.next_deadline(), Some(t0 + ECHO_TIMEOUT));
        assert_eq!(t.expire(t0 + Duration::from_millis(1999)), None);
        let first = t.expire(t0 + ECHO_TIMEOUT).unwrap();
        assert_eq!((first.key, first.answered), (1, false));
        assert_eq!(t.expire(t0 + ECHO_TIMEOUT), None);
        // Already gone: a late reply answers nothing.
        assert_eq!(t.on_reply(A, a), None);
        assert!(t.on_reply(A, c).is_some());
        let later = t0 + Duration::from_secs(10);
        assert_eq!(t.expire(later).map(|a| a.key), Some(2));
        assert_eq!(t.expire(later), None);
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn deadlines_never_go_backwards() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut t = EchoTable::new(9, ECHO_TIMEOUT);
        t.insert(1u8, A, vec![], t0).unwrap();
        // An insert with an earlier clock reading (another task's `now`) still expires after.
        t.insert(2u8, A, vec![], t0 - Duration::from_secs(1))
            .unwrap();
        assert_eq!(t.expire(t0 + ECHO_TIMEOUT).map(|a| a.key), Some(1));
        assert_eq!(t.expire(t0 + ECHO_TIMEOUT).map(|a| a.key), Some(2));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut t = EchoTable::new(9, ECHO_TIMEOUT);
        let ids: Vec<WireId> = (0..MAX_PENDING)
            .map(|i| t.insert(i, A, vec![], t0).unwrap())
            .collect();
        assert_eq!(t.insert(0, A, vec![7], t0), Err(vec![7]));
        assert!(t.on_reply(A, ids[100]).is_some());
        assert!(t.insert(0, A, vec![], t0).is_ok());
    }

    #[test]
    fn sequence_numbers_wrap_without_reusing_a_waiting_one() {
        let t0 = Instant::now();
        let mut t = EchoTable::new(9, ECHO_TIMEOUT);
        let stuck = t.insert(0u32, A, vec![], t0).unwrap();
        for i in 1..70_000u32 {
            let id = t.insert(i, A, vec![], t0).unwrap();
            assert_ne!(id, stuck);
            assert_eq!(t.on_reply(A, id).map(|a| a.key), Some(i));
        }
        assert_eq!(t.on_reply(A, stuck).map(|a| a.key), Some(0));
    }

    #[test]
    fn cancel_gives_the_request_back() {
        let mut t = EchoTable::new(9, ECHO_TIMEOUT);
        let id = t.insert(1u8, A, vec![5], Instant::now()).unwrap();
        assert_eq!(t.cancel(id), Some(vec![5]));
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert,
        Reply(u16),
        Advance(u16),
    }

    proptest! {
        #[test]
        fn parse_reply_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), v6 in any::<bool>()) {
            let family = if v6 { Family::V6 } else { Family::V4 };
            let _ = parse_reply(family, &bytes);
        }

        /// Every echo is answered exactly once, by its reply or by its deadline, never early.
        #[test]
        fn every_echo_is_answered_once(ops in proptest::collection::vec(
            prop_oneof![
                Just(Op::Insert),
                any::<u16>().prop_map(Op::Reply),
                (0u16..3000).prop_map(Op::Advance),
            ],
            0..300,
        )) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut t = EchoTable::new(77, ECHO_TIMEOUT);
            let mut sent = Vec::new();
            let mut answered = std::collections::HashSet::new();
            for op in ops {
                match op {
                    Op::Insert => {
                        let n = sent.len();
                        let id = t.insert(n, A, vec![], now).unwrap();
                        sent.push((id, now));
                    }
                    Op::Reply(i) => {
                        if let Some(&(id, _)) = sent.get(usize::from(i) % sent.len().max(1)) {
                            if let Some(a) = t.on_reply(A, id) {
                                prop_assert!(a.answered);
                                prop_assert!(answered.insert(a.key));
                            }
                        }
                    }
                    Op::Advance(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        while let Some(a) = t.expire(now) {
                            prop_assert!(!a.answered);
                            prop_assert!(sent[a.key].1 + ECHO_TIMEOUT <= now);
                            prop_assert!(answered.insert(a.key));
                        }
                    }
                }
            }
            while let Some(a) = t.expire(now + Duration::from_secs(60)) {
                prop_assert!(answered.insert(a.key));
            }
            prop_assert_eq!(answered.len(), sent.len());
            prop_assert!(t.is_empty());
        }
    }

    /// Raw sockets need root; without it these tests have nothing to check.
    fn raw_or_skip(family: Family) -> Option<Socket> {
        match open_socket(family) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: no raw sockets here ({e})");
                None
            }
            Err(e) => panic!("opening a raw {family:?} socket: {e}"),
        }
    }

    fn loopback(family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }

    /// ICMP types read from `sock` for our `ident` within a short while.
    fn types_seen(sock: &Socket, family: Family, ident: u16) -> Vec<u8> {
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; RECV_BUF];
        while let Ok((n, _)) = recv_from(sock, &mut buf) {
            let icmp = match family {
                Family::V4 => &buf[usize::from(buf[0] & 0x0f) * 4..n],
                Family::V6 => &buf[..n],
            };
            if icmp.len() >= 8 && u16::from_be_bytes([icmp[4], icmp[5]]) == ident {
                seen.push(icmp[0]);
            }
        }
        seen
    }

    /// Over loopback a raw socket sees our own request too; the kernel filter leaves only the
    /// reply (this checks the filters' bit semantics, which differ from BSD's ICMP6 macros).
    #[test]
    fn the_kernel_filter_passes_only_echo_replies() {
        for family in [Family::V4, Family::V6] {
            let Some(filtered) = raw_or_skip(family) else {
                return;
            };
            let plain = match family {
                Family::V4 => Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)),
                Family::V6 => Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)),
            }
            .unwrap();
            let id = WireId {
                ident: rand::random(),
                seq: 1,
            };
            let payload = b"filter test";
            let header = request_header(family, id, payload);
            let to = SockAddr::from(SocketAddr::new(loopback(family), 0));
            filtered
                .send_to_vectored(&[IoSlice::new(&header), IoSlice::new(payload)], &to)
                .unwrap();
            let (request, reply) = match family {
                Family::V4 => (ICMPV4_ECHO_REQUEST, ICMPV4_ECHO_REPLY),
                Family::V6 => (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
            };
            assert_eq!(
                types_seen(&plain, family, id.ident),
                vec![request, reply],
                "{family:?}"
            );
            assert_eq!(
                types_seen(&filtered, family, id.ident),
                vec![reply],
                "{family:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_pinger_answers_over_loopback() {
        if raw_or_skip(Family::V4).is_none() {
            return;
        }
        let (tx, mut rx) = mpsc::channel(1024);
        let pinger = Pinger::new(tx, ECHO_TIMEOUT);
        let mut expected = std::collections::HashSet::new();
        for i in 0..200u32 {
            let family = if i % 2 == 0 { Family::V4 } else { Family::V6 };
            pinger
                .echo(
                    i,
                    loopback(family),
                    &i.to_be_bytes(),
                    i.to_be_bytes().to_vec(),
                )
                .unwrap();
            expected.insert(i);
        }
        while !expected.is_empty() {
            let (key, msg) = tokio::time::timeout(Duration::from_secs(3), rx.recv())
                .await
                .expect("an answer in time")
                .expect("the pinger is alive");
            match msg {
                FlowMsg::EchoReply { request, answered } => {
                    assert!(answered, "echo {key}");
                    assert_eq!(request, key.to_be_bytes());
                    assert!(expected.remove(&key), "echo {key} answered twice");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_queued_reply_is_taken_at_once_and_only_once() {
        if raw_or_skip(Family::V4).is_none() {
            return;
        }
        let (tx, mut rx) = mpsc::channel(16);
        let pinger = Pinger::new(tx, ECHO_TIMEOUT);
        // Nothing waits: nothing is read.
        let mut out = Vec::new();
        pinger.take_replies(&mut out);
        assert!(out.is_empty());
        for family in [Family::V4, Family::V6] {
            let key = family as u32;
            pinger
                .echo(key, loopback(family), b"fast", b"request".to_vec())
                .unwrap();
            // Loopback usually answers before the send returns; blocking sleeps (no await)
            // keep the answering task from taking the reply first.
            let start = Instant::now();
            while out.is_empty() && start.elapsed() < Duration::from_secs(2) {
                pinger.take_replies(&mut out);
                if out.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            match out.pop() {
                Some((k, FlowMsg::EchoReply { request, answered })) => {
                    assert_eq!(k, key);
                    assert!(answered);
                    assert_eq!(request, b"request");
                }
                other => panic!("{family:?}: expected the reply, got {other:?}"),
            }
        }
        // The task, given its turn, finds nothing left to answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "a reply was answered twice");
    }
}

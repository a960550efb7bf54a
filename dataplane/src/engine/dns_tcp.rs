//! DNS over TCP in the packet path: a small smoltcp interface that holds the engine's DNS
//! address and listens on port 53, so a client told to retry over TCP (a truncated answer)
//! reaches the engine without any DNS socket on the host. Queries are length-prefixed DNS
//! messages (RFC 1035 4.2.2); answers go back in order of arrival.
//!
//! Built on the first TCP packet, so an engine that never sees DNS over TCP spends nothing on
//! it; connections, buffers and idle time are bounded.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};

use crate::queue_device::QueueDevice;

/// Connections at once; a client past this is refused (its SYN gets no listener).
const MAX_CONNS: usize = 8;
/// Receive buffer per connection: one query (DNS queries are small).
const RX_BUFFER: usize = 4096;
/// Send buffer per connection; answers larger than this go out as it drains.
const TX_BUFFER: usize = 16 * 1024;
/// Answer bytes waiting for the send buffer, per connection; past this the connection closes.
const MAX_PENDING: usize = 2 * 65_537;
/// A connection with nothing to do for this long is closed.
const IDLE: Duration = Duration::from_secs(10);
/// Largest DNS message over TCP (its length prefix is 16 bits).
const MAX_MESSAGE: usize = 65_535;

struct Conn {
    handle: SocketHandle,
    /// Which connection this socket serves now (sockets are reused; ids are not).
    id: usize,
    /// Bytes received, up to a whole length-prefixed message.
    rx: Vec<u8>,
    /// Answer bytes (with their length prefix) not yet in the send buffer.
    tx: VecDeque<u8>,
    last_active: Instant,
    /// Whether the socket has had a connection since it last listened.
    active: bool,
}

struct Stack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
}

pub struct DnsTcp {
    address: IpAddr,
    epoch: Instant,
    stack: Option<Stack>,
    next_id: usize,
    queries: VecDeque<(usize, Vec<u8>)>,
    closed: Vec<usize>,
    /// When smoltcp wants polling again, as of the last poll.
    next_poll: Option<Instant>,
}

fn smol(now: Instant, epoch: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

fn listener(address: IpAddr) -> Option<tcp::Socket<'static>> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s.listen(IpListenEndpoint {
        addr: Some(address.into()),
        port: 53,
    })
    .ok()?;
    Some(s)
}

impl Stack {
    /// One more socket listening on port 53, for connection `id`.
    fn listen(&mut self, address: IpAddr, id: usize, now: Instant) -> Option<()> {
        let handle = self.sockets.add(listener(address)?);
        self.conns.push(Conn {
            handle,
            id,
            rx: Vec::new(),
            tx: VecDeque::new(),
            last_active: now,
            active: false,
        });
        Some(())
    }
}

impl DnsTcp {
    pub fn new(address: IpAddr, now: Instant) -> Self {
        DnsTcp {
            address,
            epoch: now,
            stack: None,
            next_id: 0,
            queries: VecDeque::new(),
            closed: Vec::new(),
            next_poll: None,
        }
    }

    fn stack(&mut self, now: Instant) -> Option<&mut Stack> {
        if self.stack.is_none() {
            let mut device = QueueDevice::new(1500);
            let mut iface = Interface::new(
                Config::new(HardwareAddress::Ip),
                &mut device,
                smol(now, self.epoch),
            );
            let prefix = if self.address.is_ipv4() { 32 } else { 128 };
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(self.address.into(), prefix));
            });
            // Replies go back out of the one interface there is.
            match self.address {
                IpAddr::V4(a) => {
                    let _ = iface.routes_mut().add_default_ipv4_route(a);
                }
                IpAddr::V6(a) => {
                    let _ = iface.routes_mut().add_default_ipv6_route(a);
                }
            }
            let mut stack = Stack {
                iface,
                device,
                sockets: SocketSet::new(Vec::new()),
                conns: Vec::new(),
            };
            self.next_id += 1;
            stack.listen(self.address, self.next_id, now)?;
            self.stack = Some(stack);
        }
        self.stack.as_mut()
    }

    /// A TCP packet from the device for the DNS address.
    pub fn handle_packet(&mut self, pkt: &[u8], now: Instant) {
        if let Some(s) = self.stack(now) {
            s.device.rx.push_back(pkt.to_vec());
        }
        self.poll(now);
    }

    /// Queues `answer` for connection `conn` (gone connections drop it).
    pub fn answer(&mut self, conn: usize, answer: &[u8]) {
        let Some(s) = &mut self.stack else { return };
        let Some(c) = s.conns.iter_mut().find(|c| c.id == conn) else {
            return;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        if c.tx.len() + answer.len() + 2 > MAX_PENDING {
            // A client that does not read its answers: it loses the connection.
            s.sockets.get_mut::<tcp::Socket>(c.handle).abort();
            return;
        }
        c.tx.extend(len.to_be_bytes());
        c.tx.extend(answer.iter().copied());
    }

    /// Runs the stack: packets in, queries out, pending answers into send buffers.
    pub fn poll(&mut self, now: Instant) {
        let epoch = self.epoch;
        let address = self.address;
        let Some(s) = &mut self.stack else { return };
        let ts = smol(now, epoch);
        s.iface.poll(ts, &mut s.device, &mut s.sockets);
        let mut progressed = false;
        let mut listening = 0;
        for c in &mut s.conns {
            let sock = s.sockets.get_mut::<tcp::Socket>(c.handle);
            if sock.is_active() {
                if !c.active {
                    c.active = true;
                    c.last_active = now;
                }
                let mut buf = [0u8; 2048];
                while sock.can_recv() {
                    match sock.recv_slice(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            c.rx.extend_from_slice(&buf[..n]);
                            c.last_active = now;
                        }
                    }
                }
                // Whole messages out of the received bytes.
                while c.rx.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([c.rx[0], c.rx[1]]));
                    if len > MAX_MESSAGE || c.rx.len() < 2 + len {
                        break;
                    }
                    let q: Vec<u8> = c.rx[2..2 + len].to_vec();
                    c.rx.drain(..2 + len);
                    self.queries.push_back((c.id, q));
                }
                if c.rx.len() > RX_BUFFER + 2 {
                    sock.abort();
                }
                while !c.tx.is_empty() && sock.can_send() {
                    let (a, _) = c.tx.as_slices();
                    match sock.send_slice(a) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            c.tx.drain(..n);
                            c.last_active = now;
                            progressed = true;
                        }
                    }
                }
                if sock.state() == tcp::State::CloseWait && c.tx.is_empty() {
                    // The client finished sending and has every answer: done.
                    sock.close();
                }
                if now.saturating_duration_since(c.last_active) >= IDLE {
                    sock.abort();
                }
            } else if c.active {
                // The connection ended: the socket listens again, for a new one.
                self.closed.push(c.id);
                self.next_id += 1;
                c.id = self.next_id;
                c.active = false;
                c.rx.clear();
                c.tx.clear();
                if !sock.is_listening() {
                    let _ = sock.listen(IpListenEndpoint {
                        addr: Some(address.into()),
                        port: 53,
                    });
                }
            }
            if sock.is_listening() {
                listening += 1;
            }
        }
        // One socket listens per connection to come: add one while all are busy.
        if listening == 0 && s.conns.len() < MAX_CONNS {
            self.next_id += 1;
            let _ = s.listen(address, self.next_id, now);
        }
        if progressed {
            s.iface.poll(ts, &mut s.device, &mut s.sockets);
        }
        self.next_poll = s
            .iface
            .poll_at(ts, &s.sockets)
            .map(|t| epoch + Duration::from_micros(t.total_micros().max(0) as u64));
    }

    /// Whether [`DnsTcp::poll`] has anything to do now: packets in, answers out, or a timer.
    pub fn due(&self, now: Instant) -> bool {
        let Some(s) = &self.stack else { return false };
        !s.device.rx.is_empty()
            || s.conns.iter().any(|c| !c.tx.is_empty())
            || self.next_poll.is_some_and(|t| t <= now)
    }

    pub fn poll_query(&mut self) -> Option<(usize, Vec<u8>)> {
        self.queries.pop_front()
    }

    /// Connections that ended since the last call.
    pub fn poll_closed(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.closed)
    }

    /// A packet the stack sends, for the device.
    pub fn poll_packet(&mut self) -> Option<Vec<u8>> {
        self.stack.as_mut()?.device.tx.pop_front()
    }

    /// When the stack needs [`DnsTcp::poll`] again (retransmissions, idle connections).
    pub fn deadline(&self) -> Option<Instant> {
        let s = self.stack.as_ref()?;
        let active = s.conns.iter().filter(|c| c.active);
        let idle = active.map(|c| c.last_active + IDLE).min();
        match (self.next_poll, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

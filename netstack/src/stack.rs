//! Termination of one agent's packets, as a sans-IO state machine.
//!
//! TCP is terminated in a smoltcp interface that accepts every destination address. A new flow
//! is *connect-first*: its SYN is held while the shell dials the real service, and only when that
//! dial succeeds does a smoltcp socket listen on the destination and receive the SYN. So a
//! refused service reaches the app as a RST and an unreachable one as ICMP unreachable, at once,
//! and never as a handshake that succeeds and then dies.
//!
//! UDP and ICMP echo bypass smoltcp: they are datagrams, so the shell relays them directly.
//!
//! The shell feeds packets from the tunnel with [`Stack::input`], calls [`Stack::poll`], reads
//! [`StackEvent`]s (dial, send to service, close), moves bytes with the `tcp_*` and `udp_*`
//! calls, and sends [`Stack::output`] packets back into the tunnel.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sluice_dataplane::packet::{
    self, PacketInfo, Unreachable, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use sluice_dataplane::rate::{Bucket, Rate};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint, Ipv4Address, Ipv6Address};

use crate::device::QueueDevice;
use sluice_dataplane::connector::Terminator;

pub type FlowId = u64;

/// How long smoltcp waits for data to carry an ACK (its default is 10 ms; an app that waits
/// for an ACK before sending more, Nagle's algorithm, waits at most this long).
const TCP_ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1);

/// Limits that keep one agent from exhausting the connector.
#[derive(Debug, Clone)]
pub struct Limits {
    /// smoltcp receive and send buffer per TCP flow (bytes each).
    pub tcp_buffer: usize,
    pub max_tcp_flows: usize,
    pub max_udp_flows: usize,
    /// A UDP flow with no packet either way for this long is closed.
    pub udp_idle: Duration,
    /// A TCP flow with no byte either way for this long is aborted.
    pub tcp_idle: Duration,
    /// A dial that takes longer fails with ICMP host unreachable.
    pub dial_timeout: Duration,
    /// IP MTU of the tunnel; smoltcp's MSS follows from it (the connector's MSS clamp).
    pub mtu: usize,
    /// New flows (TCP SYNs, UDP flows, pings) the agent may open: beyond this rate a packet
    /// that would open one is dropped before the policy sees it (an app retries; a SYN flood
    /// costs the connector nothing more).
    pub new_flows: Rate,
    /// TCP dials to services in progress at once; a SYN beyond it is dropped likewise.
    pub max_dialing: usize,
    /// Bytes of smoltcp buffers the agent's TCP flows may hold in all: with `tcp_buffer` it
    /// caps the agent's TCP flows below `max_tcp_flows` when it is smaller.
    pub buffer_budget: usize,
}

impl Limits {
    /// How many TCP flows the agent may hold: `max_tcp_flows`, or fewer when their buffers
    /// (two of `tcp_buffer` each) would pass `buffer_budget`.
    pub fn tcp_flow_cap(&self) -> usize {
        let per_flow = self.tcp_buffer.saturating_mul(2).max(1);
        self.max_tcp_flows.min(self.buffer_budget / per_flow).max(1)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tcp_buffer: 256 * 1024,
            max_tcp_flows: 4096,
            max_udp_flows: 4096,
            udp_idle: Duration::from_secs(60),
            tcp_idle: Duration::from_secs(2 * 3600),
            dial_timeout: Duration::from_secs(5),
            mtu: 1280,
            new_flows: Rate::new(500, 1000),
            max_dialing: 512,
            buffer_budget: 2 << 30,
        }
    }
}

// The gate and the flows it sees belong to the connector core; the stack is its terminator.
pub use sluice_dataplane::connector::{AdmitAll, FlowGate, FlowKind, NewFlow};

/// Why a dial failed, as the app should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialError {
    Refused,
    Unreachable,
    TimedOut,
}

/// Work for the shell.
#[derive(Debug, PartialEq, Eq)]
pub enum StackEvent {
    /// Dial the real TCP service at `dst` (or at `hostname`, resolved, on `dst`'s port), then
    /// call [`Stack::tcp_dialed`].
    DialTcp {
        id: FlowId,
        dst: SocketAddr,
        hostname: Option<String>,
    },
    /// Open a UDP socket to `dst` (or `hostname`); then send it [`StackEvent::UdpSend`] payloads.
    OpenUdp {
        id: FlowId,
        dst: SocketAddr,
        hostname: Option<String>,
    },
    UdpSend {
        id: FlowId,
        payload: Vec<u8>,
    },
    /// Send an ICMP echo to `dst`; call [`Stack::echo_reply`] when it answers.
    Echo {
        dst: IpAddr,
        hostname: Option<String>,
        id: u16,
        seq: u16,
        payload: Vec<u8>,
        request: Vec<u8>,
    },
    /// The agent will send no more: half-close the service side of the flow.
    ShutdownWrite {
        id: FlowId,
    },
    /// The flow is over: drop the service side.
    Close {
        id: FlowId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    src: SocketAddr,
    dst: SocketAddr,
}

enum TcpPhase {
    Dialing { syn: Vec<u8>, info: PacketInfo },
    Open { handle: SocketHandle },
}

struct TcpFlow {
    key: FlowKey,
    hostname: Option<String>,
    phase: TcpPhase,
    /// Bytes from the service not yet accepted by smoltcp.
    pending: Vec<u8>,
    service_eof: bool,
    fin_sent: bool,
    shutdown_sent: bool,
    last_active: Instant,
}

struct UdpFlow {
    key: FlowKey,
    hostname: Option<String>,
    last_active: Instant,
}

/// Counters for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct StackStats {
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub dropped: u64,
    pub refused: u64,
    /// Packets that would have opened a flow, dropped by `new_flows` or `max_dialing`.
    pub rate_limited: u64,
}

pub struct Stack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    tcp: HashMap<FlowId, TcpFlow>,
    tcp_by_key: HashMap<FlowKey, FlowId>,
    udp: HashMap<FlowId, UdpFlow>,
    udp_by_key: HashMap<FlowKey, FlowId>,
    /// Pings the gate admitted, by source (the echo identifier as its port) and destination,
    /// with their last request and hostname: a ping is one flow, checked and audited once, not
    /// per echo.
    echo: HashMap<FlowKey, (Instant, Option<String>)>,
    events: VecDeque<StackEvent>,
    output: VecDeque<Vec<u8>>,
    next_id: FlowId,
    limits: Limits,
    stats: StackStats,
    now: Instant,
    /// The agent's rate of new flows; its clock is `created` plus the stack's time.
    new_flows: Bucket,
    created: std::time::Instant,
}

fn smol_now(since: std::time::Instant, base: std::time::Instant) -> Instant {
    Instant::from_micros(since.saturating_duration_since(base).as_micros() as i64)
}

impl Stack {
    pub fn new(limits: Limits) -> Self {
        let mut device = QueueDevice::new(limits.mtu);
        let config = Config::new(HardwareAddress::Ip);
        let now = Instant::from_micros(0);
        let mut iface = Interface::new(config, &mut device, now);
        iface.set_any_ip(true);
        // The interface's own addresses only anchor the default routes smoltcp needs to send
        // replies; with any_ip every destination is accepted.
        let v4 = Ipv4Address::new(192, 0, 0, 8);
        let v6 = Ipv6Address::new(0xfd5c, 0x1ce2, 0, 0, 0, 0, 0, 1);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(v4.into(), 32));
            let _ = a.push(IpCidr::new(v6.into(), 128));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(v4);
        let _ = iface.routes_mut().add_default_ipv6_route(v6);
        Stack {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            tcp: HashMap::new(),
            tcp_by_key: HashMap::new(),
            udp: HashMap::new(),
            udp_by_key: HashMap::new(),
            echo: HashMap::new(),
            events: VecDeque::new(),
            output: VecDeque::new(),
            next_id: 1,
            new_flows: Bucket::new(limits.new_flows),
            created: std::time::Instant::now(),
            limits,
            stats: StackStats::default(),
            now,
        }
    }

    /// Whether the agent may open one more flow now (its `new_flows` rate); counted if not.
    fn may_open_flow(&mut self) -> bool {
        let at = self.created + Duration::from_micros(self.now.total_micros().max(0) as u64);
        let ok = self.new_flows.take(1, at);
        if !ok {
            self.stats.rate_limited += 1;
        }
        ok
    }

    pub fn stats(&self) -> StackStats {
        StackStats {
            tcp_flows: self.tcp.len(),
            udp_flows: self.udp.len(),
            ..self.stats
        }
    }

    /// Sets the stack's clock from a monotonic time and the stack's creation time.
    pub fn set_time(&mut self, now: std::time::Instant, base: std::time::Instant) {
        self.now = smol_now(now, base);
    }

    pub fn poll_event(&mut self) -> Option<StackEvent> {
        self.events.pop_front()
    }

    /// Takes back the buffer of a packet from [`Stack::output`] once the caller is done with it,
    /// for smoltcp's next packets.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.device.recycle(buf);
    }

    /// Packets for the agent.
    pub fn output(&mut self) -> Option<Vec<u8>> {
        self.output
            .pop_front()
            .or_else(|| self.device.tx.pop_front())
    }

    fn new_id(&mut self) -> FlowId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Feeds one IP packet from the agent; `gate` decides on flows it would open.
    pub fn input(&mut self, pkt: &[u8], gate: &mut dyn FlowGate) {
        self.input_named(pkt, None, gate)
    }

    /// Feeds one IP packet the agent addressed to `hostname` (its destination is a synthetic
    /// address standing for that name).
    pub fn input_named(&mut self, pkt: &[u8], hostname: Option<&str>, gate: &mut dyn FlowGate) {
        let info = match packet::inspect(pkt) {
            Ok(i) => i,
            Err(_) => {
                self.stats.dropped += 1;
                return;
            }
        };
        if info.fragment {
            // Fragments are not reassembled: the agent's MTU handling makes them rare.
            self.stats.dropped += 1;
            return;
        }
        match info.proto {
            PROTO_TCP => self.input_tcp(pkt, info, hostname, gate),
            PROTO_UDP => self.input_udp(pkt, info, hostname, gate),
            PROTO_ICMP | PROTO_ICMPV6 => self.input_icmp(pkt, info, hostname, gate),
            _ => {
                if let Some(p) = packet::icmp_unreachable(pkt, &info, Unreachable::Prohibited) {
                    self.output.push_back(p);
                }
            }
        }
    }

    /// Answers a packet whose new flow the gate refused.
    fn refuse(&mut self, pkt: &[u8], info: &PacketInfo) {
        self.stats.refused += 1;
        let reply = if info.proto == PROTO_TCP {
            packet::tcp_rst(info)
        } else {
            packet::icmp_unreachable(pkt, info, Unreachable::Prohibited)
        };
        if let Some(p) = reply {
            self.output.push_back(p);
        }
    }

    fn input_tcp(
        &mut self,
        pkt: &[u8],
        info: PacketInfo,
        hostname: Option<&str>,
        gate: &mut dyn FlowGate,
    ) {
        let key = FlowKey {
            src: info.src_socket(),
            dst: info.dst_socket(),
        };
        match self
            .tcp_by_key
            .get(&key)
            .and_then(|id| self.tcp.get_mut(id))
        {
            Some(flow) => {
                flow.last_active = self.now;
                match flow.phase {
                    // Retransmitted SYNs while dialing are absorbed; the stored SYN is replayed.
                    TcpPhase::Dialing { .. } => {}
                    TcpPhase::Open { .. } => self.device.rx.push_back(pkt.to_vec()),
                }
            }
            None if info.tcp.syn && !info.tcp.ack && !info.tcp.rst => {
                if !self.may_open_flow() {
                    return;
                }
                let dialing = self
                    .tcp
                    .values()
                    .filter(|f| matches!(f.phase, TcpPhase::Dialing { .. }))
                    .count();
                if dialing >= self.limits.max_dialing {
                    self.stats.rate_limited += 1;
                    return;
                }
                let flow = NewFlow {
                    kind: FlowKind::Tcp,
                    src: key.src,
                    dst: key.dst,
                    hostname,
                };
                if !gate.admit(&flow) {
                    self.refuse(pkt, &info);
                    return;
                }
                if self.tcp.len() >= self.limits.tcp_flow_cap() {
                    self.stats.refused += 1;
                    if let Some(p) = packet::tcp_rst(&info) {
                        self.output.push_back(p);
                    }
                    return;
                }
                let id = self.new_id();
                self.tcp_by_key.insert(key, id);
                self.tcp.insert(
                    id,
                    TcpFlow {
                        key,
                        hostname: hostname.map(str::to_string),
                        phase: TcpPhase::Dialing {
                            syn: pkt.to_vec(),
                            info,
                        },
                        pending: Vec::new(),
                        service_eof: false,
                        fin_sent: false,
                        shutdown_sent: false,
                        last_active: self.now,
                    },
                );
                self.events.push_back(StackEvent::DialTcp {
                    id,
                    dst: key.dst,
                    hostname: hostname.map(str::to_string),
                });
            }
            // A segment of no flow we know: smoltcp answers it with a RST.
            None => self.device.rx.push_back(pkt.to_vec()),
        }
    }

    /// The shell's dial of flow `id` finished.
    pub fn tcp_dialed(&mut self, id: FlowId, result: Result<(), DialError>) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            // The flow went away meanwhile: make sure the service side is dropped.
            self.events.push_back(StackEvent::Close { id });
            return;
        };
        let TcpPhase::Dialing { syn, info } = &mut flow.phase else {
            return;
        };
        let (syn, info) = (std::mem::take(syn), *info);
        match result {
            Ok(()) => {
                let buf = self.limits.tcp_buffer;
                let mut sock = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; buf]),
                    tcp::SocketBuffer::new(vec![0; buf]),
                );
                sock.set_nagle_enabled(false);
                // A short delayed ACK: a request's ACK rides on its response instead of going
                // as a packet (and a tunnel packet) of its own; bulk data is still ACKed every
                // second segment (smoltcp acks at once past one MSS).
                sock.set_ack_delay(Some(TCP_ACK_DELAY));
                let ep = IpListenEndpoint {
                    addr: Some(flow.key.dst.ip().into()),
                    port: flow.key.dst.port(),
                };
                if sock.listen(ep).is_err() {
                    self.remove_tcp(id);
                    return;
                }
                let handle = self.sockets.add(sock);
                flow.phase = TcpPhase::Open { handle };
                self.device.rx.push_back(syn);
            }
            Err(e) => {
                self.stats.refused += 1;
                let reply = match e {
                    DialError::Refused => packet::tcp_rst(&info),
                    DialError::Unreachable | DialError::TimedOut => {
                        packet::icmp_unreachable(&syn, &info, Unreachable::Host)
                    }
                };
                if let Some(p) = reply {
                    self.output.push_back(p);
                }
                self.remove_tcp(id);
            }
        }
    }

    /// Bytes from the service for flow `id`. They wait in the flow until smoltcp's send buffer
    /// takes them; the shell bounds how much it hands over (see [`Stack::tcp_pending`]).
    pub fn tcp_from_service(&mut self, id: FlowId, data: &[u8]) {
        if let Some(flow) = self.tcp.get_mut(&id) {
            flow.last_active = self.now;
            flow.pending.extend_from_slice(data);
        }
    }

    /// Bytes buffered for flow `id` that smoltcp has not taken yet.
    pub fn tcp_pending(&self, id: FlowId) -> usize {
        self.tcp.get(&id).map_or(0, |f| f.pending.len())
    }

    /// The service closed its side (EOF).
    pub fn tcp_service_eof(&mut self, id: FlowId) {
        if let Some(f) = self.tcp.get_mut(&id) {
            f.service_eof = true;
        }
    }

    /// The service reset the connection or failed: reset the app's side too.
    pub fn tcp_service_reset(&mut self, id: FlowId) {
        if let Some(TcpFlow {
            phase: TcpPhase::Open { handle },
            ..
        }) = self.tcp.get(&id)
        {
            self.sockets.get_mut::<tcp::Socket>(*handle).abort();
        }
    }

    /// Reads bytes the agent sent on flow `id` into `buf`, for the service.
    pub fn tcp_to_service(&mut self, id: FlowId, buf: &mut [u8]) -> usize {
        let Some(TcpFlow {
            phase: TcpPhase::Open { handle },
            ..
        }) = self.tcp.get(&id)
        else {
            return 0;
        };
        let sock = self.sockets.get_mut::<tcp::Socket>(*handle);
        sock.recv_slice(buf).unwrap_or(0)
    }

    /// Flows with bytes from the agent waiting for the service.
    pub fn tcp_readable(&self) -> Vec<FlowId> {
        self.tcp
            .iter()
            .filter_map(|(id, f)| match f.phase {
                TcpPhase::Open { handle } => self
                    .sockets
                    .get::<tcp::Socket>(handle)
                    .can_recv()
                    .then_some(*id),
                _ => None,
            })
            .collect()
    }

    fn input_udp(
        &mut self,
        pkt: &[u8],
        info: PacketInfo,
        hostname: Option<&str>,
        gate: &mut dyn FlowGate,
    ) {
        let key = FlowKey {
            src: info.src_socket(),
            dst: info.dst_socket(),
        };
        let payload = info.payload(pkt).to_vec();
        if let Some(id) = self.udp_by_key.get(&key).copied() {
            if let Some(f) = self.udp.get_mut(&id) {
                f.last_active = self.now;
            }
            self.events.push_back(StackEvent::UdpSend { id, payload });
            return;
        }
        if !self.may_open_flow() {
            return;
        }
        let flow = NewFlow {
            kind: FlowKind::Udp,
            src: key.src,
            dst: key.dst,
            hostname,
        };
        if !gate.admit(&flow) {
            self.refuse(pkt, &info);
            return;
        }
        if self.udp.len() >= self.limits.max_udp_flows {
            self.stats.refused += 1;
            if let Some(p) = packet::icmp_unreachable(pkt, &info, Unreachable::Port) {
                self.output.push_back(p);
            }
            return;
        }
        let id = self.new_id();
        self.udp_by_key.insert(key, id);
        self.udp.insert(
            id,
            UdpFlow {
                key,
                hostname: hostname.map(str::to_string),
                last_active: self.now,
            },
        );
        self.events.push_back(StackEvent::OpenUdp {
            id,
            dst: key.dst,
            hostname: hostname.map(str::to_string),
        });
        self.events.push_back(StackEvent::UdpSend { id, payload });
    }

    /// A datagram from the service of UDP flow `id`.
    pub fn udp_from_service(&mut self, id: FlowId, payload: &[u8]) {
        let Some(f) = self.udp.get_mut(&id) else {
            return;
        };
        f.last_active = self.now;
        if let Some(p) = packet::udp_packet(f.key.dst, f.key.src, payload) {
            self.output.push_back(p);
        }
    }

    /// The UDP socket of flow `id` failed (for example ICMP port unreachable from the service).
    pub fn udp_failed(&mut self, id: FlowId, why: Unreachable) {
        let Some(f) = self.udp.remove(&id) else {
            return;
        };
        self.udp_by_key.remove(&f.key);
        // Rebuild a minimal packet of the flow to quote in the ICMP error.
        if let Some(p) = packet::udp_packet(f.key.src, f.key.dst, &[]) {
            if let Ok(info) = packet::inspect(&p) {
                if let Some(icmp) = packet::icmp_unreachable(&p, &info, why) {
                    self.output.push_back(icmp);
                }
            }
        }
    }

    fn input_icmp(
        &mut self,
        pkt: &[u8],
        info: PacketInfo,
        hostname: Option<&str>,
        gate: &mut dyn FlowGate,
    ) {
        match info.echo {
            Some(e) if e.request => {
                let key = FlowKey {
                    src: SocketAddr::new(info.src, e.id),
                    dst: SocketAddr::new(info.dst, 0),
                };
                if let Some((last, _)) = self.echo.get_mut(&key) {
                    *last = self.now;
                } else {
                    if !self.may_open_flow() {
                        return;
                    }
                    let flow = NewFlow {
                        kind: FlowKind::Icmp,
                        src: SocketAddr::new(info.src, 0),
                        dst: SocketAddr::new(info.dst, 0),
                        hostname,
                    };
                    if !gate.admit(&flow) {
                        self.refuse(pkt, &info);
                        return;
                    }
                    // Past the bound every echo is checked on its own, as before.
                    if self.echo.len() < self.limits.max_udp_flows {
                        self.echo
                            .insert(key, (self.now, hostname.map(str::to_string)));
                    }
                }
                let payload = info.payload(pkt).get(8..).unwrap_or(&[]).to_vec();
                self.events.push_back(StackEvent::Echo {
                    dst: info.dst,
                    hostname: hostname.map(str::to_string),
                    id: e.id,
                    seq: e.seq,
                    payload,
                    request: pkt.to_vec(),
                });
            }
            _ => self.stats.dropped += 1,
        }
    }

    /// The service answered the echo request `request` (as given in [`StackEvent::Echo`]).
    pub fn echo_reply(&mut self, request: &[u8]) {
        if let Ok(info) = packet::inspect(request) {
            if let Some(p) = packet::icmp_echo_reply(request, &info) {
                self.output.push_back(p);
            }
        }
    }

    /// The echo request got no answer but an error: tell the app.
    pub fn echo_unreachable(&mut self, request: &[u8]) {
        if let Ok(info) = packet::inspect(request) {
            if let Some(p) = packet::icmp_unreachable(request, &info, Unreachable::Host) {
                self.output.push_back(p);
            }
        }
    }

    /// Runs smoltcp and the flow state machines. Call after input, after service data, and
    /// when [`Stack::poll_delay`] expires.
    pub fn poll(&mut self) {
        self.iface
            .poll(self.now, &mut self.device, &mut self.sockets);
        let ids: Vec<FlowId> = self.tcp.keys().copied().collect();
        let mut again = false;
        for id in ids {
            again |= self.tcp_step(id);
        }
        if again {
            self.iface
                .poll(self.now, &mut self.device, &mut self.sockets);
        }
        self.expire_udp();
    }

    /// Moves pending service bytes into smoltcp and follows the socket's state. Returns whether
    /// smoltcp has new data to send.
    fn tcp_step(&mut self, id: FlowId) -> bool {
        let now = self.now;
        let idle = smoltcp::time::Duration::from_micros(self.limits.tcp_idle.as_micros() as u64);
        let Some(flow) = self.tcp.get_mut(&id) else {
            return false;
        };
        let TcpPhase::Open { handle } = flow.phase else {
            return false;
        };
        let sock = self.sockets.get_mut::<tcp::Socket>(handle);
        let mut wrote = false;
        if !flow.pending.is_empty() && sock.may_send() {
            if let Ok(n) = sock.send_slice(&flow.pending) {
                flow.pending.drain(..n);
                wrote = n > 0;
            }
        }
        if flow.service_eof && flow.pending.is_empty() && !flow.fin_sent {
            sock.close();
            flow.fin_sent = true;
            wrote = true;
        }
        if !flow.shutdown_sent
            && !sock.may_recv()
            && !sock.can_recv()
            && sock.state() != tcp::State::Listen
            && sock.state() != tcp::State::SynReceived
        {
            flow.shutdown_sent = true;
            self.events.push_back(StackEvent::ShutdownWrite { id });
        }
        let state = sock.state();
        let done = state == tcp::State::Closed
            || (state == tcp::State::TimeWait && flow.pending.is_empty())
            || now - flow.last_active > idle;
        if done {
            if now - flow.last_active > idle {
                sock.abort();
                self.iface
                    .poll(self.now, &mut self.device, &mut self.sockets);
            }
            self.remove_tcp(id);
        }
        wrote
    }

    /// Asks the gate again about every open flow (after a policy change) and cuts the ones it
    /// now refuses: TCP with a RST to the app, UDP by closing the service side.
    pub fn recheck(&mut self, gate: &mut dyn FlowGate) -> usize {
        let mut cut = 0;
        let tcp: Vec<(FlowId, FlowKey, Option<String>)> = self
            .tcp
            .iter()
            .map(|(id, f)| (*id, f.key, f.hostname.clone()))
            .collect();
        for (id, key, hostname) in tcp {
            let flow = NewFlow {
                kind: FlowKind::Tcp,
                src: key.src,
                dst: key.dst,
                hostname: hostname.as_deref(),
            };
            if gate.admit(&flow) {
                continue;
            }
            cut += 1;
            match self.tcp.get(&id).map(|f| &f.phase) {
                Some(TcpPhase::Open { handle }) => {
                    self.sockets.get_mut::<tcp::Socket>(*handle).abort();
                }
                Some(TcpPhase::Dialing { info, .. }) => {
                    if let Some(p) = packet::tcp_rst(info) {
                        self.output.push_back(p);
                    }
                }
                None => {}
            }
            // Let smoltcp emit the RST before the socket goes.
            self.iface
                .poll(self.now, &mut self.device, &mut self.sockets);
            self.remove_tcp(id);
        }
        let udp: Vec<(FlowId, FlowKey, Option<String>)> = self
            .udp
            .iter()
            .map(|(id, f)| (*id, f.key, f.hostname.clone()))
            .collect();
        for (id, key, hostname) in udp {
            let flow = NewFlow {
                kind: FlowKind::Udp,
                src: key.src,
                dst: key.dst,
                hostname: hostname.as_deref(),
            };
            if !gate.admit(&flow) {
                cut += 1;
                self.udp.remove(&id);
                self.udp_by_key.remove(&key);
                self.events.push_back(StackEvent::Close { id });
            }
        }
        // A ping the policy no longer allows is refused from its next echo on.
        let before = self.echo.len();
        self.echo.retain(|key, (_, hostname)| {
            gate.admit(&NewFlow {
                kind: FlowKind::Icmp,
                src: SocketAddr::new(key.src.ip(), 0),
                dst: key.dst,
                hostname: hostname.as_deref(),
            })
        });
        cut + (before - self.echo.len())
    }

    fn remove_tcp(&mut self, id: FlowId) {
        if let Some(f) = self.tcp.remove(&id) {
            self.tcp_by_key.remove(&f.key);
            if let TcpPhase::Open { handle } = f.phase {
                self.sockets.remove(handle);
            }
            self.events.push_back(StackEvent::Close { id });
        }
    }

    fn expire_udp(&mut self) {
        let idle = smoltcp::time::Duration::from_micros(self.limits.udp_idle.as_micros() as u64);
        let now = self.now;
        let expired: Vec<FlowId> = self
            .udp
            .iter()
            .filter(|(_, f)| now - f.last_active > idle)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(f) = self.udp.remove(&id) {
                self.udp_by_key.remove(&f.key);
                self.events.push_back(StackEvent::Close { id });
            }
        }
        self.echo.retain(|_, (last, _)| now - *last <= idle);
    }

    /// How long until the stack needs [`Stack::poll`] again without new input.
    pub fn poll_delay(&mut self) -> Duration {
        let d = self
            .iface
            .poll_delay(self.now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1));
        // Idle expiry is checked at least once a second.
        d.min(Duration::from_secs(1))
    }
}

/// The connector core drives one stack per agent.
impl Terminator for Stack {
    fn input(&mut self, pkt: &[u8], hostname: Option<&str>, gate: &mut dyn FlowGate) {
        self.input_named(pkt, hostname, gate);
    }
    fn advance(&mut self, now: std::time::Instant, epoch: std::time::Instant) {
        self.set_time(now, epoch);
        self.poll();
    }
    fn output(&mut self) -> Option<Vec<u8>> {
        Stack::output(self)
    }
    fn recycle(&mut self, buf: Vec<u8>) {
        Stack::recycle(self, buf);
    }
    fn poll_delay(&mut self) -> Duration {
        Stack::poll_delay(self)
    }
    fn recheck(&mut self, gate: &mut dyn FlowGate) -> usize {
        Stack::recheck(self, gate)
    }
    fn flows(&self) -> usize {
        self.tcp.len() + self.udp.len() + self.echo.len()
    }
    fn rate_limited(&self) -> u64 {
        self.stats.rate_limited
    }
}

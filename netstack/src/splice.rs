//! The tokio side of termination: a task per flow owns the real socket toward the service, and
//! bytes move between it and a [`Stack`] through bounded channels.
//!
//! Backpressure both ways, so a flow buffers a bounded amount:
//! - service → agent: the flow task reads only with credit (a semaphore of `CREDIT` bytes);
//!   credit comes back as smoltcp's send buffer takes the bytes;
//! - agent → service: bytes leave smoltcp's receive buffer only when the flow's channel has
//!   room, so a slow service closes the TCP window toward the agent.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use sluice_dataplane::packet::Unreachable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use hickory_resolver::TokioResolver;

use crate::ping::{Pinger, ECHO_TIMEOUT};
use crate::stack::{DialError, FlowId, Limits, Stack, StackEvent};
use sluice_dataplane::connector::Services;
use sluice_dataplane::identity::PeerId;

/// Bytes a flow may read from its service before the agent side has taken them.
const CREDIT: usize = 256 * 1024;
/// Largest read from a service at once.
const CHUNK: usize = 16 * 1024;
/// Chunks queued toward a service.
const TO_SERVICE_QUEUE: usize = 16;
/// How long resolving a resource hostname may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves a hostname the agent addressed, in the connector's own network.
async fn resolve(resolver: Option<&TokioResolver>, host: &str) -> Result<Vec<IpAddr>, DialError> {
    let Some(r) = resolver else {
        return Err(DialError::Unreachable);
    };
    match tokio::time::timeout(RESOLVE_TIMEOUT, r.lookup_ip(host)).await {
        Ok(Ok(found)) => {
            let v: Vec<IpAddr> = found.iter().collect();
            if v.is_empty() {
                Err(DialError::Unreachable)
            } else {
                Ok(v)
            }
        }
        Ok(Err(e)) => {
            tracing::debug!("resolving {host}: {e}");
            Err(DialError::Unreachable)
        }
        Err(_) => Err(DialError::TimedOut),
    }
}

/// Where a flow goes: its destination, or every address of its hostname on that port.
async fn targets(
    resolver: Option<&TokioResolver>,
    dst: SocketAddr,
    hostname: Option<&str>,
) -> Result<Vec<SocketAddr>, DialError> {
    match hostname {
        Some(h) => Ok(resolve(resolver, h)
            .await?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, dst.port()))
            .collect()),
        None => Ok(vec![dst]),
    }
}

/// Dials the targets in turn within one deadline: the first that accepts wins.
async fn dial(targets: &[SocketAddr], timeout: Duration) -> Result<TcpStream, DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = DialError::Unreachable;
    for t in targets {
        match tokio::time::timeout_at(deadline, TcpStream::connect(t)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => {
                tracing::debug!("dial {t} failed: {e}");
                last = dial_error(&e);
            }
            Err(_) => return Err(DialError::TimedOut),
        }
    }
    Err(last)
}

/// What flow tasks report to the loop that owns the stacks.
#[derive(Debug)]
pub enum FlowMsg {
    Dialed(FlowId, Result<(), DialError>),
    /// Bytes from the service (a reused buffer's chunk: no allocation per read).
    Data(FlowId, Bytes),
    Eof(FlowId),
    Reset(FlowId),
    Udp(FlowId, Vec<u8>),
    UdpFailed(FlowId, Unreachable),
    EchoReply {
        request: Vec<u8>,
        answered: bool,
    },
}

/// How the connector's TCP dials to services ended, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DialStats {
    pub connected: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub timed_out: u64,
}

impl DialStats {
    fn count(&mut self, r: &Result<(), DialError>) {
        match r {
            Ok(()) => self.connected += 1,
            Err(DialError::Refused) => self.refused += 1,
            Err(DialError::Unreachable) => self.unreachable += 1,
            Err(DialError::TimedOut) => self.timed_out += 1,
        }
    }
}

struct FlowHandle {
    to_service: Option<mpsc::Sender<Bytes>>,
    credit: Option<Arc<Semaphore>>,
    /// Bytes handed to the stack whose credit is not yet returned.
    given: usize,
    task: JoinHandle<()>,
}

/// The flows of many stacks, told apart by a key (the agent).
pub struct Splicer<K> {
    tx: mpsc::Sender<(K, FlowMsg)>,
    flows: HashMap<(K, FlowId), FlowHandle>,
    /// Signalled when a flow task drained a chunk toward its service.
    pub wake: Arc<Notify>,
    /// Every agent's stack gets these.
    limits: Limits,
    resolver: Option<Arc<TokioResolver>>,
    scratch: Vec<u8>,
    /// Chunks toward services are cut from this buffer; its memory is reused once the flow
    /// tasks dropped them.
    to_service_buf: BytesMut,
    /// ICMP echoes toward services.
    pinger: Pinger<K>,
    dials: DialStats,
}

impl<K: Copy + Eq + Hash + Send + 'static> Splicer<K> {
    /// `resolver` resolves hostnames agents address (split DNS); without one such flows fail.
    /// `limits` bound each agent's stack and its dials.
    pub fn new(
        limits: Limits,
        resolver: Option<Arc<TokioResolver>>,
    ) -> (Self, mpsc::Receiver<(K, FlowMsg)>) {
        let (tx, rx) = mpsc::channel(4096);
        let s = Splicer {
            pinger: Pinger::new(tx.clone(), ECHO_TIMEOUT),
            tx,
            flows: HashMap::new(),
            wake: Arc::new(Notify::new()),
            limits,
            resolver,
            scratch: vec![0u8; CHUNK],
            to_service_buf: BytesMut::new(),
            dials: DialStats::default(),
        };
        (s, rx)
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn dial_stats(&self) -> DialStats {
        self.dials
    }

    /// Carries out the stack's events for agent `key`.
    pub fn handle_events(&mut self, key: K, stack: &mut Stack) {
        let mut echoed = false;
        while let Some(ev) = stack.poll_event() {
            match ev {
                StackEvent::DialTcp { id, dst, hostname } => {
                    let (to_service, rx) = mpsc::channel(TO_SERVICE_QUEUE);
                    let credit = Arc::new(Semaphore::new(CREDIT));
                    let task = tokio::spawn(tcp_flow(
                        key,
                        id,
                        dst,
                        hostname,
                        self.resolver.clone(),
                        self.limits.dial_timeout,
                        self.tx.clone(),
                        rx,
                        credit.clone(),
                        self.wake.clone(),
                    ));
                    self.flows.insert(
                        (key, id),
                        FlowHandle {
                            to_service: Some(to_service),
                            credit: Some(credit),
                            given: 0,
                            task,
                        },
                    );
                }
                StackEvent::OpenUdp { id, dst, hostname } => {
                    let (to_service, rx) = mpsc::channel(256);
                    let task = tokio::spawn(udp_flow(
                        key,
                        id,
                        dst,
                        hostname,
                        self.resolver.clone(),
                        self.tx.clone(),
                        rx,
                    ));
                    self.flows.insert(
                        (key, id),
                        FlowHandle {
                            to_service: Some(to_service),
                            credit: None,
                            given: 0,
                            task,
                        },
                    );
                }
                StackEvent::UdpSend { id, payload } => {
                    if let Some(tx) = self
                        .flows
                        .get(&(key, id))
                        .and_then(|f| f.to_service.as_ref())
                    {
                        // A full queue drops the datagram, as a congested network would.
                        let _ = tx.try_send(Bytes::from(payload));
                    }
                }
                StackEvent::Echo {
                    dst,
                    hostname,
                    payload,
                    request,
                    ..
                } => match hostname {
                    // The common case: sent from here, no task.
                    None => match self.pinger.echo(key, dst, &payload, request) {
                        Ok(()) => echoed = true,
                        Err(r) => {
                            tracing::debug!("ping {dst}: {}", r.why);
                            stack.echo_unreachable(&r.request);
                        }
                    },
                    Some(h) => {
                        let tx = self.tx.clone();
                        let resolver = self.resolver.clone();
                        let pinger = self.pinger.clone();
                        tokio::spawn(async move {
                            let resolved = resolve(resolver.as_deref(), &h).await;
                            let request = match resolved.ok().and_then(|ips| ips.first().copied()) {
                                Some(ip) => match pinger.echo(key, ip, &payload, request) {
                                    Ok(()) => return,
                                    Err(r) => {
                                        tracing::debug!("ping {h} ({ip}): {}", r.why);
                                        r.request
                                    }
                                },
                                None => request,
                            };
                            let answer = FlowMsg::EchoReply {
                                request,
                                answered: false,
                            };
                            let _ = tx.send((key, answer)).await;
                        });
                    }
                },
                StackEvent::ShutdownWrite { id } => {
                    if let Some(f) = self.flows.get_mut(&(key, id)) {
                        // Dropping the sender ends the writer, which then shuts down its half.
                        f.to_service = None;
                    }
                }
                StackEvent::Close { id } => {
                    if let Some(f) = self.flows.remove(&(key, id)) {
                        f.task.abort();
                    }
                }
            }
        }
        if echoed {
            self.answer_queued_echoes(key, stack);
        }
    }

    /// Answers the echoes just sent whose replies are there already (see
    /// [`Pinger::take_replies`]): this agent's go into its stack now, another agent's through
    /// the channel, as if its task had read them.
    fn answer_queued_echoes(&mut self, key: K, stack: &mut Stack) {
        let mut replies = Vec::new();
        self.pinger.take_replies(&mut replies);
        for (k, msg) in replies {
            if k == key {
                self.on_message(k, msg, stack);
            } else if self.tx.try_send((k, msg)).is_err() {
                tracing::debug!("ping: an echo reply for another agent is lost (queue full)");
            }
        }
    }

    /// Applies a message from a flow task to the stack of its agent.
    pub fn on_message(&mut self, key: K, msg: FlowMsg, stack: &mut Stack) {
        match msg {
            FlowMsg::Dialed(id, r) => {
                self.dials.count(&r);
                stack.tcp_dialed(id, r)
            }
            FlowMsg::Data(id, data) => {
                if let Some(f) = self.flows.get_mut(&(key, id)) {
                    f.given += data.len();
                }
                stack.tcp_from_service(id, &data);
            }
            FlowMsg::Eof(id) => stack.tcp_service_eof(id),
            FlowMsg::Reset(id) => stack.tcp_service_reset(id),
            FlowMsg::Udp(id, data) => stack.udp_from_service(id, &data),
            FlowMsg::UdpFailed(id, why) => stack.udp_failed(id, why),
            FlowMsg::EchoReply { request, answered } => {
                if answered {
                    stack.echo_reply(&request)
                } else {
                    stack.echo_unreachable(&request)
                }
            }
        }
    }

    /// Moves bytes from the agent toward services and returns credit for bytes the stack took.
    pub fn pump(&mut self, key: K, stack: &mut Stack) {
        for id in stack.tcp_readable() {
            let Some(f) = self.flows.get_mut(&(key, id)) else {
                continue;
            };
            let Some(tx) = f.to_service.as_ref() else {
                continue;
            };
            while let Ok(permit) = tx.try_reserve() {
                let n = stack.tcp_to_service(id, &mut self.scratch);
                if n == 0 {
                    break;
                }
                self.to_service_buf.reserve(n);
                self.to_service_buf.put_slice(&self.scratch[..n]);
                permit.send(self.to_service_buf.split().freeze());
            }
        }
        for ((k, id), f) in self.flows.iter_mut() {
            if *k != key || f.given == 0 {
                continue;
            }
            let pending = stack.tcp_pending(*id);
            if pending < f.given {
                if let Some(c) = &f.credit {
                    c.add_permits(f.given - pending);
                }
                f.given = pending;
            }
        }
    }

    /// Drops every flow of agent `key` (its tunnel is gone).
    pub fn drop_agent(&mut self, key: K) {
        self.flows.retain(|(k, _), f| {
            if *k == key {
                f.task.abort();
                false
            } else {
                true
            }
        });
    }
}

/// The Linux connector's services: real sockets, one stack per agent.
impl Services for Splicer<PeerId> {
    type Terminator = Stack;
    fn terminator(&mut self) -> Stack {
        Stack::new(self.limits.clone())
    }
    fn carry_out(&mut self, agent: PeerId, stack: &mut Stack) {
        self.handle_events(agent, stack);
    }
    fn pump(&mut self, agent: PeerId, stack: &mut Stack) {
        Splicer::pump(self, agent, stack);
    }
    fn agent_gone(&mut self, agent: PeerId) {
        self.drop_agent(agent);
    }
}

fn dial_error(e: &std::io::Error) -> DialError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => DialError::Refused,
        std::io::ErrorKind::TimedOut => DialError::TimedOut,
        _ => DialError::Unreachable,
    }
}

#[allow(clippy::too_many_arguments)]
async fn tcp_flow<K: Copy + Send + 'static>(
    key: K,
    id: FlowId,
    dst: SocketAddr,
    hostname: Option<String>,
    resolver: Option<Arc<TokioResolver>>,
    dial_timeout: Duration,
    tx: mpsc::Sender<(K, FlowMsg)>,
    mut from_agent: mpsc::Receiver<Bytes>,
    credit: Arc<Semaphore>,
    wake: Arc<Notify>,
) {
    let dialed = match targets(resolver.as_deref(), dst, hostname.as_deref()).await {
        Ok(t) => dial(&t, dial_timeout).await,
        Err(e) => Err(e),
    };
    let stream = match dialed {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(
                "flow {id}: dial {} failed: {e:?}",
                hostname
                    .as_deref()
                    .map_or(dst.to_string(), |h| format!("{h}:{}", dst.port()))
            );
            let _ = tx.send((key, FlowMsg::Dialed(id, Err(e)))).await;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    if tx.send((key, FlowMsg::Dialed(id, Ok(())))).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.into_split();
    let tx2 = tx.clone();
    let reader = async move {
        // Each read is cut off as its own chunk; once the loop has consumed the earlier ones,
        // `reserve` takes their memory back instead of allocating (and zeroing) anew.
        let mut buf = BytesMut::new();
        loop {
            let Ok(permit) = credit.clone().acquire_many_owned(CHUNK as u32).await else {
                return;
            };
            buf.reserve(CHUNK);
            match rd.read_buf(&mut (&mut buf).limit(CHUNK)).await {
                Ok(0) => {
                    let _ = tx2.send((key, FlowMsg::Eof(id))).await;
                    return;
                }
                Ok(n) => {
                    permit.forget();
                    credit.add_permits(CHUNK - n);
                    let chunk = buf.split().freeze();
                    if tx2.send((key, FlowMsg::Data(id, chunk))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!("flow {id}: read from {dst}: {e}");
                    let _ = tx2.send((key, FlowMsg::Reset(id))).await;
                    return;
                }
            }
        }
    };
    let writer = async move {
        while let Some(chunk) = from_agent.recv().await {
            if let Err(e) = wr.write_all(&chunk).await {
                tracing::debug!("flow {id}: write to {dst}: {e}");
                let _ = tx.send((key, FlowMsg::Reset(id))).await;
                return;
            }
            wake.notify_one();
        }
        // The agent half-closed: pass the FIN on.
        let _ = wr.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[allow(clippy::too_many_arguments)]
async fn udp_flow<K: Copy + Send + 'static>(
    key: K,
    id: FlowId,
    dst: SocketAddr,
    hostname: Option<String>,
    resolver: Option<Arc<TokioResolver>>,
    tx: mpsc::Sender<(K, FlowMsg)>,
    mut from_agent: mpsc::Receiver<Bytes>,
) {
    let dst = match targets(resolver.as_deref(), dst, hostname.as_deref()).await {
        Ok(t) => t[0],
        Err(_) => {
            let _ = tx
                .send((key, FlowMsg::UdpFailed(id, Unreachable::Host)))
                .await;
            return;
        }
    };
    let bind: SocketAddr = match dst.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap_or(dst),
        IpAddr::V6(_) => "[::]:0".parse().unwrap_or(dst),
    };
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(_) => {
            let _ = tx
                .send((key, FlowMsg::UdpFailed(id, Unreachable::Host)))
                .await;
            return;
        }
    };
    if let Err(e) = sock.connect(dst).await {
        tracing::debug!("udp flow {id}: connect {dst}: {e}");
        let why = if e.kind() == std::io::ErrorKind::NetworkUnreachable {
            Unreachable::Net
        } else {
            Unreachable::Host
        };
        let _ = tx.send((key, FlowMsg::UdpFailed(id, why))).await;
        return;
    }
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            out = from_agent.recv() => {
                let Some(p) = out else { return };
                let _ = sock.send(&p).await;
            }
            r = sock.recv(&mut buf) => match r {
                Ok(n) => {
                    if tx.send((key, FlowMsg::Udp(id, buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    let _ = tx.send((key, FlowMsg::UdpFailed(id, Unreachable::Port))).await;
                    return;
                }
                Err(_) => {}
            }
        }
    }
}

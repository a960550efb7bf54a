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

use sluice_dataplane::packet::Unreachable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::stack::{DialError, FlowId, Stack, StackEvent};

/// Bytes a flow may read from its service before the agent side has taken them.
const CREDIT: usize = 256 * 1024;
/// Largest read from a service at once.
const CHUNK: usize = 16 * 1024;
/// Chunks queued toward a service.
const TO_SERVICE_QUEUE: usize = 16;
/// How long an ICMP echo waits for its reply.
const ECHO_TIMEOUT: Duration = Duration::from_secs(2);

/// What flow tasks report to the loop that owns the stacks.
#[derive(Debug)]
pub enum FlowMsg {
    Dialed(FlowId, Result<(), DialError>),
    Data(FlowId, Vec<u8>),
    Eof(FlowId),
    Reset(FlowId),
    Udp(FlowId, Vec<u8>),
    UdpFailed(FlowId, Unreachable),
    EchoReply { request: Vec<u8>, answered: bool },
}

struct FlowHandle {
    to_service: Option<mpsc::Sender<Vec<u8>>>,
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
    dial_timeout: Duration,
    scratch: Vec<u8>,
}

impl<K: Copy + Eq + Hash + Send + 'static> Splicer<K> {
    pub fn new(dial_timeout: Duration) -> (Self, mpsc::Receiver<(K, FlowMsg)>) {
        let (tx, rx) = mpsc::channel(4096);
        let s = Splicer {
            tx,
            flows: HashMap::new(),
            wake: Arc::new(Notify::new()),
            dial_timeout,
            scratch: vec![0u8; CHUNK],
        };
        (s, rx)
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Carries out the stack's events for agent `key`.
    pub fn handle_events(&mut self, key: K, stack: &mut Stack) {
        while let Some(ev) = stack.poll_event() {
            match ev {
                StackEvent::DialTcp { id, dst } => {
                    let (to_service, rx) = mpsc::channel(TO_SERVICE_QUEUE);
                    let credit = Arc::new(Semaphore::new(CREDIT));
                    let task = tokio::spawn(tcp_flow(
                        key,
                        id,
                        dst,
                        self.dial_timeout,
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
                StackEvent::OpenUdp { id, dst } => {
                    let (to_service, rx) = mpsc::channel(256);
                    let task = tokio::spawn(udp_flow(key, id, dst, self.tx.clone(), rx));
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
                        let _ = tx.try_send(payload);
                    }
                }
                StackEvent::Echo {
                    dst,
                    id,
                    seq,
                    payload,
                    request,
                } => {
                    let tx = self.tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let answered = crate::ping::echo(dst, id, seq, &payload, ECHO_TIMEOUT);
                        let _ = tx.blocking_send((key, FlowMsg::EchoReply { request, answered }));
                    });
                }
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
    }

    /// Applies a message from a flow task to the stack of its agent.
    pub fn on_message(&mut self, key: K, msg: FlowMsg, stack: &mut Stack) {
        match msg {
            FlowMsg::Dialed(id, r) => stack.tcp_dialed(id, r),
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
                permit.send(self.scratch[..n].to_vec());
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
    dial_timeout: Duration,
    tx: mpsc::Sender<(K, FlowMsg)>,
    mut from_agent: mpsc::Receiver<Vec<u8>>,
    credit: Arc<Semaphore>,
    wake: Arc<Notify>,
) {
    let stream = match tokio::time::timeout(dial_timeout, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("flow {id}: dial {dst} failed: {e}");
            let _ = tx
                .send((key, FlowMsg::Dialed(id, Err(dial_error(&e)))))
                .await;
            return;
        }
        Err(_) => {
            tracing::debug!("flow {id}: dial {dst} timed out");
            let _ = tx
                .send((key, FlowMsg::Dialed(id, Err(DialError::TimedOut))))
                .await;
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
        loop {
            let Ok(permit) = credit.clone().acquire_many_owned(CHUNK as u32).await else {
                return;
            };
            let mut buf = vec![0u8; CHUNK];
            match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = tx2.send((key, FlowMsg::Eof(id))).await;
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    permit.forget();
                    credit.add_permits(CHUNK - n);
                    if tx2.send((key, FlowMsg::Data(id, buf))).await.is_err() {
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

async fn udp_flow<K: Copy + Send + 'static>(
    key: K,
    id: FlowId,
    dst: SocketAddr,
    tx: mpsc::Sender<(K, FlowMsg)>,
    mut from_agent: mpsc::Receiver<Vec<u8>>,
) {
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

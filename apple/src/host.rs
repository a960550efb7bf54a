//! The engine's thread and the handle the exports work on.
//!
//! One thread owns the [`Engine`], its UDP sockets and (UTUN/RAW) its dup of the device, and
//! sleeps in poll(2) on them and on a wake pipe. Other threads talk to it only through a
//! command queue (plus the pipe to wake it) and read what it produced from bounded queues.
//! Helper threads (relay name resolution, DNS over TCP) only ever send commands: callbacks run
//! on the engine's thread alone, so joining it in `stop` ends them for good.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use sluice_dataplane::engine::{
    self, DnsConfig, Engine, EngineConfig, EngineError, Event, Settings, SocketKind,
    DEVICE_HEADROOM,
};
use sluice_dataplane::tls::Credentials;
use sluice_policy::Policy;

use crate::callbacks::Callbacks;
use crate::config::{upstreams_from_resolv_conf, AgentConfig};
use crate::events::{EventQueue, HostEvent};
use crate::ffi::Error;
use crate::network;
use crate::queue::{Batch, PacketQueue, IN_BYTES_MAX};
use crate::utun::{self, Device, Framing};

/// Commands waiting for the engine's thread; past this a call is refused (a host that floods
/// the engine with calls while its thread is stuck would otherwise grow without bound).
const COMMANDS_MAX: usize = 4096;
/// DNS-over-TCP exchanges in flight at once; more fail at once.
const HELPERS_MAX: usize = 8;
const DNS_TCP_TIMEOUT: Duration = Duration::from_secs(3);
/// Datagrams read from one socket before the others get their turn.
const READ_BURST: usize = 64;
/// How long a status call waits for the engine's thread.
const STATUS_WAIT: Duration = Duration::from_secs(2);
const BUF: usize = DEVICE_HEADROOM + 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The host moves packets (packetFlow): inject and take.
    Host,
    /// The library reads and writes a descriptor.
    Device(Framing),
}

enum Command {
    Packets(Batch),
    PathChanged {
        interfaces: Vec<IpAddr>,
        resolvers: Option<Vec<SocketAddr>>,
    },
    Sleep,
    Wake,
    SetPolicy(Arc<Policy>),
    RelayResolved(Result<Vec<SocketAddr>, String>),
    DnsTcpAnswer {
        id: u64,
        answer: Option<Vec<u8>>,
    },
    Status(mpsc::SyncSender<String>),
    Stop(Duration),
}

/// A pipe that wakes the engine's thread from poll(2).
struct Waker {
    read: OwnedFd,
    write: OwnedFd,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors that we then own.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            utun::set_nonblocking(fd.as_raw_fd())?;
            // SAFETY: fcntl on descriptors we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Ok(Waker { read, write })
    }

    fn wake(&self) {
        // A full pipe means the thread is already due to wake: the error is ignored.
        // SAFETY: writing one byte from a live buffer.
        unsafe { libc::write(self.write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    fn drain(&self) {
        let mut b = [0u8; 64];
        // SAFETY: reading into a live buffer.
        while unsafe { libc::read(self.read.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) } > 0 {}
    }
}

#[derive(Default)]
struct Counters {
    dropped_in: AtomicU64,
    device_dropped: AtomicU64,
    device_bad_frame: AtomicU64,
    udp_send_failed: AtomicU64,
}

/// What the engine's thread and the exports share.
pub struct Shared {
    commands: Mutex<VecDeque<Command>>,
    /// Bytes of injected packets not yet taken by the engine's thread.
    pending_in: AtomicUsize,
    events: Mutex<EventQueue>,
    packets: Mutex<PacketQueue>,
    waker: Waker,
    callbacks: Arc<Callbacks>,
    counters: Counters,
    helpers: AtomicUsize,
    /// The engine's thread has ended (on its own or stopped).
    exited: AtomicBool,
}

/// A lock that a panic elsewhere cannot make unusable (the data are plain queues).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn send(&self, c: Command) -> bool {
        {
            let mut q = lock(&self.commands);
            if q.len() >= COMMANDS_MAX {
                return false;
            }
            q.push_back(c);
        }
        self.waker.wake();
        true
    }

    fn push_event(&self, e: &HostEvent) {
        lock(&self.events).push(e);
    }
}

/// Time as the engine sees it: an Instant that advances with the host's clock (one that keeps
/// counting through sleep, unlike Instant on Apple), so a sleep shows as time gone by.
struct Clock {
    base: Instant,
    base_ns: u64,
    callbacks: Arc<Callbacks>,
}

impl Clock {
    fn new(callbacks: Arc<Callbacks>) -> Clock {
        let base_ns = callbacks.clock_ns().unwrap_or_else(os_clock_ns);
        Clock {
            base: Instant::now(),
            base_ns,
            callbacks,
        }
    }

    fn now(&self) -> Instant {
        let ns = self.callbacks.clock_ns().unwrap_or_else(os_clock_ns);
        self.base + Duration::from_nanos(ns.saturating_sub(self.base_ns))
    }
}

/// A monotonic clock that counts through sleep.
fn os_clock_ns() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const ID: libc::clockid_t = libc::CLOCK_BOOTTIME;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const ID: libc::clockid_t = libc::CLOCK_MONOTONIC;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(ID, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn unix_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

pub fn unix_secs() -> i64 {
    (unix_nanos() / 1_000_000_000) as i64
}

enum State {
    New,
    Running { thread: JoinHandle<()>, mode: Mode },
    Stopped,
}

/// One engine as the host holds it.
pub struct Agent {
    config: AgentConfig,
    creds: Credentials,
    /// The policy for the next start (set_policy before start lands here).
    policy: Mutex<Arc<Policy>>,
    shared: Arc<Shared>,
    pub dispatch: tracing::Dispatch,
    state: Mutex<State>,
    stopping: Mutex<()>,
    engine_thread: OnceLock<ThreadId>,
}

pub fn compile_policy(text: &str) -> Result<Arc<Policy>, Error> {
    let c = sluice_policy::compile::compile(text, "policy", unix_secs())
        .map_err(|e| Error::Policy(e.to_string()))?;
    for w in &c.warnings {
        tracing::warn!("policy: {w}");
    }
    Ok(Arc::new(c.policy))
}

/// The synthetic pools must stay clear of the policy's resource networks.
fn check_pools(config: &AgentConfig, policy: &Policy) -> Result<(), String> {
    let pools = [IpNet::V4(config.dns.pool_v4), IpNet::V6(config.dns.pool_v6)];
    match engine::pool_overlap(policy, &pools) {
        Some((pool, net)) => Err(format!(
            "the synthetic pool {pool} overlaps the policy's resource network {net}; pick a pool no resource uses"
        )),
        None => Ok(()),
    }
}

impl Agent {
    pub fn new(
        config_yaml: &str,
        policy_yaml: &str,
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        callbacks: Arc<Callbacks>,
        dispatch: tracing::Dispatch,
    ) -> Result<Agent, Error> {
        let config = AgentConfig::parse(config_yaml).map_err(|e| Error::Config(e.0))?;
        let creds = Credentials::from_pem(cert, key, ca, ["the certificate", "the key", "the CA"])
            .map_err(|e| Error::Credentials(e.to_string()))?;
        if !creds.signed_by_own_ca() {
            tracing::warn!(
                "the certificate is not signed by the CA given: every peer will refuse it"
            );
        }
        let policy = compile_policy(policy_yaml)?;
        check_pools(&config, &policy)
            .map_err(|e| Error::Config(format!("agent config: `dns`: {e}")))?;
        let shared = Arc::new(Shared {
            commands: Mutex::new(VecDeque::new()),
            pending_in: AtomicUsize::new(0),
            events: Mutex::new(EventQueue::default()),
            packets: Mutex::new(PacketQueue::default()),
            waker: Waker::new().map_err(|e| Error::Io(format!("cannot make a pipe: {e}")))?,
            callbacks,
            counters: Counters::default(),
            helpers: AtomicUsize::new(0),
            exited: AtomicBool::new(false),
        });
        Ok(Agent {
            config,
            creds,
            policy: Mutex::new(policy),
            shared,
            dispatch,
            state: Mutex::new(State::New),
            stopping: Mutex::new(()),
            engine_thread: OnceLock::new(),
        })
    }

    /// Binds the sockets, builds the engine and starts its thread; returns once the engine
    /// runs (or why it cannot).
    pub fn start(&self, mode: Mode, fd: RawFd) -> Result<(), Error> {
        let mut state = lock(&self.state);
        match *state {
            State::New => {}
            State::Running { .. } => {
                return Err(Error::State("the engine is already started".into()))
            }
            State::Stopped => {
                return Err(Error::State(
                    "the engine was stopped; make a new one".into(),
                ))
            }
        }
        let device = match mode {
            Mode::Host => None,
            Mode::Device(f) => Some(
                Device::dup(fd, f)
                    .map_err(|e| Error::Io(format!("the packet descriptor {fd}: {e}")))?,
            ),
        };
        let peer = UdpSocket::bind(self.config.listen)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .map_err(|e| Error::Io(format!("`listen` {}: cannot bind: {e}", self.config.listen)))?;
        let local = peer
            .local_addr()
            .map_err(|e| Error::Io(format!("the peer socket: {e}")))?;
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), Error>>(1);
        let setup = Setup {
            config: self.config.clone(),
            creds: self.creds.clone(),
            policy: lock(&self.policy).clone(),
            shared: self.shared.clone(),
            peer,
            local,
            device,
        };
        let dispatch = self.dispatch.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || engine_thread(setup, ready_tx))
            })
            .map_err(|e| Error::Io(format!("cannot start the engine's thread: {e}")))?;
        // A thread that died before it said anything (it cannot: it catches panics) is an error too.
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(Error::State("the engine's thread ended at start".into())));
        if let Err(e) = ready {
            let _ = thread.join();
            return Err(e);
        }
        let _ = self.engine_thread.set(thread.thread().id());
        *state = State::Running { thread, mode };
        Ok(())
    }

    /// Goodbyes sent (up to `timeout`), the thread joined, the callbacks silenced. Idempotent.
    pub fn stop(&self, timeout: Duration) -> Result<(), Error> {
        // Checked before any lock: a callback that calls stop would wait for itself.
        if self.engine_thread.get() == Some(&std::thread::current().id()) {
            return Err(Error::State(
                "stop was called from a callback, on the engine's own thread".into(),
            ));
        }
        // Held to the end: a second stop returns only once the first has joined the thread.
        let _one_at_a_time = lock(&self.stopping);
        let old = std::mem::replace(&mut *lock(&self.state), State::Stopped);
        if let State::Running { thread, .. } = old {
            // Past the queue's limit too: a stop is never refused.
            lock(&self.shared.commands).push_back(Command::Stop(timeout));
            self.shared.waker.wake();
            let _ = thread.join();
        }
        self.shared.callbacks.silence();
        Ok(())
    }

    fn running_mode(&self) -> Result<Mode, Error> {
        match &*lock(&self.state) {
            State::Running { mode, .. } if !self.shared.exited.load(Ordering::SeqCst) => Ok(*mode),
            State::Running { .. } => Err(Error::State(
                "the engine's thread has ended (see its stopped event)".into(),
            )),
            State::New => Err(Error::State("the engine is not started".into())),
            State::Stopped => Err(Error::State("the engine is stopped".into())),
        }
    }

    fn command(&self, c: Command) -> Result<(), Error> {
        self.running_mode()?;
        if self.shared.send(c) {
            Ok(())
        } else {
            Err(Error::State(
                "the engine is busy: its command queue is full".into(),
            ))
        }
    }

    /// Queues packets from the host (HOST mode); those past the queue's limit are dropped.
    pub fn inject(&self, packets: &[&[u8]]) -> Result<(), Error> {
        if self.running_mode()? != Mode::Host {
            return Err(Error::State(
                "inject_packets is for SLUICE_PACKETS_HOST".into(),
            ));
        }
        let mut b = Batch::default();
        let mut bytes = 0;
        let pending = self.shared.pending_in.load(Ordering::Relaxed);
        for p in packets {
            if pending + bytes + p.len() > IN_BYTES_MAX {
                self.shared
                    .counters
                    .dropped_in
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bytes += p.len();
            b.push(p);
        }
        if b.ends.is_empty() {
            return Ok(());
        }
        self.shared.pending_in.fetch_add(bytes, Ordering::Relaxed);
        self.command(Command::Packets(b)).inspect_err(|_| {
            self.shared.pending_in.fetch_sub(bytes, Ordering::Relaxed);
        })
    }

    /// The next packet for the host (HOST mode) through `f`, which says whether it took it.
    pub fn take_packet(&self, f: impl FnOnce(&[u8]) -> Result<bool, Error>) -> Result<bool, Error> {
        let mut q = lock(&self.shared.packets);
        let Some(p) = q.front() else {
            return Ok(false);
        };
        if f(p)? {
            q.pop();
        }
        Ok(true)
    }

    /// The next event through `f`, which says whether it took it.
    pub fn next_event(&self, f: impl FnOnce(&str) -> Result<bool, Error>) -> Result<bool, Error> {
        let mut q = lock(&self.shared.events);
        let Some(e) = q.front() else {
            return Ok(false);
        };
        if f(e)? {
            q.pop();
        }
        Ok(true)
    }

    pub fn path_changed(&self, change: network::Change) -> Result<(), Error> {
        self.running_mode()?;
        let bound = self.config.listen;
        let mut own = self.config.own_addresses();
        own.push(self.config.dns.address);
        let ips = change
            .interfaces
            .unwrap_or_else(network::interface_addresses);
        self.command(Command::PathChanged {
            interfaces: network::usable(ips, bound, &own),
            resolvers: change.resolvers,
        })
    }

    pub fn sleep(&self) -> Result<(), Error> {
        self.command(Command::Sleep)
    }

    pub fn wake(&self) -> Result<(), Error> {
        self.command(Command::Wake)
    }

    pub fn set_policy(&self, text: &str) -> Result<(), Error> {
        let policy = compile_policy(text)?;
        check_pools(&self.config, &policy).map_err(Error::Policy)?;
        *lock(&self.policy) = policy.clone();
        match &*lock(&self.state) {
            State::Running { .. } => {}
            _ => return Ok(()),
        }
        self.command(Command::SetPolicy(policy))
    }

    /// The settings the engine will start with, as the JSON of their event: readable before
    /// `start`, for a host that needs a packet descriptor that exists only once settings are
    /// applied (utun in a Network Extension).
    pub fn initial_settings(&self) -> String {
        let unspecified = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let config = engine_config(&self.config, unspecified, Vec::new(), Vec::new());
        HostEvent::settings(&Settings::initial(&config, &lock(&self.policy))).json()
    }

    pub fn status(&self) -> Result<String, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.command(Command::Status(tx))?;
        rx.recv_timeout(STATUS_WAIT)
            .map_err(|_| Error::State("the engine's thread did not answer".into()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(1));
    }
}

/// What the engine's thread starts from.
struct Setup {
    config: AgentConfig,
    creds: Credentials,
    policy: Arc<Policy>,
    shared: Arc<Shared>,
    peer: UdpSocket,
    local: SocketAddr,
    device: Option<Device>,
}

fn engine_thread(setup: Setup, ready: mpsc::SyncSender<Result<(), Error>>) {
    let shared = setup.shared.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut runner = match Runner::new(setup) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(e));
                return None;
            }
        };
        let _ = ready.send(Ok(()));
        runner.run()
    }));
    let reason = match r {
        Ok(reason) => reason,
        Err(p) => Some(format!(
            "the engine panicked: {}",
            crate::ffi::panic_text(&*p)
        )),
    };
    shared.exited.store(true, Ordering::SeqCst);
    if let Some(reason) = reason {
        tracing::error!("engine stopped: {reason}");
        shared.push_event(&HostEvent::Stopped { reason });
        shared.callbacks.work_waiting();
    }
}

struct Runner {
    engine: Engine,
    shared: Arc<Shared>,
    clock: Clock,
    peer: UdpSocket,
    dns4: Option<UdpSocket>,
    dns6: Option<UdpSocket>,
    device: Option<Device>,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Something was queued for the host since it was last told.
    news: bool,
}

/// The engine's configuration from the agent's: `local` is the peer socket's address.
fn engine_config(
    c: &AgentConfig,
    local: SocketAddr,
    interface_ips: Vec<IpAddr>,
    upstreams: Vec<SocketAddr>,
) -> EngineConfig {
    EngineConfig {
        relay: c.relay.clone(),
        local,
        ipv4: c.tun.ipv4,
        ipv6: c.tun.ipv6,
        mtu: c.tun.mtu,
        dns: DnsConfig {
            enabled: c.dns.listen,
            address: c.dns.address,
            pool_v4: c.dns.pool_v4,
            pool_v6: c.dns.pool_v6,
            max_names: c.dns.max_names,
            upstreams,
        },
        direct_paths: c.direct_paths,
        interface_ips,
        instance: rand::random(),
    }
}

impl Runner {
    fn new(s: Setup) -> Result<Runner, Error> {
        let clock = Clock::new(s.shared.callbacks.clone());
        let c = &s.config;
        let mut own = c.own_addresses();
        own.push(c.dns.address);
        let upstreams = c.dns.upstream.clone().unwrap_or_else(|| {
            upstreams_from_resolv_conf(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            )
        });
        let ips = network::usable(network::interface_addresses(), s.local, &own);
        let config = engine_config(c, s.local, ips, upstreams);
        let engine = Engine::new(config, &s.creds, s.policy, clock.now(), unix_nanos()).map_err(
            |e| match e {
                EngineError::Tls(e) => Error::Credentials(e.to_string()),
                e => Error::Config(e.to_string()),
            },
        )?;
        tracing::info!(
            "engine started: peer socket {}, relay {}, {}",
            s.local,
            c.relay,
            match &s.device {
                None => "packets through the host".to_string(),
                Some(d) => format!("packets on descriptor {}", d.raw()),
            }
        );
        Ok(Runner {
            engine,
            shared: s.shared,
            clock,
            peer: s.peer,
            dns4: None,
            dns6: None,
            device: s.device,
            buf: vec![0u8; BUF],
            out: vec![0u8; 65_536],
            news: false,
        })
    }

    /// The loop; returns why it ended on its own (None: it was stopped).
    fn run(&mut self) -> Option<String> {
        // The settings event goes out before anything else can happen.
        if let Err(e) = self.flush(self.clock.now()) {
            return Some(format!("the packet descriptor failed: {e}"));
        }
        loop {
            let now = self.clock.now();
            if let Some(timeout) = self.commands(now) {
                self.goodbye(timeout);
                return None;
            }
            self.read_udp(SocketKind::Peer, now);
            self.read_udp(SocketKind::Dns, now);
            if let Err(e) = self.read_device(now) {
                return Some(format!("the packet descriptor failed: {e}"));
            }
            let now = self.clock.now();
            if !self.engine.is_asleep() && now >= self.engine.poll_timeout(now) {
                self.engine.handle_timeout(now);
            }
            if let Err(e) = self.flush(now) {
                return Some(format!("the packet descriptor failed: {e}"));
            }
            if std::mem::take(&mut self.news) {
                self.shared.callbacks.work_waiting();
            }
            self.wait();
        }
    }

    /// Carries out the queued commands; Some(timeout) when one says stop.
    fn commands(&mut self, now: Instant) -> Option<Duration> {
        self.shared.waker.drain();
        let cmds = std::mem::take(&mut *lock(&self.shared.commands));
        for c in cmds {
            match c {
                Command::Packets(b) => {
                    self.shared
                        .pending_in
                        .fetch_sub(b.data.len(), Ordering::Relaxed);
                    for p in b.packets() {
                        let n = DEVICE_HEADROOM + p.len();
                        if n > self.buf.len() {
                            continue;
                        }
                        self.buf[DEVICE_HEADROOM..n].copy_from_slice(p);
                        self.engine.handle_device_packet(&mut self.buf[..n], now);
                    }
                }
                Command::PathChanged {
                    interfaces,
                    resolvers,
                } => self.engine.path_changed(interfaces, resolvers, now),
                Command::Sleep => self.engine.sleep(now),
                Command::Wake => {
                    // The wall clock moved on while asleep, by however long the sleep was.
                    self.engine.set_wall_clock(now, unix_nanos());
                    self.engine.wake(now);
                }
                Command::SetPolicy(p) => {
                    // Checked by set_policy's caller already; a refusal keeps the old one.
                    if let Err(e) = self.engine.set_policy(p, now) {
                        tracing::error!("policy change rejected: {e}");
                    }
                }
                Command::RelayResolved(r) => self.engine.handle_relay_resolved(r, now),
                Command::DnsTcpAnswer { id, answer } => {
                    self.engine.handle_dns_tcp_answer(id, answer, now)
                }
                Command::Status(reply) => {
                    let _ = reply.try_send(self.status(now));
                }
                Command::Stop(t) => return Some(t),
            }
        }
        None
    }

    fn status(&self, now: Instant) -> String {
        let mut v = serde_json::to_value(self.engine.status(now)).unwrap_or_default();
        let c = &self.shared.counters;
        let host = serde_json::json!({
            "asleep": self.engine.is_asleep(),
            "dropped_injected": c.dropped_in.load(Ordering::Relaxed),
            "dropped_for_host": lock(&self.shared.packets).dropped,
            "dropped_device_full": c.device_dropped.load(Ordering::Relaxed),
            "dropped_bad_frame": c.device_bad_frame.load(Ordering::Relaxed),
            "dropped_events": lock(&self.shared.events).dropped,
            "udp_send_failed": c.udp_send_failed.load(Ordering::Relaxed),
            "engine": self.engine.stats().line(),
        });
        if let Some(o) = v.as_object_mut() {
            o.insert("host".into(), host);
        }
        v.to_string()
    }

    fn read_udp(&mut self, kind: SocketKind, now: Instant) {
        let socks: [Option<&UdpSocket>; 2] = match kind {
            SocketKind::Peer => [Some(&self.peer), None],
            SocketKind::Dns => [self.dns4.as_ref(), self.dns6.as_ref()],
        };
        for sock in socks.into_iter().flatten() {
            for _ in 0..READ_BURST {
                match sock.recv_from(&mut self.buf) {
                    Ok((n, from)) => {
                        self.engine
                            .handle_datagram(kind, from, &mut self.buf[..n], now)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors of earlier sends and the like: the socket itself is fine.
                        tracing::debug!("UDP receive: {e}");
                        break;
                    }
                }
            }
        }
    }

    fn read_device(&mut self, now: Instant) -> io::Result<()> {
        let Some(dev) = &self.device else {
            return Ok(());
        };
        for _ in 0..READ_BURST {
            match dev.read(&mut self.buf, DEVICE_HEADROOM)? {
                utun::Read::Nothing => break,
                utun::Read::Dropped => {
                    self.shared
                        .counters
                        .device_bad_frame
                        .fetch_add(1, Ordering::Relaxed);
                }
                utun::Read::Packet { at, len } => self
                    .engine
                    .handle_device_packet(&mut self.buf[at - DEVICE_HEADROOM..at + len], now),
            }
        }
        Ok(())
    }

    /// Sends what the engine wants sent, hands its packets to the device or the host, and
    /// carries out its events.
    fn flush(&mut self, now: Instant) -> io::Result<()> {
        while let Some(t) = self.engine.poll_transmit(&mut self.out, now) {
            self.send(t.socket, t.to, t.len, None);
        }
        let mut failed = None;
        match &self.device {
            Some(dev) => {
                let dropped = &self.shared.counters.device_dropped;
                self.engine.drain_device(|p| {
                    if failed.is_some() {
                        return;
                    }
                    match dev.write(p) {
                        Ok(true) => {}
                        Ok(false) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failed = Some(e),
                    }
                });
            }
            None => {
                let mut q = lock(&self.shared.packets);
                let before = q.len();
                self.engine.drain_device(|p| {
                    q.push(p);
                });
                self.news |= q.len() > before;
            }
        }
        while let Some(e) = self.engine.poll_event() {
            self.on_event(e, now);
        }
        // Answers to host-read queries: this host never asks, so none come; kept bounded.
        while self.engine.poll_dns_answer().is_some() {}
        failed.map_or(Ok(()), Err)
    }

    fn on_event(&mut self, e: Event, now: Instant) {
        let host = match e {
            Event::Settings(s) => HostEvent::settings(&s),
            Event::Tunnel {
                connector,
                state,
                path,
            } => HostEvent::Tunnel {
                connector,
                state,
                path,
            },
            Event::Audit(line) => HostEvent::Audit { line },
            Event::ResolveRelay { host, port } => return self.resolve_relay(host, port, now),
            Event::DnsOverTcp { id, server, query } => {
                return self.dns_over_tcp(id, server, query, now)
            }
        };
        self.shared.push_event(&host);
        self.news = true;
    }

    /// The relay's name, resolved on a short-lived thread that answers with a command.
    fn resolve_relay(&mut self, host: String, port: u16, now: Instant) {
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-resolve".into())
            .spawn(move || {
                let r = (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>())
                    .map_err(|e| format!("cannot resolve {host}: {e}"));
                shared.send(Command::RelayResolved(r));
            });
        if let Err(e) = spawned {
            self.engine
                .handle_relay_resolved(Err(format!("cannot start a resolver thread: {e}")), now);
        }
    }

    /// One DNS exchange over TCP on a short-lived thread (bounded in number and time).
    fn dns_over_tcp(&mut self, id: u64, server: SocketAddr, query: Vec<u8>, now: Instant) {
        if self.shared.helpers.fetch_add(1, Ordering::SeqCst) >= HELPERS_MAX {
            self.shared.helpers.fetch_sub(1, Ordering::SeqCst);
            return self.engine.handle_dns_tcp_answer(id, None, now);
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-dns-tcp".into())
            .spawn(move || {
                let answer = tcp_exchange(server, &query, DNS_TCP_TIMEOUT)
                    .inspect_err(|e| tracing::debug!("DNS over TCP to {server}: {e}"))
                    .ok();
                shared.helpers.fetch_sub(1, Ordering::SeqCst);
                shared.send(Command::DnsTcpAnswer { id, answer });
            });
        if spawned.is_err() {
            self.shared.helpers.fetch_sub(1, Ordering::SeqCst);
            self.engine.handle_dns_tcp_answer(id, None, now);
        }
    }

    /// Sends `self.out[..len]`; with a deadline, waits for room in the socket until then.
    fn send(&mut self, kind: SocketKind, to: SocketAddr, len: usize, deadline: Option<Instant>) {
        let sock = match kind {
            SocketKind::Peer => Some(&self.peer),
            SocketKind::Dns => {
                let (slot, any): (&mut Option<UdpSocket>, SocketAddr) = if to.is_ipv4() {
                    (&mut self.dns4, SocketAddr::from(([0, 0, 0, 0], 0)))
                } else {
                    (&mut self.dns6, SocketAddr::from(([0u16; 8], 0)))
                };
                if slot.is_none() {
                    match UdpSocket::bind(any).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                        Ok(s) => *slot = Some(s),
                        Err(e) => tracing::warn!("cannot open a socket for upstream DNS: {e}"),
                    }
                }
                slot.as_ref()
            }
        };
        let Some(sock) = sock else {
            self.shared
                .counters
                .udp_send_failed
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        loop {
            match sock.send_to(&self.out[..len], to) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    match left {
                        Some(l) if !l.is_zero() => poll_one(sock.as_raw_fd(), libc::POLLOUT, l),
                        _ => break,
                    }
                }
                Err(e) => {
                    tracing::debug!("UDP send to {to}: {e}");
                    break;
                }
            }
        }
        self.shared
            .counters
            .udp_send_failed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Says goodbye to the relay and the connectors and sends it, within `timeout`.
    fn goodbye(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.engine.shut_down();
        let now = self.clock.now();
        while Instant::now() < deadline {
            let Some(t) = self.engine.poll_transmit(&mut self.out, now) else {
                break;
            };
            self.send(t.socket, t.to, t.len, Some(deadline));
        }
        tracing::info!("engine stopped");
    }

    /// Sleeps until a socket, the device or the wake pipe is readable, or the engine's next
    /// deadline (no deadline while asleep: timers stop with the machine).
    fn wait(&self) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
        let mut add = |fd: RawFd| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
        };
        add(self.shared.waker.read.as_raw_fd());
        add(self.peer.as_raw_fd());
        for s in [&self.dns4, &self.dns6].into_iter().flatten() {
            add(s.as_raw_fd());
        }
        if let Some(d) = &self.device {
            add(d.raw());
        }
        let timeout_ms = if self.engine.is_asleep() {
            -1
        } else {
            let now = self.clock.now();
            let left = self.engine.poll_timeout(now).saturating_duration_since(now);
            // Rounded up: waking a little early would spin until the deadline.
            left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        };
        // SAFETY: poll on descriptors that live as long as `self`, through a live array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    }
}

fn poll_one(fd: RawFd, events: libc::c_short, wait: Duration) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: poll on one live descriptor.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// One length-prefixed DNS exchange over TCP, all within `timeout`.
fn tcp_exchange(server: SocketAddr, query: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        if l.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
        } else {
            Ok(l)
        }
    };
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut s = TcpStream::connect_timeout(&server, timeout)?;
    s.set_write_timeout(Some(left()?))?;
    let mut msg = Vec::with_capacity(2 + query.len());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(query);
    s.write_all(&msg)?;
    s.set_read_timeout(Some(left()?))?;
    let mut n = [0u8; 2];
    s.read_exact(&mut n)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(n))];
    s.set_read_timeout(Some(left()?))?;
    s.read_exact(&mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn dns_over_tcp_is_length_prefixed_and_bounded_in_time() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut n = [0u8; 2];
            s.read_exact(&mut n).unwrap();
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(n))];
            s.read_exact(&mut q).unwrap();
            q.reverse();
            s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
            s.write_all(&q).unwrap();
            // A second client that never answers.
            let (_s2, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
        });
        assert_eq!(
            tcp_exchange(addr, &[1, 2, 3], DNS_TCP_TIMEOUT).unwrap(),
            vec![3, 2, 1]
        );
        let t0 = Instant::now();
        assert!(tcp_exchange(addr, &[1], Duration::from_millis(300)).is_err());
        assert!(t0.elapsed() < Duration::from_millis(700));
        t.join().unwrap();
    }

    #[test]
    fn the_wake_pipe_wakes_and_drains() {
        let w = Waker::new().unwrap();
        for _ in 0..100_000 {
            w.wake(); // Never blocks, even when full.
        }
        w.drain();
        poll_one(w.read.as_raw_fd(), libc::POLLIN, Duration::from_millis(1));
        let mut b = [0u8; 1];
        // SAFETY: reading into a live buffer.
        let n = unsafe { libc::read(w.read.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        assert_eq!(n, -1, "drained");
    }
}

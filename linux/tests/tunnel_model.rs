//! A reference model of the tunnel (issue 17, part 4), in the spirit of Firezone's tunnel
//! state-machine test (`rust/tests/fuzz`): proptest draws a NAT setup and a sequence of
//! transitions, which drive the agent engine, the relay core and the connector core (with
//! netstack's real smoltcp termination stack) in memory, joined by the simulated network of
//! `memory/`. After every transition the world runs for a while and the invariants are checked
//! against a simple model of what should have happened:
//!
//! - every byte of an allowed TCP flow reaches the other side once and in order, both ways
//!   (service side: what [`memory::MemServices`] received; app side: a smoltcp socket), and
//!   all of it once a path exists again; every UDP datagram arrives at most once and in order,
//!   and every datagram sent while the network was calm arrives;
//! - no allowed flow is reset, unless no path at all existed for longer than the tunnel's
//!   silence limit (then the tunnel is gone, by design);
//! - nothing of a denied (or revoked) flow reaches the service side;
//! - the relay never sees plaintext: every datagram into or out of the relay core is scanned
//!   for every 16-byte window of every payload (random bytes);
//! - nothing panics.
//!
//! Time is simulated. The cores take `now`, but quiche, parts of `Tunnel`, the control client
//! and the relay core read `Instant::now()` themselves; so this binary interposes libc's
//! `clock_gettime(CLOCK_MONOTONIC)` (see [`clock`]) and every `Instant::now()` on the test's
//! thread returns the simulated time. Minutes of idle time then cost microseconds, and every
//! timer of every layer sees the same clock.
//!
//! Run more cases with `TUNNEL_MODEL_CASES=10000`; failures found are kept in
//! `tunnel_model.proptest-regressions` and replayed first.

mod memory;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::{App, NatKind, Pki, TcpService, World, WorldConfig, APP};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use sluice_dataplane::packet::{self, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use sluice_dataplane::revocation::{Draft, RevocationList};
use sluice_dataplane::status::PathKind;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

/// The simulated clock: `Instant::now()` on a thread that [`clock::start`]ed returns what
/// [`clock::set`] last said, for every caller (quiche included).
mod clock {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    thread_local! {
        /// The simulated CLOCK_MONOTONIC of this thread, (seconds, nanoseconds); None: real.
        static NOW: Cell<Option<(i64, i64)>> = const { Cell::new(None) };
        /// The real time when the simulation started, and the Instant it reads as.
        static BASE: Cell<Option<((i64, i64), Instant)>> = const { Cell::new(None) };
    }

    /// Interposes libc's `clock_gettime` for this executable: std's `Instant::now()` (and so
    /// quiche's) calls it. A definition in the executable wins over libc's at link time.
    /// Other clocks, and threads that never started a simulation, get the real time through
    /// the system call.
    ///
    /// # Safety
    /// Called by libc's callers with a valid `tp`, as `clock_gettime(2)` is.
    #[no_mangle]
    pub unsafe extern "C" fn clock_gettime(
        clk: libc::clockid_t,
        tp: *mut libc::timespec,
    ) -> libc::c_int {
        if clk == libc::CLOCK_MONOTONIC && !tp.is_null() {
            if let Some((s, ns)) = NOW.try_with(|n| n.get()).ok().flatten() {
                (*tp).tv_sec = s;
                (*tp).tv_nsec = ns;
                return 0;
            }
        }
        libc::syscall(libc::SYS_clock_gettime, clk, tp) as libc::c_int
    }

    fn real() -> (i64, i64) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec for the kernel to fill.
        unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
        (ts.tv_sec, ts.tv_nsec)
    }

    /// Freezes this thread's clock (at the real time, the first time) and returns its now.
    pub fn start() -> Instant {
        if let Some((_, at)) = BASE.with(|b| b.get()) {
            // Already simulated: time goes on from where the last case left it.
            return at.max(Instant::now());
        }
        let r = real();
        NOW.with(|n| n.set(Some(r)));
        let at = Instant::now();
        BASE.with(|b| b.set(Some((r, at))));
        // The interposition works, or every "simulated" timer would run on the real clock.
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(Instant::now(), at, "clock_gettime is not interposed");
        at
    }

    /// This thread's clock reads `t` from now on.
    pub fn set(t: Instant) {
        let Some(((s, ns), at)) = BASE.with(|b| b.get()) else {
            return;
        };
        let d = t.saturating_duration_since(at);
        let total = ns as u128 + d.subsec_nanos() as u128;
        let secs = s + d.as_secs() as i64 + (total / 1_000_000_000) as i64;
        NOW.with(|n| n.set(Some((secs, (total % 1_000_000_000) as i64))));
    }
}

// ---- the model ---------------------------------------------------------------------------

/// The services' ports: two TCP (a sink each, the test sends the service's bytes) and two UDP
/// (the service keeps datagrams; the test sends its own back).
const PORTS: [(bool, u16); 4] = [(false, 7), (false, 8), (true, 9), (true, 10)];
/// What a fault leaves unsettled: after this long without one the network is calm and every
/// datagram must arrive (direct-path failure takes PTO + 3 s to notice while traffic flows,
/// and on an idle tunnel up to the next keepalive, 15 s; a restarted relay 6 s of silence and
/// a backoff). A datagram sent into a path that died unnoticed is lost, by design.
const CALM: Duration = Duration::from_secs(20);
/// A tunnel that heard nothing for this long (with QUIC probing) is closed by design; a gap
/// with no path this long may cost the flows.
const NO_PATH_LIMIT: Duration = Duration::from_secs(4);
/// How long the world runs after each transition.
const STEP: Duration = Duration::from_millis(300);
/// Payload windows this long are what the relay must never see.
const WINDOW: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enforcers {
    Both,
    AgentOnly,
    ConnectorOnly,
}

#[derive(Debug, Clone)]
enum Transition {
    /// The app opens a flow to the service on `PORTS[port]` (TCP for 0 and 1, UDP for 2, 3).
    Open {
        port: usize,
    },
    /// The app closes TCP flow number `flow` (modulo the TCP flows).
    Close {
        flow: usize,
    },
    /// `len` random bytes (TCP) or one datagram (UDP) from the app on flow `flow`.
    AppSends {
        flow: usize,
        len: usize,
    },
    /// The same from the service to the app.
    ServiceSends {
        flow: usize,
        len: usize,
    },
    CutDirect,
    RestoreDirect,
    /// The relay restarts, unreachable for `down_ms` first.
    RestartRelay {
        down_ms: u64,
    },
    RebindAgent,
    RebindConnector,
    /// A new policy allows `PORTS[i]` for each bit `i` of `allow`, given to `at`.
    Policy {
        allow: u8,
        at: Enforcers,
    },
    /// Nothing happens for `ms` (a time jump: every timer due in it runs).
    Idle {
        ms: u64,
    },
    /// The agent's certificate is revoked: the list goes to the relay, and also straight to
    /// the connector (its own file) when `at_connector`.
    Revoke {
        at_connector: bool,
    },
}

#[derive(Debug, Clone)]
struct Case {
    agent_nat: NatKind,
    connector_nat: NatKind,
    allow: u8,
    seed: u64,
    steps: Vec<Transition>,
}

fn nat() -> impl Strategy<Value = NatKind> {
    prop_oneof![
        Just(NatKind::None),
        Just(NatKind::FullCone),
        Just(NatKind::PortRestricted)
    ]
}

fn transition() -> impl Strategy<Value = Transition> {
    use Transition::*;
    prop_oneof![
        4 => (0..4usize).prop_map(|port| Open { port }),
        1 => any::<u8>().prop_map(|f| Close { flow: f.into() }),
        8 => (any::<u8>(), 1..6000usize).prop_map(|(f, len)| AppSends { flow: f.into(), len }),
        5 => (any::<u8>(), 1..6000usize)
            .prop_map(|(f, len)| ServiceSends { flow: f.into(), len }),
        2 => Just(CutDirect),
        2 => Just(RestoreDirect),
        1 => prop_oneof![Just(0u64), 1..3000u64].prop_map(|down_ms| RestartRelay { down_ms }),
        1 => Just(RebindAgent),
        1 => Just(RebindConnector),
        2 => (0..16u8, prop_oneof![
            Just(Enforcers::Both),
            Just(Enforcers::AgentOnly),
            Just(Enforcers::ConnectorOnly)
        ])
            .prop_map(|(allow, at)| Policy { allow, at }),
        3 => prop_oneof![10..1000u64, 1000..20_000u64, 20_000..400_000u64].prop_map(|ms| Idle { ms }),
        1 => any::<bool>().prop_map(|at_connector| Revoke { at_connector }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        nat(),
        nat(),
        prop_oneof![3 => Just(0b1111u8), 1 => 0..16u8],
        any::<u64>(),
        proptest::collection::vec(transition(), 1..24),
    )
        .prop_map(|(agent_nat, connector_nat, allow, seed, steps)| Case {
            agent_nat,
            connector_nat,
            allow,
            seed,
            steps,
        })
}

fn policy_text(allow: u8) -> String {
    // tcp/1 keeps the port list non-empty; no flow uses it.
    let mut ports = vec!["tcp/1".to_string()];
    for (i, (udp, p)) in PORTS.iter().enumerate() {
        if allow & (1 << i) != 0 {
            ports.push(format!("{}/{p}", if *udp { "udp" } else { "tcp" }));
        }
    }
    ports.join(", ")
}

/// One UDP datagram the model sent.
#[derive(Debug, Clone)]
struct Dgram {
    payload: Vec<u8>,
    /// Sent while the network was calm and the flow allowed: it must arrive.
    must: bool,
}

/// How a flow stands, as far as the model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    Open,
    /// The app closed it (TCP FIN).
    Closing,
}

#[derive(Debug)]
struct Flow {
    udp: bool,
    port_index: usize,
    /// The service address: unique per flow, so the service side tells the flows apart.
    dst: SocketAddr,
    src_port: u16,
    state: FlowState,
    /// Allowed by both enforcers at every moment since it opened (and not revoked): only such
    /// flows are owed delivery and must never be reset.
    clean: bool,
    /// Denied (by either enforcer) when the app opened it.
    denied_at_open: bool,
    /// No path existed for long enough that the tunnel may have gone, and the flow with it.
    may_lose: bool,
    /// The app got a TCP reset for it.
    reset: bool,
    /// The app got ICMP "administratively prohibited" for it.
    prohibited: bool,
    // TCP
    handle: Option<SocketHandle>,
    app_unsent: Vec<u8>,
    app_sent: Vec<u8>,
    app_rcvd: Vec<u8>,
    svc_sent: Vec<u8>,
    // UDP
    up: Vec<Dgram>,
    down: Vec<Dgram>,
    down_rcvd: Vec<Vec<u8>>,
    /// Bytes or datagrams the service had received at the last check (they only grow).
    svc_seen: usize,
    /// Service-side flows at the last check.
    svc_flows: usize,
}

/// Counters over all cases, printed at the end: what the random cases actually exercised.
struct Coverage {
    cases: AtomicU64,
    direct_cases: AtomicU64,
    switches: AtomicU64,
    tcp_bytes: AtomicU64,
    datagrams: AtomicU64,
    must_datagrams: AtomicU64,
    resets_allowed: AtomicU64,
    revoked: AtomicU64,
    sim_secs: AtomicU64,
}

static COVERAGE: Coverage = Coverage {
    cases: AtomicU64::new(0),
    direct_cases: AtomicU64::new(0),
    switches: AtomicU64::new(0),
    tcp_bytes: AtomicU64::new(0),
    datagrams: AtomicU64::new(0),
    must_datagrams: AtomicU64::new(0),
    resets_allowed: AtomicU64::new(0),
    revoked: AtomicU64::new(0),
    sim_secs: AtomicU64::new(0),
};

/// Random bytes from a seed (xorshift): payloads nobody could mistake for anything else.
struct Bytes(u64);

impl Bytes {
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 24) as u8
            })
            .collect()
    }
}

struct Sim {
    w: World,
    app: App,
    pki: Arc<Pki>,
    flows: Vec<Flow>,
    bytes: Bytes,
    /// Every 16-byte window of every payload sent either way.
    windows: HashSet<[u8; WINDOW]>,
    /// Ports each enforcer allows now (bits of `PORTS`), and the agent's before the last
    /// change (a packet it admitted may arrive after the change).
    agent_allow: u8,
    agent_allow_before: u8,
    connector_allow: u8,
    revoked: bool,
    /// After the revocation took effect: nothing of the agent's reaches the service any more.
    revoked_cutoff: bool,
    last_fault: Option<Instant>,
    no_path_since: Option<Instant>,
    /// A NAT rebinding broke the direct path in use (the other side's NAT filters the new
    /// mapping, or the connector's public address moved): it carries nothing until the agent
    /// leaves it for the relay (a direct path found after that is a new one).
    direct_broken: bool,
    saw_direct: bool,
    seq: u64,
    t0: Instant,
    log: Vec<String>,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

impl Sim {
    fn new(case: &Case, pki: Arc<Pki>) -> Sim {
        let t0 = clock::start();
        let cfg = WorldConfig {
            agent_policy: memory::web_policy(&policy_text(case.allow)),
            connector_policy: memory::web_policy(&policy_text(case.allow)),
            dns: false,
            direct_paths: true,
            agent_nat: case.agent_nat,
            connector_nat: case.connector_nat,
            valid: Duration::from_secs(30 * 86_400),
            services: || memory::MemServices {
                tcp: [(7, TcpService::Sink), (8, TcpService::Sink)].into(),
                udp: [9, 10].into(),
                ..Default::default()
            },
        };
        let mut w = World::with_pki(&cfg, &pki, t0, clock::set);
        w.relay_tap = Some(Vec::new());
        Sim {
            app: App::new(t0, 64 * 1024),
            w,
            pki,
            flows: Vec::new(),
            bytes: Bytes(case.seed | 1),
            windows: HashSet::new(),
            agent_allow: case.allow,
            agent_allow_before: case.allow,
            connector_allow: case.allow,
            revoked: false,
            revoked_cutoff: false,
            last_fault: None,
            no_path_since: None,
            direct_broken: false,
            saw_direct: false,
            seq: 0,
            t0,
            log: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.w.now
    }

    fn allowed(&self, port_index: usize) -> bool {
        let bit = 1 << port_index;
        !self.revoked && self.agent_allow & bit != 0 && self.connector_allow & bit != 0
    }

    fn calm(&self) -> bool {
        self.w.relay_up() && self.last_fault.is_none_or(|t| self.now() >= t + CALM)
    }

    fn fault(&mut self) {
        self.last_fault = Some(self.now());
    }

    fn remember(&mut self, payload: &[u8]) {
        for w in payload.windows(WINDOW) {
            let mut a = [0u8; WINDOW];
            a.copy_from_slice(w);
            self.windows.insert(a);
        }
    }

    /// Moves packets between the app and the world until neither has any.
    fn pump(&mut self) {
        for _ in 0..1000 {
            let now = self.now();
            for f in &mut self.flows {
                let Some(h) = f.handle else { continue };
                let s = self.app.socket(h);
                if !f.app_unsent.is_empty() && s.can_send() {
                    let n = s.send_slice(&f.app_unsent).unwrap_or(0);
                    f.app_sent.extend(f.app_unsent.drain(..n));
                }
                while s.can_recv() {
                    let mut b = [0u8; 4096];
                    match s.recv_slice(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => f.app_rcvd.extend_from_slice(&b[..n]),
                    }
                }
            }
            let mut from_app = Vec::new();
            self.app.poll(now, &mut |p| from_app.push(p));
            for p in &from_app {
                self.w.device_packet(p);
            }
            let mut to_app = Vec::new();
            self.w.pump(&mut |p| to_app.push(p.to_vec()));
            let moved = !from_app.is_empty() || !to_app.is_empty();
            for p in to_app {
                self.deliver_to_app(p);
            }
            if !moved {
                break;
            }
        }
    }

    /// A packet the engine wrote to the device: TCP goes to the app's stack, UDP and ICMP are
    /// the model's to note.
    fn deliver_to_app(&mut self, p: Vec<u8>) {
        let Ok(info) = packet::inspect(&p) else {
            return;
        };
        match info.proto {
            PROTO_TCP => {
                if info.tcp.rst {
                    if let Some(f) = self.flows.iter_mut().find(|f| {
                        !f.udp && f.dst == info.src_socket() && f.src_port == info.dst_port
                    }) {
                        f.reset = true;
                    }
                }
                self.app.dev.rx.push_back(p);
            }
            PROTO_UDP => {
                if let Some(f) = self
                    .flows
                    .iter_mut()
                    .find(|f| f.udp && f.dst == info.src_socket() && f.src_port == info.dst_port)
                {
                    f.down_rcvd.push(info.payload(&p).to_vec());
                }
            }
            PROTO_ICMP if info.icmp_error && p.len() >= 48 => {
                // Destination unreachable (3); the quoted packet's destination names the flow.
                let prohibited = p[20] == 3 && p[21] == 13;
                let dst = IpAddr::V4(Ipv4Addr::new(p[44], p[45], p[46], p[47]));
                if let Some(f) = self.flows.iter_mut().find(|f| f.dst.ip() == dst) {
                    f.prohibited |= prohibited;
                }
            }
            _ => {}
        }
    }

    /// Runs the world for `d`: from one deadline to the next, checking as it goes.
    fn run(&mut self, d: Duration) -> Result<(), TestCaseError> {
        let end = self.now() + d;
        loop {
            self.pump();
            self.watch_paths();
            self.check()?;
            let now = self.now();
            if now >= end {
                return Ok(());
            }
            let mut next = self.w.next_deadline().min(end);
            if let Some(t) = self.app.poll_at(now) {
                next = next.min(t);
            }
            // Progress even when a core says it is due now (it ran; early calls are fine).
            self.w
                .set_now(next.max(now + Duration::from_millis(1)).min(end));
        }
    }

    /// Notes the path in use and whether any path exists; a long gap with none may cost the
    /// open flows (the tunnel closes after 5 s without an answer, by design).
    fn watch_paths(&mut self) {
        let now = self.now();
        let st = self.w.engine.status(now);
        let direct = st
            .tunnels
            .first()
            .is_some_and(|t| t.path == PathKind::Direct);
        self.saw_direct |= direct;
        if !direct {
            self.direct_broken = false;
        }
        // The relayed path works when the relay (this instance: a restarted one knows nobody
        // until they connect again) has both peers, each at its address of now (a rebound
        // NAT's new mapping is learnt by the relay's QUIC with the next packet).
        let relay_ok = self.w.relay_up() && self.w.relay.connectors().count() == 1 && {
            let peers = self.w.relay.peers();
            [self.w.agent_nat.public(), self.w.connector_nat.public()]
                .iter()
                .all(|a| peers.iter().any(|p| p.identity.is_some() && p.addr == *a))
        };
        let direct_ok = direct && !self.w.direct_cut && !self.direct_broken;
        if relay_ok || direct_ok {
            self.no_path_since = None;
            return;
        }
        let since = *self.no_path_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= NO_PATH_LIMIT {
            for f in &mut self.flows {
                if !f.may_lose {
                    f.may_lose = true;
                    COVERAGE.resets_allowed.fetch_add(1, Relaxed);
                }
            }
        }
    }

    fn note(&mut self, s: String) {
        let at = self.w.now.duration_since(self.t0).as_secs_f64();
        self.log.push(format!("{at:>9.3}s {s}"));
    }

    fn apply(&mut self, t: &Transition) -> Result<(), TestCaseError> {
        use Transition::*;
        let now = self.now();
        match *t {
            Open { port } => {
                let n = self.flows.len();
                if n >= 200 {
                    return Ok(());
                }
                let (udp, p) = PORTS[port];
                let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 10 + n as u8)), p);
                let src_port = 43_000 + n as u16;
                let handle = (!udp).then(|| self.app.connect(dst, src_port));
                let clean = self.allowed(port);
                self.flows.push(Flow {
                    udp,
                    port_index: port,
                    dst,
                    src_port,
                    state: FlowState::Open,
                    clean,
                    denied_at_open: !clean,
                    may_lose: false,
                    reset: false,
                    prohibited: false,
                    handle,
                    app_unsent: Vec::new(),
                    app_sent: Vec::new(),
                    app_rcvd: Vec::new(),
                    svc_sent: Vec::new(),
                    up: Vec::new(),
                    down: Vec::new(),
                    down_rcvd: Vec::new(),
                    svc_seen: 0,
                    svc_flows: 0,
                });
                if udp {
                    // A UDP flow opens with its first datagram.
                    self.app_sends(n, 64);
                }
            }
            Close { flow } => {
                let tcp: Vec<usize> = (0..self.flows.len())
                    .filter(|i| !self.flows[*i].udp && self.flows[*i].state == FlowState::Open)
                    .collect();
                if let Some(&i) = tcp.get(flow % tcp.len().max(1)) {
                    let f = &mut self.flows[i];
                    f.state = FlowState::Closing;
                    // Bytes the app had not written yet are not part of the stream.
                    f.app_unsent.clear();
                    if let Some(h) = f.handle {
                        let s = self.app.socket(h);
                        // Closed before it connected: smoltcp aborts the connection (nothing
                        // was sent, nothing is owed).
                        if matches!(s.state(), tcp::State::SynSent | tcp::State::Closed) {
                            f.clean = false;
                        }
                        s.close();
                    }
                }
            }
            AppSends { flow, len } => {
                if !self.flows.is_empty() {
                    let i = flow % self.flows.len();
                    self.app_sends(i, len);
                }
            }
            ServiceSends { flow, len } => {
                if !self.flows.is_empty() {
                    let i = flow % self.flows.len();
                    self.service_sends(i, len);
                }
            }
            CutDirect => {
                if !self.w.direct_cut {
                    self.w.direct_cut = true;
                    self.fault();
                }
            }
            RestoreDirect => self.w.direct_cut = false,
            RestartRelay { down_ms } => {
                self.w.restart_relay(Duration::from_millis(down_ms));
                self.fault();
            }
            RebindAgent => {
                self.w.agent_nat.rebind();
                // The connector follows the agent to its new mapping (QUIC migration), unless
                // its own NAT filters the mapping it has never sent to.
                self.direct_broken |= self.w.agent_nat.kind != NatKind::None
                    && self.w.connector_nat.kind == NatKind::PortRestricted;
                self.fault();
            }
            RebindConnector => {
                self.w.connector_nat.rebind();
                // The agent keeps sending to the connector's old public address.
                self.direct_broken |= self.w.connector_nat.kind != NatKind::None;
                self.fault();
            }
            Policy { allow, at } => {
                let p = memory::web_policy(&policy_text(allow));
                if at != Enforcers::ConnectorOnly {
                    self.agent_allow_before = self.agent_allow;
                    self.agent_allow = allow;
                    self.w
                        .engine
                        .set_policy(p.clone(), now)
                        .map_err(|e| fail(format!("policy refused: {e}")))?;
                }
                if at != Enforcers::AgentOnly {
                    self.connector_allow = allow;
                    self.w.connector.set_policy(p, now);
                }
                for i in 0..self.flows.len() {
                    if !self.allowed(self.flows[i].port_index) {
                        self.flows[i].clean = false;
                    }
                }
            }
            Idle { ms } => return self.run(Duration::from_millis(ms)),
            Revoke { at_connector } => {
                return self.revoke(at_connector);
            }
        }
        self.run(STEP)
    }

    fn app_sends(&mut self, i: usize, len: usize) {
        let calm = self.calm();
        let allowed = self.allowed(self.flows[i].port_index);
        let f = &self.flows[i];
        if f.state != FlowState::Open {
            return;
        }
        if f.udp {
            let payload = self.bytes.take(24 + len % 1000);
            self.remember(&payload);
            let f = &mut self.flows[i];
            let must = calm && allowed && f.clean;
            COVERAGE.datagrams.fetch_add(1, Relaxed);
            COVERAGE.must_datagrams.fetch_add(must as u64, Relaxed);
            let p = SocketAddr::new(IpAddr::V4(APP), f.src_port);
            f.up.push(Dgram {
                payload: payload.clone(),
                must,
            });
            if let Some(pkt) = packet::udp_packet(p, f.dst, &payload) {
                self.w.device_packet(&pkt);
            }
        } else {
            let data = self.bytes.take(len);
            self.remember(&data);
            COVERAGE.tcp_bytes.fetch_add(len as u64, Relaxed);
            self.flows[i].app_unsent.extend_from_slice(&data);
        }
    }

    fn service_sends(&mut self, i: usize, len: usize) {
        let calm = self.calm();
        let allowed = self.allowed(self.flows[i].port_index);
        let dst = self.flows[i].dst;
        // Only an open flow of the service's can send (a UDP flow the connector expired has
        // none until the app's next datagram).
        let Some(svc) = self.w.services.flow_to(dst) else {
            return;
        };
        let udp = self.flows[i].udp;
        let data = self.bytes.take(if udp { 24 + len % 1000 } else { len });
        self.remember(&data);
        self.w.services.send(svc, &data);
        let f = &mut self.flows[i];
        if udp {
            let must = calm && allowed && f.clean;
            COVERAGE.datagrams.fetch_add(1, Relaxed);
            COVERAGE.must_datagrams.fetch_add(must as u64, Relaxed);
            f.down.push(Dgram {
                payload: data,
                must,
            });
        } else {
            COVERAGE.tcp_bytes.fetch_add(len as u64, Relaxed);
            f.svc_sent.extend_from_slice(&data);
        }
    }

    /// Revokes the agent's certificate (by name) with a list signed by the CA.
    fn revoke(&mut self, at_connector: bool) -> Result<(), TestCaseError> {
        // REVOCATION: uses `sluice_dataplane::revocation` as it stands (relay:
        // `Relay::apply_revocations` with the list loaded into its credentials' handle;
        // connector: `Connector::handle_revocations`, or the list the relay hands on).
        self.seq += 1;
        let unix = sluice_dataplane::identity::unix_now();
        let draft = Draft {
            sequence: self.seq,
            issued_at: unix,
            expires_at: unix + 86_400,
            peers: Default::default(),
            names: ["alice".to_string()].into(),
        };
        let list = RevocationList::sign(&draft, &self.pki.ca.cert_pem, &self.pki.ca.key_pem)
            .map_err(|e| fail(format!("cannot sign a revocation list: {e}")))?;
        let ca = self
            .w
            .relay_creds
            .ca_key()
            .map_err(|e| fail(e.to_string()))?;
        self.w
            .relay_creds
            .revocations
            .load(list.encoded(), &ca, "test", unix)
            .map_err(|e| fail(format!("relay refused the list: {e}")))?;
        self.w
            .relay
            .apply_revocations(&self.w.relay_creds.revocations);
        let now = self.now();
        if at_connector {
            self.w
                .connector
                .handle_revocations(list.encoded(), "test file", now)
                .map_err(|e| fail(format!("connector refused the list: {e}")))?;
        }
        self.revoked = true;
        for f in &mut self.flows {
            f.clean = false;
        }
        COVERAGE.revoked.fetch_add(1, Relaxed);
        // From the connector's own file it takes effect at once; through the relay the issue
        // allows 2 s (the relay may be down or restarting: then whenever it is back and the
        // connector's link is up again).
        if !at_connector {
            self.run(Duration::from_secs(2))?;
            let mut waited = Duration::ZERO;
            // Registered with this relay (a restarted one is noticed after 6 s of silence).
            while !(self.w.relay_up()
                && self.w.connector.relay_connected()
                && self.w.relay.connectors().count() == 1)
            {
                if waited > Duration::from_secs(30) {
                    return Err(fail("the connector never reconnected to the relay".into()));
                }
                self.run(Duration::from_secs(1))?;
                waited += Duration::from_secs(1);
            }
            self.run(Duration::from_secs(2))?;
        }
        self.pump();
        self.revoked_cutoff = true;
        for f in &mut self.flows {
            f.svc_seen = self
                .w
                .services
                .flows_to(f.dst)
                .map(|s| if f.udp { s.datagrams.len() } else { s.rx.len() })
                .sum();
        }
        self.run(STEP)?;
        if self.w.connector.agents() != 0 {
            return Err(fail(
                "a revoked agent still has a tunnel at the connector".into(),
            ));
        }
        Ok(())
    }

    /// The invariants that hold at every moment.
    fn check(&mut self) -> Result<(), TestCaseError> {
        // The relay never sees plaintext.
        if let Some(tap) = &mut self.w.relay_tap {
            for d in tap.drain(..) {
                for win in d.windows(WINDOW) {
                    if self.windows.contains(win) {
                        return Err(fail(format!(
                            "the relay saw {WINDOW} payload bytes in a {}-byte datagram",
                            d.len()
                        )));
                    }
                }
            }
        }
        let agent_ok = |bit: u8| (self.agent_allow | self.agent_allow_before) & bit != 0;
        for f in &mut self.flows {
            let bit = 1u8 << f.port_index;
            let svc: Vec<&memory::SvcFlow> = self.w.services.flows_to(f.dst).collect();
            if f.udp {
                let got: Vec<&Vec<u8>> = svc.iter().flat_map(|s| s.datagrams.iter()).collect();
                // Once, in order: a subsequence of what was sent.
                let mut next = 0;
                for d in &got {
                    match f.up[next..].iter().position(|u| &u.payload == *d) {
                        Some(k) => next += k + 1,
                        None => {
                            return Err(fail(format!(
                                "flow to {}: a datagram arrived twice, out of order, or unsent",
                                f.dst
                            )))
                        }
                    }
                }
                let mut next = 0;
                for d in &f.down_rcvd {
                    match f.down[next..].iter().position(|u| &u.payload == d) {
                        Some(k) => next += k + 1,
                        None => {
                            return Err(fail(format!(
                                "flow to {}: a datagram to the app arrived twice, out of order, or unsent",
                                f.dst
                            )))
                        }
                    }
                }
                if got.len() > f.svc_seen {
                    // New datagrams at the service: the connector's policy allows them now and
                    // the agent's did (now or just before), and the agent is not revoked.
                    if self.connector_allow & bit == 0 || !agent_ok(bit) || self.revoked_cutoff {
                        return Err(fail(format!(
                            "flow to {}: a datagram of a denied or revoked flow reached the service",
                            f.dst
                        )));
                    }
                }
                f.svc_seen = got.len();
            } else {
                if svc.len() > 1 {
                    return Err(fail(format!(
                        "flow to {}: dialed {} times",
                        f.dst,
                        svc.len()
                    )));
                }
                let rx: &[u8] = svc.first().map_or(&[], |s| &s.rx);
                if !f.app_sent.starts_with(rx) {
                    return Err(fail(format!(
                        "flow to {}: the service got {} bytes that are not the app's stream",
                        f.dst,
                        rx.len()
                    )));
                }
                if !f.svc_sent.starts_with(&f.app_rcvd) {
                    return Err(fail(format!(
                        "flow to {}: the app got {} bytes that are not the service's stream",
                        f.dst,
                        f.app_rcvd.len()
                    )));
                }
                if rx.len() > f.svc_seen
                    && (self.connector_allow & bit == 0 || !agent_ok(bit) || self.revoked_cutoff)
                {
                    return Err(fail(format!(
                        "flow to {}: bytes of a denied or revoked flow reached the service",
                        f.dst
                    )));
                }
                f.svc_seen = rx.len();
                // No allowed flow is reset, unless it may have lost its tunnel.
                let svc_closed = svc.first().is_some_and(|s| s.closed && !s.app_eof);
                if f.clean && !f.may_lose && (f.reset || svc_closed) {
                    return Err(fail(format!(
                        "flow to {}: reset (app got a RST: {}, service side closed: {svc_closed})",
                        f.dst, f.reset
                    )));
                }
            }
            // A new flow at the service (a dial, a UDP flow opened): only for what both
            // enforcers allow.
            if svc.len() > f.svc_flows
                && (self.connector_allow & bit == 0 || !agent_ok(bit) || self.revoked_cutoff)
            {
                return Err(fail(format!(
                    "flow to {}: the service saw a denied or revoked flow open",
                    f.dst
                )));
            }
            f.svc_flows = svc.len();
            if f.clean && f.prohibited {
                return Err(fail(format!(
                    "flow to {}: allowed, but the app was told it is prohibited",
                    f.dst
                )));
            }
        }
        Ok(())
    }

    /// After the last transition: the network heals, and every allowed flow must deliver
    /// everything it owes, both ways.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.w.direct_cut = false;
        for _ in 0..120 {
            self.run(Duration::from_millis(500))?;
            if self.owed().is_none() {
                break;
            }
        }
        if let Some(why) = self.owed() {
            return Err(fail(format!("after 60 s with a path: {why}")));
        }
        Ok(())
    }

    /// What an allowed flow still owes, if anything.
    fn owed(&self) -> Option<String> {
        for f in &self.flows {
            let svc: Vec<&memory::SvcFlow> = self.w.services.flows_to(f.dst).collect();
            if !f.clean {
                // A flow denied from the start is answered at once (TCP RST or ICMP
                // administratively prohibited), never left to time out.
                // (Not one the app gave up on itself first.)
                if !f.udp
                    && f.denied_at_open
                    && f.state == FlowState::Open
                    && f.svc_seen == 0
                    && svc.is_empty()
                    && !f.reset
                    && !self.revoked
                {
                    let bit = 1u8 << f.port_index;
                    if self.agent_allow & bit == 0 && self.connector_allow & bit == 0 {
                        return Some(format!("denied flow to {} never got a reset", f.dst));
                    }
                }
                continue;
            }
            if f.may_lose {
                continue;
            }
            if f.udp {
                let got: Vec<&Vec<u8>> = svc.iter().flat_map(|s| s.datagrams.iter()).collect();
                for d in f.up.iter().filter(|d| d.must) {
                    if !got.contains(&&d.payload) {
                        return Some(format!(
                            "flow to {}: a datagram sent while calm never reached the service",
                            f.dst
                        ));
                    }
                }
                for d in f.down.iter().filter(|d| d.must) {
                    if !f.down_rcvd.contains(&d.payload) {
                        return Some(format!(
                            "flow to {}: a datagram sent while calm never reached the app",
                            f.dst
                        ));
                    }
                }
            } else {
                let rx = svc.first().map_or(0, |s| s.rx.len());
                if !f.app_unsent.is_empty() || rx != f.app_sent.len() {
                    return Some(format!(
                        "flow to {}: the service got {rx} of {} bytes",
                        f.dst,
                        f.app_sent.len() + f.app_unsent.len()
                    ));
                }
                if f.app_rcvd.len() != f.svc_sent.len() {
                    return Some(format!(
                        "flow to {}: the app got {} of {} bytes",
                        f.dst,
                        f.app_rcvd.len(),
                        f.svc_sent.len()
                    ));
                }
            }
        }
        None
    }
}

/// The cores' logs with TUNNEL_MODEL_TRACE=FILTER (say `debug`), for a failing case replayed.
fn trace() {
    if std::env::var_os("TUNNEL_MODEL_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env(
                "TUNNEL_MODEL_TRACE",
            ))
            // Instant-based, so it reads the simulated clock.
            .with_timer(tracing_subscriber::fmt::time::Uptime::default())
            .with_ansi(false)
            .with_test_writer()
            .try_init();
    }
}

fn run_case(case: &Case, pki: &Arc<Pki>) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(case, pki.clone());
    let t0 = sim.now();
    // The connector registers first (a case's flows start on a working network).
    sim.run(Duration::from_millis(200))?;
    let mut result = Ok(());
    for (i, t) in case.steps.iter().enumerate() {
        sim.note(format!("step {i}: {t:?}"));
        result = sim.apply(t);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = sim.settle();
    }
    COVERAGE.cases.fetch_add(1, Relaxed);
    COVERAGE
        .direct_cases
        .fetch_add(sim.saw_direct as u64, Relaxed);
    COVERAGE
        .sim_secs
        .fetch_add(sim.now().duration_since(t0).as_secs(), Relaxed);
    let stats = sim.w.engine.stats();
    COVERAGE.switches.fetch_add(
        stats.switches(PathKind::Direct) + stats.switches(PathKind::Relay),
        Relaxed,
    );
    // What led up to a failure, for the one reading it.
    result.map_err(|e| fail(format!("{e}\n{}", sim.log.join("\n"))))
}

#[test]
fn the_tunnel_follows_its_reference_model() {
    let cases = std::env::var("TUNNEL_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut runner = TestRunner::new(Config {
        cases,
        source_file: Some(file!()),
        // tunnel_model.proptest-regressions, beside this file.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        // Shrinking is bounded by tries, not time: proptest's timer reads the simulated clock.
        // TUNNEL_MODEL_SHRINK=0 reports a failing case as it was drawn.
        max_shrink_iters: std::env::var("TUNNEL_MODEL_SHRINK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2000),
        ..Config::default()
    });
    trace();
    // Certificates are made once: issuing costs more than a case.
    let pki = Arc::new(Pki::new(Duration::from_secs(30 * 86_400)));
    let started = std::time::SystemTime::now();
    let result = runner.run(&case(), |c| run_case(&c, &pki));
    let c = &COVERAGE;
    eprintln!(
        "tunnel model: {} cases in {:.1} s ({} simulated s); {} used a direct path, {} path \
         switches; {} TCP bytes, {} datagrams ({} owed delivery); {} flows allowed to be lost \
         to a gap with no path; {} revocations",
        c.cases.load(Relaxed),
        started.elapsed().unwrap_or_default().as_secs_f64(),
        c.sim_secs.load(Relaxed),
        c.direct_cases.load(Relaxed),
        c.switches.load(Relaxed),
        c.tcp_bytes.load(Relaxed),
        c.datagrams.load(Relaxed),
        c.must_datagrams.load(Relaxed),
        c.resets_allowed.load(Relaxed),
        c.revoked.load(Relaxed),
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Cases that once failed, written out (the regressions file keeps only proptest's seeds,
/// which replay only while the strategies stay as they are).
#[test]
fn recorded_cases_follow_the_model() {
    use Transition::*;
    trace();
    let pki = Arc::new(Pki::new(Duration::from_secs(30 * 86_400)));
    let cases = [
        // A relay restart, then an agent rebinding that breaks the direct path (the
        // connector's NAT filters the new mapping): no path at all until both control links
        // notice the restart (6 s), so the tunnel may go, and its flows with it.
        Case {
            agent_nat: NatKind::FullCone,
            connector_nat: NatKind::PortRestricted,
            allow: 15,
            seed: 0,
            steps: vec![
                Open { port: 0 },
                RestartRelay { down_ms: 0 },
                Open { port: 0 },
                RebindAgent,
                Idle { ms: 20_000 },
            ],
        },
        // The direct path cut under a flow: the agent falls back to the relay.
        Case {
            agent_nat: NatKind::None,
            connector_nat: NatKind::None,
            allow: 15,
            seed: 0,
            steps: vec![
                Open { port: 0 },
                CutDirect,
                AppSends { flow: 0, len: 1 },
                Idle { ms: 7201 },
            ],
        },
        // The same with an idle flow: the cut is found by the keepalive.
        Case {
            agent_nat: NatKind::None,
            connector_nat: NatKind::None,
            allow: 15,
            seed: 0,
            steps: vec![Open { port: 0 }, CutDirect, Idle { ms: 14_400 }],
        },
        // The connector's NAT rebinds under an idle flow.
        Case {
            agent_nat: NatKind::None,
            connector_nat: NatKind::FullCone,
            allow: 15,
            seed: 0,
            steps: vec![
                Idle { ms: 10 },
                Open { port: 0 },
                RebindConnector,
                Idle { ms: 20_000 },
            ],
        },
        // A revocation through a relay that just restarted: the connector learns of it once
        // its control link finds the new relay.
        Case {
            agent_nat: NatKind::None,
            connector_nat: NatKind::None,
            allow: 15,
            seed: 0,
            steps: vec![
                Open { port: 0 },
                RestartRelay { down_ms: 0 },
                Revoke {
                    at_connector: false,
                },
            ],
        },
        // The agent's NAT rebinds again and again under new flows.
        Case {
            agent_nat: NatKind::FullCone,
            connector_nat: NatKind::None,
            allow: 15,
            seed: 0,
            steps: vec![
                Close { flow: 0 },
                Policy {
                    allow: 5,
                    at: Enforcers::Both,
                },
                RebindAgent,
                Open { port: 1 },
                Open { port: 1 },
                RebindAgent,
                RebindAgent,
                Open { port: 0 },
                Open { port: 0 },
                Open { port: 0 },
                AppSends { flow: 0, len: 1 },
                RebindAgent,
                RestoreDirect,
                RebindAgent,
                ServiceSends { flow: 12, len: 1 },
            ],
        },
        // A datagram soon after a cut the idle tunnel has not noticed yet (its keepalive
        // will): not owed.
        Case {
            agent_nat: NatKind::None,
            connector_nat: NatKind::None,
            allow: 15,
            seed: 0,
            steps: vec![
                Open { port: 0 },
                CutDirect,
                Idle { ms: 11_700 },
                Open { port: 2 },
            ],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        if let Err(e) = run_case(c, &pki) {
            panic!("recorded case {i}: {e}");
        }
    }
}

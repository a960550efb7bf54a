//! What the agent, connector and relay processes share: credentials, QUIC settings, the UDP
//! socket, signals, and the control link to the relay with its reconnect and liveness logic.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_dataplane::control::{ControlClient, ControlEvent};
use sluice_dataplane::identity::{IdentityError, PeerId, Role};
use sluice_dataplane::nat::candidate::{gather, Candidate};
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, Credentials};
use sluice_dataplane::tunnel::Tunnel;
use sluice_dataplane::wire::{Punch, RELAY_FORWARD_OVERHEAD};
use tokio::net::UdpSocket;

use crate::config::{ConfigError, IdentityFiles, RelayTarget};
use crate::udp_batch::UdpSender;
use crate::IdentityArgs;

/// Control keepalive; the relay is declared gone after `CONTROL_SILENCE` without a packet.
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);
const CONTROL_SILENCE: Duration = Duration::from_secs(6);
/// End-to-end keepalive (DESIGN: 15 s).
/// Packets (or messages) taken from one source in one round of an event loop before the rest is
/// flushed. Bounded so that no source starves another: under CPU pressure, draining the UDP
/// socket without a bound let the TUN queue overflow and drop the kernel's ACKs and SYNs.
pub const ROUND_BATCH: usize = 64;
pub const TUNNEL_KEEPALIVE: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Socket buffers: userspace tunnels lose throughput to receive-buffer drops otherwise.
const SOCKET_BUFFER: usize = 4 << 20;

pub fn override_identity(
    cert: &mut PathBuf,
    key: &mut PathBuf,
    ca: &mut PathBuf,
    args: &IdentityArgs,
) {
    if let Some(c) = &args.cert {
        *cert = c.clone();
    }
    if let Some(k) = &args.key {
        *key = k.clone();
    }
    if let Some(c) = &args.ca {
        *ca = c.clone();
    }
}

/// Loads the node's credentials and checks the certificate is for the role being run. Every
/// error is a configuration error (exit status 2) that names the key and the file.
pub fn credentials(files: &IdentityFiles, role: Role, origin: &str) -> Result<Credentials> {
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    // Which setting a file came from: `cert: ...` in the file, or --cert.
    let key_of = |p: &str| {
        if Path::new(p) == files.cert {
            "cert"
        } else if Path::new(p) == files.key {
            "key"
        } else {
            "ca"
        }
    };
    let creds = Credentials::load(&path(&files.cert), &path(&files.key), &path(&files.ca))
        .map_err(|e| match e {
            IdentityError::File { path, reason } => {
                ConfigError(format!("{origin}: `{}` {path}: {reason}", key_of(&path)))
            }
            other => ConfigError(format!(
                "{origin}: `cert` {}: {other}",
                files.cert.display()
            )),
        })?;
    if creds.identity.role != role {
        return Err(ConfigError(format!(
            "{origin}: `cert` {}: this is a {} certificate, but this process runs the {role} role (issue one with `sluice ca issue --role {role}`)",
            files.cert.display(),
            creds.identity.role
        )).into());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if creds.identity.not_after < now {
        return Err(ConfigError(format!(
            "{origin}: `cert` {}: certificate expired {} ago; issue a new one",
            files.cert.display(),
            crate::node::human_duration(Duration::from_secs(
                (now - creds.identity.not_after) as u64
            ))
        ))
        .into());
    }
    if !creds.signed_by_own_ca() {
        tracing::warn!(
            "{origin}: `cert` {} is not signed by the CA in `ca` {}: peers will refuse this node",
            files.cert.display(),
            files.ca.display()
        );
    }
    if let Ok(m) = std::fs::metadata(&files.key) {
        use std::os::unix::fs::PermissionsExt;
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{origin}: `key` {} can be read by other users (mode {mode:04o}); `chmod 600 {}`",
                files.key.display(),
                files.key.display()
            );
        }
    }
    Ok(creds)
}

/// A duration for people: "45s", "12min", "3h", "2 days".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}min", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A UDP socket with large buffers (forced past rmem_max when we may).
pub fn bind_udp(addr: SocketAddr) -> Result<tokio::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_nonblocking(true)?;
    for (opt, fallback) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let v = SOCKET_BUFFER as libc::c_int;
        // SAFETY: setsockopt with a valid fd and a c_int value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let _ = if fallback == libc::SO_RCVBUF {
                s.set_recv_buffer_size(SOCKET_BUFFER)
            } else {
                s.set_send_buffer_size(SOCKET_BUFFER)
            };
        }
    }
    s.bind(&addr.into())?;
    Ok(tokio::net::UdpSocket::from_std(s.into())?)
}

/// An event loop's one timer, re-armed each round to the loop's next deadline.
///
/// It is moved both ways, so it never fires for a deadline that went away (at 20 ms between
/// pings, a held ACK's deadline that the next ping cleared woke each process once per ping for
/// nothing). Moving a tokio timer earlier wakes the runtime's driver (an eventfd write and one
/// more epoll round): that is unavoidable with tokio's timer. Moving it later is cheap, but
/// `Sleep::reset` only extends the deadline lazily (the driver still wakes at the old time, then
/// re-files the timer), so a timer that must go later by more than [`LoopTimer::LATER`] is
/// replaced instead.
pub struct LoopTimer(std::pin::Pin<Box<tokio::time::Sleep>>);

impl LoopTimer {
    /// Smaller moves later are not worth a new timer: tokio's wheel counts whole milliseconds,
    /// and firing that much early is harmless since every loop checks each deadline against the
    /// clock.
    const LATER: Duration = Duration::from_millis(1);

    /// A timer that fires at once (the loop's first round then computes the real deadline).
    pub fn new() -> Self {
        LoopTimer(Box::pin(tokio::time::sleep(Duration::ZERO)))
    }

    /// Arms the timer for `after` from now.
    pub fn rearm(&mut self, after: Duration) {
        self.rearm_at(tokio::time::Instant::now() + after);
    }

    fn rearm_at(&mut self, deadline: tokio::time::Instant) {
        let armed = self.0.deadline();
        if self.0.is_elapsed() || deadline < armed {
            self.0.as_mut().reset(deadline);
        } else if deadline > armed + Self::LATER {
            self.0 = Box::pin(tokio::time::sleep_until(deadline));
        }
    }

    /// Resolves when the armed deadline passes.
    pub async fn fired(&mut self) {
        self.0.as_mut().await
    }
}

impl Default for LoopTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The control connection to the relay, kept up: reconnects with backoff when it closes or the
/// relay falls silent, and sends keepalives so NAT mappings and liveness stay fresh. A relay
/// given by name is resolved again for every new connection (off the event loop, in a thread),
/// and each of its addresses is tried in turn.
pub struct ControlLink {
    config: quiche::Config,
    local: SocketAddr,
    target: RelayTarget,
    /// The address in use (or last used); unspecified until a name resolved.
    relay: SocketAddr,
    /// Addresses of a relay name still to try before resolving it again.
    untried: Vec<SocketAddr>,
    resolving: Option<std::sync::mpsc::Receiver<std::io::Result<Vec<SocketAddr>>>>,
    client: Option<ControlClient>,
    backoff: Duration,
    retry_at: Option<Instant>,
    started: Instant,
    last_rx: Instant,
    next_keepalive: Instant,
    events: Vec<ControlEvent>,
    /// When the current connection's handshake finished.
    connected_at: Option<Instant>,
    /// Why the last connection ended or was refused, for `sluice status`.
    last_error: Option<String>,
    /// Connections in a row that ended before they were up for [`STABLE_AFTER`].
    failures: u32,
    /// Random per process: tells the relay this node's reconnections from another node with
    /// the same certificate.
    instance: u64,
}

/// How long a node the relay turned away as a duplicate waits before trying again.
const DUPLICATE_BACKOFF: Duration = Duration::from_secs(30);

/// How often a pending name resolution is looked at.
const RESOLVE_POLL: Duration = Duration::from_millis(20);
/// A connection that lasts this long was a real one: the backoff starts over after it. (A
/// relay that refuses our certificate does so right after the client's handshake finishes, so
/// "connected" alone proves nothing.)
const STABLE_AFTER: Duration = Duration::from_secs(10);

impl ControlLink {
    pub fn new(config: quiche::Config, local: SocketAddr, target: RelayTarget) -> Self {
        let now = Instant::now();
        let unspecified = if local.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        };
        let mut link = ControlLink {
            config,
            local,
            relay: target.literal.unwrap_or(unspecified),
            target,
            untried: Vec::new(),
            resolving: None,
            client: None,
            backoff: BACKOFF_MIN,
            retry_at: Some(now),
            started: now,
            last_rx: now,
            next_keepalive: now + CONTROL_KEEPALIVE,
            events: Vec::new(),
            connected_at: None,
            last_error: None,
            failures: 0,
            instance: rand::random::<u64>() | 1,
        };
        link.on_timeout(now);
        link
    }

    /// The address to dial next, or None while a relay name is being resolved (or failed to).
    fn next_relay_addr(&mut self, now: Instant) -> Option<SocketAddr> {
        if let Some(a) = self.target.literal {
            return Some(a);
        }
        if let Some(a) = self.untried.pop() {
            return Some(a);
        }
        let rx = self.resolving.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (host, port) = (self.target.host.clone(), self.target.port);
            std::thread::spawn(move || {
                use std::net::ToSocketAddrs;
                let _ = tx.send(
                    (host.as_str(), port)
                        .to_socket_addrs()
                        .map(Iterator::collect),
                );
            });
            rx
        });
        let result = match rx.try_recv() {
            Ok(r) => r,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                self.retry_at = Some(now + RESOLVE_POLL);
                return None;
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(std::io::Error::other(
                "the resolver thread ended without an answer",
            )),
        };
        self.resolving = None;
        // Our socket speaks one address family.
        match result.map(|v: Vec<SocketAddr>| {
            v.into_iter()
                .filter(|a| a.is_ipv4() == self.local.is_ipv4())
                .collect::<Vec<_>>()
        }) {
            Ok(addrs) if !addrs.is_empty() => {
                tracing::debug!(
                    "relay {} resolved to {}",
                    self.target,
                    addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                // Tried in the resolver's order.
                self.untried = addrs.into_iter().rev().collect();
                self.untried.pop()
            }
            Ok(_) => {
                tracing::warn!(
                    "relay {}: the name has no {} address",
                    self.target,
                    if self.local.is_ipv4() { "IPv4" } else { "IPv6" }
                );
                self.schedule_retry(now);
                None
            }
            Err(e) => {
                tracing::warn!("relay {}: cannot resolve the name: {e}", self.target);
                self.schedule_retry(now);
                None
            }
        }
    }

    /// The client, when its handshake is done.
    pub fn connected(&mut self) -> Option<&mut ControlClient> {
        self.client.as_mut().filter(|c| c.is_connected())
    }

    pub fn recv(&mut self, pkt: &mut [u8], from: SocketAddr, now: Instant) {
        if from != self.relay {
            return;
        }
        if let Some(c) = &mut self.client {
            c.recv(pkt, from);
            self.last_rx = now;
        }
        self.collect();
    }

    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }

    pub fn send(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let r = self.client.as_mut()?.send(out);
        if r.is_none() {
            self.collect();
        }
        r
    }

    pub fn timeout(&self, now: Instant) -> Duration {
        let mut t = self.next_keepalive.saturating_duration_since(now);
        if let Some(c) = &self.client {
            if let Some(d) = c.timeout() {
                t = t.min(d);
            }
            if let Some(e) = c.relay_expires() {
                t = t.min(e.saturating_duration_since(now));
            }
        }
        if let Some(r) = self.retry_at {
            t = t.min(r.saturating_duration_since(now));
        }
        t
    }

    pub fn on_timeout(&mut self, now: Instant) {
        if let Some(c) = &mut self.client {
            if c.timeout() == Some(Duration::ZERO) {
                c.on_timeout();
            }
        }
        self.collect();
        if let Some(c) = self
            .client
            .as_mut()
            .filter(|c| c.relay_expires().is_some_and(|t| now >= t) && !c.is_closed())
        {
            tracing::warn!("relay {}: its certificate expired; closing", self.target);
            let _ = c.conn_mut().close(
                true,
                sluice_dataplane::tunnel::CLOSE_CERT_EXPIRED,
                b"certificate expired",
            );
        }
        if let Some(c) = &mut self.client {
            let silent = now.saturating_duration_since(self.last_rx);
            let handshaking =
                !c.is_connected() && now.saturating_duration_since(self.started) > CONTROL_SILENCE;
            if (c.is_connected() && silent > CONTROL_SILENCE) || handshaking {
                tracing::warn!(
                    "relay {} silent for {:.1}s; reconnecting",
                    self.relay,
                    silent.as_secs_f32()
                );
                self.client = None;
                self.events
                    .push(ControlEvent::Closed("relay silent".into()));
                self.ended("relay silent".into(), now);
            }
        }
        if now >= self.next_keepalive {
            self.next_keepalive = now + CONTROL_KEEPALIVE;
            if let Some(c) = self.client.as_mut().filter(|c| c.is_connected()) {
                c.keepalive();
            }
        }
        if self.client.is_none() && self.retry_at.is_some_and(|r| now >= r) {
            self.retry_at = None;
            let Some(relay) = self.next_relay_addr(now) else {
                return;
            };
            self.relay = relay;
            match ControlClient::connect(&mut self.config, self.local, self.relay, self.instance) {
                Ok(c) => {
                    tracing::debug!("connecting to relay {} at {}", self.target, self.relay);
                    self.client = Some(c);
                    self.started = now;
                    self.last_rx = now;
                }
                Err(e) => {
                    tracing::warn!("cannot connect to relay {}: {e}", self.relay);
                    self.schedule_retry(now);
                }
            }
        }
    }

    /// Closes the control connection because this node stops: the relay forgets it at once.
    pub fn goodbye(&mut self) {
        if let Some(c) = &mut self.client {
            c.close("stopping");
        }
        self.retry_at = None;
    }

    /// The relay's address: packets from it are the control connection's.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    /// Every address the relay is known at now: the one in use and those still to try. The
    /// agent keeps these out of its TUN routes.
    pub fn relay_addrs(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.untried.iter().map(|a| a.ip()).collect();
        if !self.relay.ip().is_unspecified() {
            v.push(self.relay.ip());
        }
        v.sort();
        v.dedup();
        v
    }

    /// The connection ended (or never came up) because of `why`: retry after the backoff, which
    /// starts over only after a connection that lasted; a relay name is resolved again.
    fn ended(&mut self, why: String, now: Instant) {
        let lasted = self
            .connected_at
            .take()
            .is_some_and(|t| now.saturating_duration_since(t) >= STABLE_AFTER);
        if lasted {
            self.backoff = BACKOFF_MIN;
            self.failures = 0;
            self.untried.clear();
        } else {
            self.failures = self.failures.saturating_add(1);
        }
        self.last_error = Some(why);
        self.schedule_retry(now);
    }

    fn schedule_retry(&mut self, now: Instant) {
        let jitter = Duration::from_millis(rand::random::<u64>() % 250);
        self.retry_at = Some(now + self.backoff + jitter);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn collect(&mut self) {
        let Some(c) = &mut self.client else { return };
        while let Some(ev) = c.poll_event() {
            match &ev {
                ControlEvent::Connected { relay } => {
                    // Said at debug until the relay speaks (its first message is our observed
                    // address): a relay that refuses us finishes the handshake first.
                    tracing::debug!("handshake with relay {relay:?} at {} done", self.relay);
                    self.connected_at = Some(Instant::now());
                }
                ControlEvent::ObservedAddr(a) => {
                    if self.last_error.take().is_some() || self.failures > 0 {
                        tracing::info!("connected to relay at {} again", self.relay);
                    } else {
                        tracing::info!("connected to relay at {}", self.relay);
                    }
                    tracing::info!("relay sees us at {a}");
                }
                ControlEvent::Closed(why) => {
                    // The first refusal in a row is a warning; repeats are counted, said at the
                    // 2nd, 4th, 8th... time, so a refused node does not flood its log.
                    let n = self.failures + 1;
                    if self
                        .connected_at
                        .is_some_and(|t| t.elapsed() >= STABLE_AFTER)
                    {
                        tracing::warn!("relay connection closed: {why}");
                    } else if n == 1 || n.is_power_of_two() {
                        tracing::warn!(
                            "relay {} at {}: {why} (attempt {n}; retrying with backoff, up to {}s apart)",
                            self.target,
                            self.relay,
                            BACKOFF_MAX.as_secs()
                        );
                    } else {
                        tracing::debug!("relay connection closed: {why} (attempt {n})");
                    }
                }
                ControlEvent::LookupReply { .. } => {}
            }
            self.events.push(ev);
        }
        if c.is_closed() {
            let why = tls::describe_close(c.conn()).unwrap_or_else(|| "closed".into());
            let duplicate = c.closed_as_duplicate();
            self.client = None;
            self.ended(why, Instant::now());
            if duplicate {
                // Another node with our certificate holds the relay: stay off (it wins while it
                // is connected), and try again now and then in case it went away.
                let now = Instant::now();
                if self.failures <= 1 {
                    tracing::error!(
                        "relay {}: another node with this certificate is connected, so this one stays off (two connectors need two names: see docs); retrying every {}s",
                        self.target,
                        DUPLICATE_BACKOFF.as_secs()
                    );
                }
                self.retry_at = Some(now + DUPLICATE_BACKOFF);
                self.last_error = Some(
                    "duplicate identity: another node with this certificate holds the relay".into(),
                );
            }
        }
    }

    /// The relay, whether the control connection is up, and where the relay sees us.
    pub fn status(&self) -> crate::status::RelayStatus {
        let up = self.client.as_ref().filter(|c| c.is_connected());
        crate::status::RelayStatus {
            addr: match self.target.literal {
                Some(a) => a.to_string(),
                None if self.relay.ip().is_unspecified() => self.target.to_string(),
                None => format!("{} ({})", self.target, self.relay),
            },
            connected: up.is_some(),
            observed_addr: up.and_then(|c| c.observed_addr()).map(|a| a.to_string()),
            error: if up.is_some() {
                None
            } else {
                self.last_error.clone()
            },
        }
    }
}

/// Sends what the tunnels and the control link have queued, in GSO batches: each tunnel's
/// direct packets and punches straight from the socket (they need no relay), its relayed packets in relay forward
/// DATAGRAMs (only while the control connection has room, so the rest waits inside quiche
/// instead of being dropped), then the control link's UDP packets.
pub async fn flush(
    link: &mut ControlLink,
    tunnels: &mut [&mut Tunnel],
    socket: &UdpSocket,
    out: &mut [u8],
    tx: &mut UdpSender,
) {
    loop {
        for t in tunnels.iter_mut() {
            while let Some((n, to)) = t.send_direct(out) {
                tx.send(socket, &out[..n], to).await;
            }
            while let Some((to, punch)) = t.poll_punch() {
                tx.send(socket, &punch, to).await;
            }
            while let Some(client) = link.connected().filter(|c| c.can_forward()) {
                let Some(n) = t.send_relayed(&mut out[RELAY_FORWARD_OVERHEAD..]) else {
                    break;
                };
                if let Err(e) =
                    client.send_forward(&t.peer(), &mut out[..RELAY_FORWARD_OVERHEAD + n])
                {
                    tracing::debug!("relay forward to {} failed: {e}", t.peer().short());
                }
            }
        }
        let mut sent = false;
        while let Some((n, to)) = link.send(out) {
            sent = true;
            tx.send(socket, &out[..n], to).await;
        }
        if !sent {
            break;
        }
    }
    tx.flush(socket).await;
}

/// What a UDP packet on a node's socket is.
pub enum Incoming {
    /// From the relay: the control connection's.
    Control,
    /// A connectivity check of a direct path.
    Punch(Punch),
    /// QUIC straight from a peer, for the tunnel that issued this destination connection id
    /// (ours are all `MAX_CONN_ID_LEN` long; held inline, no allocation per packet).
    Direct { dcid: [u8; quiche::MAX_CONN_ID_LEN] },
    /// Nothing we take (logged by the caller at debug level).
    Junk(&'static str),
}

/// Sorts a packet from `from` on the node's socket.
pub fn classify(pkt: &mut [u8], from: SocketAddr, relay: SocketAddr) -> Incoming {
    if from == relay {
        return Incoming::Control;
    }
    if Punch::is_punch(pkt) {
        return match Punch::parse(pkt) {
            Ok(p) => Incoming::Punch(p),
            Err(_) => Incoming::Junk("malformed punch"),
        };
    }
    // Our connection ids are all MAX_CONN_ID_LEN long: a short header names one at once.
    match quiche::Header::from_slice(pkt, quiche::MAX_CONN_ID_LEN) {
        Ok(h) if h.ty == quiche::Type::Short => match h.dcid.as_ref().try_into() {
            Ok(dcid) => Incoming::Direct { dcid },
            Err(_) => Incoming::Junk("connection id of another length"),
        },
        Ok(_) => Incoming::Junk("long-header QUIC packet off the relay"),
        Err(_) => Incoming::Junk("not QUIC"),
    }
}

/// This node's direct-path candidates: every usable address of its interfaces (but
/// `skip_iface`, the agent's own TUN device) in the socket's address family, on the socket's
/// port, and the address the relay sees.
pub fn local_candidates(
    socket: SocketAddr,
    observed: Option<SocketAddr>,
    skip_iface: Option<&str>,
) -> Vec<Candidate> {
    let mut ips = Vec::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                if Some(a.interface_name.as_str()) == skip_iface
                    || !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
                {
                    continue;
                }
                let Some(sa) = a.address else { continue };
                let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                // A socket bound to an IPv4 address sends IPv4 only, and the other way round.
                if ip.is_ipv4() == socket.is_ipv4() && !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Err(e) => tracing::warn!("cannot list interface addresses: {e}"),
    }
    if !socket.ip().is_unspecified() {
        ips.retain(|ip| *ip == socket.ip());
    }
    gather(&ips, socket.port(), observed)
}

/// A node's side of direct paths: its peer id, its socket, and its current candidates.
pub struct DirectSetup {
    pub me: PeerId,
    /// The socket's address, as quiche names every direct path of this node.
    pub local: SocketAddr,
    observed: Option<SocketAddr>,
    skip_iface: Option<String>,
    pub candidates: Vec<Candidate>,
    refused: u64,
}

impl DirectSetup {
    pub fn new(me: PeerId, local: SocketAddr, skip_iface: Option<String>) -> Self {
        let candidates = local_candidates(local, None, skip_iface.as_deref());
        DirectSetup {
            me,
            local,
            observed: None,
            skip_iface,
            candidates,
            refused: 0,
        }
    }

    /// Gathers the candidates again (a network change shows here): the new list if it changed.
    pub fn refresh(&mut self) -> Option<Vec<Candidate>> {
        let now = local_candidates(self.local, self.observed, self.skip_iface.as_deref());
        if now == self.candidates {
            return None;
        }
        tracing::info!(
            "direct-path candidates now {}",
            now.iter()
                .map(|c| c.addr.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.candidates = now.clone();
        Some(now)
    }

    /// The relay sees us at `addr` now.
    pub fn set_observed(&mut self, addr: SocketAddr) -> Option<Vec<Candidate>> {
        self.observed = Some(addr);
        self.refresh()
    }

    /// A packet off a direct path was refused: said at the 1st, 2nd, 4th, 8th... time, so a
    /// flood cannot fill the log.
    pub fn refuse(&mut self, from: SocketAddr, why: &dyn std::fmt::Display) {
        self.refused += 1;
        if self.refused.is_power_of_two() {
            tracing::info!(
                "refused a direct-path packet from {from}: {why} ({} refused so far)",
                self.refused
            );
        } else {
            tracing::debug!("refused a direct-path packet from {from}: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, but only bounds that hold on any machine: a tokio timer never fires before its
    // deadline, and the upper bounds are seconds.

    #[tokio::test]
    async fn a_timer_moved_later_does_not_fire_at_the_old_deadline() {
        let mut t = LoopTimer::new();
        t.rearm(Duration::from_millis(10));
        let start = tokio::time::Instant::now();
        t.rearm(Duration::from_millis(60));
        t.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn a_timer_moved_earlier_fires_at_the_new_deadline() {
        let mut t = LoopTimer::new();
        t.rearm(Duration::from_secs(3600));
        t.rearm(Duration::from_millis(10));
        tokio::time::timeout(Duration::from_secs(5), t.fired())
            .await
            .expect("the earlier deadline fired");
    }

    #[tokio::test]
    async fn a_fired_timer_is_armed_again() {
        let mut t = LoopTimer::new();
        t.fired().await;
        let start = tokio::time::Instant::now();
        t.rearm(Duration::from_millis(30));
        t.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_move_later_within_a_millisecond_keeps_the_armed_deadline() {
        let mut t = LoopTimer::new();
        let armed = tokio::time::Instant::now() + Duration::from_secs(10);
        t.rearm_at(armed);
        t.rearm_at(armed + Duration::from_micros(900));
        assert_eq!(t.0.deadline(), armed);
        t.rearm_at(armed + Duration::from_millis(2));
        assert_eq!(t.0.deadline(), armed + Duration::from_millis(2));
    }
}

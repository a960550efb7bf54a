//! What the agent, connector and relay processes share: credentials, QUIC settings, the UDP
//! socket, signals, and the control link to the relay with its reconnect and liveness logic.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sluice_dataplane::control::{ControlClient, ControlEvent};
use sluice_dataplane::identity::{PeerId, Role};
use sluice_dataplane::nat::candidate::{gather, Candidate};
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::Credentials;
use sluice_dataplane::tunnel::Tunnel;
use sluice_dataplane::wire::{Punch, RELAY_FORWARD_OVERHEAD};
use tokio::net::UdpSocket;

use crate::config::IdentityFiles;
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

/// Loads the node's credentials and checks the certificate is for the role being run.
pub fn credentials(files: &IdentityFiles, role: Role) -> Result<Credentials> {
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    let creds = Credentials::load(&path(&files.cert), &path(&files.key), &path(&files.ca))?;
    if creds.identity.role != role {
        bail!(
            "{}: this is a {} certificate, but this process runs the {role} role (issue one with `sluice ca issue --role {role}`)",
            files.cert.display(),
            creds.identity.role
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if creds.identity.not_after < now {
        bail!(
            "{}: certificate expired; issue a new one",
            files.cert.display()
        );
    }
    Ok(creds)
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
/// relay falls silent, and sends keepalives so NAT mappings and liveness stay fresh.
pub struct ControlLink {
    config: quiche::Config,
    local: SocketAddr,
    relay: SocketAddr,
    client: Option<ControlClient>,
    backoff: Duration,
    retry_at: Option<Instant>,
    started: Instant,
    last_rx: Instant,
    next_keepalive: Instant,
    events: Vec<ControlEvent>,
}

impl ControlLink {
    pub fn new(config: quiche::Config, local: SocketAddr, relay: SocketAddr) -> Self {
        let now = Instant::now();
        let mut link = ControlLink {
            config,
            local,
            relay,
            client: None,
            backoff: BACKOFF_MIN,
            retry_at: Some(now),
            started: now,
            last_rx: now,
            next_keepalive: now + CONTROL_KEEPALIVE,
            events: Vec::new(),
        };
        link.on_timeout(now);
        link
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
                self.schedule_retry(now);
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
            match ControlClient::connect(&mut self.config, self.local, self.relay) {
                Ok(c) => {
                    tracing::debug!("connecting to relay {}", self.relay);
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

    /// The relay's address: packets from it are the control connection's.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
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
                    tracing::info!("connected to relay {relay:?} at {}", self.relay);
                    self.backoff = BACKOFF_MIN;
                }
                ControlEvent::ObservedAddr(a) => tracing::info!("relay sees us at {a}"),
                ControlEvent::Closed(why) => tracing::warn!("relay connection closed: {why}"),
                ControlEvent::LookupReply { .. } => {}
            }
            self.events.push(ev);
        }
        if c.is_closed() {
            self.client = None;
            self.schedule_retry(Instant::now());
        }
    }

    /// The relay, whether the control connection is up, and where the relay sees us.
    pub fn status(&self) -> crate::status::RelayStatus {
        let up = self.client.as_ref().filter(|c| c.is_connected());
        crate::status::RelayStatus {
            addr: self.relay.to_string(),
            connected: up.is_some(),
            observed_addr: up.and_then(|c| c.observed_addr()).map(|a| a.to_string()),
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

//! What the agent, connector and relay processes share: credentials, QUIC settings, the UDP
//! socket, signals, and the control link to the relay with its reconnect and liveness logic.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sluice_dataplane::control::{ControlClient, ControlEvent};
use sluice_dataplane::identity::Role;
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_dataplane::tunnel::Tunnel;
use sluice_dataplane::wire::RELAY_FORWARD_OVERHEAD;
use tokio::net::UdpSocket;

use crate::config::IdentityFiles;
use crate::IdentityArgs;

pub use sluice_dataplane::wire::{CONTROL_UDP_PAYLOAD, TUNNEL_UDP_PAYLOAD};
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

pub fn control_params() -> QuicParams {
    QuicParams {
        alpn: tls::ALPN_CONTROL,
        max_udp_payload: CONTROL_UDP_PAYLOAD,
        idle_timeout_ms: 30_000,
        dgram_queue: 1024,
        streams: true,
    }
}

pub fn tunnel_params() -> QuicParams {
    QuicParams {
        alpn: tls::ALPN_TUNNEL,
        max_udp_payload: TUNNEL_UDP_PAYLOAD,
        idle_timeout_ms: 120_000,
        dgram_queue: 1024,
        streams: true,
    }
}

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

/// Sends what the tunnels and the control link have queued: tunnel packets for the relayed
/// path go into relay forward DATAGRAMs (only while the control connection has room, so the
/// rest waits inside quiche instead of being dropped), then the control link's UDP packets.
pub async fn flush(
    link: &mut ControlLink,
    tunnels: &mut [&mut Tunnel],
    socket: &UdpSocket,
    out: &mut [u8],
) {
    loop {
        for t in tunnels.iter_mut() {
            while let Some(client) = link.connected().filter(|c| c.can_forward()) {
                match t.send(&mut out[RELAY_FORWARD_OVERHEAD..]) {
                    Some((n, None)) => {
                        if let Err(e) =
                            client.send_forward(&t.peer(), &mut out[..RELAY_FORWARD_OVERHEAD + n])
                        {
                            tracing::debug!("relay forward to {} failed: {e}", t.peer().short());
                        }
                    }
                    Some((n, Some(to))) => {
                        let pkt = &out[RELAY_FORWARD_OVERHEAD..RELAY_FORWARD_OVERHEAD + n];
                        if let Err(e) = socket.send_to(pkt, to).await {
                            tracing::debug!("UDP send to {to} failed: {e}");
                        }
                    }
                    None => break,
                }
            }
        }
        let mut sent = false;
        while let Some((n, to)) = link.send(out) {
            sent = true;
            if let Err(e) = socket.send_to(&out[..n], to).await {
                tracing::debug!("UDP send to {to} failed: {e}");
            }
        }
        if !sent {
            break;
        }
    }
}

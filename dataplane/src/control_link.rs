//! The control connection to the relay, kept up: a sans-IO state machine the agent engine and
//! the connector both drive. It reconnects with backoff when the connection closes or the relay
//! falls silent, and sends keepalives so NAT mappings and liveness stay fresh. A relay given by
//! name is resolved by the host (it asks through [`ControlLink::poll_resolve`]) again for every
//! new connection, and each of its addresses is tried in turn.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::control::{ControlClient, ControlEvent};
use crate::session::QuicSession;
use crate::status::RelayStatus;
use crate::tls;

/// Control keepalive; the relay is declared gone after `CONTROL_SILENCE` without a packet.
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);
const CONTROL_SILENCE: Duration = Duration::from_secs(6);
/// The relay answers a keepalive within one: silent longer, something between is amiss.
const RELAY_SUSPECT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// The relay: an IP address and port, or a hostname and port that is resolved again on every
/// reconnect (each address it has is tried in turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    pub host: String,
    pub port: u16,
    /// The address itself, when `host` is an IP literal.
    pub literal: Option<SocketAddr>,
}

impl std::str::FromStr for RelayTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(RelayTarget {
                host: a.ip().to_string(),
                port: a.port(),
                literal: Some(a),
            });
        }
        let usage = || {
            format!("{s:?}: expected HOST:PORT (like relay.example.com:4433, 192.0.2.1:4433 or [2001:db8::1]:4433)")
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(usage)?;
        let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(usage)?;
        // A hostname: letters, digits, hyphens and dots (an IPv6 address needs its brackets).
        let ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(usage());
        }
        Ok(RelayTarget {
            host: host.to_ascii_lowercase(),
            port,
            literal: None,
        })
    }
}

impl std::fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.literal {
            Some(a) => write!(f, "{a}"),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for RelayTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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
    /// A resolution of the relay name is wanted (`Some(false)`) or asked of the host and not
    /// answered yet (`Some(true)`).
    resolving: Option<bool>,
    client: Option<ControlClient>,
    backoff: Duration,
    retry_at: Option<Instant>,
    started: Instant,
    last_rx: Instant,
    /// The last packet from any relay connection (reconnecting does not move it).
    last_heard: Instant,
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

/// A connection that lasts this long was a real one: the backoff starts over after it. (A
/// relay that refuses our certificate does so right after the client's handshake finishes, so
/// "connected" alone proves nothing.)
const STABLE_AFTER: Duration = Duration::from_secs(10);

impl ControlLink {
    /// A link that dials at once (or, for a relay name, asks the host to resolve it first).
    /// `instance` tells the relay this process from another node with the same certificate.
    pub fn new(
        config: quiche::Config,
        local: SocketAddr,
        target: RelayTarget,
        instance: u64,
        now: Instant,
    ) -> Self {
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
            last_heard: now,
            next_keepalive: now + CONTROL_KEEPALIVE,
            events: Vec::new(),
            connected_at: None,
            last_error: None,
            failures: 0,
            instance,
        };
        link.on_timeout(now);
        link
    }

    /// The address to dial next, or None while a relay name is being resolved (or failed to).
    fn next_relay_addr(&mut self) -> Option<SocketAddr> {
        if let Some(a) = self.target.literal {
            return Some(a);
        }
        if let Some(a) = self.untried.pop() {
            return Some(a);
        }
        if self.resolving.is_none() {
            self.resolving = Some(false);
        }
        None
    }

    /// A relay name the host should resolve now (asked once per resolution); the answer goes
    /// to [`ControlLink::handle_resolved`].
    pub fn poll_resolve(&mut self) -> Option<(String, u16)> {
        if self.resolving != Some(false) {
            return None;
        }
        self.resolving = Some(true);
        Some((self.target.host.clone(), self.target.port))
    }

    /// The host's answer to [`ControlLink::poll_resolve`]: the relay's addresses, or why the
    /// name did not resolve.
    pub fn handle_resolved(&mut self, result: Result<Vec<SocketAddr>, String>, now: Instant) {
        if self.resolving.take().is_none() || self.client.is_some() {
            return;
        }
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
                self.retry_at = Some(now);
                self.on_timeout(now);
            }
            Ok(_) => {
                tracing::warn!(
                    "relay {}: the name has no {} address",
                    self.target,
                    if self.local.is_ipv4() { "IPv4" } else { "IPv6" }
                );
                self.schedule_retry(now);
            }
            Err(e) => {
                tracing::warn!("relay {}: cannot resolve the name: {e}", self.target);
                self.schedule_retry(now);
            }
        }
    }

    /// Whether the relay has been silent for longer than its keepalives allow (or the link is
    /// reconnecting): a tunnel's silence then may be the network's, not its peer's.
    pub fn relay_silent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_heard) > RELAY_SUSPECT
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
            self.last_heard = now;
        }
        self.collect(now);
    }

    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }

    pub fn send(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        let r = self.client.as_mut()?.send(out);
        if r.is_none() {
            self.collect(now);
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
        self.collect(now);
        if let Some(c) = self
            .client
            .as_mut()
            .filter(|c| c.relay_expires().is_some_and(|t| now >= t) && !c.is_closed())
        {
            tracing::warn!("relay {}: its certificate expired; closing", self.target);
            let _ = c.conn_mut().close(
                true,
                crate::tunnel::CLOSE_CERT_EXPIRED,
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
            let Some(relay) = self.next_relay_addr() else {
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

    /// Dials the relay again now, from wherever the network puts us (a path change, a wake
    /// from sleep); a relay name is resolved again.
    pub fn reconnect(&mut self, now: Instant) {
        if let Some(c) = &mut self.client {
            c.close("network changed");
        }
        self.client = None;
        self.connected_at = None;
        self.untried.clear();
        self.resolving = None;
        self.backoff = BACKOFF_MIN;
        self.retry_at = Some(now);
        self.last_rx = now;
        self.on_timeout(now);
    }

    /// This node's certificate was renewed: later connections present `config`'s, and the live
    /// one presents `der` (the same key's new certificate) in place, so it is not dropped.
    pub fn renew(&mut self, config: quiche::Config, der: Option<Vec<u8>>) {
        self.config = config;
        let live = self.client.as_mut().filter(|c| c.is_connected());
        if let (Some(der), Some(c)) = (der, live) {
            if let Err(e) = c.present_certificate(der) {
                tracing::warn!("cannot present the renewed certificate to the relay: {e}");
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

    fn collect(&mut self, now: Instant) {
        let Some(c) = &mut self.client else { return };
        while let Some(ev) = c.poll_event() {
            match &ev {
                ControlEvent::Connected { relay } => {
                    // Said at debug until the relay speaks (its first message is our observed
                    // address): a relay that refuses us finishes the handshake first.
                    tracing::debug!("handshake with relay {relay:?} at {} done", self.relay);
                    self.connected_at = Some(now);
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
                        .is_some_and(|t| now.saturating_duration_since(t) >= STABLE_AFTER)
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
                ControlEvent::LookupReply { .. }
                | ControlEvent::Revocations(_)
                | ControlEvent::PeerGone(_)
                | ControlEvent::RecordWanted => {}
            }
            self.events.push(ev);
        }
        if c.is_closed() {
            let why = tls::describe_close(c.conn()).unwrap_or_else(|| "closed".into());
            let duplicate = c.closed_as_duplicate();
            self.client = None;
            self.ended(why, now);
            if duplicate {
                // Another node with our certificate holds the relay: stay off (it wins while it
                // is connected), and try again now and then in case it went away.
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
    pub fn status(&self) -> RelayStatus {
        let up = self.client.as_ref().filter(|c| c.is_connected());
        RelayStatus {
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

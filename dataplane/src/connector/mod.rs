//! The connector core: everything a connector decides, as one sans-IO state machine that its
//! host drives (the Linux binary over tokio and real sockets, tests in memory).
//!
//! Inputs are UDP datagrams on the node's socket ([`Connector::handle_datagram`]), the time
//! ([`Connector::handle_timeout`]), the answers to the host's work (a resolved relay name, a
//! DNS lookup), and commands (a new policy, new interface addresses, the wall clock). Outputs
//! are polled: datagrams to send ([`Connector::poll_transmit`]), the next deadline
//! ([`Connector::poll_timeout`]) and [`Event`]s. [`Connector::step`] runs what the inputs
//! left to do: tunnel events, and each agent's [`Terminator`] with the host's [`Services`].
//!
//! What it decides: one end-to-end tunnel per agent (accepted from the relay, replaced when
//! the agent restarts, closed when it goes quiet), the policy gate every new flow passes with
//! the agent's authenticated identity (and again when the policy changes), which tunnel a
//! direct packet belongs to (by connection id), direct paths, and which DNS lookups an agent
//! may have done here. It never opens a socket or a file and never reads a clock.

pub mod dns;
pub mod record;
pub mod terminator;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use sluice_policy::audit::FlowDecision;
use sluice_policy::{Flow, Policy, Proto, Subject};

use crate::control::ControlEvent;
use crate::control_link::{ControlLink, RelayTarget};
use crate::datagram::{classify, Incoming, TransmitRound, Tunnels};
use crate::identity::{PeerId, Role};
use crate::metrics::{Direction, DnsKind, DnsStats, DropReason, NodeCounters};
use crate::nat::local::DirectSetup;
use crate::revocation::{CaKey, Offered, RevocationError, Revocations};
use crate::session::QuicSession;
use crate::status::{millis, secs, AgentTunnelStatus, ConnectorStatus};
use crate::tls::{self, Credentials, QuicParams};
use crate::tunnel::{Tunnel, TunnelEvent, VirtualPaths, TUNNEL_KEEPALIVE};
use crate::wall_clock::WallClock;
use crate::wire::{ControlMessage, Punch, RELAY_FORWARD_OVERHEAD, TUNNEL_GONE, TUNNEL_IP_OVERHEAD};

pub use terminator::{AdmitAll, FlowGate, FlowKind, NewFlow, Services, Terminator};

/// Events held for a host that does not poll them; past this the oldest go.
const EVENTS_MAX: usize = 4096;

/// An agent whose packets come for a tunnel we do not hold hears so at most this often.
const GONE_EVERY: Duration = Duration::from_millis(500);

/// An agent over its flood limits is said in the log at most this often.
const LIMIT_SAY_EVERY: Duration = Duration::from_secs(10);

/// What the core needs to start.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    pub relay: RelayTarget,
    /// The address of the host's UDP socket, as quiche names every path of this node.
    pub local: SocketAddr,
    /// The host's interface addresses: direct-path candidates.
    pub interface_ips: Vec<IpAddr>,
    /// Random per process: tells the relay this node's reconnections from another node with the
    /// same certificate.
    pub instance: u64,
}

/// Something the host has to do or know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Resolve the relay's name and call [`Connector::handle_relay_resolved`].
    ResolveRelay { host: String, port: u16 },
    /// Look `name` up for `rtype` records in this network and answer `query` with what was
    /// found (SERVFAIL at worst) through [`Connector::handle_dns_answer`].
    DnsLookup {
        agent: PeerId,
        id: u32,
        name: String,
        rtype: RecordType,
        query: Vec<u8>,
    },
    /// One flow decision, as a JSON line for the audit log.
    Audit(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// One agent's tunnel and what terminates its packets.
struct Session<T> {
    tunnel: Tunnel,
    terminator: T,
    next_keepalive: Instant,
    /// The agent's user as the policy sees it, once its certificate is known.
    subject: Option<Subject>,
    /// The agent's peer id in short form: the audit log's device.
    device: String,
    /// DNS lookups running for this agent, by id, with when each was asked.
    dns_in_flight: HashMap<u32, Instant>,
    /// The terminator's flood-limit drops when last logged, and when.
    limited_said: (u64, Option<Instant>),
    /// The terminator's flood-limit drops already in the counters.
    limited_counted: u64,
}

/// The connector's policy check of one agent's new (or re-checked) flow.
struct Gate<'a> {
    policy: &'a Policy,
    subject: Option<&'a Subject>,
    me: &'a str,
    device: &'a str,
    events: &'a mut VecDeque<Event>,
    counters: &'a mut NodeCounters,
    unix_nanos: i128,
}

impl<T: Terminator> Session<T> {
    /// Resolves the agent's groups again (a new policy, or a renewed certificate) and puts
    /// every open flow to the policy again; returns how many it cut.
    fn recheck(
        &mut self,
        policy: &Policy,
        me: &str,
        events: &mut VecDeque<Event>,
        counters: &mut NodeCounters,
        unix_nanos: i128,
    ) -> usize {
        self.subject = self
            .tunnel
            .remote()
            .map(|id| policy.subject(&id.name, &id.groups));
        let mut gate = Gate {
            policy,
            subject: self.subject.as_ref(),
            me,
            device: &self.device,
            events,
            counters,
            unix_nanos,
        };
        self.terminator.recheck(&mut gate)
    }
}

impl FlowGate for Gate<'_> {
    fn admit(&mut self, f: &NewFlow<'_>) -> bool {
        let Some(subject) = self.subject else {
            return false;
        };
        let flow = Flow {
            dst: f.dst.ip(),
            hostname: f.hostname,
            proto: match f.kind {
                FlowKind::Tcp => Proto::Tcp,
                FlowKind::Udp => Proto::Udp,
                FlowKind::Icmp => Proto::Icmp,
            },
            port: f.dst.port(),
        };
        let unix = (self.unix_nanos / 1_000_000_000) as i64;
        // Only resources this connector serves count: it passes nothing else.
        let d = self.policy.decide_for(subject, &flow, unix, Some(self.me));
        let line = FlowDecision {
            enforcer: "connector",
            user: &subject.user,
            device: self.device,
            source: f.src,
            flow: &flow,
            decision: &d,
        }
        .line(self.policy, self.unix_nanos);
        push_event(self.events, Event::Audit(line));
        self.counters.decisions.count(d.allowed());
        if !d.allowed() {
            self.counters.drops.add(DropReason::Policy);
        }
        d.allowed()
    }
}

fn push_event(events: &mut VecDeque<Event>, e: Event) {
    if events.len() >= EVENTS_MAX {
        events.pop_front();
    }
    events.push_back(e);
}

/// The sessions' tunnels, by index, for [`TransmitRound`].
struct SessionTunnels<'a, T>(&'a mut [Session<T>]);

impl<T> Tunnels for SessionTunnels<'_, T> {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn tunnel(&mut self, i: usize) -> Option<&mut Tunnel> {
        self.0.get_mut(i).map(|s| &mut s.tunnel)
    }
}

pub struct Connector<T> {
    link: ControlLink,
    /// When each agent last heard [`TUNNEL_GONE`] from us.
    gone_said: HashMap<PeerId, Instant>,
    tunnel_cfg: quiche::Config,
    /// One per agent with a tunnel here; `index` finds them by peer id.
    sessions: Vec<Session<T>>,
    index: HashMap<PeerId, usize>,
    /// Which agent a direct packet's destination connection id belongs to (rebuilt on a miss).
    by_cid: HashMap<Vec<u8>, PeerId>,
    paths: VirtualPaths,
    /// This connector's name: the policy's resources name their connector by it.
    me: String,
    peer_id: PeerId,
    policy: Arc<Policy>,
    direct: DirectSetup,
    events: VecDeque<Event>,
    /// The terminators' time origin.
    epoch: Instant,
    clock: WallClock,
    tx_round: TransmitRound,
    /// The control link closes once the tunnels' goodbyes are out.
    link_goodbye_due: bool,
    /// Scratch for packets the relay forwarded.
    relayed: Vec<u8>,
    /// Scratch for packets from a terminator into a tunnel (with the tunnel header's headroom).
    ip_buf: Vec<u8>,
    counters: NodeCounters,
    /// The list the tunnels' TLS config checks at every handshake (shared with the
    /// credentials), from the host's file or the relay, whichever is newer.
    revocations: Revocations,
    /// What revocation lists must be signed with; None if the CA certificate is unusable
    /// (then every list is refused, loudly).
    ca_key: Result<CaKey, RevocationError>,
    /// The signed record that homes this connector on the relay it is connected to.
    record: record::RecordPublisher,
    /// Checks agents' renewed certificates.
    peer_check: tls::PeerCheck,
}

impl<T: Terminator> Connector<T> {
    /// A connector for `creds`, enforcing `policy`; `unix_nanos` is the wall clock at `now`.
    pub fn new(
        config: ConnectorConfig,
        creds: &Credentials,
        policy: Arc<Policy>,
        now: Instant,
        unix_nanos: i128,
    ) -> Result<Self, ConnectorError> {
        let control_cfg = tls::quic_config(creds, &[Role::Relay], &QuicParams::control())?;
        let tunnel_cfg = tls::quic_config(creds, &[Role::Agent], &QuicParams::tunnel())?;
        let mut c = Connector {
            gone_said: HashMap::new(),
            link: ControlLink::new(
                control_cfg,
                config.local,
                config.relay,
                config.instance,
                now,
            ),
            tunnel_cfg,
            sessions: Vec::new(),
            index: HashMap::new(),
            by_cid: HashMap::new(),
            paths: VirtualPaths::default(),
            me: creds.identity.name.clone(),
            peer_id: creds.identity.peer_id,
            policy,
            direct: DirectSetup::new(creds.identity.peer_id, config.local, config.interface_ips),
            events: VecDeque::new(),
            epoch: now,
            clock: WallClock::new(now, unix_nanos),
            tx_round: TransmitRound::default(),
            link_goodbye_due: false,
            relayed: vec![0u8; 65_536],
            ip_buf: vec![0u8; TUNNEL_IP_OVERHEAD + 65_536],
            counters: NodeCounters::default(),
            revocations: creds.revocations.clone(),
            ca_key: creds.ca_key(),
            peer_check: creds.peer_check()?,
            record: record::RecordPublisher::new(creds),
        };
        c.after_link();
        Ok(c)
    }

    /// Agents with a tunnel here now.
    pub fn agents(&self) -> usize {
        self.sessions.len()
    }

    /// Whether the control connection to the relay is up.
    pub fn relay_connected(&self) -> bool {
        self.link.status().connected
    }

    /// What the core counted, with the tunnels up and the flows open now.
    pub fn stats(&self) -> NodeCounters {
        let mut c = self.counters;
        c.tunnels = self.sessions.iter().filter(|s| s.tunnel.is_up()).count() as u64;
        c.flows = self
            .sessions
            .iter()
            .map(|s| s.terminator.flows() as u64)
            .sum();
        c
    }

    /// A snapshot for `sluice status`: the relay link and every agent's tunnel.
    pub fn status(&self, now: Instant) -> ConnectorStatus {
        let age = |t: Instant| secs(now.saturating_duration_since(t));
        let tunnels = self
            .sessions
            .iter()
            .map(|s| {
                let t = &s.tunnel;
                let st = t.stats();
                let remote = t.remote();
                AgentTunnelStatus {
                    user: remote.map(|id| id.name.clone()),
                    groups: remote.map(|id| id.groups.clone()).unwrap_or_default(),
                    peer_id: t.peer().to_string(),
                    state: t.state(),
                    path: t.path_kind(),
                    direct_addr: match st.path {
                        crate::tunnel::Path::Direct(a) => Some(a.to_string()),
                        crate::tunnel::Path::Relay => None,
                    },
                    rtt_ms: st.rtt.filter(|_| t.is_up()).map(millis),
                    flows: s.terminator.flows() as u64,
                    bytes_sent: st.bytes_sent,
                    bytes_received: st.bytes_received,
                    since_switch_secs: st.path_changed_at.map(age),
                    up_secs: st.up_at.map_or(0.0, age),
                }
            })
            .collect();
        ConnectorStatus {
            name: self.me.clone(),
            peer_id: self.peer_id.to_string(),
            relay: self.link.status(),
            tunnels,
        }
    }

    /// The DNS lookups done for agents (also in [`Connector::stats`]).
    pub fn dns_stats(&self) -> &DnsStats {
        &self.counters.dns
    }

    /// The wall clock is `unix_nanos` at `now`.
    pub fn set_wall_clock(&mut self, now: Instant, unix_nanos: i128) {
        self.clock = WallClock::new(now, unix_nanos);
    }

    // ---- inputs ----------------------------------------------------------------------------

    /// A datagram from `from` on the node's socket. Its packets wait in their tunnels' and
    /// terminators' queues until [`Connector::step`] (a host reading a batch steps once).
    pub fn handle_datagram<S: Services<Terminator = T>>(
        &mut self,
        from: SocketAddr,
        pkt: &mut [u8],
        now: Instant,
        services: &mut S,
    ) {
        match classify(pkt, from, self.link.relay_addr()) {
            Incoming::Control => {}
            Incoming::Punch(p) => return self.on_punch(from, &p, now),
            Incoming::Direct { dcid } => return self.on_direct(pkt, from, &dcid, now),
            Incoming::Junk(why) => return self.direct.refuse(from, &why),
        }
        self.link.recv(pkt, from, now);
        self.after_link();
        self.link_events(now);
        let mut buf = std::mem::take(&mut self.relayed);
        while let Some((peer, data)) = self.link.connected().and_then(|c| c.recv_forward(&mut buf))
        {
            self.on_relayed(peer, data, now, services);
        }
        self.relayed = buf;
    }

    /// The deadline from [`Connector::poll_timeout`] passed (early calls are harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.link.on_timeout(now);
        self.after_link();
        self.link_events(now);
        let relay_silent = self.link.relay_silent(now);
        for s in &mut self.sessions {
            s.tunnel.set_network_silent(relay_silent);
            s.tunnel.run_timers(now, &mut s.next_keepalive);
        }
    }

    /// The answer to [`Event::ResolveRelay`]: the relay's addresses, or why there are none.
    pub fn handle_relay_resolved(&mut self, result: Result<Vec<SocketAddr>, String>, now: Instant) {
        self.link.handle_resolved(result, now);
        self.after_link();
    }

    /// The answer to [`Event::DnsLookup`] `id` of `agent`, sent back on its tunnel.
    pub fn handle_dns_answer(&mut self, agent: PeerId, id: u32, answer: Vec<u8>, now: Instant) {
        let Some(i) = self.index.get(&agent).copied() else {
            return;
        };
        let s = &mut self.sessions[i];
        let Some(asked) = s.dns_in_flight.remove(&id) else {
            return;
        };
        let took = now.saturating_duration_since(asked);
        self.counters.dns.answered(DnsKind::Lookup, &answer, took);
        let msg = ControlMessage::DnsAnswer {
            id,
            message: answer,
        };
        if let Err(e) = s.tunnel.send_message(&msg) {
            tracing::debug!("to agent peer {}: cannot answer DNS: {e}", agent.short());
        }
    }

    /// A new policy is in force: every agent's groups are resolved again and every open flow
    /// is checked again; the flows it denies are cut at once. Returns how many were cut.
    pub fn set_policy(&mut self, policy: Arc<Policy>, now: Instant) -> usize {
        self.policy = policy;
        let unix_nanos = self.clock.unix_nanos(now);
        let mut total = 0;
        for s in &mut self.sessions {
            let cut = s.recheck(
                &self.policy,
                &self.me,
                &mut self.events,
                &mut self.counters,
                unix_nanos,
            );
            if cut > 0 {
                tracing::info!(
                    "policy reload cut {cut} flow(s) of agent peer {}",
                    s.tunnel.peer().short()
                );
            }
            total += cut;
        }
        total
    }

    /// A revocation list (its signed bytes) from `source` (the host's file, or the relay):
    /// once verified, and if newer than the one in force, it is put in force and the tunnel of
    /// every agent it revokes closes now (new handshakes check it already).
    pub fn handle_revocations(
        &mut self,
        bytes: &[u8],
        source: &str,
        now: Instant,
    ) -> Result<Offered, RevocationError> {
        let ca = self.ca_key.as_ref().map_err(|e| {
            tracing::warn!("revocation list from {source} refused: {e}");
            e.clone()
        })?;
        let offered = self
            .revocations
            .load(bytes, ca, source, self.clock.unix(now))?;
        if let (Offered::Installed { .. }, Some(list)) = (offered, self.revocations.current()) {
            for s in &mut self.sessions {
                let Some(id) = s.tunnel.remote() else {
                    continue;
                };
                if let Some(why) = list.revokes(id) {
                    tracing::warn!(
                        "closing the tunnel of {id}: certificate revoked ({why} is on revocation list #{}); its {} flow(s) end",
                        list.sequence,
                        s.terminator.flows()
                    );
                    let reason =
                        format!("certificate revoked (revocation list #{})", list.sequence);
                    s.tunnel.revoke(&reason);
                }
            }
        }
        Ok(offered)
    }

    /// This connector's certificate file changed: new tunnels and relay connections present
    /// `creds`. With the same key (a renewal, `sluice ca renew`) every live tunnel and the
    /// relay connection present the new certificate in place, so no flow is dropped; with a
    /// new key that cannot be done (the handshake proved the old one), and the live ones go on
    /// until the old certificate expires.
    pub fn set_credentials(&mut self, creds: &Credentials) -> Result<(), ConnectorError> {
        let control_cfg = tls::quic_config(creds, &[Role::Relay], &QuicParams::control())?;
        self.tunnel_cfg = tls::quic_config(creds, &[Role::Agent], &QuicParams::tunnel())?;
        self.peer_check = creds.peer_check()?;
        self.ca_key = creds.ca_key();
        self.revocations = creds.revocations.clone();
        self.record.set_credentials(creds);
        let same_key = creds.identity.peer_id == self.peer_id;
        let der = if same_key {
            Some(creds.certificate_der()?)
        } else {
            tracing::warn!(
                "the new certificate has another key (peer {}): new connections use it, but the relay and agents know this connector by peer {} until it restarts; renew with `sluice ca renew` to keep the key",
                creds.identity.peer_id.short(),
                self.peer_id.short()
            );
            None
        };
        self.link.renew(control_cfg, der.clone());
        if let Some(der) = der {
            let msg = ControlMessage::Certificate(der);
            for s in &mut self.sessions {
                if s.tunnel.is_up() {
                    if let Err(e) = s.tunnel.send_message(&msg) {
                        tracing::warn!(
                            "cannot present the renewed certificate to agent peer {}: {e}",
                            s.tunnel.peer().short()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The host's interface addresses now: a change is a network change for direct paths.
    pub fn set_interfaces(&mut self, interface_ips: Vec<IpAddr>, now: Instant) {
        if let Some(c) = self.direct.set_interfaces(interface_ips) {
            for s in &mut self.sessions {
                s.tunnel.set_candidates(c.clone(), now);
            }
        }
    }

    /// Says goodbye: every tunnel and then the relay hear the close at once, instead of after
    /// their silence limits. The host sends what [`Connector::poll_transmit`] gives, then stops.
    pub fn shut_down(&mut self) {
        for s in &mut self.sessions {
            s.tunnel.goodbye();
        }
        self.link_goodbye_due = true;
    }

    /// Runs what the inputs left to do: each tunnel's events (up, closed, DNS queries), each
    /// agent's terminator with `services` (dials, bytes to and from services), and the
    /// terminators' packets into their tunnels. Tunnels that closed are dropped with their
    /// flows.
    pub fn step<S: Services<Terminator = T>>(&mut self, now: Instant, services: &mut S) {
        let mut i = 0;
        while i < self.sessions.len() {
            self.tunnel_events(i, now);
            let s = &mut self.sessions[i];
            if s.tunnel.is_closed() {
                let peer = s.tunnel.peer();
                self.end_session(peer, services);
                continue;
            }
            let peer = s.tunnel.peer();
            s.terminator.advance(now, self.epoch);
            let limited = s.terminator.rate_limited();
            self.counters.drops.add_n(
                DropReason::RateLimited,
                limited.saturating_sub(s.limited_counted),
            );
            s.limited_counted = limited;
            if limited > s.limited_said.0
                && s.limited_said
                    .1
                    .is_none_or(|t| now.saturating_duration_since(t) >= LIMIT_SAY_EVERY)
            {
                tracing::warn!(
                    "agent peer {} opens flows faster than its limits (`new_flows_per_agent`, `dialing_per_agent`): dropped {} packet(s) that would have opened one",
                    s.device,
                    limited - s.limited_said.0
                );
                s.limited_said = (limited, Some(now));
            }
            services.carry_out(peer, &mut s.terminator);
            services.pump(peer, &mut s.terminator);
            s.terminator.advance(now, self.epoch);
            services.carry_out(peer, &mut s.terminator);
            let pkt = &mut self.ip_buf;
            while s.tunnel.can_send_ip() {
                let Some(p) = s.terminator.output() else {
                    break;
                };
                let n = TUNNEL_IP_OVERHEAD + p.len();
                if n <= pkt.len() {
                    pkt[TUNNEL_IP_OVERHEAD..n].copy_from_slice(&p);
                    match s.tunnel.send_ip(&mut pkt[..n]) {
                        Ok(()) => {
                            let path = s.tunnel.path_kind();
                            (self.counters.traffic).count(Direction::Sent, path, p.len());
                        }
                        Err(e) => {
                            self.counters.drops.add(DropReason::QueueFull);
                            tracing::debug!(
                                "to agent peer {}: dropping a packet: {e}",
                                peer.short()
                            );
                        }
                    }
                } else {
                    self.counters.drops.add(DropReason::TooBig);
                }
                s.terminator.recycle(p);
            }
            i += 1;
        }
    }

    // ---- outputs ---------------------------------------------------------------------------

    /// `agent`'s terminator, for the host's services to deliver what a service sent.
    pub fn terminator_mut(&mut self, agent: &PeerId) -> Option<&mut T> {
        self.session_mut(agent).map(|s| &mut s.terminator)
    }

    /// The next datagram to send, written into `out` (64 KiB is always enough).
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        loop {
            let sent = self.tx_round.next(
                &mut self.link,
                &mut SessionTunnels(&mut self.sessions),
                out,
                now,
            );
            if sent.is_some() || !self.link_goodbye_due {
                return sent;
            }
            // Every tunnel's goodbye is out: now the relay's.
            self.link_goodbye_due = false;
            self.link.goodbye();
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connector::handle_timeout`] (or [`Connector::step`], for a terminator) is due
    /// next.
    pub fn poll_timeout(&mut self, now: Instant) -> Instant {
        let mut t = self.link.timeout(now);
        if let Some(d) = self.record.timeout(now) {
            t = t.min(d);
        }
        for s in &mut self.sessions {
            if let Some(d) = s.tunnel.timeout() {
                t = t.min(d);
            }
            t = t.min(s.next_keepalive.saturating_duration_since(now));
            t = t.min(s.terminator.poll_delay());
            if let Some(d) = s.tunnel.deadline() {
                t = t.min(d.saturating_duration_since(now));
            }
        }
        now + t
    }

    // ---- the rest --------------------------------------------------------------------------

    fn session_mut(&mut self, agent: &PeerId) -> Option<&mut Session<T>> {
        let i = *self.index.get(agent)?;
        self.sessions.get_mut(i)
    }

    /// A relay name to resolve becomes an event.
    fn after_link(&mut self) {
        if let Some((host, port)) = self.link.poll_resolve() {
            push_event(&mut self.events, Event::ResolveRelay { host, port });
        }
    }

    /// The relay sees us at a new address: new direct-path candidates for every tunnel.
    fn link_events(&mut self, now: Instant) {
        while let Some(ev) = self.link.poll_event() {
            match ev {
                ControlEvent::ObservedAddr(a) => {
                    if let Some(c) = self.direct.set_observed(a) {
                        for s in &mut self.sessions {
                            s.tunnel.set_candidates(c.clone(), now);
                        }
                    }
                }
                ControlEvent::Revocations(list) => {
                    // Logged by handle_revocations either way.
                    let _ = self.handle_revocations(&list, "the relay", now);
                }
                ControlEvent::Connected { relay } => self.record.on_connected(&relay),
                ControlEvent::RecordWanted => {
                    let unix_micros = (self.clock.unix_nanos(now) / 1000) as i64;
                    let rec = self.record.on_wanted(now, unix_micros);
                    self.publish_record(rec);
                }
                ControlEvent::Closed(_) => self.record.on_disconnected(),
                _ => {}
            }
        }
        let unix_micros = (self.clock.unix_nanos(now) / 1000) as i64;
        if let Some(rec) = self.record.due(now, unix_micros) {
            self.publish_record(rec);
        }
    }

    /// Hands our signed record to the relay (for the relays' shared registry).
    fn publish_record(&mut self, rec: Result<Vec<u8>, crate::connector_record::RecordError>) {
        let sent = rec
            .map_err(|e| e.to_string())
            .and_then(|b| match self.link.connected() {
                Some(c) => c.publish_record(b).map_err(|e| e.to_string()),
                None => Ok(()),
            });
        if let Err(e) = sent {
            tracing::warn!("cannot publish this connector's signed record to the relay: {e}");
        }
    }

    /// A connectivity check from an agent we have a tunnel with.
    fn on_punch(&mut self, from: SocketAddr, p: &Punch, now: Instant) {
        let Some(i) = self.index.get(&p.from).copied() else {
            return self
                .direct
                .refuse(from, &"punch from a peer with no tunnel here");
        };
        if let Err(e) = self.sessions[i].tunnel.on_punch(from, p, now) {
            self.direct.refuse(from, &e);
        }
    }

    /// QUIC straight from an agent (a direct path), found by its destination connection id.
    fn on_direct(&mut self, pkt: &mut [u8], from: SocketAddr, dcid: &[u8], now: Instant) {
        if !self.by_cid.contains_key(dcid) {
            self.by_cid.clear();
            for s in &self.sessions {
                for cid in s.tunnel.source_cids() {
                    self.by_cid.insert(cid, s.tunnel.peer());
                }
            }
        }
        let Some(i) = self
            .by_cid
            .get(dcid)
            .and_then(|peer| self.index.get(peer))
            .copied()
        else {
            return self
                .direct
                .refuse(from, &"QUIC packet for no tunnel of ours");
        };
        self.sessions[i]
            .tunnel
            .recv_direct(pkt, from, self.direct.local);
        self.deliver(i, now);
    }

    /// An end-to-end packet from agent `peer`, forwarded by the relay.
    fn on_relayed<S: Services<Terminator = T>>(
        &mut self,
        peer: PeerId,
        data: &mut [u8],
        now: Instant,
        services: &mut S,
    ) {
        let initial = quiche::Header::from_slice(data, quiche::MAX_CONN_ID_LEN)
            .ok()
            .filter(|h| h.ty == quiche::Type::Initial)
            .map(|h| h.dcid.to_vec());
        if let (Some(dcid), Some(i)) = (&initial, self.index.get(&peer).copied()) {
            let t = &self.sessions[i].tunnel;
            // A new Initial to an unknown connection id: the agent restarted.
            if !t.owns_cid(dcid) && t.is_up() {
                tracing::info!(
                    "agent peer {} opened a new tunnel; dropping its old one",
                    peer.short()
                );
                self.end_session(peer, services);
            }
        }
        let i = match self.index.get(&peer) {
            Some(i) => *i,
            None => {
                if initial.is_none() {
                    self.say_gone(peer, now);
                    return;
                }
                let path = self.paths.addr_of(peer);
                let tunnel = match Tunnel::accept(&mut self.tunnel_cfg, peer, path) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!("cannot accept a tunnel from peer {}: {e}", peer.short());
                        return;
                    }
                };
                self.sessions.push(Session {
                    tunnel,
                    terminator: services.terminator(),
                    next_keepalive: now + TUNNEL_KEEPALIVE,
                    subject: None,
                    device: peer.short(),
                    dns_in_flight: HashMap::new(),
                    limited_said: (0, None),
                    limited_counted: 0,
                });
                let i = self.sessions.len() - 1;
                self.index.insert(peer, i);
                i
            }
        };
        self.sessions[i].tunnel.recv_relayed(data);
        self.deliver(i, now);
    }

    /// Tells agent `peer`, whose tunnel packets reach us with no tunnel to take them (this
    /// connector restarted), that its tunnel is gone, so it opens a new one now rather than
    /// after its silence limit. At most every [`GONE_EVERY`] per agent.
    fn say_gone(&mut self, peer: PeerId, now: Instant) {
        if self
            .gone_said
            .get(&peer)
            .is_some_and(|t| now.saturating_duration_since(*t) < GONE_EVERY)
        {
            return;
        }
        if self.gone_said.len() >= 4096 {
            self.gone_said
                .retain(|_, t| now.saturating_duration_since(*t) < GONE_EVERY);
        }
        self.gone_said.insert(peer, now);
        let mut buf = [0u8; RELAY_FORWARD_OVERHEAD + TUNNEL_GONE.len()];
        buf[RELAY_FORWARD_OVERHEAD..].copy_from_slice(&TUNNEL_GONE);
        if let Some(c) = self.link.connected() {
            if c.send_forward(&peer, &mut buf).is_ok() {
                tracing::debug!("told agent peer {} that its tunnel is gone", peer.short());
            }
        }
    }

    /// Takes the IP packets session `i`'s tunnel received into its terminator.
    fn deliver(&mut self, i: usize, now: Instant) {
        let unix_nanos = self.clock.unix_nanos(now);
        let s = &mut self.sessions[i];
        if s.subject.is_none() {
            s.subject = s
                .tunnel
                .remote()
                .map(|id| self.policy.subject(&id.name, &id.groups));
        }
        let mut gate = Gate {
            policy: &self.policy,
            subject: s.subject.as_ref(),
            me: &self.me,
            device: &s.device,
            events: &mut self.events,
            counters: &mut self.counters,
            unix_nanos,
        };
        let mut ip = [0u8; 2048];
        let path = s.tunnel.path_kind();
        while let Some(r) = s.tunnel.recv_ip(&mut ip) {
            let name = r.name.and_then(|n| std::str::from_utf8(&ip[n]).ok());
            let len = r.packet.len();
            (gate.counters.traffic).count(Direction::Received, path, len);
            s.terminator.input(&ip[r.packet.clone()], name, &mut gate);
        }
    }

    /// Carries out session `i`'s tunnel events.
    fn tunnel_events(&mut self, i: usize, now: Instant) {
        let unix = self.clock.unix(now);
        let s = &mut self.sessions[i];
        let peer = s.tunnel.peer();
        while let Some(ev) = s.tunnel.poll_event() {
            match ev {
                TunnelEvent::Up(id) => {
                    // TLS refused revoked agents; a list that came during the handshake is
                    // checked here.
                    if let Some((seq, why)) = self.revocations.revokes(&id) {
                        tracing::warn!("refusing the tunnel of {id}: certificate revoked ({why} is on revocation list #{seq})");
                        s.tunnel
                            .revoke(&format!("certificate revoked (revocation list #{seq})"));
                        continue;
                    }
                    tracing::info!(
                        "tunnel from {id} is up via the relay (groups: {})",
                        crate::identity::groups_text(&id.groups)
                    );
                    s.tunnel.enable_direct(
                        self.direct.me,
                        self.direct.local,
                        self.direct.candidates.clone(),
                        Vec::new(),
                        now,
                    );
                }
                TunnelEvent::Closed(why) => {
                    tracing::info!("tunnel from agent peer {} closed: {why}", peer.short())
                }
                TunnelEvent::Message(ControlMessage::DnsQuery { id, message }) => {
                    let asker = dns::Asker {
                        policy: &self.policy,
                        subject: s.subject.as_ref(),
                        me: &self.me,
                        now: unix,
                        in_flight: s.dns_in_flight.len(),
                    };
                    match dns::admit(&asker, &message) {
                        dns::Admission::Answer(a) => {
                            (self.counters.dns).answered(DnsKind::Lookup, &a, Duration::ZERO);
                            let msg = ControlMessage::DnsAnswer { id, message: a };
                            if let Err(e) = s.tunnel.send_message(&msg) {
                                tracing::debug!(
                                    "to agent peer {}: cannot answer DNS: {e}",
                                    peer.short()
                                );
                            }
                        }
                        dns::Admission::Lookup { name, rtype } => {
                            s.dns_in_flight.insert(id, now);
                            push_event(
                                &mut self.events,
                                Event::DnsLookup {
                                    agent: peer,
                                    id,
                                    name,
                                    rtype,
                                    query: message,
                                },
                            );
                        }
                        dns::Admission::Ignore => self.counters.dns.dropped(DnsKind::Lookup),
                    }
                }
                TunnelEvent::Message(ControlMessage::Certificate(der)) => {
                    let Some(current) = s.tunnel.remote().cloned() else {
                        continue;
                    };
                    match self.peer_check.renewed(&current, &der, unix) {
                        Ok(id) => {
                            tracing::info!(
                                "{id} renewed its certificate in place (groups: {})",
                                crate::identity::groups_text(&id.groups)
                            );
                            s.tunnel.peer_renewed(id);
                            // New groups may deny what the old ones allowed.
                            s.recheck(
                                &self.policy,
                                &self.me,
                                &mut self.events,
                                &mut self.counters,
                                self.clock.unix_nanos(now),
                            );
                        }
                        Err(e) => tracing::warn!(
                            "{current}: renewed certificate refused: {e}; the tunnel lasts until its certificate expires"
                        ),
                    }
                }
                TunnelEvent::Message(other) => {
                    tracing::debug!("agent peer {}: unexpected message {other:?}", peer.short())
                }
                TunnelEvent::PathChanged(path) => {
                    self.counters.switched(s.tunnel.path_kind());
                    tracing::info!(
                        "tunnel from agent peer {}: now {}",
                        peer.short(),
                        crate::engine::describe_path(path)
                    )
                }
                TunnelEvent::DirectFailed(_) | TunnelEvent::DirectNotFound => {}
            }
        }
    }

    /// Drops `peer`'s tunnel, its terminator and (through `services`) its flows.
    fn end_session<S: Services<Terminator = T>>(&mut self, peer: PeerId, services: &mut S) {
        let Some(i) = self.index.remove(&peer) else {
            return;
        };
        self.sessions.swap_remove(i);
        if let Some(moved) = self.sessions.get(i) {
            self.index.insert(moved.tunnel.peer(), i);
        }
        // The round's cursor may now point past a session that moved into `i`; it only
        // costs that session a turn until the next round.
        services.agent_gone(peer);
    }
}

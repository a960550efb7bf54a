//! `sluice connector`: accepts agents' end-to-end tunnels (via the relay), terminates their
//! packets in one smoltcp stack per agent, and splices flows to the real services.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_dataplane::control::ControlEvent;
use sluice_dataplane::identity::{PeerId, Role};
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, QuicParams};
use sluice_dataplane::tunnel::{Tunnel, TunnelEvent, VirtualPaths};
use sluice_dataplane::wire::{ControlMessage, Punch, TUNNEL_IP_OVERHEAD};
use sluice_netstack::splice::{FlowMsg, Splicer};
use sluice_netstack::stack::{Limits, Stack};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use sluice_netstack::stack::{FlowGate, FlowKind, NewFlow};
use sluice_policy::watch::{now_unix, PolicyWatcher};
use sluice_policy::{Flow, Policy, Proto, Subject};

use crate::access::{self, AuditSink, FlowRecord};
use crate::config::{self, ConnectorConfig};
use crate::node::{self, ControlLink};
use crate::remote_dns;
use crate::udp_batch;
use crate::ConnectorArgs;

pub fn run(args: ConnectorArgs) -> Result<()> {
    let origin = args.config.display().to_string();
    let mut cfg: ConnectorConfig = config::load(&args.config)?;
    if let Some(r) = args.relay {
        cfg.relay = r;
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(p) = args.policy {
        cfg.policy = p;
    }
    if let Some(p) = args.audit_log {
        cfg.audit_log = Some(p);
    }
    node::override_identity(&mut cfg.cert, &mut cfg.key, &mut cfg.ca, &args.identity);
    let creds = node::credentials(&cfg.identity(), Role::Connector, &origin)?;
    let watcher = access::open_policy(&cfg.policy, &origin)?;
    let audit = AuditSink::open(cfg.audit_log.as_deref())?;
    let control_cfg = tls::quic_config(&creds, &[Role::Relay], &QuicParams::control())?;
    let tunnel_cfg = tls::quic_config(&creds, &[Role::Agent], &QuicParams::tunnel())?;
    let limits = Limits {
        tcp_buffer: cfg.tcp_buffer.clamp(4096, 16 << 20),
        udp_idle: Duration::from_secs(cfg.udp_idle_secs.max(1)),
        dial_timeout: Duration::from_secs(cfg.dial_timeout_secs.max(1)),
        ..Limits::default()
    };
    // Per-flow TCP buffers are big (256 KiB each way) and mostly empty: allocated zeroed by
    // mmap, their untouched pages cost no memory. glibc would otherwise raise its mmap
    // threshold after the first frees and serve them from the heap, where every page gets
    // touched. An explicit threshold keeps it fixed.
    // SAFETY: mallopt only changes allocator parameters; no allocation is in flight here.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
    let rt = node::runtime()?;
    rt.block_on(async move {
        let socket = node::bind_udp(cfg.listen).with_context(|| format!("cannot bind {}", cfg.listen))?;
        let local = socket.local_addr()?;
        tracing::info!(
            "connector {:?} (peer {}) on {local}, relay {}",
            creds.identity.name,
            creds.identity.peer_id.short(),
            cfg.relay
        );
        let link = node::control_link(control_cfg, local, cfg.relay.clone());
        // Resolves the hostnames agents address (split DNS) with this network's resolvers.
        let resolver = match hickory_resolver::TokioResolver::builder_tokio().and_then(|b| b.build()) {
            Ok(r) => Some(std::sync::Arc::new(r)),
            Err(e) => {
                tracing::warn!("no DNS resolver ({e}): flows to resource hostnames will fail");
                None
            }
        };
        let (splicer, flow_rx) = Splicer::new(limits.dial_timeout, resolver.clone());
        let (dns_done, dns_rx) = mpsc::channel(256);
        let mut c = Connector {
            link,
            tunnel_cfg,
            sessions: HashMap::new(),
            paths: VirtualPaths::default(),
            splicer,
            limits,
            base: Instant::now(),
            out: vec![0u8; 65_536],
            ip_buf: vec![0u8; TUNNEL_IP_OVERHEAD + 65_536],
            me: creds.identity.name.clone(),
            watcher,
            audit,
            next_reload_check: Instant::now() + RELOAD_EVERY,
            resolver,
            dns_done,
            direct: node::DirectSetup::new(creds.identity.peer_id, local, node::interface_ips(None)),
            by_cid: HashMap::new(),
            udp_tx: crate::udp_batch::UdpSender::default(),
        };
        tokio::select! {
            r = c.run(&socket, flow_rx, dns_rx) => r,
            _ = node::shutdown_signal() => {
                tracing::info!("connector: shutting down with {} agent(s), {} flow(s)", c.sessions.len(), c.splicer.flow_count());
                c.goodbye(&socket).await;
                Ok(())
            }
        }
    })
}

/// How often the policy file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

struct Session {
    tunnel: Tunnel,
    stack: Stack,
    next_keepalive: Instant,
    /// The agent's user as the policy sees it, once its certificate is known.
    subject: Option<Subject>,
    /// The agent's peer id in short form: the audit log's device.
    device: String,
    /// DNS lookups running for this agent.
    dns_in_flight: usize,
}

/// The connector's policy check of a new (or re-checked) flow of one agent.
struct Gate<'a> {
    policy: &'a Policy,
    subject: Option<&'a Subject>,
    me: &'a str,
    device: &'a str,
    audit: &'a mut AuditSink,
    now: i64,
}

impl FlowGate for Gate<'_> {
    fn admit(&mut self, f: &NewFlow<'_>) -> bool {
        let Some(subject) = self.subject else {
            return false;
        };
        let proto = match f.kind {
            FlowKind::Tcp => Proto::Tcp,
            FlowKind::Udp => Proto::Udp,
            FlowKind::Icmp => Proto::Icmp,
        };
        let flow = Flow {
            dst: f.dst.ip(),
            hostname: f.hostname,
            proto,
            port: f.dst.port(),
        };
        // Only resources this connector serves count: it passes nothing else.
        let d = self
            .policy
            .decide_for(subject, &flow, self.now, Some(self.me));
        let rec = FlowRecord {
            enforcer: "connector",
            user: &subject.user,
            device: self.device,
            src: f.src.ip(),
            src_port: f.src.port(),
            flow: &flow,
        };
        self.audit.record(self.policy, &rec, &d);
        d.allowed()
    }
}

struct Connector {
    link: ControlLink,
    tunnel_cfg: quiche::Config,
    sessions: HashMap<PeerId, Session>,
    paths: VirtualPaths,
    splicer: Splicer<PeerId>,
    limits: Limits,
    base: Instant,
    out: Vec<u8>,
    /// Scratch for packets from a stack into a tunnel (with the tunnel header's headroom).
    ip_buf: Vec<u8>,
    /// This connector's name: the policy's resources name their connector by it.
    me: String,
    watcher: PolicyWatcher,
    audit: AuditSink,
    next_reload_check: Instant,
    resolver: Option<std::sync::Arc<hickory_resolver::TokioResolver>>,
    dns_done: mpsc::Sender<remote_dns::Done>,
    direct: node::DirectSetup,
    /// Which agent a direct packet's destination connection id belongs to (rebuilt on a miss).
    by_cid: HashMap<Vec<u8>, PeerId>,
    /// Outgoing UDP, sent in GSO batches.
    udp_tx: crate::udp_batch::UdpSender,
}

impl Connector {
    async fn run(
        &mut self,
        socket: &UdpSocket,
        mut flow_rx: mpsc::Receiver<(PeerId, FlowMsg)>,
        mut dns_rx: mpsc::Receiver<remote_dns::Done>,
    ) -> Result<()> {
        let mut udp_rx = udp_batch::UdpReceiver::new(socket);
        let wake = self.splicer.wake.clone();
        let (resolved_tx, mut resolved_rx) = mpsc::channel(4);
        // One timer, re-armed each round, rather than a new one per packet.
        // The control link's first Initial is queued already: send it now, not at the first
        // timer (a second later).
        self.flush(socket).await;
        let mut timer = node::LoopTimer::new();
        loop {
            let now = Instant::now();
            timer.rearm(self.timeout(now));
            tokio::select! {
                r = udp_rx.recv(socket) => {
                    r.context("UDP receive failed")?;
                    let mut taken = 0;
                    loop {
                        let (len, segment) = udp_rx.layout();
                        if let Some(from) = udp_rx.from() {
                            for p in udp_batch::segments(len, segment) {
                                self.on_udp(&mut udp_rx.buf_mut()[p], from);
                                taken += 1;
                            }
                        }
                        if taken == 1 {
                            // A packet that came alone most likely is alone: answer it before a
                            // read that would only find nothing (latency, not batching).
                            self.step_stacks();
                            self.flush(socket).await;
                        }
                        if taken >= node::ROUND_BATCH || udp_rx.try_recv(socket).is_err() {
                            break;
                        }
                    }
                }
                Some((peer, msg)) = flow_rx.recv() => {
                    self.on_flow_msg(peer, msg);
                    for _ in 1..node::ROUND_BATCH {
                        let Ok((peer, msg)) = flow_rx.try_recv() else { break };
                        self.on_flow_msg(peer, msg);
                    }
                }
                Some((peer, id, answer)) = dns_rx.recv() => {
                    if let Some(s) = self.sessions.get_mut(&peer) {
                        s.dns_in_flight = s.dns_in_flight.saturating_sub(1);
                        let msg = ControlMessage::DnsAnswer { id, message: answer };
                        if let Err(e) = s.tunnel.send_message(&msg) {
                            tracing::debug!("to agent peer {}: cannot answer DNS: {e}", peer.short());
                        }
                    }
                }
                _ = wake.notified() => {}
                Some(r) = resolved_rx.recv() => self.link.handle_resolved(r, Instant::now()),
                _ = timer.fired() => self.on_timeout(Instant::now()),
            }
            if let Some((host, port)) = self.link.poll_resolve() {
                let tx = resolved_tx.clone();
                node::resolve_relay(host, port, move |r| {
                    let _ = tx.blocking_send(r);
                });
            }
            self.step_stacks();
            self.flush(socket).await;
        }
    }

    fn timeout(&mut self, now: Instant) -> Duration {
        let mut t = self
            .link
            .timeout(now)
            .min(self.next_reload_check.saturating_duration_since(now));
        for s in self.sessions.values_mut() {
            if let Some(d) = s.tunnel.timeout() {
                t = t.min(d);
            }
            t = t.min(s.next_keepalive.saturating_duration_since(now));
            t = t.min(s.stack.poll_delay());
            if let Some(d) = s.tunnel.deadline() {
                t = t.min(d.saturating_duration_since(now));
            }
        }
        t
    }

    fn on_timeout(&mut self, now: Instant) {
        self.link.on_timeout(now);
        let mut fresh = None;
        if now >= self.next_reload_check {
            self.next_reload_check = now + RELOAD_EVERY;
            self.check_reload();
            // Checked with the policy file, once a second: a new interface address is a
            // network change.
            fresh = self.direct.set_interfaces(node::interface_ips(None));
        }
        while let Some(ev) = self.link.poll_event() {
            if let ControlEvent::ObservedAddr(a) = ev {
                fresh = self.direct.set_observed(a).or(fresh);
            }
        }
        for s in self.sessions.values_mut() {
            if s.tunnel.timeout() == Some(Duration::ZERO) {
                s.tunnel.on_timeout();
            }
            if let Some(c) = &fresh {
                s.tunnel.set_candidates(c.clone(), now);
            }
            if s.tunnel.deadline().is_some_and(|d| d <= now) {
                s.tunnel.on_deadline(now);
            }
            if now >= s.next_keepalive {
                s.next_keepalive = now + node::TUNNEL_KEEPALIVE;
                if s.tunnel.is_up() {
                    s.tunnel.keepalive();
                }
            }
        }
    }

    fn on_udp(&mut self, pkt: &mut [u8], from: SocketAddr) {
        match node::classify(pkt, from, self.link.relay_addr()) {
            node::Incoming::Control => {}
            node::Incoming::Punch(p) => return self.on_punch(from, &p),
            node::Incoming::Direct { dcid } => return self.on_direct(pkt, from, &dcid),
            node::Incoming::Junk(why) => return self.direct.refuse(from, &why),
        }
        self.link.recv(pkt, from, Instant::now());
        while let Some(ev) = self.link.poll_event() {
            if let ControlEvent::ObservedAddr(a) = ev {
                if let Some(c) = self.direct.set_observed(a) {
                    for s in self.sessions.values_mut() {
                        s.tunnel.set_candidates(c.clone(), Instant::now());
                    }
                }
            }
        }
        let mut buf = std::mem::take(&mut self.out);
        while let Some((peer, data)) = self.link.connected().and_then(|c| c.recv_forward(&mut buf))
        {
            self.on_relayed(peer, data);
        }
        self.out = buf;
    }

    /// A connectivity check from an agent we have a tunnel with.
    fn on_punch(&mut self, from: SocketAddr, p: &Punch) {
        let Some(s) = self.sessions.get_mut(&p.from) else {
            return self
                .direct
                .refuse(from, &"punch from a peer with no tunnel here");
        };
        if let Err(e) = s.tunnel.on_punch(from, p, Instant::now()) {
            self.direct.refuse(from, &e);
        }
    }

    /// QUIC straight from an agent (a direct path), found by its destination connection id.
    fn on_direct(&mut self, pkt: &mut [u8], from: SocketAddr, dcid: &[u8]) {
        if !self.by_cid.contains_key(dcid) {
            self.by_cid.clear();
            for (peer, s) in &self.sessions {
                for cid in s.tunnel.source_cids() {
                    self.by_cid.insert(cid, *peer);
                }
            }
        }
        let Some(peer) = self.by_cid.get(dcid).copied() else {
            return self
                .direct
                .refuse(from, &"QUIC packet for no tunnel of ours");
        };
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        s.tunnel.recv_direct(pkt, from, self.direct.local);
        self.deliver(peer);
    }

    /// An end-to-end packet from agent `peer`, forwarded by the relay.
    fn on_relayed(&mut self, peer: PeerId, data: &mut [u8]) {
        let initial = quiche::Header::from_slice(data, quiche::MAX_CONN_ID_LEN)
            .ok()
            .filter(|h| h.ty == quiche::Type::Initial)
            .map(|h| h.dcid.to_vec());
        if let (Some(dcid), Some(s)) = (&initial, self.sessions.get(&peer)) {
            // A new Initial to an unknown connection id: the agent restarted.
            if !s.tunnel.owns_cid(dcid) && s.tunnel.is_up() {
                tracing::info!(
                    "agent peer {} opened a new tunnel; dropping its old one",
                    peer.short()
                );
                self.end_session(peer);
            }
        }
        if !self.sessions.contains_key(&peer) {
            if initial.is_none() {
                return;
            }
            let path = self.paths.addr_of(peer);
            match Tunnel::accept(&mut self.tunnel_cfg, peer, path) {
                Ok(tunnel) => {
                    self.sessions.insert(
                        peer,
                        Session {
                            tunnel,
                            stack: Stack::new(self.limits.clone()),
                            next_keepalive: Instant::now() + node::TUNNEL_KEEPALIVE,
                            subject: None,
                            device: peer.short(),
                            dns_in_flight: 0,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!("cannot accept a tunnel from peer {}: {e}", peer.short());
                    return;
                }
            }
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        s.tunnel.recv_relayed(data);
        self.deliver(peer);
    }

    /// Takes the IP packets agent `peer`'s tunnel received into its stack.
    fn deliver(&mut self, peer: PeerId) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        let policy = self.watcher.policy();
        if s.subject.is_none() {
            s.subject = s
                .tunnel
                .remote()
                .map(|id| policy.subject(&id.name, &id.groups));
        }
        let mut gate = Gate {
            policy,
            subject: s.subject.as_ref(),
            me: &self.me,
            device: &s.device,
            audit: &mut self.audit,
            now: now_unix(),
        };
        let mut ip = [0u8; 2048];
        while let Some(r) = s.tunnel.recv_ip(&mut ip) {
            let name = r.name.and_then(|n| std::str::from_utf8(&ip[n]).ok());
            s.stack.input_named(&ip[r.packet.clone()], name, &mut gate);
        }
    }

    fn on_flow_msg(&mut self, peer: PeerId, msg: FlowMsg) {
        match self.sessions.get_mut(&peer) {
            Some(s) => self.splicer.on_message(peer, msg, &mut s.stack),
            None => self.splicer.drop_agent(peer),
        }
    }

    /// Runs every stack, carries out its events and moves bytes between flows and tunnels.
    fn step_stacks(&mut self) {
        let now = Instant::now();
        let mut ended = Vec::new();
        let pkt = &mut self.ip_buf;
        for (peer, s) in self.sessions.iter_mut() {
            while let Some(ev) = s.tunnel.poll_event() {
                match ev {
                    TunnelEvent::Up(id) => {
                        tracing::info!(
                            "tunnel from {id} is up via the relay (groups: {})",
                            if id.groups.is_empty() {
                                "none".into()
                            } else {
                                id.groups.join(",")
                            }
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
                        let q = remote_dns::Query {
                            policy: self.watcher.policy(),
                            subject: s.subject.as_ref(),
                            me: &self.me,
                            peer: *peer,
                            id,
                            now: now_unix(),
                        };
                        let started = remote_dns::start(
                            q,
                            message,
                            self.resolver.as_ref(),
                            &mut s.dns_in_flight,
                            &self.dns_done,
                        );
                        if let remote_dns::Outcome::Answer(a) = started {
                            let msg = ControlMessage::DnsAnswer { id, message: a };
                            if let Err(e) = s.tunnel.send_message(&msg) {
                                tracing::debug!(
                                    "to agent peer {}: cannot answer DNS: {e}",
                                    peer.short()
                                );
                            }
                        }
                    }
                    TunnelEvent::Message(other) => {
                        tracing::debug!("agent peer {}: unexpected message {other:?}", peer.short())
                    }
                    TunnelEvent::PathChanged(path) => tracing::info!(
                        "tunnel from agent peer {}: now {}",
                        peer.short(),
                        sluice_dataplane::engine::describe_path(path)
                    ),
                    TunnelEvent::DirectFailed(_) | TunnelEvent::DirectNotFound => {}
                }
            }
            if s.tunnel.is_closed() {
                ended.push(*peer);
                continue;
            }
            s.stack.set_time(now, self.base);
            s.stack.poll();
            self.splicer.handle_events(*peer, &mut s.stack);
            self.splicer.pump(*peer, &mut s.stack);
            s.stack.poll();
            self.splicer.handle_events(*peer, &mut s.stack);
            while s.tunnel.can_send_ip() {
                let Some(p) = s.stack.output() else { break };
                let n = TUNNEL_IP_OVERHEAD + p.len();
                if n <= pkt.len() {
                    pkt[TUNNEL_IP_OVERHEAD..n].copy_from_slice(&p);
                    if let Err(e) = s.tunnel.send_ip(&mut pkt[..n]) {
                        tracing::debug!("to agent peer {}: dropping a packet: {e}", peer.short());
                    }
                }
                s.stack.recycle(p);
            }
        }
        for peer in ended {
            self.end_session(peer);
        }
    }

    /// Applies a changed policy file: every agent's groups are resolved again and every open
    /// flow is checked again; flows the new policy denies are reset at once.
    fn check_reload(&mut self) {
        if !access::reload(&mut self.watcher) {
            return;
        }
        let policy = self.watcher.policy().clone();
        let now = now_unix();
        for (peer, s) in self.sessions.iter_mut() {
            s.subject = s
                .tunnel
                .remote()
                .map(|id| policy.subject(&id.name, &id.groups));
            let mut gate = Gate {
                policy: &policy,
                subject: s.subject.as_ref(),
                me: &self.me,
                device: &s.device,
                audit: &mut self.audit,
                now,
            };
            let cut = s.stack.recheck(&mut gate);
            if cut > 0 {
                tracing::info!(
                    "policy reload cut {cut} flow(s) of agent peer {}",
                    peer.short()
                );
            }
        }
    }

    fn end_session(&mut self, peer: PeerId) {
        if self.sessions.remove(&peer).is_some() {
            self.splicer.drop_agent(peer);
        }
    }

    /// Says goodbye before exiting: every tunnel and the relay hear the close at once (their
    /// peers then stop waiting for us), instead of after their silence limits.
    async fn goodbye(&mut self, socket: &UdpSocket) {
        for s in self.sessions.values_mut() {
            s.tunnel.goodbye();
        }
        self.flush(socket).await;
        self.link.goodbye();
        self.flush(socket).await;
    }

    async fn flush(&mut self, socket: &UdpSocket) {
        let mut tunnels: Vec<&mut Tunnel> =
            self.sessions.values_mut().map(|s| &mut s.tunnel).collect();
        node::flush(
            &mut self.link,
            &mut tunnels,
            socket,
            &mut self.out,
            &mut self.udp_tx,
        )
        .await;
    }
}

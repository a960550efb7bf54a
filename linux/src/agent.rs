//! `sluice agent`: TUN device → end-to-end tunnels to connectors, via the relay.
//!
//! One task owns everything (TUN, UDP socket, control link, tunnels), so packets of a flow keep
//! their order and no locks sit on the packet path.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use sluice_dataplane::control::ControlEvent;
use sluice_dataplane::dns::pool::SyntheticPool;
use sluice_dataplane::identity::{PeerId, Role};
use sluice_dataplane::packet::{self, Unreachable};
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, QuicParams};
use sluice_dataplane::tunnel::{Tunnel, TunnelError, TunnelEvent, VirtualPaths};
use sluice_dataplane::wire::{named_ip_overhead, ControlMessage, TUNNEL_IP_OVERHEAD};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tun_rs::AsyncDevice;

use sluice_policy::cache::FlowCache;
use sluice_policy::watch::{now_unix, PolicyWatcher};
use sluice_policy::Subject;

use crate::access::{self, AuditSink, FlowRecord};
use crate::config::{self, AgentConfig};
use crate::dns::{self, ConnectorQuery, ConnectorReply, DnsState, FlowKey, SharedDns};
use crate::instance::{self, InstanceLock};
use crate::node::{self, ControlLink};
use crate::{resolvconf, tun, udp_batch, AgentArgs};
use sluice_dataplane::nat::candidate::{Candidate, Kind};
use sluice_dataplane::nat::traversal::RETRY_AFTER;

/// Packets held per connector while its tunnel comes up.
const QUEUE_MAX: usize = 256;
/// After a failed lookup, packets to that connector are refused for this long.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(2);
/// A lookup with no reply is sent again after this long.
const LOOKUP_RETRY: Duration = Duration::from_secs(2);
/// Flows whose decision is cached; past this the cache starts over.
const FLOW_CACHE: usize = 65_536;
/// How often the policy file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// DNS queries held per connector while its tunnel comes up.
const DNS_QUEUE_MAX: usize = 64;

/// Sends one IP packet (in `buf[TUNNEL_IP_OVERHEAD..]`) into the tunnel; a packet to a
/// synthetic address goes with the hostname it stands for, copied behind it in `scratch`.
fn send_packet(
    t: &mut Tunnel,
    buf: &mut [u8],
    name: Option<&str>,
    scratch: &mut Vec<u8>,
) -> Result<(), TunnelError> {
    match name {
        None => t.send_ip(buf),
        Some(n) => {
            let ip = &buf[TUNNEL_IP_OVERHEAD..];
            let head = named_ip_overhead(n);
            scratch.clear();
            scratch.resize(head + ip.len(), 0);
            scratch[head..].copy_from_slice(ip);
            t.send_named_ip(scratch, n)
        }
    }
}

fn is_unicast_global(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_link_local()),
        std::net::IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unicast_link_local()),
    }
}

/// The networks a policy routes into the tunnel.
fn networks(p: &sluice_policy::Policy) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = p.networks().iter().map(|(n, _)| *n).collect();
    v.sort();
    v.dedup();
    v
}

pub fn run(args: AgentArgs) -> Result<()> {
    let origin = args.config.display().to_string();
    let mut cfg: AgentConfig = config::load(&args.config)?;
    // The file first, then each flag: an error names whichever said it.
    cfg.validate(&origin)?;
    if let Some(r) = args.relay {
        cfg.relay = r;
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(n) = args.tun_name {
        cfg.tun.name = n;
    }
    if let Some(m) = args.mtu {
        config::check_mtu(m, "--mtu")?;
        cfg.tun.mtu = m;
    }
    if let Some(p) = args.policy {
        cfg.policy = p;
    }
    if let Some(p) = args.status_socket {
        cfg.status_socket = p;
    }
    if let Some(p) = args.audit_log {
        cfg.audit_log = Some(p);
    }
    if args.no_dns {
        cfg.dns.listen = false;
    }
    if args.no_direct {
        cfg.direct_paths = false;
    }
    node::override_identity(&mut cfg.cert, &mut cfg.key, &mut cfg.ca, &args.identity);
    // Everything that can be checked is checked before anything in the system changes, so a
    // start that fails leaves the system (and any agent already running) as it was.
    let creds = node::credentials(&cfg.identity(), Role::Agent, &origin)?;
    let control_cfg = tls::quic_config(&creds, &[Role::Relay], &QuicParams::control())?;
    let tunnel_cfg = tls::quic_config(&creds, &[Role::Connector], &QuicParams::tunnel())?;
    let watcher = access::open_policy(&cfg.policy, &origin)?;
    let pool = SyntheticPool::new(
        (cfg.dns.pool_v4.network(), cfg.dns.pool_v4.prefix_len()),
        (cfg.dns.pool_v6.network(), cfg.dns.pool_v6.prefix_len()),
        cfg.dns.max_names,
    )
    .map_err(|e| config::ConfigError(format!("{origin}: `dns`: {e}")))?;
    let pools = [IpNet::V4(pool.v4_net()), IpNet::V6(pool.v6_net())];
    if let Some((net, pool_net)) = networks(watcher.policy())
        .iter()
        .find_map(|n| pools.iter().find(|p| overlap(n, p)).map(|p| (*n, *p)))
    {
        return Err(config::ConfigError(format!(
            "{origin}: `{}`: the synthetic pool {pool_net} overlaps the policy's resource network {net} ({}); pick a pool no resource uses",
            if pool_net.addr().is_ipv4() { "dns.pool_v4" } else { "dns.pool_v6" },
            cfg.policy.display()
        ))
        .into());
    }
    let audit_path = cfg
        .audit_log
        .clone()
        .unwrap_or_else(|| std::path::Path::new(instance::STATE_DIR).join("agent-audit.jsonl"));
    let audit = AuditSink::open(Some(&audit_path))?;
    // One agent per tunnel address and network namespace: taken before the TUN device,
    // routes, DNS or backups.
    let _instance = InstanceLock::take(
        &instance::netns_lock_path(
            std::path::Path::new(instance::STATE_DIR),
            cfg.tun.ipv4.addr(),
        ),
        &instance::holder_text(&format!("TUN {}, config {origin}", cfg.tun.name)),
    )?;
    tracing::debug!("holding {}", _instance.path().display());
    let rt = node::runtime()?;
    rt.block_on(async move {
        let dev = tun::create(&cfg.tun)?;
        let socket =
            node::bind_udp(cfg.listen).with_context(|| format!("cannot bind {}", cfg.listen))?;
        let local = socket.local_addr()?;
        let dns_addr = SocketAddr::new(cfg.tun.ipv4.addr().into(), 53);
        // Without its DNS listener the agent still carries every flow to an address; names are
        // then the system resolver's business alone, so the system is left alone too.
        let listeners = if cfg.dns.listen {
            match dns::bind(dns_addr) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(
                        "{e:#}; running without split DNS (resource names will not resolve; `dns.listen: false` silences this)"
                    );
                    None
                }
            }
        } else {
            tracing::info!("DNS listener off (`dns.listen: false`): resource names are not answered");
            None
        };
        let dns_state: SharedDns = Arc::new(Mutex::new(DnsState {
            pool,
            policy: watcher.policy().clone(),
            flows: Default::default(),
        }));
        tracing::info!(
            "agent {:?} (peer {}): TUN {} mtu {}, relay {}",
            creds.identity.name,
            creds.identity.peer_id.short(),
            cfg.tun.name,
            cfg.tun.mtu,
            cfg.relay
        );
        let link = ControlLink::new(control_cfg, local, cfg.relay.clone());
        // `sluice status` reads the snapshot the agent publishes once a second.
        let (status_tx, status_rx) = tokio::sync::watch::channel(crate::status::AgentStatus {
            name: creds.identity.name.clone(),
            peer_id: creds.identity.peer_id.to_string(),
            relay: link.status(),
            tunnels: Vec::new(),
        });
        let subject = watcher
            .policy()
            .subject(&creds.identity.name, &creds.identity.groups);
        let mut agent = Agent {
            link,
            tunnel_cfg,
            slots: Vec::new(),
            paths: VirtualPaths::default(),
            mtu: usize::from(cfg.tun.mtu),
            stats: Stats::default(),
            out: vec![0u8; 65_536],
            watcher,
            subject,
            cert_groups: creds.identity.groups.clone(),
            device: creds.identity.peer_id.short(),
            flows: FlowCache::new(FLOW_CACHE),
            audit,
            tun_name: cfg.tun.name.clone(),
            wanted: Vec::new(),
            routed: Vec::new(),
            kept_out: Vec::new(),
            resource_slots: Vec::new(),
            dns: dns_state.clone(),
            named_buf: Vec::with_capacity(2048),
            pool_nets: (cfg.dns.pool_v4.trunc(), cfg.dns.pool_v6.trunc()),
            next_reload_check: Instant::now() + RELOAD_EVERY,
            dns_pending: HashMap::new(),
            next_dns_id: 0,
            status_tx,
            direct_paths: cfg.direct_paths,
            direct: node::DirectSetup::new(
                creds.identity.peer_id,
                local,
                Some(cfg.tun.name.clone()),
            ),
            name: creds.identity.name.clone(),
            peer_id: creds.identity.peer_id,
            udp_tx: crate::udp_batch::UdpSender::default(),
        };
        let mut nets = networks(agent.watcher.policy());
        nets.extend(pools);
        agent.set_routes(nets)?;
        tracing::info!(
            "{} resource network(s) routed into {}; flow decisions go to {}",
            agent.wanted.len(),
            cfg.tun.name,
            audit_path.display()
        );
        // The system's resolver: claimed (its lock taken, a crashed agent's change undone)
        // before the upstreams are read from it, so they are the real ones.
        let mut claim = None;
        if listeners.is_some() && cfg.dns.configure_system {
            match resolvconf::claim(&instance::holder_text(&format!("TUN {}", cfg.tun.name))) {
                Ok(c) => claim = Some(c),
                Err(e) if resolvconf::is_held(&e) => tracing::warn!(
                    "leaving the system resolver alone: {e:#} (it is this namespace's /etc/resolv.conf)"
                ),
                Err(e) => return Err(e),
            }
        }
        let upstreams: Vec<SocketAddr> = match &cfg.dns.upstream {
            Some(u) => u.clone(),
            None => dns::upstreams_from_resolv_conf(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        }
        .into_iter()
        .filter(|u| *u != dns_addr)
        .collect();
        // Restored when this goes out of scope: on return, error, or signal.
        let _system_dns = match &mut claim {
            Some(c) => Some(resolvconf::take_over(
                c,
                &cfg.tun.name,
                &dns_addr.ip().to_string(),
                &agent.watcher.policy().dns_domains(),
            )?),
            None => None,
        };
        let (ask_tx, ask_rx) = mpsc::channel(256);
        let dns_server = async {
            match listeners {
                Some(l) => dns::serve(l, dns_state.clone(), upstreams, ask_tx).await,
                None => std::future::pending().await,
            }
        };
        // Held until the agent stops, which removes the socket file. Without it the tunnels
        // still work, so a bad path is a warning, not a reason to refuse to start.
        let _status_server = match crate::status::serve(&cfg.status_socket, status_rx) {
            Ok(s) => {
                tracing::info!("status socket {}", cfg.status_socket.display());
                Some(s)
            }
            Err(e) => {
                tracing::warn!("no status socket, `sluice status` cannot reach this agent: {e}");
                None
            }
        };
        tracing::info!(
            "policy: {:?} is in group(s): {}",
            agent.subject.user,
            if agent.subject.groups.is_empty() {
                "none".into()
            } else {
                agent.subject.groups.join(", ")
            }
        );
        tokio::select! {
            r = agent.run(&dev, &socket, ask_rx) => r,
            r = dns_server => r,
            _ = node::shutdown_signal() => {
                tracing::info!("agent: shutting down ({})", agent.stats_line());
                agent.goodbye(&socket).await;
                Ok(())
            }
        }
    })
}

/// Whether two networks share an address.
fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

struct Slot {
    name: String,
    tunnel: Option<Tunnel>,
    lookup_sent: Option<Instant>,
    /// Packets (with the tunnel header's headroom) and the hostname each is addressed to.
    queue: VecDeque<(Option<Arc<str>>, Vec<u8>)>,
    /// DNS queries for the connector, held while its tunnel comes up.
    dns_queue: Vec<ControlMessage>,
    unavailable_until: Option<Instant>,
    next_keepalive: Instant,
}

impl Slot {
    /// Whether something waits for this connector's tunnel.
    fn waiting(&self) -> bool {
        !self.queue.is_empty() || !self.dns_queue.is_empty()
    }
}

#[derive(Default)]
struct Stats {
    tun_packets: u64,
    tun_bad: u64,
    no_route: u64,
    denied: u64,
    too_big: u64,
    dropped: u64,
    /// TCP segments of connections whose tunnel went away, answered with a reset.
    reset: u64,
}

struct Agent {
    link: ControlLink,
    tunnel_cfg: quiche::Config,
    /// One per connector in use, created on a flow's first packet.
    slots: Vec<Slot>,
    paths: VirtualPaths,
    mtu: usize,
    stats: Stats,
    out: Vec<u8>,
    watcher: PolicyWatcher,
    /// This agent's user as the policy sees it.
    subject: Subject,
    cert_groups: Vec<String>,
    device: String,
    flows: FlowCache<FlowKey>,
    audit: AuditSink,
    tun_name: String,
    /// The networks the policy and the synthetic pools ask to route into the TUN device.
    wanted: Vec<IpNet>,
    /// What is routed there now: `wanted` less the relay's addresses.
    routed: Vec<IpNet>,
    /// The relay addresses kept out of `routed`.
    kept_out: Vec<std::net::IpAddr>,
    /// Connector slot of each resource of the current policy, filled on first use.
    resource_slots: Vec<Option<usize>>,
    /// The synthetic address pool and policy the DNS server shares with the packet path.
    dns: SharedDns,
    /// Scratch for packets sent to a name (the name goes in front of the packet).
    named_buf: Vec<u8>,
    /// The synthetic pools, to tell without a lock whether a packet goes to a name.
    pool_nets: (ipnet::Ipv4Net, ipnet::Ipv6Net),
    next_reload_check: Instant,
    /// DNS queries sent to connectors, by request id, and where their answers go.
    dns_pending: HashMap<u32, oneshot::Sender<ConnectorReply>>,
    next_dns_id: u32,
    /// Publishes [`Agent::status`] for `sluice status`, once a second.
    status_tx: tokio::sync::watch::Sender<crate::status::AgentStatus>,
    direct: node::DirectSetup,
    /// Whether tunnels look for direct paths (`direct_paths` in the config).
    direct_paths: bool,
    /// This agent's certificate name and peer id, for the status.
    name: String,
    peer_id: PeerId,
    /// Outgoing UDP, sent in GSO batches.
    udp_tx: crate::udp_batch::UdpSender,
}

impl Agent {
    fn stats_line(&self) -> String {
        let s = &self.stats;
        format!(
            "{} packets from TUN, {} malformed, {} without route, {} denied, {} too big, {} dropped, {} reset",
            s.tun_packets, s.tun_bad, s.no_route, s.denied, s.too_big, s.dropped, s.reset
        )
    }

    async fn run(
        &mut self,
        dev: &AsyncDevice,
        socket: &UdpSocket,
        mut asks: mpsc::Receiver<ConnectorQuery>,
    ) -> Result<()> {
        let mut udp_rx = udp_batch::UdpReceiver::new(socket);
        let mut tun_rx = tun::TunReader::new(self.mtu, TUNNEL_IP_OVERHEAD);
        let mut to_tun = tun::TunWriter::default();
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
                                self.on_udp(&mut udp_rx.buf_mut()[p], from, &mut to_tun);
                                taken += 1;
                            }
                        }
                        if taken == 1 {
                            // A packet that came alone most likely is alone: deliver it before
                            // a read that would only find nothing (latency, not batching).
                            self.flush_round(dev, socket, &mut to_tun).await;
                        }
                        if taken >= node::ROUND_BATCH || udp_rx.try_recv(socket).is_err() {
                            break;
                        }
                    }
                }
                r = tun_rx.recv(dev) => {
                    let mut n = r.context("TUN receive failed")?;
                    let mut taken = 0;
                    // Take what else is queued before flushing: fewer, fuller send rounds.
                    loop {
                        for i in 0..n {
                            if let Some(pkt) = tun_rx.packet_mut(i) {
                                self.on_tun(pkt, &mut to_tun);
                            }
                        }
                        taken += n;
                        if taken == 1 {
                            // As for UDP above: a lone packet goes out before the next read.
                            self.flush_round(dev, socket, &mut to_tun).await;
                        }
                        if taken >= node::ROUND_BATCH {
                            break;
                        }
                        let Ok(more) = tun_rx.try_recv(dev) else { break };
                        n = more;
                    }
                }
                Some(q) = asks.recv() => self.on_connector_query(q, Instant::now()),
                _ = timer.fired() => self.on_timeout(Instant::now(), &mut to_tun),
            }
            self.flush_round(dev, socket, &mut to_tun).await;
        }
    }

    /// Carries out what a round of input caused: tunnel events, packets to the TUN device and
    /// datagrams to peers.
    async fn flush_round(
        &mut self,
        dev: &AsyncDevice,
        socket: &UdpSocket,
        to_tun: &mut tun::TunWriter,
    ) {
        self.on_control_events(to_tun);
        to_tun.flush(dev).await;
        self.flush(socket).await;
    }

    fn timeout(&self, now: Instant) -> Duration {
        let mut t = self
            .link
            .timeout(now)
            .min(self.next_reload_check.saturating_duration_since(now));
        for s in &self.slots {
            if let Some(tn) = &s.tunnel {
                if let Some(d) = tn.timeout() {
                    t = t.min(d);
                }
                if let Some(d) = tn.deadline() {
                    t = t.min(d.saturating_duration_since(now));
                }
                t = t.min(s.next_keepalive.saturating_duration_since(now));
            }
        }
        t
    }

    fn on_timeout(&mut self, now: Instant, to_tun: &mut tun::TunWriter) {
        self.link.on_timeout(now);
        // Before anything is sent to a relay address that resolved anew.
        self.check_relay_routes();
        if now >= self.next_reload_check {
            self.next_reload_check = now + RELOAD_EVERY;
            self.check_reload();
            // Queries whose asker gave up (it timed out) need no answer.
            self.dns_pending.retain(|_, tx| !tx.is_closed());
            if let Ok(mut st) = self.dns.lock() {
                let st = &mut *st;
                st.flows.sweep(&mut st.pool, now_unix().max(0) as u64);
            }
            let _ = self.status_tx.send(self.status());
            // A new interface address is a network change: the tunnels try direct again.
            if let Some(c) = self.direct.refresh() {
                self.set_candidates(&c, now);
            }
        }
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(t) = &mut slot.tunnel {
                if t.timeout() == Some(Duration::ZERO) {
                    t.on_timeout();
                }
                if t.deadline().is_some_and(|d| d <= now) {
                    t.on_deadline(now);
                }
                if now >= slot.next_keepalive {
                    slot.next_keepalive = now + node::TUNNEL_KEEPALIVE;
                    if t.is_up() {
                        t.keepalive();
                    }
                }
            }
            if slot.tunnel.is_none()
                && slot.waiting()
                && slot
                    .lookup_sent
                    .is_none_or(|t| now.duration_since(t) > LOOKUP_RETRY)
            {
                self.start_lookup(i, now);
            }
            self.tunnel_events(i, to_tun);
        }
    }

    fn on_udp(&mut self, pkt: &mut [u8], from: SocketAddr, to_tun: &mut tun::TunWriter) {
        let now = Instant::now();
        match node::classify(pkt, from, self.link.relay_addr()) {
            node::Incoming::Control => {}
            node::Incoming::Punch(p) => {
                let Some(i) = self.slot_of_peer(&p.from) else {
                    return self
                        .direct
                        .refuse(from, &"punch from a peer with no tunnel here");
                };
                if let Some(t) = &mut self.slots[i].tunnel {
                    if let Err(e) = t.on_punch(from, &p, now) {
                        self.direct.refuse(from, &e);
                    }
                }
                return self.tunnel_events(i, to_tun);
            }
            node::Incoming::Direct { dcid } => {
                let Some(i) = self
                    .slots
                    .iter()
                    .position(|s| s.tunnel.as_ref().is_some_and(|t| t.owns_cid(&dcid)))
                else {
                    return self
                        .direct
                        .refuse(from, &"QUIC packet for no tunnel of ours");
                };
                if let Some(t) = &mut self.slots[i].tunnel {
                    t.recv_direct(pkt, from, self.direct.local);
                }
                self.deliver(i, to_tun);
                return self.tunnel_events(i, to_tun);
            }
            node::Incoming::Junk(why) => return self.direct.refuse(from, &why),
        }
        self.link.recv(pkt, from, now);
        let mut buf = std::mem::take(&mut self.out);
        while let Some((peer, data)) = self.link.connected().and_then(|c| c.recv_forward(&mut buf))
        {
            let Some(i) = self.slot_of_peer(&peer) else {
                self.stats.dropped += 1;
                continue;
            };
            if let Some(t) = &mut self.slots[i].tunnel {
                t.recv_relayed(data);
            }
            self.deliver(i, to_tun);
            self.tunnel_events(i, to_tun);
        }
        self.out = buf;
    }

    fn slot_of_peer(&self, peer: &PeerId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.tunnel.as_ref().is_some_and(|t| t.peer() == *peer))
    }

    /// IP packets that came out of slot `i`'s tunnel, for the TUN device.
    fn deliver(&mut self, i: usize, to_tun: &mut tun::TunWriter) {
        let Some(t) = &mut self.slots[i].tunnel else {
            return;
        };
        let mut buf = [0u8; 2048];
        while let Some(r) = t.recv_ip(&mut buf) {
            to_tun.push(&buf[r.packet]);
        }
    }

    fn on_tun(&mut self, buf: &mut [u8], to_tun: &mut tun::TunWriter) {
        self.stats.tun_packets += 1;
        let pkt = &buf[TUNNEL_IP_OVERHEAD..];
        let info = match packet::inspect(pkt) {
            Ok(i) => i,
            Err(e) => {
                self.stats.tun_bad += 1;
                tracing::debug!(
                    "TUN: dropping a malformed packet ({} bytes): {e}",
                    pkt.len()
                );
                return;
            }
        };
        let Some((i, name)) = self.admit(&info, pkt, to_tun) else {
            return;
        };
        let now = Instant::now();
        // A packet to a name carries the name in front: the tunnel has that much less room.
        let extra = name
            .as_deref()
            .map_or(0, |n| named_ip_overhead(n) - TUNNEL_IP_OVERHEAD);
        let max = self.slots[i]
            .tunnel
            .as_ref()
            .and_then(|t| t.max_ip_len())
            .map_or(self.mtu, |m| m.saturating_sub(extra).min(self.mtu));
        if pkt.len() > max {
            self.stats.too_big += 1;
            if let Some(icmp) = packet::icmp_too_big(pkt, &info, max as u16) {
                to_tun.push(&icmp);
            }
            return;
        }
        let slot = &mut self.slots[i];
        if let Some(t) = slot.tunnel.as_mut().filter(|t| t.is_up()) {
            match send_packet(t, buf, name.as_deref(), &mut self.named_buf) {
                Ok(()) => {}
                Err(TunnelError::TooBig { max, .. }) => {
                    self.stats.too_big += 1;
                    let pkt = &buf[TUNNEL_IP_OVERHEAD..];
                    if let Some(icmp) = packet::icmp_too_big(pkt, &info, max as u16) {
                        to_tun.push(&icmp);
                    }
                }
                Err(e) => {
                    self.stats.dropped += 1;
                    tracing::debug!("tunnel to {}: dropping a packet: {e}", slot.name);
                }
            }
            return;
        }
        if info.proto == packet::PROTO_TCP && !info.tcp.syn {
            // A segment of a connection whose tunnel is gone (the connector stopped or
            // restarted): no new tunnel can carry it on, so the app hears it now, not after
            // its retransmissions give up.
            self.stats.reset += 1;
            if let Some(rst) = packet::tcp_rst(&info) {
                to_tun.push(&rst);
            }
            return;
        }
        if slot.unavailable_until.is_some_and(|u| now < u) {
            if let Some(icmp) = packet::icmp_unreachable(pkt, &info, Unreachable::Host) {
                to_tun.push(&icmp);
            }
            return;
        }
        if slot.queue.len() >= QUEUE_MAX {
            self.stats.dropped += 1;
            return;
        }
        slot.queue.push_back((name, buf.to_vec()));
        if slot.tunnel.is_none()
            && slot
                .lookup_sent
                .is_none_or(|t| now.duration_since(t) > LOOKUP_RETRY)
        {
            self.start_lookup(i, now);
        }
    }

    /// The policy's fast path: the connector slot for an allowed packet, or None after
    /// answering a denied one (TCP reset, or ICMP administratively prohibited) at once.
    fn admit(
        &mut self,
        info: &packet::PacketInfo,
        pkt: &[u8],
        to_tun: &mut tun::TunWriter,
    ) -> Option<(usize, Option<Arc<str>>)> {
        if !is_unicast_global(info.dst) {
            // Link-local and multicast chatter of the interface itself (IPv6 router
            // solicitations, MLD): not a flow to any resource.
            self.stats.no_route += 1;
            return None;
        }
        let Some(mut flow): Option<sluice_policy::Flow<'_>> = access::flow_of(info) else {
            // The kernel routes only resource networks here; other protocols are not allowed.
            self.stats.no_route += 1;
            if let Some(icmp) = packet::icmp_unreachable(pkt, info, Unreachable::Prohibited) {
                to_tun.push(&icmp);
            }
            return None;
        };
        let sport = info.echo.map_or(info.src_port, |e| e.id);
        let key: FlowKey = (info.src, info.dst, info.proto, sport, info.dst_port);
        // A synthetic address stands for the hostname it was handed out for.
        // Only packets to the synthetic pools take the lock the DNS server shares.
        let synthetic = match info.dst {
            std::net::IpAddr::V4(a) => self.pool_nets.0.contains(&a),
            std::net::IpAddr::V6(a) => self.pool_nets.1.contains(&a),
        };
        let name: Option<Arc<str>> = if synthetic {
            match self.synthetic_name(info, key) {
                Some(n) => Some(n),
                None => {
                    // An address no name holds (the pool recycled it, or it was never given).
                    if let Some(icmp) = packet::icmp_unreachable(pkt, info, Unreachable::Host) {
                        to_tun.push(&icmp);
                    }
                    return None;
                }
            }
        } else {
            None
        };
        flow.hostname = name.as_deref();
        let now = now_unix();
        let generation = self.watcher.generation();
        let d = match self.flows.get(&key, generation, now) {
            Some(d) => d,
            None => {
                let policy = self.watcher.policy();
                let d = policy.decide(&self.subject, &flow, now);
                self.flows.insert(key, generation, d);
                let rec = FlowRecord {
                    enforcer: "agent",
                    user: &self.subject.user,
                    device: &self.device,
                    src: info.src,
                    src_port: sport,
                    flow: &flow,
                };
                self.audit.record(policy, &rec, &d);
                d
            }
        };
        match d.resource.filter(|_| d.allowed()) {
            Some(r) => Some((self.slot_of_resource(r), name)),
            None => {
                self.stats.denied += 1;
                // Answering an ICMP error with an ICMP error is never done; a RST is not
                // answered either (packet helpers refuse both).
                let reply = if info.proto == packet::PROTO_TCP {
                    packet::tcp_rst(info)
                } else {
                    packet::icmp_unreachable(pkt, info, Unreachable::Prohibited)
                };
                if let Some(r) = reply {
                    to_tun.push(&r);
                }
                None
            }
        }
    }

    /// The connector slot serving resource `r`, remembered per resource until the next reload
    /// so the packet path does no name lookups.
    fn slot_of_resource(&mut self, r: sluice_policy::matcher::ResourceId) -> usize {
        let r = r as usize;
        if let Some(Some(i)) = self.resource_slots.get(r) {
            return *i;
        }
        let name = self.watcher.policy().resource(r as u32).connector.clone();
        let i = self.slot_index(&name);
        if self.resource_slots.len() <= r {
            self.resource_slots.resize(r + 1, None);
        }
        self.resource_slots[r] = Some(i);
        i
    }

    /// The hostname a packet's synthetic destination stands for; the packet's flow keeps the
    /// name's addresses in use.
    fn synthetic_name(&self, info: &packet::PacketInfo, key: FlowKey) -> Option<Arc<str>> {
        let mut st = self.dns.lock().ok()?;
        let st = &mut *st;
        let name = st.pool.shared_name_of(info.dst)?;
        let now = now_unix().max(0) as u64;
        st.flows
            .packet(&mut st.pool, key, info.dst, info.proto, info.tcp, now);
        Some(name)
    }

    /// A query for a resource name's records other than A/AAAA: sent to the connector serving
    /// the name, if this user may see them.
    fn on_connector_query(&mut self, q: ConnectorQuery, now: Instant) {
        let policy = self.watcher.policy().clone();
        let Some(r) = policy.name_allowed(&self.subject, &q.name, now_unix(), None) else {
            let _ = q.reply.send(ConnectorReply::Hidden);
            return;
        };
        let i = self.slot_of_resource(r);
        self.next_dns_id = self.next_dns_id.wrapping_add(1);
        let id = self.next_dns_id;
        let msg = ControlMessage::DnsQuery {
            id,
            message: q.query,
        };
        let slot = &mut self.slots[i];
        if let Some(t) = slot.tunnel.as_mut().filter(|t| t.is_up()) {
            if let Err(e) = t.send_message(&msg) {
                tracing::debug!("tunnel to {}: cannot send a DNS query: {e}", slot.name);
                let _ = q.reply.send(ConnectorReply::Unavailable);
                return;
            }
        } else if slot.unavailable_until.is_some_and(|u| now < u)
            || slot.dns_queue.len() >= DNS_QUEUE_MAX
        {
            let _ = q.reply.send(ConnectorReply::Unavailable);
            return;
        } else {
            slot.dns_queue.push(msg);
            if slot.tunnel.is_none()
                && slot
                    .lookup_sent
                    .is_none_or(|t| now.duration_since(t) > LOOKUP_RETRY)
            {
                self.start_lookup(i, now);
            }
        }
        self.dns_pending.insert(id, q.reply);
    }

    fn slot_index(&mut self, connector: &str) -> usize {
        if let Some(i) = self.slots.iter().position(|s| s.name == connector) {
            return i;
        }
        self.slots.push(Slot {
            name: connector.to_string(),
            tunnel: None,
            lookup_sent: None,
            queue: VecDeque::new(),
            dns_queue: Vec::new(),
            unavailable_until: None,
            next_keepalive: Instant::now(),
        });
        self.slots.len() - 1
    }

    /// Applies a changed policy file: new subject, new routes, and every cached decision is
    /// stale (flows are re-decided on their next packet).
    fn check_reload(&mut self) {
        if !access::reload(&mut self.watcher) {
            return;
        }
        let policy = self.watcher.policy().clone();
        self.subject = policy.subject(&self.subject.user, &self.cert_groups);
        self.resource_slots.clear();
        if let Ok(mut st) = self.dns.lock() {
            st.policy = policy.clone();
        }
        let mut nets = networks(&policy);
        if let Ok(st) = self.dns.lock() {
            nets.push(IpNet::V4(st.pool.v4_net()));
            nets.push(IpNet::V6(st.pool.v6_net()));
        }
        if let Err(e) = self.set_routes(nets) {
            tracing::warn!("policy reload: {e:#}");
        }
    }

    /// Routes `wanted` into the TUN device, less the relay's addresses (whatever the policy
    /// says, the agent's own way to the relay never goes into its tunnel), changing only what
    /// differs from the routes in place.
    fn set_routes(&mut self, mut wanted: Vec<IpNet>) -> Result<()> {
        wanted.sort();
        wanted.dedup();
        let relay = self.link.relay_addrs();
        let (nets, hits) = tun::without(&wanted, &relay);
        for (net, ip) in &hits {
            if !self.kept_out.contains(ip) {
                tracing::warn!(
                    "the policy routes {net} into the tunnel, which holds the relay's address {ip}: {ip} stays outside the tunnel"
                );
            }
        }
        self.kept_out = hits.iter().map(|(_, ip)| *ip).collect();
        self.kept_out.sort();
        self.kept_out.dedup();
        let added: Vec<IpNet> = nets
            .iter()
            .filter(|n| !self.routed.contains(n))
            .copied()
            .collect();
        let removed: Vec<IpNet> = self
            .routed
            .iter()
            .filter(|n| !nets.contains(n))
            .copied()
            .collect();
        // Added first: a network split anew keeps a route at every moment.
        let add = tun::add_routes(&self.tun_name, &added);
        let del = tun::remove_routes(&self.tun_name, &removed);
        self.routed = nets;
        if wanted != self.wanted {
            for s in &mut self.slots {
                if let Some(t) = &mut s.tunnel {
                    t.exclude_from_direct(wanted.clone());
                }
            }
            self.wanted = wanted;
        }
        add.and(del)
    }

    /// The relay's addresses changed (a name resolved anew): keep them out of the routes.
    fn check_relay_routes(&mut self) {
        let mut inside: Vec<std::net::IpAddr> = self
            .link
            .relay_addrs()
            .into_iter()
            .filter(|ip| self.wanted.iter().any(|n| n.contains(ip)))
            .collect();
        inside.sort();
        inside.dedup();
        if inside == self.kept_out {
            return;
        }
        if let Err(e) = self.set_routes(self.wanted.clone()) {
            tracing::warn!("routes around the relay: {e:#}");
        }
    }

    fn start_lookup(&mut self, i: usize, now: Instant) {
        let name = self.slots[i].name.clone();
        if let Some(c) = self.link.connected() {
            if c.lookup(&name).is_ok() {
                tracing::debug!("looking up connector {name:?}");
                self.slots[i].lookup_sent = Some(now);
            }
        }
    }

    fn on_control_events(&mut self, to_tun: &mut tun::TunWriter) {
        let now = Instant::now();
        while let Some(ev) = self.link.poll_event() {
            match ev {
                ControlEvent::Connected { .. } => {
                    for i in 0..self.slots.len() {
                        if self.slots[i].tunnel.is_none() && self.slots[i].waiting() {
                            self.start_lookup(i, now);
                        }
                    }
                }
                ControlEvent::LookupReply { name, peer } => {
                    for i in 0..self.slots.len() {
                        if self.slots[i].name != name || self.slots[i].tunnel.is_some() {
                            continue;
                        }
                        self.slots[i].lookup_sent = None;
                        match peer {
                            Some(peer) => self.open_tunnel(i, peer),
                            None => {
                                tracing::warn!("connector {name:?} is not connected to the relay");
                                let slot = &mut self.slots[i];
                                slot.unavailable_until = Some(now + UNAVAILABLE_FOR);
                                for m in slot.dns_queue.drain(..) {
                                    if let ControlMessage::DnsQuery { id, .. } = m {
                                        if let Some(tx) = self.dns_pending.remove(&id) {
                                            let _ = tx.send(ConnectorReply::Unavailable);
                                        }
                                    }
                                }
                                for (_, p) in slot.queue.drain(..) {
                                    let ip = &p[TUNNEL_IP_OVERHEAD..];
                                    if let Ok(info) = packet::inspect(ip) {
                                        if let Some(icmp) =
                                            packet::icmp_unreachable(ip, &info, Unreachable::Host)
                                        {
                                            to_tun.push(&icmp);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                ControlEvent::ObservedAddr(a) => {
                    if let Some(c) = self.direct.set_observed(a) {
                        self.set_candidates(&c, now);
                    }
                }
                ControlEvent::Closed(_) => {}
            }
        }
    }

    fn open_tunnel(&mut self, i: usize, peer: PeerId) {
        let path = self.paths.addr_of(peer);
        let slot = &mut self.slots[i];
        match Tunnel::connect(&mut self.tunnel_cfg, peer, &slot.name, path) {
            Ok(t) => {
                tracing::info!(
                    "opening tunnel to connector {:?} (peer {}) via the relay",
                    slot.name,
                    peer.short()
                );
                slot.tunnel = Some(t);
                slot.next_keepalive = Instant::now() + node::TUNNEL_KEEPALIVE;
            }
            Err(e) => tracing::warn!("cannot open tunnel to {:?}: {e}", slot.name),
        }
    }

    fn tunnel_events(&mut self, i: usize, to_tun: &mut tun::TunWriter) {
        let slot = &mut self.slots[i];
        let Some(t) = &mut slot.tunnel else { return };
        while let Some(ev) = t.poll_event() {
            match ev {
                TunnelEvent::Up(id) => {
                    tracing::info!(
                        "tunnel to {id} is up via the relay (rtt {:?}); sending {} queued packet(s)",
                        t.rtt().unwrap_or_default(),
                        slot.queue.len()
                    );
                    slot.unavailable_until = None;
                    if self.direct_paths {
                        t.enable_direct(
                            self.direct.me,
                            self.direct.local,
                            self.direct.candidates.clone(),
                            self.wanted.clone(),
                            Instant::now(),
                        );
                    }
                    while let Some((name, mut p)) = slot.queue.pop_front() {
                        if send_packet(t, &mut p, name.as_deref(), &mut self.named_buf).is_err() {
                            self.stats.dropped += 1;
                        }
                    }
                    for m in slot.dns_queue.drain(..) {
                        if let Err(e) = t.send_message(&m) {
                            tracing::debug!(
                                "tunnel to {}: cannot send a DNS query: {e}",
                                slot.name
                            );
                        }
                    }
                }
                TunnelEvent::Message(ControlMessage::DnsAnswer { id, message }) => {
                    if let Some(tx) = self.dns_pending.remove(&id) {
                        let _ = tx.send(ConnectorReply::Answer(message));
                    }
                }
                TunnelEvent::Message(other) => {
                    tracing::debug!("tunnel to {}: unexpected message {other:?}", slot.name);
                }
                TunnelEvent::PathChanged(path) => {
                    tracing::info!(
                        "tunnel to {}: now {}",
                        slot.name,
                        crate::connector::describe_path(path)
                    );
                }
                TunnelEvent::DirectFailed(addr) => {
                    tracing::info!(
                        "tunnel to {}: direct path to {addr} failed; relayed, trying again in {}s",
                        slot.name,
                        RETRY_AFTER.as_secs()
                    );
                }
                TunnelEvent::DirectNotFound => {
                    tracing::info!(
                        "tunnel to {}: no direct path found; staying relayed, trying again in {}s",
                        slot.name,
                        RETRY_AFTER.as_secs()
                    );
                }
                TunnelEvent::Closed(why) => {
                    tracing::warn!("tunnel to connector {:?} closed: {why}", slot.name);
                }
            }
        }
        if t.is_closed() {
            slot.tunnel = None;
        }
        let _ = to_tun;
    }

    /// Says goodbye before exiting: connectors and the relay hear the close at once.
    async fn goodbye(&mut self, socket: &UdpSocket) {
        for s in &mut self.slots {
            if let Some(t) = &mut s.tunnel {
                t.goodbye();
            }
        }
        self.flush(socket).await;
        self.link.goodbye();
        self.flush(socket).await;
    }

    async fn flush(&mut self, socket: &UdpSocket) {
        let mut tunnels: Vec<&mut Tunnel> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.tunnel.as_mut())
            .collect();
        node::flush(
            &mut self.link,
            &mut tunnels,
            socket,
            &mut self.out,
            &mut self.udp_tx,
        )
        .await;
    }

    /// A snapshot for `sluice status`: the relay link and the tunnel of every connector used.
    /// Tells every tunnel our new candidates.
    fn set_candidates(&mut self, c: &[Candidate], now: Instant) {
        for s in &mut self.slots {
            if let Some(t) = &mut s.tunnel {
                t.set_candidates(c.to_vec(), now);
            }
        }
    }

    fn status(&self) -> crate::status::AgentStatus {
        use crate::status::{millis, secs, PathKind, TunnelState, TunnelStatus};
        use sluice_dataplane::tunnel::Path;
        let now = Instant::now();
        let age = |t: Instant| secs(now.saturating_duration_since(t));
        let tunnels = self
            .slots
            .iter()
            .map(|s| {
                let Some(t) = &s.tunnel else {
                    // Closed tunnels are dropped; the slot says whether a new one is coming.
                    let coming = s.waiting() || s.lookup_sent.is_some();
                    let state = if coming {
                        TunnelState::Connecting
                    } else {
                        TunnelState::Closed
                    };
                    return TunnelStatus::without_tunnel(s.name.clone(), state);
                };
                let st = t.stats();
                let (path, direct_addr) = match st.path {
                    Path::Relay => (PathKind::Relay, None),
                    Path::Direct(a) => (PathKind::Direct, Some(a.to_string())),
                };
                let state = if t.is_closed() {
                    TunnelState::Closed
                } else if t.is_up() {
                    TunnelState::Up
                } else {
                    TunnelState::Connecting
                };
                TunnelStatus {
                    connector: s.name.clone(),
                    peer_id: Some(t.peer().to_string()),
                    state,
                    path,
                    candidate_pair: candidate_pair(t),
                    direct_addr,
                    // Before the handshake quiche reports its initial guess, not a measurement.
                    rtt_ms: st.rtt.filter(|_| t.is_up()).map(millis),
                    bytes_sent: st.bytes_sent,
                    bytes_received: st.bytes_received,
                    packets_sent: st.packets_sent,
                    packets_received: st.packets_received,
                    since_switch_secs: st.path_changed_at.map(age),
                    up_secs: st.up_at.map_or(0.0, age),
                }
            })
            .collect();
        crate::status::AgentStatus {
            name: self.name.clone(),
            peer_id: self.peer_id.to_string(),
            relay: self.link.status(),
            tunnels,
        }
    }
}

/// The pair a direct tunnel uses: the peer's address, and ours as the peer sees it (the
/// reflexive candidate when a NAT is in the way, else the host one).
fn candidate_pair(t: &Tunnel) -> Option<crate::status::CandidatePair> {
    let sluice_dataplane::tunnel::Path::Direct(remote) = t.path() else {
        return None;
    };
    let (local, _) = t.candidates()?;
    let ours = local
        .iter()
        .filter(|c| c.addr.is_ipv4() == remote.is_ipv4())
        .max_by_key(|c| (c.kind == Kind::ServerReflexive, c.priority))?;
    Some(crate::status::CandidatePair {
        local: format!("{} {}", ours.kind, ours.addr),
        remote: remote.to_string(),
    })
}

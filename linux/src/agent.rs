//! `sluice agent` on Linux: the host around the agent engine (`sluice_dataplane::engine`).
//! The engine decides everything; this file moves bytes and applies what it asks for: the TUN
//! device (tun-rs with offloads), the UDP socket (GSO/GRO batches), routes, the system resolver
//! (resolv.conf or systemd-resolved), the DNS sockets when the DNS address is the TUN's own,
//! the policy file, the audit log, the status socket and signals.
//!
//! One task owns the engine and every socket, so packets of a flow keep their order and no
//! locks sit on the packet path.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use sluice_dataplane::engine::{
    DnsConfig, Engine, EngineConfig, EngineError, Event, Settings, SocketKind, DEVICE_HEADROOM,
};
use sluice_dataplane::identity::Role;
use sluice_policy::watch::PolicyWatcher;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tun_rs::AsyncDevice;

use crate::access::{self, AuditSink};
use crate::cert_watch::CertWatch;
use crate::config::{self, AgentConfig, ConfigError};
use crate::dns::{self, TcpQuery};
use crate::instance::{self, InstanceLock};
use crate::metrics::{CertExpiry, NodeRole, Sample};
use crate::node;
use crate::ops::Ops;
use crate::status::NodeStatus;
use crate::{resolvconf, tun, udp_batch, AgentArgs};

/// How often the host looks at the policy file, the interface addresses and publishes status.
const EVERY_SECOND: Duration = Duration::from_secs(1);
/// A UDP DNS client whose query got no answer by then is forgotten (the engine answers or
/// fails every query it can parse within a few seconds).
const DNS_CLIENT_TTL: Duration = Duration::from_secs(10);
/// DNS clients remembered at once (UDP queries in flight to the engine).
const DNS_CLIENTS_MAX: usize = 4096;

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
    if let Some(p) = &args.policy {
        cfg.policy = p.clone();
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
    let watcher = access::open_policy(&cfg.policy, &origin)?;
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
        let socket =
            node::bind_udp(cfg.listen).with_context(|| format!("cannot bind {}", cfg.listen))?;
        let local = socket.local_addr()?;
        let dns_addr = cfg.dns_address();
        // The TUN device's own address is delivered locally: queries to it come on sockets.
        // Any other DNS address is routed into the device and answered in the packet path.
        let own = dns_addr == IpAddr::V4(cfg.tun.ipv4.addr())
            || cfg.tun.ipv6.is_some_and(|v6| IpAddr::V6(v6.addr()) == dns_addr);
        let engine_cfg = EngineConfig {
            relay: cfg.relay.clone(),
            local,
            ipv4: cfg.tun.ipv4,
            ipv6: cfg.tun.ipv6,
            mtu: cfg.tun.mtu,
            dns: DnsConfig {
                enabled: cfg.dns.listen,
                address: dns_addr,
                pool_v4: cfg.dns.pool_v4,
                pool_v6: cfg.dns.pool_v6,
                max_names: cfg.dns.max_names,
                // Read from the system once its resolver is claimed, below.
                upstreams: Vec::new(),
            },
            direct_paths: cfg.direct_paths,
            interface_ips: node::interface_ips(Some(&cfg.tun.name)),
            instance: rand::random::<u64>() | 1,
        };
        let mut engine = Engine::new(
            engine_cfg,
            &creds,
            watcher.policy().clone(),
            Instant::now(),
            node::unix_nanos(),
        )
        .map_err(|e| match e {
            EngineError::Pool(e) => ConfigError(format!("{origin}: `dns`: {e}")).into(),
            EngineError::PoolOverlap { pool, net } => ConfigError(format!(
                "{origin}: `{}`: the synthetic pool {pool} overlaps the policy's resource network {net} ({}); pick a pool no resource uses",
                if pool.addr().is_ipv4() { "dns.pool_v4" } else { "dns.pool_v6" },
                cfg.policy.display()
            ))
            .into(),
            other => anyhow::Error::from(other),
        })?;
        let dev = tun::create(&cfg.tun)?;
        tracing::info!(
            "agent {:?} (peer {}): TUN {} mtu {}, relay {}",
            creds.identity.name,
            creds.identity.peer_id.short(),
            cfg.tun.name,
            cfg.tun.mtu,
            cfg.relay
        );
        let mut dns_on = cfg.dns.listen;
        let listeners = if dns_on && own {
            match dns::bind(SocketAddr::new(dns_addr, 53)) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(
                        "{e:#}; running without split DNS (resource names will not resolve; `dns.listen: false` silences this)"
                    );
                    dns_on = false;
                    None
                }
            }
        } else {
            if !dns_on {
                tracing::info!(
                    "DNS listener off (`dns.listen: false`): resource names are not answered"
                );
            }
            None
        };
        let upstream_cfg = cfg.dns.upstream.clone();
        // The system's resolver: claimed (its lock taken, a crashed agent's change undone)
        // before the upstreams are read from it, so they are the real ones.
        let mut claim = None;
        if dns_on && cfg.dns.configure_system {
            match resolvconf::claim(&instance::holder_text(&format!("TUN {}", cfg.tun.name))) {
                Ok(c) => claim = Some(c),
                Err(e) if resolvconf::is_held(&e) => tracing::warn!(
                    "leaving the system resolver alone: {e:#} (it is this namespace's /etc/resolv.conf)"
                ),
                Err(e) => return Err(e),
            }
        }
        let upstreams: Vec<SocketAddr> = match upstream_cfg {
            Some(u) => u,
            None => dns::upstreams_from_resolv_conf(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        };
        engine.set_upstreams(upstreams);
        let (status_tx, status_rx) = watch::channel(NodeStatus::Agent(engine.status(Instant::now())));
        let (host_tx, host_rx) = mpsc::channel::<HostMsg>(256);
        let mut host = Host {
            engine,
            watcher,
            audit,
            tun_name: cfg.tun.name.clone(),
            mtu: usize::from(cfg.tun.mtu),
            routed: Vec::new(),
            settings: None,
            status_tx,
            out: vec![0u8; 65_536],
            udp_tx: udp_batch::UdpSender::default(),
            upstream_v4: None,
            upstream_v6: None,
            dns_clients: HashMap::new(),
            tcp_clients: HashMap::new(),
            next_token: 0,
            next_second: Instant::now() + EVERY_SECOND,
            interfaces: Vec::new(),
            host_tx,
            pending: Vec::new(),
            ops: None,
            certs: None,
            reload: None,
            cert_watch: None,
        };
        // The first settings: routes before anything is sent through the device.
        host.apply_first_events()?;
        tracing::info!(
            "{} network(s) routed into {}; flow decisions go to {}",
            host.routed.len(),
            cfg.tun.name,
            audit_path.display()
        );
        // Restored when this goes out of scope: on return, error, or signal.
        let domains = host.settings.as_ref().map(|s| s.match_domains.clone()).unwrap_or_default();
        let _system_dns = match &mut claim {
            Some(c) => Some(resolvconf::take_over(
                c,
                &cfg.tun.name,
                &dns_addr.to_string(),
                &domains,
            )?),
            None => None,
        };
        if dns_on {
            tracing::info!(
                "DNS on {dns_addr} ({})",
                match &listeners {
                    Some(l) if l.tcp.is_some() => "udp, tcp",
                    Some(_) => "udp",
                    None => "in the packet path, udp and tcp",
                }
            );
        }
        // Held until the agent stops, which removes the socket file. Without it the tunnels
        // still work, so a bad path is a warning, not a reason to refuse to start.
        let _status_server = crate::status::serve_or_warn(&cfg.status_socket, status_rx, "agent");
        let certs = node::cert_expiry(&creds, &cfg.ca);
        host.ops = Some(Ops::start(cfg.metrics_listen, Sample::starting(NodeRole::Agent, certs)).await?);
        host.certs = Some(certs);
        host.cert_watch = Some(CertWatch::new(cfg.identity(), Role::Agent, &origin, creds));
        host.reload = Some(Reload {
            config: args.config.clone(),
            policy_flag: args.policy.clone(),
            origin: origin.clone(),
            count: (0, 0),
        });
        // The TUN device is up and routed: systemd hears READY=1 now.
        host.publish(Instant::now());
        let mut shutdown = std::pin::pin!(node::shutdown_signal());
        tokio::select! {
            r = host.run(&dev, &socket, listeners, host_rx) => r,
            _ = &mut shutdown => {
                if let Some(ops) = &host.ops {
                    ops.stopping();
                }
                host.engine.shut_down();
                host.flush(&socket).await;
                Ok(())
            }
        }
    })
}

/// `sluice cleanup`: restores the resolv.conf an agent that was killed left rewritten (its
/// unit's `ExecStopPost`). A running agent holds the file's lock, and then nothing is touched.
pub fn cleanup() -> Result<()> {
    match resolvconf::claim(&instance::holder_text("sluice cleanup")) {
        // Restored (and logged) by the claim; the lock goes with it.
        Ok(_) => {
            tracing::info!("cleanup: /etc/resolv.conf is the system's");
            Ok(())
        }
        Err(e) if resolvconf::is_held(&e) => {
            tracing::info!(
                "cleanup: an agent is running and holds /etc/resolv.conf; nothing to do"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// What the host's helper tasks send back to its loop.
enum HostMsg {
    /// An upstream exchange over TCP ended.
    TcpAnswer { id: u64, answer: Option<Vec<u8>> },
    /// The relay name resolved (or did not).
    Resolved(Result<Vec<SocketAddr>, String>),
}

struct Host {
    engine: Engine,
    watcher: PolicyWatcher,
    audit: AuditSink,
    tun_name: String,
    mtu: usize,
    /// The routes in place in the TUN device.
    routed: Vec<IpNet>,
    settings: Option<Settings>,
    status_tx: watch::Sender<NodeStatus>,
    out: Vec<u8>,
    /// Outgoing UDP on the peer socket, sent in GSO batches.
    udp_tx: udp_batch::UdpSender,
    /// Sockets for upstream DNS queries, one per address family, opened on first use.
    upstream_v4: Option<Arc<UdpSocket>>,
    upstream_v6: Option<Arc<UdpSocket>>,
    /// UDP DNS clients waiting for the engine's answer, by token.
    dns_clients: HashMap<u64, (SocketAddr, Instant)>,
    /// TCP DNS clients waiting, by token.
    tcp_clients: HashMap<u64, oneshot::Sender<Vec<u8>>>,
    next_token: u64,
    next_second: Instant,
    /// The interface addresses last told to the engine.
    interfaces: Vec<IpAddr>,
    /// Where helper tasks (resolutions, TCP exchanges) send their results.
    host_tx: mpsc::Sender<HostMsg>,
    /// Events taken before the loop ran, carried out at its first round.
    pending: Vec<Event>,
    /// Metrics and systemd, once the TUN device is up.
    ops: Option<Ops>,
    certs: Option<CertExpiry>,
    reload: Option<Reload>,
    /// The certificate files, watched for a renewal once the agent runs.
    cert_watch: Option<CertWatch>,
}

/// What a SIGHUP reads again.
struct Reload {
    config: PathBuf,
    /// `--policy`, which outranks the file's `policy` on reload too.
    policy_flag: Option<PathBuf>,
    origin: String,
    /// Reloads that took, and that failed.
    count: (u64, u64),
}

/// A datagram from `sock`, or never when there is no socket.
async fn recv_opt(
    sock: Option<&Arc<UdpSocket>>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

impl Host {
    async fn run(
        &mut self,
        dev: &AsyncDevice,
        socket: &UdpSocket,
        listeners: Option<dns::Listeners>,
        mut host_rx: mpsc::Receiver<HostMsg>,
    ) -> Result<()> {
        let mut udp_rx = udp_batch::UdpReceiver::new(socket);
        let mut tun_rx = tun::TunReader::new(self.mtu, DEVICE_HEADROOM);
        let mut to_tun = tun::TunWriter::default();
        let (tcp_query_tx, mut tcp_query_rx) = mpsc::channel::<TcpQuery>(64);
        let (dns_udp, dns_tcp) = match listeners {
            Some(l) => (Some(Arc::new(l.udp)), l.tcp),
            None => (None, None),
        };
        let mut dns_buf = vec![0u8; 65_535];
        let mut up4_buf = vec![0u8; 65_535];
        let mut up6_buf = vec![0u8; 65_535];
        // The control link's first Initial is queued already: send it now, not at the first
        // timer.
        self.flush_round(dev, socket, &mut to_tun).await;
        let mut timer = node::LoopTimer::new();
        let mut hangups = node::Hangups::new();
        loop {
            let now = Instant::now();
            let due = self.engine.poll_timeout(now).min(self.next_second);
            timer.rearm(due.saturating_duration_since(now));
            tokio::select! {
                r = udp_rx.recv(socket) => {
                    r.context("UDP receive failed")?;
                    let mut taken = 0;
                    loop {
                        let now = Instant::now();
                        let (len, segment) = udp_rx.layout();
                        if let Some(from) = udp_rx.from() {
                            for p in udp_batch::segments(len, segment) {
                                self.engine.handle_datagram(
                                    SocketKind::Peer,
                                    from,
                                    &mut udp_rx.buf_mut()[p],
                                    now,
                                );
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
                        let now = Instant::now();
                        for i in 0..n {
                            if let Some(pkt) = tun_rx.packet_mut(i) {
                                self.engine.handle_device_packet(pkt, now);
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
                r = recv_opt(self.upstream_v4.as_ref(), &mut up4_buf) => {
                    if let Ok((n, from)) = r {
                        self.engine.handle_datagram(SocketKind::Dns, from, &mut up4_buf[..n], Instant::now());
                    }
                }
                r = recv_opt(self.upstream_v6.as_ref(), &mut up6_buf) => {
                    if let Ok((n, from)) = r {
                        self.engine.handle_datagram(SocketKind::Dns, from, &mut up6_buf[..n], Instant::now());
                    }
                }
                r = recv_opt(dns_udp.as_ref(), &mut dns_buf) => {
                    match r {
                        Ok((n, client)) => {
                            let token = self.token();
                            if self.dns_clients.len() < DNS_CLIENTS_MAX {
                                self.dns_clients.insert(token, (client, Instant::now()));
                                self.engine.handle_dns_query(token, false, &dns_buf[..n], Instant::now());
                            }
                        }
                        Err(e) => tracing::debug!("DNS receive: {e}"),
                    }
                }
                r = dns::accept(dns_tcp.as_ref()) => {
                    if let Ok((stream, _)) = r {
                        let q = tcp_query_tx.clone();
                        tokio::spawn(async move {
                            if let Err(e) = dns::serve_tcp(stream, q).await {
                                tracing::debug!("DNS over TCP: {e:#}");
                            }
                        });
                    }
                }
                Some(q) = tcp_query_rx.recv() => {
                    let token = self.token();
                    self.tcp_clients.insert(token, q.answer);
                    self.engine.handle_dns_query(token, true, &q.query, Instant::now());
                }
                Some(m) = host_rx.recv() => self.on_host_msg(m),
                _ = hangups.recv() => self.reload(Instant::now()),
                _ = timer.fired() => {
                    let now = Instant::now();
                    if now >= self.next_second {
                        self.next_second = now + EVERY_SECOND;
                        self.every_second(now);
                    }
                    self.engine.handle_timeout(now);
                }
            }
            self.flush_round(dev, socket, &mut to_tun).await;
            if let Some(dns_udp) = &dns_udp {
                while let Some((token, answer)) = self.engine.poll_dns_answer() {
                    if let Some((client, _)) = self.dns_clients.remove(&token) {
                        let _ = dns_udp.send_to(&answer, client).await;
                    } else if let Some(tx) = self.tcp_clients.remove(&token) {
                        let _ = tx.send(answer);
                    }
                }
            }
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token
    }

    fn on_host_msg(&mut self, m: HostMsg) {
        let now = Instant::now();
        match m {
            HostMsg::TcpAnswer { id, answer } => self.engine.handle_dns_tcp_answer(id, answer, now),
            HostMsg::Resolved(r) => self.engine.handle_relay_resolved(r, now),
        }
    }

    /// The policy file, the interface addresses, forgotten DNS clients and the status.
    fn every_second(&mut self, now: Instant) {
        if access::reload(&mut self.watcher) {
            if let Err(e) = self.engine.set_policy(self.watcher.policy().clone(), now) {
                tracing::error!("policy change rejected, the previous policy stays in force: {e}");
            }
        }
        let ips = node::interface_ips(Some(&self.tun_name));
        if ips != self.interfaces {
            self.interfaces = ips.clone();
            self.engine.set_interfaces(ips, now);
        }
        self.engine.set_wall_clock(now, node::unix_nanos());
        self.check_certificate(now);
        self.dns_clients
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < DNS_CLIENT_TTL);
        self.tcp_clients.retain(|_, tx| !tx.is_closed());
        self.publish(now);
    }

    /// A renewed certificate file goes into force for new tunnels and is presented on the open
    /// ones.
    fn check_certificate(&mut self, now: Instant) {
        let Some(w) = self.cert_watch.as_mut() else {
            return;
        };
        let Some(new) = w.poll() else {
            return;
        };
        match self.engine.set_credentials(&new, now) {
            Ok(()) => {
                self.certs = Some(node::cert_expiry(&new, &w.ca_path()));
                w.accept(new);
            }
            Err(e) => tracing::error!(
                "the renewed certificate cannot be used ({e}); the one in force stays"
            ),
        }
    }

    /// Status, metrics, readiness and systemd's watchdog. The agent is up (for systemd) once
    /// its TUN device is, and ready (for `/ready`) while the relay is connected too.
    fn publish(&mut self, now: Instant) {
        let status = self.engine.status(now);
        let connected = status.relay.connected;
        let _ = self.status_tx.send(NodeStatus::Agent(status));
        let (Some(ops), Some(certs)) = (self.ops.as_mut(), self.certs) else {
            return;
        };
        let mut s = Sample::starting(NodeRole::Agent, certs);
        s.taken = now;
        s.ready = connected;
        s.relay_connected = Some(connected);
        s.node = Some(self.engine.stats());
        s.reloads = self.reload.as_ref().map_or((0, 0), |r| r.count);
        ops.publish(s, true);
    }

    /// SIGHUP: the configuration is read again and its policy put in force now. Other settings
    /// (relay, TUN, DNS, certificates) take effect on restart.
    fn reload(&mut self, now: Instant) {
        let Some(r) = self.reload.as_mut() else {
            return;
        };
        if let Some(ops) = &self.ops {
            ops.reloading();
        }
        tracing::info!("SIGHUP: reloading {}", r.config.display());
        let path = match (&r.policy_flag, config::load::<AgentConfig>(&r.config)) {
            (Some(p), _) => Ok(p.clone()),
            (None, Ok(cfg)) => Ok(cfg.policy),
            (None, Err(e)) => Err(e),
        };
        let mut outcome = match path {
            Ok(p) => access::reload_now(&mut self.watcher, &p, &r.origin),
            Err(e) => {
                tracing::error!("SIGHUP: {e:#}; nothing changed");
                access::Reloaded::Rejected
            }
        };
        if outcome == access::Reloaded::Applied {
            match self.engine.set_policy(self.watcher.policy().clone(), now) {
                Ok(()) => tracing::info!("SIGHUP: new policy in force"),
                Err(e) => {
                    tracing::error!("SIGHUP: policy refused, the previous one stays in force: {e}");
                    outcome = access::Reloaded::Rejected;
                }
            }
        }
        let status = if outcome == access::Reloaded::Rejected {
            r.count.1 += 1;
            "reload failed: the previous policy stays in force"
        } else {
            r.count.0 += 1;
            "running"
        };
        if let Some(ops) = &self.ops {
            ops.reloaded(status);
        }
        self.publish(now);
    }

    /// Carries out what a round of input caused: events, packets to the TUN device and
    /// datagrams to peers.
    async fn flush_round(
        &mut self,
        dev: &AsyncDevice,
        socket: &UdpSocket,
        to_tun: &mut tun::TunWriter,
    ) {
        self.on_events();
        self.engine.drain_device(|p| to_tun.push(p));
        to_tun.flush(dev).await;
        self.flush(socket).await;
    }

    /// Events before the packet path starts: the first settings (and a relay name to
    /// resolve, whose answer the loop takes). Routes that cannot be set stop the start.
    fn apply_first_events(&mut self) -> Result<()> {
        let mut first = None;
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Settings(s) if first.is_none() => first = Some(s),
                other => self.pending.push(other),
            }
        }
        if let Some(s) = first {
            self.apply_settings(s)?;
        }
        Ok(())
    }

    fn on_events(&mut self) {
        let host_tx = self.host_tx.clone();
        let mut pending = std::mem::take(&mut self.pending).into_iter();
        while let Some(ev) = pending.next().or_else(|| self.engine.poll_event()) {
            match ev {
                Event::Settings(s) => {
                    if let Err(e) = self.apply_settings(s) {
                        tracing::warn!("routes: {e:#}");
                    }
                }
                Event::Audit(line) => self.audit.write_line(&line),
                Event::ResolveRelay { host, port } => {
                    let tx = host_tx.clone();
                    node::resolve_relay(host, port, move |r| {
                        let _ = tx.blocking_send(HostMsg::Resolved(r));
                    });
                }
                Event::DnsOverTcp { id, server, query } => {
                    let tx = host_tx.clone();
                    tokio::spawn(async move {
                        let answer = match dns::forward_tcp(&query, server).await {
                            Ok(a) => Some(a),
                            Err(e) => {
                                tracing::debug!("DNS upstream {server} over TCP: {e:#}");
                                None
                            }
                        };
                        let _ = tx.send(HostMsg::TcpAnswer { id, answer }).await;
                    });
                }
                Event::Tunnel { .. } => {}
            }
        }
    }

    /// Routes into the TUN device as the engine asks, changing only what differs (added
    /// first: a network split anew keeps a route at every moment).
    fn apply_settings(&mut self, s: Settings) -> Result<()> {
        let added: Vec<IpNet> = s
            .routes
            .iter()
            .filter(|n| !self.routed.contains(n))
            .copied()
            .collect();
        let removed: Vec<IpNet> = self
            .routed
            .iter()
            .filter(|n| !s.routes.contains(n))
            .copied()
            .collect();
        let add = tun::add_routes(&self.tun_name, &added);
        let del = tun::remove_routes(&self.tun_name, &removed);
        self.routed = s.routes.clone();
        self.settings = Some(s);
        add.and(del)
    }

    async fn flush(&mut self, socket: &UdpSocket) {
        let now = Instant::now();
        while let Some(t) = self.engine.poll_transmit(&mut self.out, now) {
            let pkt = &self.out[..t.len];
            match t.socket {
                SocketKind::Peer => self.udp_tx.send(socket, pkt, t.to).await,
                SocketKind::Dns => {
                    let slot = if t.to.is_ipv4() {
                        &mut self.upstream_v4
                    } else {
                        &mut self.upstream_v6
                    };
                    if slot.is_none() {
                        let bind: SocketAddr = if t.to.is_ipv4() {
                            ([0, 0, 0, 0], 0).into()
                        } else {
                            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                        };
                        match UdpSocket::bind(bind).await {
                            Ok(s) => *slot = Some(Arc::new(s)),
                            Err(e) => tracing::warn!("DNS upstream socket: {e}"),
                        }
                    }
                    if let Some(s) = slot {
                        if let Err(e) = s.send_to(pkt, t.to).await {
                            tracing::debug!("DNS upstream {}: {e}", t.to);
                        }
                    }
                }
            }
        }
        self.udp_tx.flush(socket).await;
    }
}

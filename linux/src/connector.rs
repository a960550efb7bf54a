//! `sluice connector`: accepts agents' end-to-end tunnels (via the relay), terminates their
//! packets in one smoltcp stack per agent, and splices flows to the real services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_resolver::TokioResolver;
use sluice_dataplane::connector::{self as core, Connector, Event};
use sluice_dataplane::identity::{PeerId, Role};
use sluice_netstack::splice::{FlowMsg, Splicer};
use sluice_netstack::stack::{Limits, Stack};
use sluice_policy::watch::PolicyWatcher;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::access::{self, AuditSink};
use crate::cert_watch::CertWatch;
use crate::config::{self, ConnectorConfig};
use crate::metrics::{CertExpiry, NodeRole, Sample};
use crate::node;
use crate::ops::Ops;
use crate::remote_dns;
use crate::revocations::RevocationFile;
use crate::status::NodeStatus;
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
    if let Some(p) = &args.policy {
        cfg.policy = p.clone();
    }
    if let Some(p) = args.audit_log {
        cfg.audit_log = Some(p);
    }
    node::override_identity(&mut cfg.cert, &mut cfg.key, &mut cfg.ca, &args.identity);
    let creds = node::credentials(&cfg.identity(), Role::Connector, &origin)?;
    let watcher = access::open_policy(&cfg.policy, &origin)?;
    let revocations = match &cfg.revocations {
        Some(p) => Some(RevocationFile::open(p, &creds, &origin)?),
        None => None,
    };
    let audit = AuditSink::open(cfg.audit_log.as_deref())?;
    let flood = cfg.limits;
    let limits = Limits {
        tcp_buffer: cfg.tcp_buffer.clamp(4096, 16 << 20),
        udp_idle: Duration::from_secs(cfg.udp_idle_secs.max(1)),
        dial_timeout: Duration::from_secs(cfg.dial_timeout_secs.max(1)),
        max_tcp_flows: flood.flows_per_agent.get(),
        max_udp_flows: flood.flows_per_agent.get(),
        new_flows: flood.new_flows_per_agent.rate(),
        max_dialing: flood.dialing_per_agent.get(),
        buffer_budget: flood.buffer_per_agent.get(),
        ..Limits::default()
    };
    // Every flow holds a socket: one agent's flows must not use up the descriptors others need.
    node::raise_fd_limit();
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
        // Resolves the hostnames agents address (split DNS) with this network's resolvers.
        let resolver = match TokioResolver::builder_tokio().and_then(|b| b.build()) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                tracing::warn!("no DNS resolver ({e}): flows to resource hostnames will fail");
                None
            }
        };
        let now = Instant::now();
        let mut core = Connector::new(
            core::ConnectorConfig {
                relay: cfg.relay.clone(),
                local,
                interface_ips: node::interface_ips(None),
                instance: rand::random::<u64>() | 1,
            },
            &creds,
            watcher.policy().clone(),
            now,
            node::unix_nanos(),
        )?;
        let revocation_file = revocations.map(|(file, bytes)| {
            // Verified by open already; this hands it to the core, which enforces it.
            let _ = core.handle_revocations(&bytes, &file.source(), now);
            file
        });
        let (splicer, flow_rx) = Splicer::new(limits, resolver.clone());
        let (dns_done, dns_rx) = mpsc::channel(256);
        let certs = node::cert_expiry(&creds, &cfg.ca);
        let ops = Ops::start(cfg.metrics_listen, Sample::starting(NodeRole::Connector, certs)).await?;
        let (status_tx, status_rx) = watch::channel(NodeStatus::Connector(core.status(now)));
        // Held until the connector stops, which removes the socket file; without it the
        // tunnels still work, so a bad path is a warning.
        let _status_server = crate::status::serve_or_warn(&cfg.status_socket, status_rx, "connector");
        let mut c = Host {
            cert_watch: CertWatch::new(cfg.identity(), Role::Connector, &origin, creds),
            status_tx,
            ops,
            certs,
            reloads: (0, 0),
            config_path: args.config.clone(),
            policy_flag: args.policy.clone(),
            origin,
            core,
            splicer,
            watcher,
            audit,
            resolver,
            dns_done,
            next_reload_check: now + RELOAD_EVERY,
            revocation_file,
            out: vec![0u8; 65_536],
            udp_tx: udp_batch::UdpSender::default(),
        };
        tokio::select! {
            r = c.run(&socket, flow_rx, dns_rx) => r,
            _ = node::shutdown_signal() => {
                c.ops.stopping();
                tracing::info!("connector: shutting down with {} agent(s), {} flow(s)", c.core.agents(), c.splicer.flow_count());
                c.goodbye(&socket).await;
                Ok(())
            }
        }
    })
}

/// How often the policy file and the interface addresses are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The I/O around the connector core: the UDP socket, the flow tasks' channel, DNS lookups,
/// the policy file and the audit log.
struct Host {
    core: Connector<Stack>,
    splicer: Splicer<PeerId>,
    watcher: PolicyWatcher,
    audit: AuditSink,
    resolver: Option<Arc<TokioResolver>>,
    dns_done: mpsc::Sender<remote_dns::Done>,
    next_reload_check: Instant,
    out: Vec<u8>,
    /// Outgoing UDP, sent in GSO batches.
    udp_tx: udp_batch::UdpSender,
    ops: Ops,
    status_tx: watch::Sender<NodeStatus>,
    certs: CertExpiry,
    /// SIGHUP reloads that took, and that failed.
    reloads: (u64, u64),
    /// Read again on SIGHUP.
    config_path: PathBuf,
    /// `--policy`, which outranks the file's `policy` on reload too.
    policy_flag: Option<PathBuf>,
    origin: String,
    revocation_file: Option<RevocationFile>,
    /// The certificate files, watched for a renewal.
    cert_watch: CertWatch,
}

impl Host {
    async fn run(
        &mut self,
        socket: &UdpSocket,
        mut flow_rx: mpsc::Receiver<(PeerId, FlowMsg)>,
        mut dns_rx: mpsc::Receiver<remote_dns::Done>,
    ) -> Result<()> {
        let mut udp_rx = udp_batch::UdpReceiver::new(socket);
        let wake = self.splicer.wake.clone();
        let (resolved_tx, mut resolved_rx) = mpsc::channel(4);
        // The control link's first Initial is queued already: send it now, not at the first
        // timer (a second later).
        self.round(socket, &resolved_tx).await;
        self.publish(Instant::now());
        let mut timer = node::LoopTimer::new();
        let mut hangups = node::Hangups::new();
        loop {
            let now = Instant::now();
            let due = self.core.poll_timeout(now).min(self.next_reload_check);
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
                                let pkt = &mut udp_rx.buf_mut()[p];
                                self.core.handle_datagram(from, pkt, now, &mut self.splicer);
                                taken += 1;
                            }
                        }
                        if taken == 1 {
                            // A packet that came alone most likely is alone: answer it before a
                            // read that would only find nothing (latency, not batching).
                            self.round(socket, &resolved_tx).await;
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
                Some((peer, id, answer)) = dns_rx.recv() => self.core.handle_dns_answer(peer, id, answer, Instant::now()),
                _ = wake.notified() => {}
                Some(r) = resolved_rx.recv() => self.core.handle_relay_resolved(r, Instant::now()),
                _ = hangups.recv() => self.reload(Instant::now()),
                _ = timer.fired() => {
                    let now = Instant::now();
                    if now >= self.next_reload_check {
                        self.next_reload_check = now + RELOAD_EVERY;
                        self.every_second(now);
                    }
                    self.core.handle_timeout(now);
                }
            }
            self.round(socket, &resolved_tx).await;
        }
    }

    /// The policy file and the interface addresses (a new one is a network change).
    fn every_second(&mut self, now: Instant) {
        if access::reload(&mut self.watcher) {
            self.core.set_policy(self.watcher.policy().clone(), now);
        }
        self.check_revocations(now, false);
        self.check_certificate();
        self.core.set_wall_clock(now, node::unix_nanos());
        self.core.set_interfaces(node::interface_ips(None), now);
        self.publish(now);
    }

    /// A renewed certificate file goes into force for new connections and is presented on the
    /// live ones.
    fn check_certificate(&mut self) {
        let Some(new) = self.cert_watch.poll() else {
            return;
        };
        match self.core.set_credentials(&new) {
            Ok(()) => {
                self.certs = node::cert_expiry(&new, &self.cert_watch.ca_path());
                self.cert_watch.accept(new);
            }
            Err(e) => tracing::error!(
                "the renewed certificate cannot be used ({e}); the one in force stays"
            ),
        }
    }

    /// Reads the revocation file again if it changed (or now, with `force`); the core verifies
    /// it, logs, and closes the tunnels a newer list revokes.
    fn check_revocations(&mut self, now: Instant, force: bool) {
        let Some(file) = &mut self.revocation_file else {
            return;
        };
        if let Some(bytes) = file.poll(force) {
            let _ = self.core.handle_revocations(&bytes, &file.source(), now);
        }
    }

    /// Metrics, readiness and systemd's watchdog: ready once registered with the relay.
    fn publish(&mut self, now: Instant) {
        let connected = self.core.relay_connected();
        let mut s = Sample::starting(NodeRole::Connector, self.certs);
        s.taken = now;
        s.ready = connected;
        s.relay_connected = Some(connected);
        s.node = Some(self.core.stats());
        s.dials = Some(self.splicer.dial_stats());
        s.reloads = self.reloads;
        self.ops.publish(s, connected);
        let _ = (self.status_tx).send(NodeStatus::Connector(self.core.status(now)));
    }

    /// SIGHUP: the configuration is read again and its policy put in force now. Other settings
    /// (relay, listen, certificates, limits) take effect on restart.
    fn reload(&mut self, now: Instant) {
        self.ops.reloading();
        tracing::info!("SIGHUP: reloading {}", self.config_path.display());
        let path = match (
            &self.policy_flag,
            config::load::<ConnectorConfig>(&self.config_path),
        ) {
            (Some(p), _) => Ok(p.clone()),
            (None, Ok(cfg)) => Ok(cfg.policy),
            (None, Err(e)) => Err(e),
        };
        let outcome = match path {
            Ok(p) => access::reload_now(&mut self.watcher, &p, &self.origin),
            Err(e) => {
                tracing::error!("SIGHUP: {e:#}; nothing changed");
                access::Reloaded::Rejected
            }
        };
        if outcome == access::Reloaded::Applied {
            let cut = self.core.set_policy(self.watcher.policy().clone(), now);
            tracing::info!("SIGHUP: new policy in force ({cut} open flow(s) it denies were cut)");
        }
        self.check_revocations(now, true);
        let status = if outcome == access::Reloaded::Rejected {
            self.reloads.1 += 1;
            "reload failed: the previous policy stays in force"
        } else {
            self.reloads.0 += 1;
            "running"
        };
        self.ops.reloaded(status);
        self.publish(now);
    }

    /// A flow task's news, for its agent's stack (gone agents' flows are dropped).
    fn on_flow_msg(&mut self, peer: PeerId, msg: FlowMsg) {
        match self.core.terminator_mut(&peer) {
            Some(stack) => self.splicer.on_message(peer, msg, stack),
            None => self.splicer.drop_agent(peer),
        }
    }

    /// Steps the core, carries out its events and sends what it has.
    async fn round(
        &mut self,
        socket: &UdpSocket,
        resolved: &mpsc::Sender<Result<Vec<SocketAddr>, String>>,
    ) {
        self.core.step(Instant::now(), &mut self.splicer);
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::Audit(line) => self.audit.write_line(&line),
                Event::ResolveRelay { host, port } => {
                    let tx = resolved.clone();
                    node::resolve_relay(host, port, move |r| {
                        let _ = tx.blocking_send(r);
                    });
                }
                Event::DnsLookup {
                    agent,
                    id,
                    name,
                    rtype,
                    query,
                } => {
                    let now = remote_dns::start(
                        self.resolver.as_ref(),
                        (agent, id),
                        name,
                        rtype,
                        query,
                        &self.dns_done,
                    );
                    if let Some(answer) = now {
                        self.core
                            .handle_dns_answer(agent, id, answer, Instant::now());
                    }
                }
            }
        }
        self.flush(socket).await;
    }

    async fn flush(&mut self, socket: &UdpSocket) {
        let now = Instant::now();
        while let Some((n, to)) = self.core.poll_transmit(&mut self.out, now) {
            self.udp_tx.send(socket, &self.out[..n], to).await;
        }
        self.udp_tx.flush(socket).await;
    }

    /// Says goodbye before exiting: every tunnel and the relay hear the close at once (their
    /// peers then stop waiting for us), instead of after their silence limits.
    async fn goodbye(&mut self, socket: &UdpSocket) {
        self.core.shut_down();
        self.flush(socket).await;
    }
}

//! `sluice relay`: the tokio shell around the sans-IO relay core (`sluice_relay::server`): one
//! UDP socket, read and written in GRO/GSO batches, and the core's timers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_dataplane::identity::Role;
use sluice_dataplane::revocation::{CaKey, Offered, Revocations};
use sluice_dataplane::tls::{self, QuicParams};
use sluice_relay::registry::{Registry, RelayRecord, RELAY_RECORD_VERSION};
use sluice_relay::server::{Relay, RelayStats};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::config::{self, RelayConfig};
use crate::metrics::{CertExpiry, NodeRole, Sample};
use crate::node;
use crate::ops::{self, Ops};
use crate::registry_etcd::{EtcdRegistry, Feed};
use crate::revocations::RevocationFile;
use crate::status::{
    NodeStatus, RegistryConnectorStatus, RegistryRelayStatus, RegistryStatus, RelayNodeStatus,
    RelayPeerStatus,
};
use crate::udp_batch::{self, UdpReceiver, UdpSender};
use crate::RelayArgs;

/// How often the relay logs its counters when something changed.
const STATS_EVERY: Duration = Duration::from_secs(30);

pub fn run(args: RelayArgs) -> Result<()> {
    let origin = args.config.display().to_string();
    let mut cfg: RelayConfig = config::load(&args.config)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    node::override_identity(&mut cfg.cert, &mut cfg.key, &mut cfg.ca, &args.identity);
    let creds = node::credentials(&cfg.identity(), Role::Relay, &origin)?;
    let revocations = match &cfg.revocations {
        Some(p) => Some(RevocationFile::open(p, &creds, &origin)?.0),
        None => None,
    };
    if let Some(r) = &cfg.registry {
        r.validate(&origin)?;
    }
    // A relay of several also takes the links other relays open, and dials its own.
    let accept: &'static [Role] = match cfg.registry {
        Some(_) => &[Role::Agent, Role::Connector, Role::Relay],
        None => &[Role::Agent, Role::Connector],
    };
    let quic = tls::quic_config(&creds, accept, &QuicParams::control())?;
    let dial = tls::quic_config(&creds, &[Role::Relay], &QuicParams::control())?;
    let rt = node::runtime()?;
    rt.block_on(async move {
        let socket = node::bind_udp(cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        tracing::info!(
            "relay {:?} listening on {} (peer id {})",
            creds.identity.name,
            socket.local_addr()?,
            creds.identity.peer_id.short()
        );
        let certs = node::cert_expiry(&creds, &cfg.ca);
        let ops = Ops::start(cfg.metrics_listen, Sample::starting(NodeRole::Relay, certs)).await?;
        let reload = Reload {
            config: args.config.clone(),
            running: cfg.clone(),
            count: (0, 0),
        };
        let me = RelayNodeStatus {
            name: creds.identity.name.clone(),
            peer_id: creds.identity.peer_id.to_string(),
            listen: socket.local_addr()?.to_string(),
            peers: Vec::new(),
            forwarded_packets: 0,
            forwarded_bytes: 0,
            registry: None,
        };
        let (status_tx, status_rx) = watch::channel(NodeStatus::Relay(me.clone()));
        // Held until the relay stops, which removes the socket file.
        let _status_server = crate::status::serve_or_warn(&cfg.status_socket, status_rx, "relay");
        let status = Status {
            me,
            tx: status_tx,
            etcd_up: false,
        };
        let lists = Lists {
            file: revocations,
            handle: creds.revocations.clone(),
            ca: creds.ca_key()?,
            peer_check: creds.peer_check()?,
        };
        let shared = cfg.registry.as_ref().map(|r| {
            let registry = Registry::new(&r.prefix, lists.peer_check.clone());
            let record = RelayRecord {
                version: RELAY_RECORD_VERSION,
                name: creds.identity.name.clone(),
                region: r.region.clone(),
                mesh_addr: r.advertise,
                client_addr: r.advertise,
                peer_id: creds.identity.peer_id.to_string(),
            };
            tracing::info!(
                "relay {:?}: sharing the registry under {} on etcd {} (region {}, reached at {})",
                creds.identity.name,
                r.prefix,
                r.etcd.join(", "),
                r.region,
                r.advertise
            );
            let own = (registry.relay_key(&record.name), record.encode());
            let etcd = EtcdRegistry::start(r.etcd.clone(), r.prefix.clone(), own);
            (creds.identity.name.clone(), registry, etcd, dial)
        });
        serve(socket, quic, ops, certs, reload, status, lists, shared)
            .await
            .context("relay failed")?;
        Ok(())
    })
}

/// The status socket's snapshot, refreshed once a second.
struct Status {
    me: RelayNodeStatus,
    tx: watch::Sender<NodeStatus>,
    /// Whether etcd answered last (for a relay sharing a registry).
    etcd_up: bool,
}

impl Status {
    fn publish(&mut self, relay: &Relay) {
        self.me.registry = relay.registry().map(|reg| {
            let mut relays: Vec<RegistryRelayStatus> = reg
                .relays()
                .map(|r| RegistryRelayStatus {
                    name: r.name.clone(),
                    region: r.region.clone(),
                    addr: r.client_addr.to_string(),
                })
                .collect();
            relays.sort_by(|a, b| a.name.cmp(&b.name));
            let mut connectors: Vec<RegistryConnectorStatus> = reg
                .connectors()
                .map(|(name, home)| RegistryConnectorStatus {
                    name: name.to_string(),
                    home: home.to_string(),
                })
                .collect();
            connectors.sort_by(|a, b| a.name.cmp(&b.name));
            RegistryStatus {
                etcd_up: self.etcd_up,
                relays,
                connectors,
            }
        });
        let s = relay.stats();
        self.me.forwarded_packets = s.forwarded_packets;
        self.me.forwarded_bytes = s.forwarded_bytes;
        self.me.peers = relay
            .peers()
            .into_iter()
            .map(|p| RelayPeerStatus {
                name: p.identity.as_ref().map(|i| i.name.clone()),
                role: p.identity.as_ref().map(|i| i.role.to_string()),
                peer_id: p.identity.as_ref().map(|i| i.peer_id.to_string()),
                addr: p.addr.to_string(),
                registered: p.registered,
                forwarded_bytes: p.forwarded_bytes,
            })
            .collect();
        let _ = self.tx.send(NodeStatus::Relay(self.me.clone()));
    }
}

/// The revocation list: its file (if configured) and the handle the TLS config checks.
struct Lists {
    file: Option<RevocationFile>,
    handle: Revocations,
    ca: CaKey,
    peer_check: tls::PeerCheck,
}

impl Lists {
    /// Reads the file again if it changed (or now, with `force`) and, when it holds a newer
    /// list, puts it in force in `relay`.
    fn check(&mut self, relay: &mut Relay, force: bool) {
        let Some(file) = &mut self.file else { return };
        let Some(bytes) = file.poll(force) else {
            return;
        };
        let loaded = (self.handle).load(
            &bytes,
            &self.ca,
            &file.source(),
            sluice_dataplane::identity::unix_now(),
        );
        if let Ok(Offered::Installed { .. }) = loaded {
            let closed = relay.apply_revocations(&self.handle);
            if closed > 0 {
                tracing::info!(
                    "relay: closed {closed} connection(s) the new revocation list revokes"
                );
            }
        }
    }
}

/// What a SIGHUP reads again.
struct Reload {
    config: PathBuf,
    /// The configuration in force.
    running: RelayConfig,
    /// Reloads that took, and that failed.
    count: (u64, u64),
}

impl Reload {
    /// The relay has nothing to apply without a restart (its socket and certificate are fixed
    /// while it runs): a reload checks the file and says what a restart would change.
    fn run(&mut self, ops: &Ops) {
        ops.reloading();
        match config::load::<RelayConfig>(&self.config) {
            Ok(new) => {
                let mut changed = Vec::new();
                if new.listen != self.running.listen {
                    changed.push("listen");
                }
                if (&new.cert, &new.key, &new.ca)
                    != (&self.running.cert, &self.running.key, &self.running.ca)
                {
                    changed.push("cert/key/ca");
                }
                if new.metrics_listen != self.running.metrics_listen {
                    changed.push("metrics_listen");
                }
                if new.limits != self.running.limits {
                    changed.push("limits");
                }
                if new.registry != self.running.registry {
                    changed.push("registry");
                }
                if new.revocations != self.running.revocations {
                    changed.push("revocations (the file named now is read again on SIGHUP)");
                }
                if changed.is_empty() {
                    tracing::info!(
                        "SIGHUP: {} read again: nothing changed",
                        self.config.display()
                    );
                } else {
                    tracing::warn!(
                        "SIGHUP: {} changes {}: the relay applies these on restart",
                        self.config.display(),
                        changed.join(", ")
                    );
                }
                self.count.0 += 1;
                ops.reloaded("running");
            }
            Err(e) => {
                tracing::error!("SIGHUP: {e:#}");
                self.count.1 += 1;
                ops.reloaded("reload failed: the configuration is invalid");
            }
        }
    }
}

/// Serves relay clients on `socket` until SIGINT or SIGTERM, then closes every connection so
/// the clients know at once.
// The loop's parts, each used by its own arms; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn serve(
    socket: UdpSocket,
    config: quiche::Config,
    mut ops: Ops,
    certs: CertExpiry,
    mut reload: Reload,
    mut status: Status,
    mut lists: Lists,
    shared: Option<(String, Registry, EtcdRegistry, quiche::Config)>,
) -> std::io::Result<()> {
    let local = socket.local_addr()?;
    let mut relay = Relay::new(config, local);
    let mut etcd = match shared {
        Some((me, registry, etcd, dial)) => {
            relay.share_registry(&me, registry, dial);
            Some(etcd)
        }
        None => None,
    };
    relay.apply_revocations(&lists.handle);
    relay.set_peer_check(lists.peer_check.clone());
    relay.set_limits(reload.running.limits.limits());
    let mut rx = UdpReceiver::new(&socket);
    let mut tx = UdpSender::default();
    let mut out = vec![0u8; 1500];
    let mut last_logged = RelayStats::default();
    let mut stats_tick = tokio::time::interval(STATS_EVERY);
    // One timer, re-armed each round, rather than a new one per packet.
    let mut timer = node::LoopTimer::new();
    let shutdown = node::shutdown_signal();
    tokio::pin!(shutdown);
    let mut hangups = node::Hangups::new();
    let mut publish_tick = tokio::time::interval(ops::PUBLISH_EVERY);
    loop {
        timer.rearm(relay.timeout().unwrap_or(Duration::from_secs(3600)));
        tokio::select! {
            r = rx.recv(&socket) => {
                r?;
                // Take what else is queued (bounded), to batch the sends below.
                let mut taken = 0;
                loop {
                    let (len, segment) = rx.layout();
                    if let Some(from) = rx.from() {
                        for p in udp_batch::segments(len, segment) {
                            relay.recv(&mut rx.buf_mut()[p], from);
                            taken += 1;
                        }
                    }
                    if taken >= node::ROUND_BATCH || rx.try_recv(&socket).is_err() {
                        break;
                    }
                }
            }
            _ = timer.fired() => relay.on_timeout(),
            f = registry_feed(&mut etcd) => match f {
                Feed::Loaded { kvs, revision } => relay.registry_loaded(kvs, revision),
                Feed::Event(ev) => relay.registry_event(ev),
                Feed::Up { lease } => {
                    status.etcd_up = true;
                    tracing::info!(
                        "relay: registry: etcd answers; this relay's keys are under lease {lease:x}"
                    );
                }
                Feed::Down(why) => {
                    status.etcd_up = false;
                    tracing::warn!(
                        "relay: registry: etcd unreachable ({why}); forwarding goes on from what the relay knows, and it tries again"
                    );
                }
            },
            _ = publish_tick.tick() => {
                // Listening since before the loop: the relay is ready as long as it runs.
                let mut s = Sample::starting(NodeRole::Relay, certs);
                s.ready = true;
                s.relay = Some(relay.stats());
                s.reloads = reload.count;
                ops.publish(s, true);
                status.publish(&relay);
                lists.check(&mut relay, false);
                relay.sweep_registry();
            }
            _ = hangups.recv() => {
                reload.run(&ops);
                lists.check(&mut relay, true);
            }
            _ = &mut shutdown => {
                ops.stopping();
                tracing::info!("relay: shutting down");
                relay.goodbye();
                while let Some((n, to)) = relay.send(&mut out) {
                    tx.send(&socket, &out[..n], to).await;
                }
                tx.flush(&socket).await;
                return Ok(());
            }
            _ = stats_tick.tick() => {
                let s = relay.stats();
                if s != last_logged {
                    tracing::info!(
                        "relay: {} clients ({} connectors), forwarded {} packets / {} bytes, dropped {}, bad {}",
                        s.clients, s.connectors, s.forwarded_packets, s.forwarded_bytes,
                        s.dropped_packets, s.bad_packets
                    );
                    last_logged = s;
                }
            }
        }
        while let Some((n, to)) = relay.send(&mut out) {
            tx.send(&socket, &out[..n], to).await;
        }
        tx.flush(&socket).await;
        if let Some(e) = &etcd {
            while let Some(w) = relay.poll_registry_write() {
                e.write(w);
            }
        }
    }
}

/// The next feed from etcd; never, for a relay on its own.
async fn registry_feed(etcd: &mut Option<EtcdRegistry>) -> Feed {
    match etcd {
        Some(e) => match e.feeds.recv().await {
            Some(f) => f,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

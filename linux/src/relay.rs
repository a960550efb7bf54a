//! `sluice relay`: the tokio shell around the sans-IO relay core (`sluice_relay::server`): one
//! UDP socket, read and written in GRO/GSO batches, and the core's timers.

use std::time::Duration;

use anyhow::{Context, Result};
use sluice_dataplane::identity::Role;
use sluice_dataplane::tls::{self, QuicParams};
use sluice_relay::server::{Relay, RelayStats};
use tokio::net::UdpSocket;

use crate::config::{self, RelayConfig};
use crate::node;
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
    let quic = tls::quic_config(
        &creds,
        &[Role::Agent, Role::Connector],
        &QuicParams::control(),
    )?;
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
        serve(socket, quic).await.context("relay failed")?;
        Ok(())
    })
}

/// Serves relay clients on `socket` until SIGINT or SIGTERM, then closes every connection so
/// the clients know at once.
async fn serve(socket: UdpSocket, config: quiche::Config) -> std::io::Result<()> {
    let local = socket.local_addr()?;
    let mut relay = Relay::new(config, local);
    let mut rx = UdpReceiver::new(&socket);
    let mut tx = UdpSender::default();
    let mut out = vec![0u8; 1500];
    let mut last_logged = RelayStats::default();
    let mut stats_tick = tokio::time::interval(STATS_EVERY);
    // One timer, re-armed each round, rather than a new one per packet.
    let mut timer = node::LoopTimer::new();
    let shutdown = node::shutdown_signal();
    tokio::pin!(shutdown);
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
            _ = &mut shutdown => {
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
    }
}

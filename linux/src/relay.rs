//! `sluice relay`.

use anyhow::{Context, Result};
use sluice_dataplane::identity::Role;
use sluice_dataplane::tls;

use crate::config::{self, RelayConfig};
use crate::node;
use crate::RelayArgs;

pub fn run(args: RelayArgs) -> Result<()> {
    let mut cfg: RelayConfig = config::load(&args.config)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    node::override_identity(&mut cfg.cert, &mut cfg.key, &mut cfg.ca, &args.identity);
    let creds = node::credentials(&cfg.identity(), Role::Relay)?;
    let quic = tls::quic_config(
        &creds,
        &[Role::Agent, Role::Connector],
        &node::control_params(),
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
        tokio::select! {
            r = sluice_relay::run::serve(socket, quic) => r.context("relay failed")?,
            _ = node::shutdown_signal() => tracing::info!("relay: shutting down"),
        }
        Ok(())
    })
}

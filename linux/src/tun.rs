//! The agent's TUN device and the routes that send resource traffic into it.

use std::process::Command;

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::config::TunConfig;

pub fn create(cfg: &TunConfig) -> Result<AsyncDevice> {
    let mut b = DeviceBuilder::new()
        .name(&cfg.name)
        .ipv4(cfg.ipv4.addr(), cfg.ipv4.prefix_len(), None)
        .mtu(cfg.mtu);
    if let Some(v6) = cfg.ipv6 {
        b = b.ipv6(v6.addr(), v6.prefix_len());
    }
    b.build_async().with_context(|| {
        format!(
            "cannot create TUN device {:?} (needs root or CAP_NET_ADMIN, and /dev/net/tun)",
            cfg.name
        )
    })
}

/// Routes each network through the device. The routes vanish with the device when the agent
/// exits, so nothing is left behind even after a crash.
pub fn add_routes(dev: &str, nets: &[IpNet]) -> Result<()> {
    routes("replace", dev, nets)
}

/// Removes routes added by [`add_routes`] (a policy no longer names those networks).
pub fn remove_routes(dev: &str, nets: &[IpNet]) -> Result<()> {
    routes("del", dev, nets)
}

fn routes(op: &str, dev: &str, nets: &[IpNet]) -> Result<()> {
    for net in nets {
        let family = if matches!(net, IpNet::V4(_)) {
            "-4"
        } else {
            "-6"
        };
        let out = Command::new("ip")
            .args([family, "route", op, &net.to_string(), "dev", dev])
            .output()
            .context("cannot run `ip` (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip route {op} {net} dev {dev}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

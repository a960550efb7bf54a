//! The agent's TUN device and the routes that send resource traffic into it.

use std::process::Command;

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::config::TunConfig;

/// Creates the device with offloads (`IFF_VNET_HDR`: the kernel hands over whole TCP/UDP GSO
/// super-packets and takes coalesced ones, so one read or write moves many packets), or without
/// them where the kernel refuses.
pub fn create(cfg: &TunConfig) -> Result<AsyncDevice> {
    // An existing interface of that name is the usual cause of a failure here, and deserves
    // its own words (the kernel's EBUSY or EINVAL would read like a permission problem).
    let sys = std::path::Path::new("/sys/class/net").join(&cfg.name);
    if sys.exists() {
        if !sys.join("tun_flags").exists() {
            bail!(
                "cannot create TUN device {:?}: an interface of that name exists and is not a TUN device (see `ip -d link show {}`); set another `tun.name` or --tun-name",
                cfg.name,
                cfg.name
            );
        }
        // A persistent TUN device made for us is fine; one an agent holds is not.
        return build(cfg, true).or_else(|_| build(cfg, false)).map_err(|e| {
            anyhow::anyhow!(
                "cannot open TUN device {:?}: it exists and another process holds it (another agent?): {e:#}; set another `tun.name` or --tun-name",
                cfg.name
            )
        });
    }
    match build(cfg, true) {
        Ok(d) => Ok(d),
        Err(e) => {
            tracing::warn!(
                "TUN device {:?} without offloads ({e}): one read or write per packet",
                cfg.name
            );
            build(cfg, false)
        }
    }
}

fn build(cfg: &TunConfig, offload: bool) -> Result<AsyncDevice> {
    let mut b = DeviceBuilder::new()
        .name(&cfg.name)
        .ipv4(cfg.ipv4.addr(), cfg.ipv4.prefix_len(), None)
        .mtu(cfg.mtu)
        .offload(offload);
    if let Some(v6) = cfg.ipv6 {
        b = b.ipv6(v6.addr(), v6.prefix_len());
    }
    b.build_async().map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => " (needs root or CAP_NET_ADMIN)",
            Some(libc::ENOENT) | Some(libc::ENODEV) => " (no /dev/net/tun: load the tun module)",
            _ => "",
        };
        anyhow::anyhow!("cannot create TUN device {:?}: {e}{hint}", cfg.name)
    })
}

/// Reads from the device in batches: one read returns a GSO super-packet, split here into
/// packets of at most the MTU, each with `headroom` free bytes in front (for the tunnel header).
pub struct TunReader {
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    headroom: usize,
    count: usize,
}

impl TunReader {
    pub fn new(mtu: usize, headroom: usize) -> Self {
        TunReader {
            raw: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            // A segment never exceeds the MTU; a packet the kernel did not segment neither.
            bufs: vec![vec![0u8; headroom + mtu.max(1500)]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            headroom,
            count: 0,
        }
    }

    /// Waits for the next read; returns how many packets it gave.
    pub async fn recv(&mut self, dev: &AsyncDevice) -> std::io::Result<usize> {
        self.count = 0;
        self.count = dev
            .recv_multiple(
                &mut self.raw,
                &mut self.bufs,
                &mut self.sizes,
                self.headroom,
            )
            .await?;
        Ok(self.count)
    }

    /// The next read if one is ready (`WouldBlock` if not).
    pub fn try_recv(&mut self, dev: &AsyncDevice) -> std::io::Result<usize> {
        self.count = 0;
        self.count = dev.try_recv_multiple(
            &mut self.raw,
            &mut self.bufs,
            &mut self.sizes,
            self.headroom,
        )?;
        Ok(self.count)
    }

    /// Packet `i` of the last read, headroom included.
    pub fn packet_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        if i >= self.count {
            return None;
        }
        let end = self.headroom + *self.sizes.get(i)?;
        self.bufs.get_mut(i)?.get_mut(..end)
    }
}

/// Packets for the device, written in one batch per loop round: TCP segments of one flow are
/// coalesced into one write (GRO) when the device has offloads. Buffers are reused.
#[derive(Default)]
pub struct TunWriter {
    bufs: Vec<Vec<u8>>,
    used: usize,
    gro: GROTable,
}

impl TunWriter {
    /// Queues a copy of `pkt`.
    pub fn push(&mut self, pkt: &[u8]) {
        if self.used == self.bufs.len() {
            self.bufs
                .push(Vec::with_capacity(VIRTIO_NET_HDR_LEN + 1500));
        }
        let b = &mut self.bufs[self.used];
        b.clear();
        // The virtio header goes in front (written by the GRO pass).
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(pkt);
        self.used += 1;
    }

    /// Writes everything queued.
    pub async fn flush(&mut self, dev: &AsyncDevice) {
        if self.used == 0 {
            return;
        }
        let n = self.used;
        self.used = 0;
        if let Err(e) = dev
            .send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            tracing::debug!("TUN write failed: {e}");
        }
        // A burst's buffers are kept for the next one, but not a flood's.
        self.bufs.truncate(IDEAL_BATCH_SIZE * 2);
    }
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
    if nets.is_empty() {
        return Ok(());
    }
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

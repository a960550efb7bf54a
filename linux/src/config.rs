//! The YAML configuration of each role. Unknown keys are errors, and every error names the file,
//! line, column and key, so a typo never silently changes behaviour.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sluice_dataplane::rate::Rate;

pub use sluice_dataplane::control_link::RelayTarget;

/// A configuration problem; the binary exits with code 2 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Certificate, key and CA files: every role authenticates the same way.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

macro_rules! identity_files {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn identity(&self) -> IdentityFiles {
                IdentityFiles { cert: self.cert.clone(), key: self.key.clone(), ca: self.ca.clone() }
            }
        }
    )*};
}
identity_files!(RelayConfig, ConnectorConfig, AgentConfig);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address to serve QUIC on.
    #[serde(default = "default_relay_listen")]
    pub listen: SocketAddr,
    /// This node's certificate (PEM), issued by `sluice ca issue`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The organisation CA certificate (PEM) every peer must be signed by.
    pub ca: PathBuf,
    /// Serve Prometheus metrics on `/metrics` (and `/healthz`, `/ready`) at this TCP address
    /// (none by default; `127.0.0.1:9464` keeps them on the machine).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Unix socket where `sluice status` reads the relay's peers (mode 0600).
    #[serde(default = "default_relay_socket")]
    pub status_socket: PathBuf,
    /// The CA's revocation list (`sluice ca revoke` writes it): enforced at every handshake,
    /// read again within a second of a change, and handed to every connector.
    #[serde(default)]
    pub revocations: Option<PathBuf>,
    /// Flood limits (see configs/relay.yaml).
    #[serde(default)]
    pub limits: RelayLimits,
    /// The registry this relay shares with other relays (etcd); none: a relay on its own.
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
}

/// Where several relays keep their shared registry, and what this one says of itself there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// etcd's client URLs (`http://HOST:2379`), one or more members of one cluster.
    pub etcd: Vec<String>,
    /// The keys' prefix in etcd (ending in `/`); every relay of one deployment uses the same.
    #[serde(default = "default_registry_prefix")]
    pub prefix: String,
    /// This relay's region, by name (`eu-west`), for people and for homing.
    pub region: String,
    /// The address agents, connectors and other relays reach this relay at (the listening
    /// address is often not it: `0.0.0.0`, or behind a load balancer).
    pub advertise: SocketAddr,
}

fn default_registry_prefix() -> String {
    "/sluice/".into()
}

impl RegistryConfig {
    /// Refuses what etcd would take but the relays could not use.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if self.etcd.is_empty() {
            return Err(ConfigError(format!(
                "{origin}: `registry.etcd` lists no etcd endpoint (e.g. http://10.0.0.5:2379)"
            )));
        }
        for e in &self.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                return Err(ConfigError(format!(
                    "{origin}: `registry.etcd` endpoint {e:?} is not a URL like http://10.0.0.5:2379"
                )));
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(ConfigError(format!(
                "{origin}: `registry.prefix` {:?} must start and end with `/` (e.g. /sluice/)",
                self.prefix
            )));
        }
        if self.region.is_empty()
            || self.region.len() > 63
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(ConfigError(format!(
                "{origin}: `registry.region` {:?} must be 1-63 letters, digits, `-`, `_` or `.`",
                self.region
            )));
        }
        if self.advertise.ip().is_unspecified() || self.advertise.port() == 0 {
            return Err(ConfigError(format!(
                "{origin}: `registry.advertise` {} must be an address others can reach (not 0.0.0.0, not port 0)",
                self.advertise
            )));
        }
        Ok(())
    }
}

/// A rate in a config file: `per_second` on average, `burst` at once (default: one second's
/// worth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub per_second: std::num::NonZeroU64,
    #[serde(default)]
    pub burst: Option<std::num::NonZeroU64>,
}

impl RateConfig {
    pub fn rate(&self) -> Rate {
        let per_second = self.per_second.get();
        Rate::new(per_second, self.burst.map_or(per_second, |b| b.get()))
    }

    fn from_rate(r: Rate) -> RateConfig {
        let nz = |v: u64| std::num::NonZeroU64::new(v.max(1)).unwrap_or(std::num::NonZeroU64::MIN);
        RateConfig {
            per_second: nz(r.per_second),
            burst: Some(nz(r.burst)),
        }
    }
}

/// The relay's flood limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayLimits {
    /// New connections per second from one source IP address (after address validation).
    pub connections_per_source: RateConfig,
    /// Connections one source IP address may hold at once.
    pub connections_per_address: std::num::NonZeroUsize,
    /// Tunnel packets per second forwarded for one peer (none: no limit).
    pub peer_packets: Option<RateConfig>,
    /// Tunnel bytes per second forwarded for one peer (none: no limit); the burst is at least
    /// one full packet (65,535 bytes).
    pub peer_bytes: Option<RateConfig>,
}

impl Default for RelayLimits {
    fn default() -> Self {
        let d = sluice_relay::limits::Limits::default();
        RelayLimits {
            connections_per_source: RateConfig::from_rate(d.connections_per_source),
            connections_per_address: std::num::NonZeroUsize::new(d.connections_per_address)
                .unwrap_or(std::num::NonZeroUsize::MIN),
            peer_packets: d.peer_packets.map(RateConfig::from_rate),
            peer_bytes: d.peer_bytes.map(RateConfig::from_rate),
        }
    }
}

impl RelayLimits {
    pub fn limits(&self) -> sluice_relay::limits::Limits {
        sluice_relay::limits::Limits {
            connections_per_source: self.connections_per_source.rate(),
            connections_per_address: self.connections_per_address.get(),
            peer_packets: self.peer_packets.map(|r| r.rate()),
            peer_bytes: self.peer_bytes.map(|r| r.rate()),
        }
    }
}

/// The connector's flood limits, per agent.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorLimits {
    /// TCP flows one agent may hold, and UDP flows likewise.
    pub flows_per_agent: std::num::NonZeroUsize,
    /// New flows per second one agent may open; past it the packet that would open one is
    /// dropped before the policy sees it.
    pub new_flows_per_agent: RateConfig,
    /// TCP dials to services one agent may have in progress at once.
    pub dialing_per_agent: std::num::NonZeroUsize,
    /// Bytes of TCP buffers (`tcp_buffer` each way per flow) one agent's flows may hold.
    pub buffer_per_agent: std::num::NonZeroUsize,
}

impl Default for ConnectorLimits {
    fn default() -> Self {
        let d = sluice_netstack::stack::Limits::default();
        let nz = |v: usize| std::num::NonZeroUsize::new(v).unwrap_or(std::num::NonZeroUsize::MIN);
        ConnectorLimits {
            flows_per_agent: nz(d.max_tcp_flows),
            new_flows_per_agent: RateConfig::from_rate(d.new_flows),
            dialing_per_agent: nz(d.max_dialing),
            buffer_per_agent: nz(d.buffer_budget),
        }
    }
}

fn default_relay_socket() -> PathBuf {
    PathBuf::from(crate::status::RELAY_SOCKET)
}

fn default_relay_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}

fn default_any() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// The relay: HOST:PORT (an IP address, or a name resolved on every reconnect).
    pub relay: RelayTarget,
    /// Local UDP address for the relay connection and (later) direct tunnels.
    #[serde(default = "default_any")]
    pub listen: SocketAddr,
    /// This node's certificate (PEM), issued by `sluice ca issue`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The organisation CA certificate (PEM) every peer must be signed by.
    pub ca: PathBuf,
    /// Seconds a new TCP dial to a service may take before the app gets ICMP unreachable.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout_secs: u64,
    /// Seconds after which an idle UDP flow is closed.
    #[serde(default = "default_udp_idle")]
    pub udp_idle_secs: u64,
    /// Bytes of smoltcp buffer per TCP flow and direction.
    #[serde(default = "default_tcp_buffer")]
    pub tcp_buffer: usize,
    /// The access policy (reloaded when the file changes); see configs/policy.yaml.
    pub policy: PathBuf,
    /// Where every new-flow decision is written as a JSON line (default: standard output).
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Serve Prometheus metrics on `/metrics` (and `/healthz`, `/ready`) at this TCP address
    /// (none by default; `127.0.0.1:9464` keeps them on the machine).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Unix socket where `sluice status` reads the connector's agents (mode 0600).
    #[serde(default = "default_connector_socket")]
    pub status_socket: PathBuf,
    /// The CA's revocation list, read again within a second of a change. Optional: the
    /// relay hands its list to every connector, and the newer of the two is in force.
    #[serde(default)]
    pub revocations: Option<PathBuf>,
    /// Flood limits per agent (see configs/connector.yaml).
    #[serde(default)]
    pub limits: ConnectorLimits,
}

fn default_connector_socket() -> PathBuf {
    PathBuf::from(crate::status::CONNECTOR_SOCKET)
}

fn default_dial_timeout() -> u64 {
    5
}
fn default_udp_idle() -> u64 {
    60
}
fn default_tcp_buffer() -> usize {
    256 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunConfig {
    /// Interface name.
    #[serde(default = "default_tun_name")]
    pub name: String,
    /// IPv4 address of the interface, with prefix (the source of the agent's IPv4 packets).
    #[serde(default = "default_tun_v4")]
    pub ipv4: Ipv4Net,
    /// IPv6 address of the interface, with prefix.
    #[serde(default = "default_tun_v6")]
    pub ipv6: Option<Ipv6Net>,
    /// Interface MTU; larger packets get ICMP "fragmentation needed" / "packet too big".
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

fn default_tun_name() -> String {
    "sluice0".into()
}
fn default_tun_v4() -> Ipv4Net {
    Ipv4Net::new(std::net::Ipv4Addr::new(100, 96, 0, 1), 32).unwrap_or_default()
}
fn default_tun_v6() -> Option<Ipv6Net> {
    Ipv6Net::new(
        std::net::Ipv6Addr::new(0xfd5c, 0x1ce0, 0x1, 0, 0, 0, 0, 1),
        128,
    )
    .ok()
}
fn default_mtu() -> u16 {
    1280
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig {
            name: default_tun_name(),
            ipv4: default_tun_v4(),
            ipv6: default_tun_v6(),
            mtu: default_mtu(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The relay: HOST:PORT (an IP address, or a name resolved on every reconnect).
    pub relay: RelayTarget,
    #[serde(default = "default_any")]
    pub listen: SocketAddr,
    /// This node's certificate (PEM), issued by `sluice ca issue`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The organisation CA certificate (PEM) every peer must be signed by.
    pub ca: PathBuf,
    #[serde(default)]
    pub tun: TunConfig,
    /// The access policy: which resources exist, who may reach them, and which connector
    /// serves each (reloaded when the file changes). The agent routes every resource network
    /// into its TUN device and checks each new flow; the connector checks again.
    pub policy: PathBuf,
    /// Where every new-flow decision is written as a JSON line (default
    /// /run/sluice/agent-audit.jsonl: standard output is the console's).
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Split DNS: the agent answers for resource hostnames itself.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Unix socket where `sluice status` reads the agent's tunnels (mode 0600).
    #[serde(default = "default_status_socket")]
    pub status_socket: PathBuf,
    /// Look for direct paths to connectors (hole punching); false keeps every tunnel on the
    /// relay (a site that must not send traffic around it, or a benchmark of the relay).
    #[serde(default = "default_true")]
    pub direct_paths: bool,
    /// Serve Prometheus metrics on `/metrics` (and `/healthz`, `/ready`) at this TCP address
    /// (none by default; `127.0.0.1:9464` keeps them on the machine).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_status_socket() -> PathBuf {
    PathBuf::from(crate::status::DEFAULT_SOCKET)
}

/// The agent's DNS server, on its tunnel IPv4 address, port 53.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Synthetic IPv4 addresses for resource names. Pick a range no real network of the user
    /// uses (the default is RFC 2544's benchmarking range, not CGNAT space).
    #[serde(default = "default_pool_v4")]
    pub pool_v4: Ipv4Net,
    /// Synthetic IPv6 addresses for resource names.
    #[serde(default = "default_pool_v6")]
    pub pool_v6: Ipv6Net,
    /// Most names held at once; past this the least recently used idle name is recycled.
    #[serde(default = "default_max_names")]
    pub max_names: u32,
    /// Resolvers for every other name (default: the nameservers of /etc/resolv.conf at start).
    #[serde(default)]
    pub upstream: Option<Vec<SocketAddr>>,
    /// Make the agent the system's resolver while it runs (systemd-resolved routing domains,
    /// or /etc/resolv.conf, restored on exit).
    #[serde(default = "default_true")]
    pub configure_system: bool,
    /// Serve DNS on the tunnel address (UDP and TCP port 53 of `tun.ipv4` only). Off, resource
    /// names do not resolve and the system resolver is left alone; flows to addresses work.
    #[serde(default = "default_true")]
    pub listen: bool,
    /// Where apps send DNS queries. Default: `tun.ipv4`'s address, served from sockets (the
    /// kernel delivers the device's own address locally). Any other address is routed into
    /// the TUN device and answered in the packet path, with no socket: nothing to share port
    /// 53 with, whatever else listens on this machine.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
}

fn default_true() -> bool {
    true
}

fn default_pool_v4() -> Ipv4Net {
    Ipv4Net::new(std::net::Ipv4Addr::new(198, 18, 0, 0), 15).unwrap_or_default()
}
fn default_pool_v6() -> Ipv6Net {
    Ipv6Net::new(
        std::net::Ipv6Addr::new(0xfd5c, 0x1ce0, 0xd5, 0, 0, 0, 0, 0),
        96,
    )
    .unwrap_or_default()
}
fn default_max_names() -> u32 {
    65_536
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            pool_v4: default_pool_v4(),
            pool_v6: default_pool_v6(),
            max_names: default_max_names(),
            upstream: None,
            configure_system: true,
            listen: true,
            address: None,
        }
    }
}

/// Paths in a config file are relative to the file's own folder (not the working directory),
/// so a config can be started from anywhere.
pub trait RelativePaths {
    fn paths_mut(&mut self) -> Vec<&mut PathBuf>;
}

impl RelativePaths for RelayConfig {
    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut v = vec![
            &mut self.cert,
            &mut self.key,
            &mut self.ca,
            &mut self.status_socket,
        ];
        v.extend(self.revocations.as_mut());
        v
    }
}

impl RelativePaths for ConnectorConfig {
    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut v = vec![
            &mut self.cert,
            &mut self.key,
            &mut self.ca,
            &mut self.policy,
            &mut self.status_socket,
        ];
        v.extend(self.audit_log.as_mut());
        v.extend(self.revocations.as_mut());
        v
    }
}

impl RelativePaths for AgentConfig {
    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut v = vec![
            &mut self.cert,
            &mut self.key,
            &mut self.ca,
            &mut self.policy,
            &mut self.status_socket,
        ];
        v.extend(self.audit_log.as_mut());
        v
    }
}

/// Reads and parses a YAML file; errors name the file, line, column and key. Relative paths in
/// it are taken from the file's folder.
pub fn load<T: DeserializeOwned + RelativePaths>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
    let mut cfg: T = parse(&text, &path.display().to_string())?;
    let base = path.parent().unwrap_or(Path::new(""));
    for p in cfg.paths_mut() {
        if p.is_relative() && !p.as_os_str().is_empty() {
            *p = base.join(&*p);
        }
    }
    Ok(cfg)
}

pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde_yaml places a missing key where its mapping ends, which is some unrelated line:
        // name the key and the mapping it belongs in instead.
        if let Some(rest) = msg.strip_prefix("missing field `") {
            let field = rest.split('`').next().unwrap_or(rest);
            let within = if key == "." {
                String::new()
            } else {
                format!(" under `{key}`")
            };
            return ConfigError(format!(
                "{origin}: invalid configuration: required key `{field}` is missing{within}"
            ));
        }
        let place = match inner.location() {
            Some(l) => format!("{origin}:{}:{}", l.line(), l.column()),
            None => origin.to_string(),
        };
        let key = if key == "." {
            String::new()
        } else {
            format!(" at key `{key}`")
        };
        ConfigError(format!("{place}: invalid configuration{key}: {inner}"))
    })
}

/// Checks a TUN MTU; `what` names where it came from (a key of a file, or a flag).
pub fn check_mtu(mtu: u16, what: &str) -> Result<(), ConfigError> {
    if mtu < 1280 {
        return Err(ConfigError(format!(
            "{what} is {mtu}; IPv6 needs at least 1280"
        )));
    }
    Ok(())
}

impl AgentConfig {
    /// Checks what the file says (flags are checked where they are applied, so an error names
    /// the flag, not the file).
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        check_mtu(self.tun.mtu, &format!("{origin}: `tun.mtu`"))?;
        let d = &self.dns;
        if d.pool_v4.trunc() != d.pool_v4 {
            return Err(ConfigError(format!(
                "{origin}: `dns.pool_v4` {} has host bits set; did you mean {}?",
                d.pool_v4,
                d.pool_v4.trunc()
            )));
        }
        if d.pool_v6.trunc() != d.pool_v6 {
            return Err(ConfigError(format!(
                "{origin}: `dns.pool_v6` {} has host bits set; did you mean {}?",
                d.pool_v6,
                d.pool_v6.trunc()
            )));
        }
        let tun_v4 = self.tun.ipv4.addr();
        if d.pool_v4.contains(&tun_v4) {
            return Err(ConfigError(format!(
                "{origin}: `dns.pool_v4` {} contains the agent's own address {tun_v4} (`tun.ipv4`)",
                d.pool_v4
            )));
        }
        if let Some(v6) = self.tun.ipv6 {
            if d.pool_v6.contains(&v6.addr()) {
                return Err(ConfigError(format!(
                    "{origin}: `dns.pool_v6` {} contains the agent's own address {} (`tun.ipv6`)",
                    d.pool_v6,
                    v6.addr()
                )));
            }
        }
        if let Some(a) = d.address {
            let in_pool = match a {
                std::net::IpAddr::V4(v4) => d.pool_v4.contains(&v4),
                std::net::IpAddr::V6(v6) => d.pool_v6.contains(&v6),
            };
            if in_pool || a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(ConfigError(format!(
                    "{origin}: `dns.address` {a} cannot be a DNS server's address here (in a synthetic pool, loopback, multicast or unspecified); leave it out to use `tun.ipv4`"
                )));
            }
        }
        Ok(())
    }

    /// Where apps send DNS queries (`dns.address`, or the tunnel's IPv4 address).
    pub fn dns_address(&self) -> std::net::IpAddr {
        self.dns
            .address
            .unwrap_or(std::net::IpAddr::V4(self.tun.ipv4.addr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented-out `limits:` blocks of configs/ are what a user uncomments: they must
    /// parse, and mean what they say.
    fn uncommented_limits(file: &str) -> String {
        uncommented(file, "limits")
    }

    /// The commented-out block `# KEY:` of configs/FILE, uncommented.
    fn uncommented(file: &str, key: &str) -> String {
        let text =
            std::fs::read_to_string(format!("{}/../configs/{file}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == format!("# {key}:") {
                inside = true;
            } else if inside && !line.starts_with("#   ") {
                inside = false;
            }
            if inside && !line.starts_with("#   #") {
                out.push_str(&line[2..]);
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn the_documented_relay_limits_parse_and_apply() {
        let base = "cert: a\nkey: b\nca: c\n";
        let r: RelayConfig = parse(base, "r.yaml").unwrap();
        assert_eq!(r.limits.limits(), sluice_relay::limits::Limits::default());
        let r: RelayConfig = parse(
            &format!("{base}{}", uncommented_limits("relay.yaml")),
            "r.yaml",
        )
        .unwrap();
        let l = r.limits.limits();
        assert_eq!(l.connections_per_source, Rate::new(20, 200));
        assert_eq!(l.connections_per_address, 1024);
        assert_eq!(l.peer_packets, Some(Rate::new(100_000, 10_000)));
        assert_eq!(l.peer_bytes, Some(Rate::new(62_500_000, 1_000_000)));
        // The documented defaults are the real ones.
        let d = sluice_relay::limits::Limits::default();
        assert_eq!(
            (l.connections_per_source, l.connections_per_address),
            (d.connections_per_source, d.connections_per_address)
        );
        // A burst defaults to one second's worth; a zero rate is an error that names the key.
        let r: RelayConfig = parse(
            &format!("{base}limits:\n  peer_bytes: {{ per_second: 1000 }}\n"),
            "r.yaml",
        )
        .unwrap();
        assert_eq!(r.limits.limits().peer_bytes, Some(Rate::new(1000, 1000)));
        let e = parse::<RelayConfig>(
            &format!("{base}limits:\n  peer_packets: {{ per_second: 0 }}\n"),
            "r.yaml",
        )
        .unwrap_err()
        .0;
        assert!(e.contains("limits.peer_packets.per_second"), "{e}");
    }

    #[test]
    fn the_documented_registry_parses_and_bad_ones_are_refused() {
        let base = "cert: a\nkey: b\nca: c\n";
        let r: RelayConfig = parse(
            &format!("{base}{}", uncommented("relay.yaml", "registry")),
            "r.yaml",
        )
        .unwrap();
        let reg = r.registry.unwrap();
        assert_eq!(reg.etcd.len(), 3);
        assert_eq!(reg.prefix, "/sluice/");
        assert_eq!(reg.region, "eu-west");
        reg.validate("r.yaml").unwrap();
        let bad = [
            (
                RegistryConfig {
                    etcd: vec![],
                    ..reg.clone()
                },
                "lists no etcd endpoint",
            ),
            (
                RegistryConfig {
                    etcd: vec!["10.0.0.5:2379".into()],
                    ..reg.clone()
                },
                "is not a URL",
            ),
            (
                RegistryConfig {
                    prefix: "sluice".into(),
                    ..reg.clone()
                },
                "must start and end",
            ),
            (
                RegistryConfig {
                    region: "eu west".into(),
                    ..reg.clone()
                },
                "registry.region",
            ),
            (
                RegistryConfig {
                    advertise: "0.0.0.0:4433".parse().unwrap(),
                    ..reg.clone()
                },
                "others can reach",
            ),
        ];
        for (cfg, want) in bad {
            let e = cfg.validate("r.yaml").unwrap_err().0;
            assert!(e.starts_with("r.yaml: `registry."), "{e}");
            assert!(e.contains(want), "{e}");
        }
        let e = parse::<RelayConfig>(&format!("{base}registry:\n  etcd: []\n"), "r.yaml")
            .unwrap_err()
            .0;
        assert!(e.contains("region"), "{e}");
    }

    #[test]
    fn the_documented_connector_limits_parse_and_are_the_defaults() {
        let base = "relay: 192.0.2.1:4433\ncert: a\nkey: b\nca: c\npolicy: p.yaml\n";
        let c: ConnectorConfig = parse(
            &format!("{base}{}", uncommented_limits("connector.yaml")),
            "c.yaml",
        )
        .unwrap();
        let d: ConnectorConfig = parse(base, "c.yaml").unwrap();
        let (l, d) = (c.limits, d.limits);
        assert_eq!(l.flows_per_agent, d.flows_per_agent);
        assert_eq!(l.new_flows_per_agent, d.new_flows_per_agent);
        assert_eq!(l.dialing_per_agent, d.dialing_per_agent);
        assert_eq!(l.buffer_per_agent, d.buffer_per_agent);
        assert_eq!(l.flows_per_agent.get(), 4096);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let text = "relay: 192.0.2.1:4433\ncert: a\nkey: b\nca: c\ntun:\n  mtu: 1400\n  nmae: x\npolicy: p.yaml\n";
        let e = parse::<AgentConfig>(text, "agent.yaml").unwrap_err().0;
        assert!(e.starts_with("agent.yaml:7:"), "{e}");
        assert!(e.contains("tun"), "{e}");
        assert!(e.contains("nmae"), "{e}");

        let e = parse::<AgentConfig>(
            "relay: nope\ncert: a\nkey: b\nca: c\npolicy: p.yaml\n",
            "a.yaml",
        )
        .unwrap_err()
        .0;
        assert!(e.starts_with("a.yaml:1:"), "{e}");
        assert!(e.contains("`relay`"), "{e}");
    }

    #[test]
    fn status_socket_defaults_and_overrides() {
        let base = "relay: 192.0.2.1:4433\ncert: a\nkey: b\nca: c\npolicy: p.yaml\n";
        let a: AgentConfig = parse(base, "a.yaml").unwrap();
        assert_eq!(a.status_socket, Path::new("/run/sluice/agent.sock"));
        let a: AgentConfig = parse(
            &format!("{base}status_socket: /tmp/x/agent.sock\n"),
            "a.yaml",
        )
        .unwrap();
        assert_eq!(a.status_socket, Path::new("/tmp/x/agent.sock"));
    }

    #[test]
    fn example_configs_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs");
        let a: AgentConfig = load(&Path::new(dir).join("agent.yaml")).unwrap();
        a.validate("agent.yaml").unwrap();
        let _: ConnectorConfig = load(&Path::new(dir).join("connector.yaml")).unwrap();
        let _: RelayConfig = load(&Path::new(dir).join("relay.yaml")).unwrap();
    }
}

//! The agent YAML, as far as it applies to an Apple host: relay, listen, tun, dns and
//! direct_paths. The Linux agent's file keys (cert, key, ca, policy, status_socket, audit_log,
//! metrics_listen, dns.configure_system, tun.name) are accepted and ignored, so one file serves
//! both hosts; any other key is an error that names it. (A Network Extension serves no HTTP:
//! its app reads the numbers through the status call.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;
use sluice_dataplane::control_link::RelayTarget;

/// The default DNS address: a sentinel routed into the tunnel. On Apple the tunnel's own
/// address would be delivered locally and never reach the engine.
pub(crate) const DEFAULT_DNS_ADDRESS: Ipv4Addr = Ipv4Addr::new(100, 100, 111, 1);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub relay: RelayTarget,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub tun: TunConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default = "yes")]
    pub direct_paths: bool,
    // The Linux agent's files: credentials and the policy come as bytes here.
    #[serde(default, rename = "cert")]
    _cert: Ignored,
    #[serde(default, rename = "key")]
    _key: Ignored,
    #[serde(default, rename = "ca")]
    _ca: Ignored,
    #[serde(default, rename = "policy")]
    _policy: Ignored,
    #[serde(default, rename = "status_socket")]
    _status_socket: Ignored,
    #[serde(default, rename = "audit_log")]
    _audit_log: Ignored,
    #[serde(default, rename = "metrics_listen")]
    _metrics_listen: Ignored,
}

/// A key that is allowed and means nothing here.
#[derive(Debug, Clone, Default)]
struct Ignored;

impl<'de> Deserialize<'de> for Ignored {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Ignored)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunConfig {
    /// The utun device is the system's to name.
    #[serde(default, rename = "name")]
    _name: Ignored,
    #[serde(default = "default_tun_v4")]
    pub ipv4: Ipv4Net,
    #[serde(default = "default_tun_v6")]
    pub ipv6: Option<Ipv6Net>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig {
            _name: Ignored,
            ipv4: default_tun_v4(),
            ipv6: default_tun_v6(),
            mtu: default_mtu(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default = "default_pool_v4")]
    pub pool_v4: Ipv4Net,
    #[serde(default = "default_pool_v6")]
    pub pool_v6: Ipv6Net,
    #[serde(default = "default_max_names")]
    pub max_names: u32,
    /// Resolvers for other names; None: /etc/resolv.conf's until the host's path update says.
    #[serde(default)]
    pub upstream: Option<Vec<SocketAddr>>,
    #[serde(default = "default_dns_address")]
    pub address: IpAddr,
    #[serde(default = "yes")]
    pub listen: bool,
    /// The host applies the settings event's resolver itself.
    #[serde(default, rename = "configure_system")]
    _configure_system: Ignored,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            pool_v4: default_pool_v4(),
            pool_v6: default_pool_v6(),
            max_names: default_max_names(),
            upstream: None,
            address: default_dns_address(),
            listen: true,
            _configure_system: Ignored,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_tun_v4() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(100, 96, 0, 1), 32).unwrap_or_default()
}
fn default_tun_v6() -> Option<Ipv6Net> {
    Ipv6Net::new(Ipv6Addr::new(0xfd5c, 0x1ce0, 0x1, 0, 0, 0, 0, 1), 128).ok()
}
fn default_mtu() -> u16 {
    1280
}
fn default_pool_v4() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 15).unwrap_or_default()
}
fn default_pool_v6() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd5c, 0x1ce0, 0xd5, 0, 0, 0, 0, 0), 96).unwrap_or_default()
}
fn default_max_names() -> u32 {
    65_536
}
fn default_dns_address() -> IpAddr {
    IpAddr::V4(DEFAULT_DNS_ADDRESS)
}

impl AgentConfig {
    /// Parses and checks the YAML; errors name the line, column and key.
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: AgentConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.to_string();
            // serde_yaml places a missing key where its mapping ends: name the key instead.
            if let Some(rest) = msg.strip_prefix("missing field `") {
                let field = rest.split('`').next().unwrap_or(rest);
                let within = if key == "." {
                    String::new()
                } else {
                    format!(" under `{key}`")
                };
                return ConfigError(format!(
                    "agent config: required key `{field}` is missing{within}"
                ));
            }
            let place = inner
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            let key = if key == "." {
                String::new()
            } else {
                format!(" at key `{key}`")
            };
            ConfigError(format!("agent config{place}{key}: {msg}"))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(format!("agent config: {s}")));
        if self.tun.mtu < 1280 {
            return bad(format!(
                "`tun.mtu` is {}; IPv6 needs at least 1280",
                self.tun.mtu
            ));
        }
        let d = &self.dns;
        if d.pool_v4.trunc() != d.pool_v4 {
            return bad(format!(
                "`dns.pool_v4` {} has host bits set; did you mean {}?",
                d.pool_v4,
                d.pool_v4.trunc()
            ));
        }
        if d.pool_v6.trunc() != d.pool_v6 {
            return bad(format!(
                "`dns.pool_v6` {} has host bits set; did you mean {}?",
                d.pool_v6,
                d.pool_v6.trunc()
            ));
        }
        let own = self.tun.ipv4.addr();
        if d.pool_v4.contains(&own) {
            return bad(format!(
                "`dns.pool_v4` {} contains the agent's own address {own} (`tun.ipv4`)",
                d.pool_v4
            ));
        }
        if let Some(v6) = self.tun.ipv6 {
            if d.pool_v6.contains(&v6.addr()) {
                return bad(format!(
                    "`dns.pool_v6` {} contains the agent's own address {} (`tun.ipv6`)",
                    d.pool_v6,
                    v6.addr()
                ));
            }
        }
        let in_pool = match d.address {
            IpAddr::V4(a) => d.pool_v4.contains(&a),
            IpAddr::V6(a) => d.pool_v6.contains(&a),
        };
        if in_pool {
            return bad(format!(
                "`dns.address` {} is inside a synthetic pool (`dns.pool_v4`/`dns.pool_v6`)",
                d.address
            ));
        }
        Ok(())
    }

    /// The device's own addresses: never direct-path candidates.
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.tun.ipv4.addr())];
        v.extend(self.tun.ipv6.map(|n| IpAddr::V6(n.addr())));
        v
    }
}

pub use sluice_dataplane::engine::dns::upstreams_from_resolv_conf;

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_AGENT: &str = "# as `sluice lab up` writes it\nrelay: 192.0.2.1:4433\ncert: /x/a.pem\nkey: /x/a.key\nca: /x/ca.pem\ntun:\n  name: sluice0\n  mtu: 1280\npolicy: /x/policy.yaml\naudit_log: /x/audit.jsonl\nstatus_socket: /x/agent.sock\ndirect_paths: true\nmetrics_listen: 127.0.0.1:9464\n";

    #[test]
    fn the_linux_agent_file_parses_with_its_keys_ignored() {
        let c = AgentConfig::parse(LINUX_AGENT).unwrap();
        assert_eq!(c.relay.to_string(), "192.0.2.1:4433");
        assert_eq!(c.tun.mtu, 1280);
        assert_eq!(c.tun.ipv4.to_string(), "100.96.0.1/32");
        assert_eq!(c.tun.ipv6.unwrap().to_string(), "fd5c:1ce0:1::1/128");
        assert_eq!(c.dns.address, IpAddr::V4(DEFAULT_DNS_ADDRESS));
        assert!(c.dns.listen && c.direct_paths && c.dns.upstream.is_none());
        assert_eq!(c.listen, default_listen());
    }

    #[test]
    fn every_key_of_the_subset_is_read() {
        let c = AgentConfig::parse(
            "relay: relay.example.test:4433\nlisten: 0.0.0.0:5000\ntun:\n  ipv4: 100.64.0.2/32\n  ipv6: null\n  mtu: 1400\ndns:\n  pool_v4: 198.18.0.0/16\n  pool_v6: fd00:1::/96\n  max_names: 10\n  upstream: [192.0.2.53:53]\n  address: 100.96.0.53\n  listen: false\n  configure_system: false\ndirect_paths: false\n",
        )
        .unwrap();
        assert_eq!(c.relay.host, "relay.example.test");
        assert!(c.relay.literal.is_none());
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.tun.ipv4.to_string(), "100.64.0.2/32");
        assert!(c.tun.ipv6.is_none());
        assert_eq!(c.tun.mtu, 1400);
        assert_eq!(c.dns.pool_v4.to_string(), "198.18.0.0/16");
        assert_eq!(c.dns.max_names, 10);
        assert_eq!(c.dns.upstream.as_deref().unwrap().len(), 1);
        assert_eq!(c.dns.address.to_string(), "100.96.0.53");
        assert!(!c.dns.listen && !c.direct_paths);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\nrelya: x\n")
            .unwrap_err()
            .0;
        assert!(e.contains("relya"), "{e}");
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\ntun:\n  mtu: 1400\n  nmae: x\n")
            .unwrap_err()
            .0;
        assert!(e.contains("`tun.nmae`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\ndns:\n  adress: 100.96.0.53\n")
            .unwrap_err()
            .0;
        assert!(e.contains("`dns.adress`"), "{e}");
    }

    #[test]
    fn bad_values_and_missing_keys_are_named() {
        let e = AgentConfig::parse("listen: 0.0.0.0:0\n").unwrap_err().0;
        assert!(e.contains("`relay` is missing"), "{e}");
        let e = AgentConfig::parse("relay: nope\n").unwrap_err().0;
        assert!(e.contains("`relay`"), "{e}");
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\ndns:\n  address: not-an-ip\n")
            .unwrap_err()
            .0;
        assert!(e.contains("`dns.address`"), "{e}");
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\ntun:\n  mtu: 1000\n")
            .unwrap_err()
            .0;
        assert!(e.contains("`tun.mtu`"), "{e}");
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\ndns:\n  pool_v4: 198.18.0.1/15\n")
            .unwrap_err()
            .0;
        assert!(
            e.contains("`dns.pool_v4`") && e.contains("198.18.0.0/15"),
            "{e}"
        );
        let e = AgentConfig::parse("relay: 192.0.2.1:4433\ndns:\n  address: 198.18.0.53\n")
            .unwrap_err()
            .0;
        assert!(e.contains("`dns.address`"), "{e}");
        let e = AgentConfig::parse("- a list\n").unwrap_err().0;
        assert!(e.starts_with("agent config"), "{e}");
    }
}

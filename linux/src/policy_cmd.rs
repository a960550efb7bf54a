//! `sluice policy check` and `sluice policy explain`: what an admin runs before deploying a
//! policy, and to see why a flow is allowed or denied.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use sluice_policy::compile::{parse_address, parse_expiry, Address};
use sluice_policy::diagnostic::io_reason;
use sluice_policy::watch::now_unix;
use sluice_policy::{compile, Flow, Proto, Severity};

use crate::PolicyCmd;

/// Exit status of `policy explain` on a denied flow (0 is allowed; 2, through main, a usage
/// error or an invalid policy).
const EXIT_DENIED: u8 = 1;
const EXIT_INVALID: u8 = 2;

/// A file that cannot be read has no line or column to name: `FILE: cannot read: REASON`.
fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow!("{}: cannot read: {}", path.display(), io_reason(&e)))
}

/// `HOST_OR_IP:PORT/PROTO`, `[IPv6]:PORT/PROTO`, or `HOST_OR_IP/icmp`.
pub fn parse_target(s: &str) -> Result<(IpAddr, Option<String>, Proto, u16)> {
    let usage = || {
        anyhow!("--to {s:?}: expected IP:PORT/PROTO, [IPV6]:PORT/PROTO or HOST:PORT/PROTO (like 10.0.0.5:22/tcp or [fd00::1]:443/tcp), or HOST_OR_IP/icmp")
    };
    let (addr_port, proto) = s.rsplit_once('/').ok_or_else(usage)?;
    let proto = Proto::parse(&proto.to_ascii_lowercase()).ok_or_else(usage)?;
    let (host, port) = if proto == Proto::Icmp {
        let host = match addr_port.strip_prefix('[') {
            Some(rest) => match rest.strip_suffix(']') {
                Some(h) => h,
                None => match rest.split_once("]:") {
                    Some((h, _)) => bail!("--to {s:?}: ICMP has no port: write [{h}]/icmp"),
                    None => return Err(usage()),
                },
            },
            // A bare IPv6 address is unambiguous here, as there is no port to split off.
            None if addr_port.parse::<Ipv6Addr>().is_ok() => addr_port,
            None => match addr_port.rsplit_once(':') {
                Some((h, _)) => bail!("--to {s:?}: ICMP has no port: write {h}/icmp"),
                None => addr_port,
            },
        };
        (host, 0)
    } else {
        let (host, port) = match addr_port.strip_prefix('[') {
            Some(rest) => rest.split_once("]:").ok_or_else(usage)?,
            None => {
                let (h, p) = addr_port.rsplit_once(':').ok_or_else(usage)?;
                // 2001:db8::1:443 is an address and a port, or an address alone: never guess.
                if h.contains(':') {
                    bail!(
                        "--to {s:?}: an IPv6 address with a port must be written [ADDRESS]:PORT, like [{h}]:{p}/{}",
                        proto.as_str()
                    );
                }
                (h, p)
            }
        };
        let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(usage)?;
        (host, port)
    };
    if host.is_empty() {
        return Err(usage());
    }
    if addr_port.starts_with('[') {
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| anyhow!("--to {s:?}: {host:?} in brackets is not an IPv6 address"))?;
        return Ok((IpAddr::V6(ip), None, proto, port));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((ip, None, proto, port));
    }
    match parse_address(host) {
        // A hostname: the address part matches nothing but 0.0.0.0/0.
        Ok(Address::Host(h)) => Ok((IpAddr::V4(Ipv4Addr::UNSPECIFIED), Some(h), proto, port)),
        Ok(_) => bail!("--to {s:?}: {host:?} is not one IP address or hostname"),
        Err(e) => bail!("--to {s:?}: {e}"),
    }
}

/// `--at` takes what a rule's `expires:` takes.
fn parse_at(s: &str) -> Result<i64> {
    parse_expiry(s).map_err(|e| anyhow!("--at {e}"))
}

pub fn run(cmd: PolicyCmd) -> Result<ExitCode> {
    match cmd {
        PolicyCmd::Check { file } => {
            let text = read(&file)?;
            let name = file.display().to_string();
            match compile(&text, &name, now_unix()) {
                Ok(c) => {
                    for w in &c.warnings {
                        println!("{w}");
                    }
                    println!(
                        "{name}: valid: {} groups, {} resources, {} rules{}",
                        c.policy_groups(),
                        c.policy.resources().len(),
                        c.policy.rules().len(),
                        match c.warnings.len() {
                            0 => String::new(),
                            n => format!(", {n} warning(s)"),
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    for d in &e.0 {
                        println!("{d}");
                    }
                    let n = e.0.iter().filter(|d| d.severity == Severity::Error).count();
                    println!("{name}: invalid: {n} error(s)");
                    Ok(ExitCode::from(1))
                }
            }
        }
        PolicyCmd::Explain {
            file,
            user,
            groups,
            to,
            at,
        } => {
            // The command line first: a usage error says so, whatever the file holds.
            let (ip, host, proto, port) = parse_target(&to)?;
            let now = match at {
                Some(t) => parse_at(&t)?,
                None => now_unix(),
            };
            let group: Vec<String> = groups
                .iter()
                .map(|g| g.trim().to_string())
                .filter(|g| !g.is_empty())
                .collect();
            let text = read(&file)?;
            let name = file.display().to_string();
            let c = match compile(&text, &name, now) {
                Ok(c) => c,
                Err(e) => {
                    // As `policy check` prints them: each line has its own `error:`.
                    for d in &e.0 {
                        eprintln!("{d}");
                    }
                    let n = e.0.iter().filter(|d| d.severity == Severity::Error).count();
                    eprintln!("{name}: invalid: {n} error(s); no decision made");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let subject = c.policy.subject(&user, &group);
            let flow = Flow {
                dst: ip,
                hostname: host.as_deref(),
                proto,
                port,
            };
            let d = c.policy.decide(&subject, &flow, now);
            let target = match (&host, proto) {
                (Some(h), Proto::Icmp) => format!("{h} (icmp)"),
                (Some(h), _) => format!("{h} port {port}/{}", proto.as_str()),
                (None, Proto::Icmp) => format!("{ip} (icmp)"),
                (None, _) => format!("{ip} port {port}/{}", proto.as_str()),
            };
            println!("{}", c.policy.describe(&d));
            println!("  user:   {user}");
            println!(
                "  groups: {}",
                if subject.groups.is_empty() {
                    "none".into()
                } else {
                    subject.groups.join(", ")
                }
            );
            println!("  flow:   {target}");
            let mut matched = Vec::new();
            c.policy
                .for_each_resource(&flow, |r| matched.push(c.policy.resource(r).name.clone()));
            matched.dedup();
            println!(
                "  resources matching the flow: {}",
                if matched.is_empty() {
                    "none".into()
                } else {
                    matched.join(", ")
                }
            );
            if let Some(r) = d.resource {
                println!("  served by connector {:?}", c.policy.resource(r).connector);
            }
            if let Some(t) = d.valid_until {
                println!("  this decision can change at {t} (unix seconds): a rule expires");
            }
            Ok(if d.allowed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENIED)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let (ip, h, p, port) = parse_target("10.0.0.5:22/tcp").unwrap();
        assert_eq!(
            (ip.to_string(), h, p, port),
            ("10.0.0.5".into(), None, Proto::Tcp, 22)
        );
        let (ip, _, p, port) = parse_target("[fd00::1]:443/TCP").unwrap();
        assert_eq!(
            (ip.to_string(), p, port),
            ("fd00::1".into(), Proto::Tcp, 443)
        );
        let (_, h, p, _) = parse_target("wiki.corp.example:80/tcp").unwrap();
        assert_eq!((h.as_deref(), p), (Some("wiki.corp.example"), Proto::Tcp));
        let (ip, _, p, port) = parse_target("10.0.0.5/icmp").unwrap();
        assert_eq!(
            (ip.to_string(), p, port),
            ("10.0.0.5".into(), Proto::Icmp, 0)
        );
        let (ip, _, p, _) = parse_target("fd00::1/icmp").unwrap();
        assert_eq!((ip.to_string(), p), ("fd00::1".into(), Proto::Icmp));
        let (ip, _, _, _) = parse_target("[fd00::1]/icmp").unwrap();
        assert_eq!(ip.to_string(), "fd00::1");
        for bad in [
            "10.0.0.5",
            "10.0.0.5:80",
            "10.0.0.5:0/tcp",
            "10.0.0.5:99999/tcp",
            ":80/tcp",
            "10.0.0.5:80/sctp",
            "[10.0.0.5]:80/tcp",
            "[fd00::1]443/tcp",
            "*.corp.example:80/tcp",
            "bad host:80/tcp",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    fn err(s: &str) -> String {
        match parse_target(s) {
            Ok(t) => panic!("{s}: accepted as {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_bare_ipv6_address_with_a_port_is_refused() {
        assert_eq!(
            err("2001:db8::1:443/tcp"),
            "--to \"2001:db8::1:443/tcp\": an IPv6 address with a port must be written [ADDRESS]:PORT, like [2001:db8::1]:443/tcp"
        );
    }

    #[test]
    fn icmp_takes_no_port() {
        assert_eq!(
            err("10.0.0.5:80/icmp"),
            "--to \"10.0.0.5:80/icmp\": ICMP has no port: write 10.0.0.5/icmp"
        );
        assert_eq!(
            err("[fd00::1]:80/icmp"),
            "--to \"[fd00::1]:80/icmp\": ICMP has no port: write [fd00::1]/icmp"
        );
        assert_eq!(
            err("wiki.corp.example:80/icmp"),
            "--to \"wiki.corp.example:80/icmp\": ICMP has no port: write wiki.corp.example/icmp"
        );
    }

    #[test]
    fn at_takes_a_date_or_an_rfc3339_time() {
        assert_eq!(parse_at("2100-01-01").unwrap(), 4_102_444_800);
        assert_eq!(parse_at("2100-01-01T00:00:00Z").unwrap(), 4_102_444_800);
        assert_eq!(
            parse_at("2100-01-01T01:00:00+01:00").unwrap(),
            4_102_444_800
        );
        assert!(parse_at("tomorrow").is_err());
    }
}

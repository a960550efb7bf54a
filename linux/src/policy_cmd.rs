//! `sluice policy check` and `sluice policy explain`: what an admin runs before deploying a
//! policy, and to see why a flow is allowed or denied.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use sluice_policy::watch::now_unix;
use sluice_policy::{compile, Flow, Proto, Severity};

use crate::PolicyCmd;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `HOST_OR_IP:PORT/PROTO`, `[IPv6]:PORT/PROTO`, or `HOST_OR_IP/icmp`.
pub fn parse_target(s: &str) -> Result<(IpAddr, Option<String>, Proto, u16)> {
    let usage = || {
        format!("--to {s:?}: expected HOST_OR_IP:PORT/PROTO (like 10.0.0.5:22/tcp or [fd00::1]:443/tcp) or HOST_OR_IP/icmp")
    };
    let (addr_port, proto) = s.rsplit_once('/').with_context(usage)?;
    let proto = Proto::parse(&proto.to_ascii_lowercase()).with_context(usage)?;
    let (host, port) = if proto == Proto::Icmp {
        (addr_port.trim_start_matches('[').trim_end_matches(']'), 0)
    } else {
        let (h, p) = addr_port.rsplit_once(':').with_context(usage)?;
        let port: u16 = p.parse().ok().filter(|p| *p > 0).with_context(usage)?;
        (h.trim_start_matches('[').trim_end_matches(']'), port)
    };
    if host.is_empty() {
        bail!(usage());
    }
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => (ip, None, proto, port),
        // A hostname: the address part matches nothing but 0.0.0.0/0.
        Err(_) => (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(host.to_ascii_lowercase()),
            proto,
            port,
        ),
    })
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
            group,
            to,
            at,
        } => {
            let text = read(&file)?;
            let name = file.display().to_string();
            let now = match at {
                Some(t) => parse_time(&t)?,
                None => now_unix(),
            };
            let c = compile(&text, &name, now).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (ip, host, proto, port) = parse_target(&to)?;
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
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_time(s: &str) -> Result<i64> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .with_context(|| format!("--at {s:?}: expected an RFC 3339 time like 2027-01-31T12:00:00Z"))
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
        for bad in [
            "10.0.0.5",
            "10.0.0.5:80",
            "10.0.0.5:0/tcp",
            "10.0.0.5:99999/tcp",
            ":80/tcp",
            "10.0.0.5:80/sctp",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}

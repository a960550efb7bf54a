//! What the host says about the network (the path-change JSON), and what we find out
//! ourselves when it does not say: the interface addresses, by getifaddrs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Deserialize;

use crate::ffi::Error;

/// A network change as the host reports it; both keys optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathChange {
    interfaces: Option<Vec<IpAddr>>,
    /// "IP:PORT" or a bare IP (port 53), as NWPath / SCDynamicStore give them.
    resolvers: Option<Vec<String>>,
}

#[derive(Debug, PartialEq)]
pub struct Change {
    pub interfaces: Option<Vec<IpAddr>>,
    pub resolvers: Option<Vec<SocketAddr>>,
}

pub fn parse_path_change(json: &str) -> Result<Change, Error> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let p: PathChange =
        serde_json::from_str(json).map_err(|e| Error::Argument(format!("change_json: {e}")))?;
    let resolvers = p
        .resolvers
        .map(|v| {
            v.iter()
                .map(|r| {
                    r.parse::<SocketAddr>()
                        .or_else(|_| r.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .map_err(|_| {
                            Error::Argument(format!(
                                "change_json: resolver {r:?} is not IP or IP:PORT"
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(Change {
        interfaces: p.interfaces,
        resolvers,
    })
}

/// Which interface addresses may be direct-path candidates of a socket bound to `bound`: its
/// family (a socket bound to IPv4 sends IPv4 only), not loopback, not link-local (no scope to
/// name it with), not the tunnel's own.
pub fn usable(ips: Vec<IpAddr>, bound: SocketAddr, own: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ips {
        let link_local = match ip {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => a.is_unicast_link_local(),
        };
        let family = ip.is_ipv4() == bound.is_ipv4()
            || (bound.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && ip.is_ipv6());
        if ip.is_loopback()
            || ip.is_unspecified()
            || link_local
            || !family
            || own.contains(&ip)
            || out.contains(&ip)
        {
            continue;
        }
        if !bound.ip().is_unspecified() && ip != bound.ip() {
            continue;
        }
        out.push(ip);
    }
    out
}

/// The addresses of every interface that is up (getifaddrs).
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(
            "cannot list interface addresses: {}",
            std::io::Error::last_os_error()
        );
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_UP as u32) == 0 {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says how long it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))));
        } else if family == libc::AF_INET6 {
            // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
        }
    }
    // SAFETY: the list getifaddrs gave us, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_change_json() {
        let c = parse_path_change(
            r#"{"interfaces":["192.0.2.10","2001:db8::10"],"resolvers":["192.0.2.53:53","2001:db8::53"]}"#,
        )
        .unwrap();
        assert_eq!(c.interfaces.unwrap().len(), 2);
        let r = c.resolvers.unwrap();
        assert_eq!(r[0].to_string(), "192.0.2.53:53");
        assert_eq!(r[1].to_string(), "[2001:db8::53]:53");
        let c = parse_path_change("{}").unwrap();
        assert_eq!(
            c,
            Change {
                interfaces: None,
                resolvers: None
            }
        );
        assert!(parse_path_change("").is_ok());
        assert!(parse_path_change("{").is_err());
        assert!(parse_path_change(r#"{"interface":[]}"#).is_err());
        assert!(parse_path_change(r#"{"resolvers":["nope"]}"#).is_err());
    }

    #[test]
    fn usable_leaves_out_loopback_link_local_the_tunnel_and_other_families() {
        let ips: Vec<IpAddr> = [
            "127.0.0.1",
            "192.0.2.10",
            "100.96.0.1",
            "169.254.1.1",
            "2001:db8::1",
            "fe80::1",
            "192.0.2.10",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let own = ["100.96.0.1".parse().unwrap()];
        let v4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(
            usable(ips.clone(), v4, &own),
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        let v6: SocketAddr = "[::]:0".parse().unwrap();
        assert_eq!(
            usable(ips.clone(), v6, &own),
            vec!["2001:db8::1".parse::<IpAddr>().unwrap()]
        );
        let bound: SocketAddr = "192.0.2.11:0".parse().unwrap();
        assert!(usable(ips, bound, &own).is_empty());
    }

    #[test]
    fn getifaddrs_lists_loopback() {
        assert!(interface_addresses().iter().any(|ip| ip.is_loopback()));
    }
}

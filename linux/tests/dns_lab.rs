//! Split DNS in the lab: resource names resolve to synthetic addresses and reach the service
//! through its connector (which resolves them in the private zone); other names are answered
//! by the upstream resolver exactly as without the agent.

use std::collections::HashSet;
use std::fs;
use std::net::IpAddr;
use std::time::{Duration, Instant};

mod common;
use common::*;

fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec!["dig", "+time=2", "+tries=1"];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&lab.exec("agent", &a).stdout).into_owned()
}

fn short(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    dig(lab, &a).trim().to_string()
}

#[test]
fn resource_names_get_synthetic_addresses_and_reach_the_service() {
    require_root();
    let lab = Lab::up("tdns-");
    let v4: IpAddr = short(&lab, &["wiki.corp.internal"])
        .parse()
        .expect("an A answer");
    assert!(
        matches!(v4, IpAddr::V4(a) if a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18),
        "{v4}"
    );
    // Stable while in use, over TCP too.
    assert_eq!(short(&lab, &["+tcp", "wiki.corp.internal"]), v4.to_string());
    let v6: IpAddr = short(&lab, &["AAAA", "wiki.corp.internal"])
        .parse()
        .expect("an AAAA answer");
    assert!(v6.to_string().starts_with("fd5c:1ce0:d5::"), "{v6}");

    let page = |args: &[&str]| {
        let mut a = vec!["curl", "-sS", "--max-time", "5"];
        a.extend_from_slice(args);
        lab.exec("agent", &a)
    };
    let out = page(&["http://wiki.corp.internal/"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Hello from the private service network"),
        "{out:?}"
    );
    // IPv6 from the app; the connector dials whatever the name really has.
    let out = page(&["-6", "http://wiki.corp.internal/"]);
    assert!(out.status.success(), "{out:?}");
    // A name under the wildcard resource.
    let out = page(&["http://app.dev.corp.internal/"]);
    assert!(out.status.success(), "{out:?}");

    // A name the zone does not have: a synthetic address, then a quick failure, no timeout.
    let t0 = Instant::now();
    let out = page(&["http://nothere.corp.internal/"]);
    assert!(!out.status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );

    // The policy saw the hostname.
    let audit = fs::read_to_string(lab.dir.join("connector-audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"hostname\":\"wiki.corp.internal\"")
            && audit.contains("\"resource\":\"corp-zone\""),
        "{audit}"
    );
}

/// Records the agent cannot make up (MX, TXT, SRV) come from the private zone, through the
/// connector; an answer too large for UDP makes the client retry over TCP and arrives whole.
#[test]
fn other_record_types_of_resource_names_come_from_the_private_zone() {
    require_root();
    let lab = Lab::up("tdrr-");
    assert_eq!(
        short(&lab, &["MX", "wiki.corp.internal"]),
        "10 mail.corp.internal."
    );
    assert_eq!(short(&lab, &["TXT", "wiki.corp.internal"]), "\"team=docs\"");
    assert_eq!(
        short(&lab, &["SRV", "_http._tcp.wiki.corp.internal"]),
        "0 0 80 wiki.corp.internal."
    );
    // Without EDNS a client takes 512 bytes over UDP: dig gets TC, asks again over TCP.
    let big = dig(&lab, &["+noedns", "TXT", "big.corp.internal"]);
    assert!(big.contains("Truncated, retrying in TCP mode"), "{big}");
    for c in ["a", "b", "c"] {
        assert!(big.contains(&c.repeat(250)), "{big}");
    }
    // A name the zone does not have.
    let nx = dig(&lab, &["MX", "nothere.corp.internal"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // HTTPS records would carry the real servers' address hints: none are given.
    let https = dig(&lab, &["HTTPS", "wiki.corp.internal"]);
    assert!(
        https.contains("status: NOERROR") && https.contains("ANSWER: 0"),
        "{https}"
    );
}

#[test]
fn other_names_are_answered_by_the_upstream_unchanged() {
    require_root();
    let lab = Lab::up("tdnsu-");
    let answer = |a: &str| {
        a.lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let status = |a: &str| {
        a.lines()
            .find(|l| l.contains("status:"))
            .map(|l| l.split(", id:").next().unwrap_or("").to_string())
    };
    for name in ["www.example.test", "missing.example.test"] {
        let via_agent = dig(&lab, &[name]);
        let direct = dig(&lab, &["@192.0.2.53", name]);
        assert_eq!(
            answer(&via_agent),
            answer(&direct),
            "{name}:\n{via_agent}\n{direct}"
        );
        assert_eq!(status(&via_agent), status(&direct), "{name}");
    }
    assert_eq!(short(&lab, &["www.example.test"]), "192.0.2.80");
    assert_eq!(short(&lab, &["+tcp", "www.example.test"]), "192.0.2.80");
}

#[test]
fn a_thousand_names_resolve_without_collision() {
    require_root();
    let lab = Lab::up("tdnsk-");
    let names: Vec<String> = (0..1000)
        .map(|i| format!("host{i}.corp.internal"))
        .collect();
    let file = lab.dir.join("names.txt");
    fs::write(&file, names.join("\n")).unwrap();
    let out = short(&lab, &["-f", file.to_str().unwrap()]);
    let addrs: Vec<&str> = out.lines().collect();
    assert_eq!(addrs.len(), 1000, "{out}");
    let distinct: HashSet<&str> = addrs.iter().copied().collect();
    assert_eq!(distinct.len(), 1000, "collisions");
    // Asked again, every name keeps its address.
    let again = short(&lab, &["-f", file.to_str().unwrap()]);
    assert_eq!(again, out);
}

/// Waits until `f` holds (or fails the test after `secs`).
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_system_resolver_is_restored_after_a_stop_and_after_a_crash() {
    require_root();
    let lab = Lab::up("tdnsr-");
    let conf = std::path::PathBuf::from(format!("/etc/netns/{}/resolv.conf", lab.ns("agent")));
    let original = "nameserver 192.0.2.53\n";
    let read = || fs::read_to_string(&conf).unwrap_or_default();
    assert!(
        read().contains("nameserver 100.96.0.1"),
        "the agent took resolution over:\n{}",
        read()
    );

    lab.stop("agent", "TERM");
    assert_eq!(read(), original, "restored exactly on SIGTERM");

    lab.start("agent", "agent");
    wait_for(10, "agent took over again", || {
        read().contains("100.96.0.1")
    });
    lab.stop("agent", "KILL");
    assert!(
        read().contains("100.96.0.1"),
        "a killed agent cannot restore"
    );

    // The next start restores the original first (and reads the real upstream from it).
    lab.start("agent", "agent");
    wait_for(10, "agent took over after the crash", || {
        lab.log("agent").matches("DNS on").count() >= 3
    });
    assert!(
        lab.log("agent")
            .contains("restored /etc/resolv.conf as a previous agent left it changed"),
        "{}",
        lab.log("agent")
    );
    assert!(
        lab.log("agent").contains("forwarded to 192.0.2.53:53"),
        "{}",
        lab.log("agent")
    );
    assert_eq!(short(&lab, &["www.example.test"]), "192.0.2.80");
    lab.stop("agent", "TERM");
    assert_eq!(
        read(),
        original,
        "restored exactly after the crash and a clean stop"
    );
}

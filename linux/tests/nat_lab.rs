//! NAT lab tests: `sluice lab up --nat-agent TYPE` / `--nat-connector TYPE` puts a side behind a
//! real NAT (nftables in a router namespace). For each type the probe must measure the RFC 4787
//! behaviour the type stands for, and the lab must keep working behind it: the tunnel through
//! the relay, the page, the upstream and the private DNS. Each test builds its own lab under its
//! own prefix and takes it down when it ends, failed or not. They need root; run them one at a
//! time (`--test-threads=1`).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

const PAGE: &str = "Hello from the private service network";
const AGENT_WAN: &str = "192.0.2.11";
const CONN_WAN: &str = "192.0.2.21";

/// `sluice lab nat-probe --side SIDE --json`: that side's report.
fn probe(lab: &Lab, side: &str) -> Value {
    let out = Command::new(BIN)
        .args([
            "lab",
            "nat-probe",
            "--prefix",
            &lab.prefix,
            "--side",
            side,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nat-probe failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}

/// The probe's report says `mapping` and `filtering`, and every responder saw the side at its
/// router's WAN address.
fn assert_probe(lab: &Lab, side: &str, nat: &str, wan: &str, mapping: &str, filtering: &str) {
    let line = format!("{side} NAT {nat}: mapping {mapping}, filtering {filtering}");
    assert!(
        lab.up_output.contains(&line),
        "lab up should print {line:?}:\n{}",
        lab.up_output
    );
    let r = probe(lab, side);
    assert_eq!(r["nat"], nat, "{r:#}");
    assert_eq!(r["mapping"], mapping, "{r:#}");
    assert_eq!(r["filtering"], filtering, "{r:#}");
    assert_eq!(r["translated"], true, "{r:#}");
    assert_eq!(r["as_configured"], true, "{r:#}");
    let seen = r["seen"].as_array().unwrap();
    assert_eq!(seen.len(), 3, "{r:#}");
    for s in seen {
        let mapped = s["mapped"].as_str().unwrap();
        assert!(mapped.starts_with(&format!("{wan}:")), "{r:#}");
    }
}

/// A page through the tunnel, which runs through the relay, with each side connected to the
/// relay from the address its NAT gives it.
fn assert_page_through_relay(lab: &Lab, agent_public: &str, conn_public: &str) {
    let out = lab.curl(&format!("http://{SVC}/"), "5");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(PAGE),
        "no page through the tunnel: {out:?}\nagent log:\n{}",
        lab.log("agent")
    );
    assert!(
        lab.log("agent").contains("is up via the relay"),
        "{}",
        lab.log("agent")
    );
    let relay = lab.log("relay");
    for public in [agent_public, conn_public] {
        assert!(
            relay.contains(&format!("connected from {public}:")),
            "the relay should see a peer at {public}:\n{relay}"
        );
    }
}

/// The agent's resolver (itself) forwards a public name to the upstream 192.0.2.53, through
/// the agent's NAT when it has one.
fn assert_upstream_dns(lab: &Lab) {
    let out = lab.exec(
        "agent",
        &["dig", "+short", "+time=2", "+tries=2", "www.example.test"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "192.0.2.80",
        "{out:?}"
    );
}

fn agent_behind(prefix: &str, nat: &str, mapping: &str, filtering: &str) {
    require_root();
    let lab = Lab::up_with(prefix, &["--nat-agent", nat]);
    assert_probe(&lab, "agent", nat, AGENT_WAN, mapping, filtering);
    assert_page_through_relay(&lab, AGENT_WAN, "192.0.2.20");
    assert_upstream_dns(&lab);
}

#[test]
fn agent_behind_full_cone() {
    agent_behind(
        "nf-fc-",
        "full-cone",
        "endpoint-independent",
        "endpoint-independent",
    );
}

#[test]
fn agent_behind_address_restricted() {
    agent_behind(
        "nf-ar-",
        "address-restricted",
        "endpoint-independent",
        "address-dependent",
    );
}

#[test]
fn agent_behind_port_restricted() {
    agent_behind(
        "nf-pr-",
        "port-restricted",
        "endpoint-independent",
        "address-and-port-dependent",
    );
}

#[test]
fn agent_behind_symmetric() {
    agent_behind(
        "nf-sy-",
        "symmetric",
        "address-and-port-dependent",
        "address-and-port-dependent",
    );
}

/// The connector behind a symmetric NAT: the probe sees it, the page and the connector's
/// private DNS work, `lab status` shows the router, and `lab down` removes it.
#[test]
fn connector_behind_symmetric() {
    require_root();
    let lab = Lab::up_with("nf-cs-", &["--nat-connector", "symmetric"]);
    assert_probe(
        &lab,
        "connector",
        "symmetric",
        CONN_WAN,
        "address-and-port-dependent",
        "address-and-port-dependent",
    );
    // The agent, on the bridge, is not translated.
    let a = probe(&lab, "agent");
    assert_eq!(a["translated"], false, "{a:#}");
    assert_page_through_relay(&lab, "192.0.2.10", CONN_WAN);
    // A resource hostname: the connector resolves it with the private zone's server.
    let out = lab.curl("http://wiki.corp.internal/", "5");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(PAGE),
        "{out:?}"
    );
    let status = Command::new(BIN)
        .args(["lab", "status", "--prefix", &lab.prefix])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status
            .lines()
            .any(|l| l.contains("nf-cs-nat-conn") && l.contains("symmetric")),
        "{status}"
    );
    let out = Command::new(BIN)
        .args(["lab", "down", "--prefix", &lab.prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for ns in ["nat-conn", "conn", "agent", "relay"] {
        let ns = lab.ns(ns);
        assert!(!Path::new("/run/netns").join(&ns).exists(), "{ns} is left");
        assert!(
            !Path::new("/etc/netns").join(&ns).exists(),
            "{ns} files left"
        );
    }
}

//! Direct paths in the NAT lab: the agent and the connector find a path around the relay by
//! hole punching through real NATs (nftables routers in namespaces), the one end-to-end QUIC
//! connection migrates onto it, falls back to the relay when it breaks and comes back when it
//! heals, with application flows running across every switch. What the agent says about its
//! path is read from `sluice status --json`. Each test builds its own lab and takes it down
//! when it ends, failed or not. They need root; run them one at a time (`--test-threads=1`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::*;

const PAGE: &str = "Hello from the private service network";
const TYPES: [&str; 5] = [
    "none",
    "full-cone",
    "address-restricted",
    "port-restricted",
    "symmetric",
];

fn nat_args(agent: &str, conn: &str) -> Vec<String> {
    let mut v = Vec::new();
    if agent != "none" {
        v.extend(["--nat-agent".to_string(), agent.to_string()]);
    }
    if conn != "none" {
        v.extend(["--nat-connector".to_string(), conn.to_string()]);
    }
    v
}

fn lab_with(prefix: &str, agent: &str, conn: &str) -> Lab {
    let args = nat_args(agent, conn);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Lab::up_with(prefix, &args)
}

/// The agent's status (`sluice status --json`); Null while it cannot be read.
fn status(lab: &Lab) -> Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(lab.dir.join("agent.sock"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn tunnel(lab: &Lab) -> Value {
    status(lab)["tunnels"][0].clone()
}

/// Waits until the tunnel's path is `want` ("direct" or "relay"); the status then.
fn wait_path(lab: &Lab, want: &str, within: Duration) -> Option<Value> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let t = tunnel(lab);
        if t["state"] == "up" && t["path"] == want {
            return Some(t);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn page(lab: &Lab) -> bool {
    let out = lab.curl(&format!("http://{SVC}/"), "5");
    String::from_utf8_lossy(&out.stdout).contains(PAGE)
}

/// Whether a direct path must be found between these two NAT types: every pair of
/// endpoint-independent mappings, and a symmetric NAT facing one that does not filter by port.
fn direct_expected(agent: &str, conn: &str) -> bool {
    let port_filtering = |t: &str| matches!(t, "port-restricted" | "symmetric");
    !((agent == "symmetric" && port_filtering(conn))
        || (conn == "symmetric" && port_filtering(agent)))
}

/// The 5x5 matrix of NAT types: a page through every pair, direct where the NATs allow it
/// (found within 2 s of the tunnel coming up), relayed (and working) where they do not. The
/// table is printed and written to `nat-matrix.md` in cargo's test scratch directory.
#[test]
fn nat_matrix() {
    require_root();
    let mut rows = Vec::new();
    let mut wrong = Vec::new();
    for (i, a) in TYPES.iter().enumerate() {
        for (j, c) in TYPES.iter().enumerate() {
            let lab = lab_with(&format!("m{i}{j}-"), a, c);
            assert!(page(&lab), "{a} x {c}: no page\n{}", lab.log("agent"));
            let expect = direct_expected(a, c);
            let (got, took) = match wait_path(&lab, "direct", Duration::from_secs(7)) {
                Some(t) => {
                    let up = t["up_secs"].as_f64().unwrap_or(0.0);
                    let since = t["since_switch_secs"].as_f64().unwrap_or(0.0);
                    (
                        "direct",
                        format!("{:.0} ms", (up - since).max(0.0) * 1000.0),
                    )
                }
                None => ("relay", "-".to_string()),
            };
            if got == "relay" {
                // Still working over the relay after the checks gave up.
                assert!(page(&lab), "{a} x {c}: no page on the relay");
                assert!(
                    lab.log("agent").contains("no direct path found"),
                    "{a} x {c}:\n{}",
                    lab.log("agent")
                );
            }
            if (got == "direct") != expect {
                wrong.push(format!("{a} x {c}: {got}"));
            }
            rows.push(format!("| {a} | {c} | {got} | {took} |"));
        }
    }
    let table = format!(
        "| agent NAT | connector NAT | path | tunnel up to direct |\n|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    eprintln!("{table}");
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nat-matrix.md"),
        &table,
    );
    assert!(wrong.is_empty(), "unexpected paths: {wrong:?}\n{table}");
}

/// Bytes the relay's namespace moved (both ways, every interface but loopback).
fn relay_bytes(lab: &Lab) -> u64 {
    let out = lab.exec("relay", &["cat", "/proc/net/dev"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter(|l| !l.trim_start().starts_with("lo:"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(f.get(1)?.parse::<u64>().ok()? + f.get(9)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Drops (or lets through again) every packet between the two NATs' WAN addresses in the
/// connector's router: the direct path breaks, the relayed one does not.
fn block_direct(lab: &Lab, block: bool) {
    let script = if block {
        "table inet sluicetest {\n chain forward {\n  type filter hook forward priority -300; policy accept;\n  ip saddr 192.0.2.11 drop\n  ip daddr 192.0.2.11 drop\n }\n}\n"
    } else {
        "delete table inet sluicetest\n"
    };
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("nat-conn"), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "nft: {out:?}");
}

/// A download through the tunnel that reads at most `rate` bytes a second until `hurry` is
/// set, then as fast as it can; the SHA-256 of what arrived.
fn paced_download(len: u64, seed: u64, rate: u64, hurry: Arc<AtomicBool>) -> [u8; 32] {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([198, 51, 100, 10], DATA_PORT)),
        Duration::from_secs(10),
    )
    .expect("connect through the tunnel");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&data_request(b'D', len, seed)).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 16 * 1024];
    let (mut got, t0) = (0u64, Instant::now());
    loop {
        let n = s.read(&mut buf).expect("download read (reset or stalled)");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n as u64;
        if !hurry.load(Ordering::Relaxed) {
            let due = Duration::from_secs_f64(got as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    assert_eq!(got, len, "download length");
    h.finalize().into()
}

/// One TCP download keeps running, checksum intact, while its tunnel goes relay -> direct ->
/// relay -> direct: the download starts while the direct path is blocked (the tunnel is
/// relayed), the block is lifted (the retry finds the path within 35 s, after which the relay
/// carries nothing of the transfer), blocked again mid-transfer (back on the relay within
/// seconds) and lifted again (direct within 35 s).
#[test]
fn a_transfer_survives_every_switch_between_relay_and_direct() {
    require_root();
    let lab = lab_with("dsw-", "port-restricted", "port-restricted");
    start_data_server(&lab);
    block_direct(&lab, true);
    const LEN: u64 = 1 << 30;
    const RATE: u64 = 4 << 20;
    // `lab up` has already brought the tunnel up (and direct): with the download's traffic
    // the block sends it back to the relay within seconds.
    let hurry = Arc::new(AtomicBool::new(false));
    let h2 = hurry.clone();
    let download = in_netns(&lab.ns("agent"), move || paced_download(LEN, 5, RATE, h2));
    wait_path(&lab, "relay", Duration::from_secs(10)).expect("relayed after the block");
    std::thread::sleep(Duration::from_secs(1));

    block_direct(&lab, false);
    let t = wait_path(&lab, "direct", Duration::from_secs(35)).expect("direct after the lift");
    eprintln!("direct after the first lift: {t}");
    // Give the switch a moment, then the relay must carry (almost) nothing of the transfer.
    std::thread::sleep(Duration::from_millis(500));
    let (r0, b0) = (
        relay_bytes(&lab),
        tunnel(&lab)["bytes_received"].as_u64().unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let (r1, b1) = (
        relay_bytes(&lab),
        tunnel(&lab)["bytes_received"].as_u64().unwrap(),
    );
    assert!(
        b1 - b0 > 4 << 20,
        "the transfer moved {} bytes in 3 s",
        b1 - b0
    );
    assert!(
        r1 - r0 < 64 << 10,
        "the relay moved {} bytes while the tunnel was direct",
        r1 - r0
    );

    // Broken mid-transfer: back on the relay within seconds, the transfer going on.
    block_direct(&lab, true);
    let t1 = Instant::now();
    wait_path(&lab, "relay", Duration::from_secs(10)).expect("relayed after the block");
    eprintln!("relayed {:.1}s after the block", t1.elapsed().as_secs_f32());
    // The transfer goes on over the relay: once TCP's retransmission timer (backed off during
    // the seconds the path was dark) fires, bytes flow again.
    let b2 = tunnel(&lab)["bytes_received"].as_u64().unwrap();
    let t3 = Instant::now();
    while tunnel(&lab)["bytes_received"].as_u64().unwrap() < b2 + (1 << 20) {
        assert!(
            t3.elapsed() < Duration::from_secs(15),
            "the transfer stalled on the relay"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "flowing on the relay {:.1}s after the switch",
        t3.elapsed().as_secs_f32()
    );

    block_direct(&lab, false);
    let t2 = Instant::now();
    wait_path(&lab, "direct", Duration::from_secs(35)).expect("direct again within 35 s");
    eprintln!("direct {:.1}s after the lift", t2.elapsed().as_secs_f32());

    hurry.store(true, Ordering::Relaxed);
    let got = download.join().expect("the transfer failed");
    assert_eq!(got, pattern_digest(5, LEN), "download checksum");
}

/// The agent's host moves to another address (its old one removed): the tunnel recovers
/// without a restart of the agent, and goes direct again.
#[test]
fn the_agent_moving_to_a_new_address_recovers() {
    require_root();
    // Behind a symmetric NAT the new address gets a new public port: every peer sees the agent
    // somewhere new.
    let lab = lab_with("dmv-", "symmetric", "full-cone");
    assert!(page(&lab));
    wait_path(&lab, "direct", Duration::from_secs(5)).expect("direct at first");
    let pid = lab.pid("agent");
    let ip = |args: &[&str]| {
        let out = lab.exec("agent", &[&["ip"][..], args].concat());
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    // Renumbered, as by a new DHCP lease (removing the primary address first: Linux would
    // take a secondary in the same subnet away with it).
    ip(&["addr", "del", "10.0.1.10/24", "dev", "eth0"]);
    ip(&["addr", "add", "10.0.1.77/24", "dev", "eth0"]);
    // Removing the address took the default route with it.
    let _ = lab.exec(
        "agent",
        &["ip", "route", "replace", "default", "via", "10.0.1.1"],
    );
    let t0 = Instant::now();
    let mut ok = false;
    while t0.elapsed() < Duration::from_secs(30) && !ok {
        ok = page(&lab);
    }
    assert!(ok, "no page after the move:\n{}", lab.log("agent"));
    eprintln!(
        "page again {:.1}s after the move",
        t0.elapsed().as_secs_f32()
    );
    let t0 = Instant::now();
    while !lab.log("agent").contains("10.0.1.77") && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = wait_path(&lab, "direct", Duration::from_secs(40)).expect("direct after the move");
    assert!(
        t["candidate_pair"]["local"]
            .as_str()
            .is_some_and(|l| l.contains("192.0.2.11")),
        "{t}"
    );
    assert!(
        lab.log("agent").contains("10.0.1.77"),
        "the new address is a candidate:\n{}",
        lab.log("agent")
    );
    assert_eq!(lab.pid("agent"), pid, "the agent was not restarted");
}

/// Packets on the agent's socket that claim to come from another peer (a NAT that gave two
/// peers one address, or a forger) are refused and change nothing.
#[test]
fn punches_from_the_wrong_peer_are_refused() {
    require_root();
    let lab = lab_with("dpx-", "none", "none");
    assert!(page(&lab));
    wait_path(&lab, "direct", Duration::from_secs(5)).expect("direct");
    let st = status(&lab);
    let me = st["peer_id"].as_str().unwrap().to_string();
    let port: u16 = st["relay"]["observed_addr"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let me = hex(&me);
    assert_eq!(me.len(), 32);
    // Sent from the connector's namespace, where the real peer's packets come from.
    let forged = move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut p = vec![0x14u8];
        p.extend_from_slice(&me);
        p.extend_from_slice(&[0xab; 32]);
        p.extend_from_slice(&7u64.to_be_bytes());
        p.extend_from_slice(&1u64.to_be_bytes());
        for _ in 0..3 {
            sock.send_to(&p, ("192.0.2.10", port)).unwrap();
        }
        // Not QUIC either.
        sock.send_to(b"\x40garbage", ("192.0.2.10", port)).unwrap();
    };
    in_netns(&lab.ns("conn"), forged).join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let log = lab.log("agent");
    assert!(
        log.contains("refused a direct-path packet from 192.0.2.20:")
            && log.contains("punch from a peer with no tunnel here"),
        "{log}"
    );
    assert_eq!(tunnel(&lab)["path"], "direct");
    assert!(page(&lab));
}

/// `direct_paths: false` (here `lab up --relay-only`) keeps the tunnel on the relay even where
/// a direct path would work.
#[test]
fn relay_only_agents_stay_on_the_relay() {
    require_root();
    let lab = Lab::up_with("dro-", &["--relay-only"]);
    assert!(page(&lab));
    std::thread::sleep(Duration::from_secs(2));
    let t = tunnel(&lab);
    assert_eq!(t["path"], "relay", "{t}");
    assert!(!lab.log("agent").contains("now direct"));
}

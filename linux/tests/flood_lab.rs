//! Flood limits in the lab (issue 17, part 2), with the real binaries: one agent sends 100,000
//! TCP SYNs through its tunnel (a raw socket in its namespace writes them into the TUN route,
//! each a new flow), and a second agent, at the same time, opens a connection at once. The
//! connector drops the flood past the first agent's new-flow rate before the policy sees it,
//! says so in its log and counts it in its metrics; the flooder's tunnel stays up.
//!
//! Needs root and the release binary; run one at a time (`--test-threads=1`).

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Writes N SYNs from SRC to DST:PORT, each from another source port, through a raw socket
/// (the route sends them into the agent's TUN device). Waits out a full queue (ENOBUFS)
/// rather than losing a packet, and prints how many it sent.
const SYN_FLOOD: &str = r#"
import socket, struct, sys, time, random
src, dst, dport, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sip, dip = socket.inet_aton(src), socket.inet_aton(dst)
def csum(b):
    if len(b) % 2:
        b += b"\0"
    v = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    v = (v >> 16) + (v & 0xFFFF)
    v += v >> 16
    return ~v & 0xFFFF
sent = 0
for i in range(n):
    sport = 1024 + i % 60000
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(sip + dip + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i & 0xFFFF, 0, 64, 6, 0, sip, dip)
    while True:
        try:
            s.sendto(ip + tcp, (dst, 0))
            sent += 1
            break
        except OSError:
            time.sleep(0.0005)
print(sent)
"#;

fn tun_addr(lab: &Lab, short: &str) -> String {
    let out = lab.exec(short, &["ip", "-4", "-o", "addr", "show", "dev", "sluice0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no TUN address in {short}: {text}"))
        .to_string()
}

/// One page fetched by `short`'s agent: how long it took, or why it failed.
fn fetch(lab: &Lab, short: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let out = lab.exec(
        short,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            &format!("http://{SVC}/"),
        ],
    );
    match out.status.success() {
        true => Ok(t0.elapsed()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn metric(lab: &Lab, short: &str, name: &str) -> f64 {
    let out = lab.exec(
        short,
        &[
            "curl",
            "-sS",
            "--max-time",
            "2",
            "http://127.0.0.1:9464/metrics",
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_syn_flood_from_one_agent_leaves_another_able_to_connect_at_once() {
    require_root();
    let lab = Lab::up_with("sf-", &["--second-agent", "--relay-only"]);
    // Both agents reach the service before the flood.
    fetch(&lab, "agent").expect("agent 1 before the flood");
    fetch(&lab, "agent2").expect("agent 2 before the flood");
    let src = tun_addr(&lab, "agent");
    let flood = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("agent"),
            "python3",
            "-c",
            SYN_FLOOD,
            &src,
            SVC,
            "80",
            "100000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // While it runs (the first SYNs are through at once): the second agent opens connections.
    std::thread::sleep(Duration::from_millis(300));
    let mut during = Vec::new();
    for _ in 0..3 {
        during.push(fetch(&lab, "agent2"));
    }
    let out = flood.wait_with_output().unwrap();
    let flood_secs = started.elapsed().as_secs_f64();
    let sent: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert_eq!(sent, 100_000, "the flood tool sent {sent}");
    eprintln!("100,000 SYNs written in {flood_secs:.1} s; agent 2's fetches meanwhile: {during:?}");
    for (i, r) in during.iter().enumerate() {
        let t = r
            .as_ref()
            .unwrap_or_else(|e| panic!("agent 2's fetch {i} during the flood failed: {e}"));
        assert!(
            *t < Duration::from_secs(2),
            "agent 2's fetch {i} took {t:?} during the flood"
        );
    }
    // Right after it, too.
    let after = fetch(&lab, "agent2").expect("agent 2 right after the flood");
    assert!(after < Duration::from_secs(2), "{after:?}");

    // The connector dropped the flood by its limits, said so, and counted it.
    let t0 = Instant::now();
    let mut limited = 0.0;
    while t0.elapsed() < Duration::from_secs(10) {
        limited = metric(
            &lab,
            "conn",
            "sluice_dropped_packets_total{reason=\"rate_limited\"}",
        );
        if limited >= 10_000.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Not all 100,000 reach it: queues on the way (the agent's, the relay's) drop some too.
    eprintln!("the connector dropped {limited} SYNs by its limits");
    assert!(
        limited >= 10_000.0,
        "the connector counted {limited} rate-limited packets of 100,000 SYNs"
    );
    let log = lab.log("connector");
    assert!(log.contains("opens flows faster than its limits"), "{log}");
    // The flooder's own tunnel is still up: once its new-flow rate refills it connects again.
    let t0 = Instant::now();
    let mut again = fetch(&lab, "agent");
    while again.is_err() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        again = fetch(&lab, "agent");
    }
    again.expect("the flooding agent connects again once the flood is over");
}

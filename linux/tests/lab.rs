//! Lab tests: the real `sluice` binary in network namespaces (`sluice lab up`), driven by real
//! clients (curl, dig, ping) and by sockets this test opens inside the namespaces. Each test
//! builds its own lab under its own name prefix and takes it down when it ends, failed or not.
//! They need root; run them one at a time (`--test-threads=1`) on a small machine.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod common;
use common::*;

fn connect_data() -> TcpStream {
    let s = TcpStream::connect_timeout(
        &SocketAddr::from(([198, 51, 100, 10], DATA_PORT)),
        Duration::from_secs(10),
    )
    .expect("connect through the tunnel");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Downloads `len` pattern bytes through the tunnel and returns their SHA-256.
fn download(len: u64, seed: u64) -> [u8; 32] {
    let mut s = connect_data();
    s.write_all(&data_request(b'D', len, seed)).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).expect("download read");
        if n == 0 {
            break;
        }
        got += n as u64;
        h.update(&buf[..n]);
    }
    assert_eq!(got, len, "download length");
    h.finalize().into()
}

/// Uploads `len` pattern bytes, half-closes, and returns the SHA-256 the server computed.
fn upload(len: u64, seed: u64) -> [u8; 32] {
    let mut s = connect_data();
    s.write_all(&data_request(b'U', len, seed)).unwrap();
    let mut p = Pattern(seed | 1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).expect("upload write");
        left -= n as u64;
    }
    // The server answers only after our FIN: this checks half-close through the tunnel.
    s.shutdown(Shutdown::Write).unwrap();
    let mut d = [0u8; 32];
    s.read_exact(&mut d).expect("server digest");
    d
}

#[test]
fn page_through_tunnel_and_unreachable_without_agent() {
    require_root();
    let lab = Lab::up("tpage-");
    let out = lab.curl(&format!("http://{SVC}/"), "5");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hello from the private service network"));
    // IPv6 resource address too.
    let out = lab.curl("http://[fd00:5c1c:5c::10]/", "5");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The relay saw both handshakes with the post-quantum hybrid group.
    assert!(
        lab.log("relay").contains("key exchange X25519MLKEM768"),
        "{}",
        lab.log("relay")
    );

    lab.stop("agent", "TERM");
    let out = lab.curl(&format!("http://{SVC}/"), "2");
    assert!(
        !out.status.success(),
        "page still reachable without the agent"
    );
    assert!(
        lab.log("agent").contains("shutting down"),
        "{}",
        lab.log("agent")
    );
}

#[test]
fn large_transfers_both_ways_keep_their_checksums() {
    require_root();
    let lab = Lab::up("txfer-");
    start_data_server(&lab);
    const LEN: u64 = 200 << 20;
    let t0 = Instant::now();
    let got = in_netns(&lab.ns("agent"), || download(LEN, 7))
        .join()
        .unwrap();
    assert_eq!(got, pattern_digest(7, LEN), "download checksum");
    eprintln!("200 MiB download: {:.1}s", t0.elapsed().as_secs_f32());
    let t0 = Instant::now();
    let got = in_netns(&lab.ns("agent"), || upload(LEN, 11))
        .join()
        .unwrap();
    assert_eq!(got, pattern_digest(11, LEN), "upload checksum");
    eprintln!("200 MiB upload: {:.1}s", t0.elapsed().as_secs_f32());
}

#[test]
fn hundred_concurrent_connections() {
    require_root();
    let lab = Lab::up("tconc-");
    start_data_server(&lab);
    let handles: Vec<_> = (0..100u64)
        .map(|i| in_netns(&lab.ns("agent"), move || (i, download(1 << 20, 1000 + i))))
        .collect();
    for h in handles {
        let (i, got) = h.join().expect("a connection failed");
        assert_eq!(got, pattern_digest(1000 + i, 1 << 20), "connection {i}");
    }
}

#[test]
fn dns_over_udp_ping_and_refused_port() {
    require_root();
    let lab = Lab::up("tudp-");
    let out = lab.exec(
        "agent",
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=2",
            "@198.51.100.10",
            "web.lab.internal",
            "A",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SVC, "{out:?}");
    let out = lab.exec("agent", &["ping", "-c", "3", "-i", "0.2", "-W", "2", SVC]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A host that does not exist answers with ICMP unreachable, not silence.
    let out = lab.exec("agent", &["ping", "-c", "1", "-W", "4", "198.51.100.99"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Unreachable"),
        "{out:?}"
    );

    // A closed port: the connector's dial is refused and the app gets a RST at once.
    let res = in_netns(&lab.ns("agent"), || {
        let t0 = Instant::now();
        let r = TcpStream::connect_timeout(
            &SocketAddr::from(([198, 51, 100, 10], 81)),
            Duration::from_secs(5),
        );
        (r.map(|_| ()).map_err(|e| e.kind()), t0.elapsed())
    })
    .join()
    .unwrap();
    assert_eq!(res.0, Err(std::io::ErrorKind::ConnectionRefused));
    assert!(res.1 < Duration::from_secs(1), "refusal took {:?}", res.1);
    let out = lab.curl(&format!("http://{SVC}:81/"), "5");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Couldn't connect"),
        "{out:?}"
    );

    // Packets larger than the tunnel MTU get "fragmentation needed", so PMTUD works.
    let out = lab.exec("agent", &["ping", "-c", "1", "-s", "1400", "-M", "do", SVC]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("mtu=1280") || text.contains("Frag needed"),
        "{text}"
    );
}

#[test]
fn relay_restart_reconnects_within_ten_seconds() {
    require_root();
    // Relay only: a direct tunnel would not notice the relay going (see direct_lab.rs).
    let lab = Lab::up_with("trelay-", &["--relay-only"]);
    lab.stop("relay", "KILL");
    std::thread::sleep(Duration::from_secs(3));
    lab.start("relay", "relay");
    let back = Instant::now();
    loop {
        if lab.curl(&format!("http://{SVC}/"), "2").status.success() {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "no tunnel 10 s after the relay came back:\nagent:\n{}\nconnector:\n{}",
            lab.log("agent"),
            lab.log("connector")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "tunnel usable {:.1}s after the relay restarted",
        back.elapsed().as_secs_f32()
    );
    for role in ["agent", "connector"] {
        assert!(
            lab.log(role).matches("connected to relay").count() >= 2,
            "{role} did not reconnect:\n{}",
            lab.log(role)
        );
    }
}

#[test]
fn bad_input_is_refused_cleanly() {
    require_root();
    let tmp = PathBuf::from("/run/sluice-lab/tbad-scratch");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();

    // A malformed config: one error naming file, line and key; exit code 2.
    let bad = tmp.join("bad.yaml");
    fs::write(&bad, "relay: 192.0.2.1:4433\ncert: a.pem\nkey: a.key\nca: ca.pem\ntun:\n  mtu: 1400\n  nmae: x\nresources: []\n").unwrap();
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.yaml:7:") && err.contains("nmae"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let lab = Lab::up("tbad-");
    start_data_server(&lab);

    // A peer with a certificate from another CA is refused, and both sides say why. The
    // intruder trusts the lab's CA, so it is the relay that does the refusing.
    let ca = tmp.join("otherca");
    let ok = |c: &mut Command| assert!(c.status().unwrap().success());
    ok(Command::new(BIN)
        .args(["ca", "init", "--org", "intruder", "--dir"])
        .arg(&ca));
    ok(Command::new(BIN)
        .args([
            "ca", "issue", "--role", "agent", "--name", "mallory", "--dir",
        ])
        .arg(&ca));
    let cfg = tmp.join("mallory.yaml");
    // Its own network, so its routes do not replace the lab agent's.
    fs::write(
        tmp.join("mallory-policy.yaml"),
        "version: 1\nresources:\n  - name: x\n    connector: lab-connector\n    addresses: [203.0.113.0/24]\n    ports: [any]\nrules:\n  - action: allow\n    who: [everyone]\n    to: [x]\n",
    )
    .unwrap();
    let d = ca.display();
    fs::write(
        &cfg,
        format!("relay: 192.0.2.1:4433\ncert: {d}/mallory.pem\nkey: {d}/mallory.key\nca: {}/ca/ca.pem\ntun:\n  name: intruder0\n  ipv4: 100.96.9.1/32\n  ipv6: fd5c:1ce0:9::1/128\ndns:\n  configure_system: false\n  pool_v4: 198.19.0.0/16\n  pool_v6: fd5c:1ce0:d9::/96\npolicy: {}/mallory-policy.yaml\n", lab.dir.display(), tmp.display()),
    )
    .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns("agent"), BIN, "agent", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mallory = String::from_utf8_lossy(&out.stderr);
    assert!(
        mallory.contains("the peer refused us: unknown CA"),
        "intruder's log:\n{mallory}"
    );
    assert!(
        lab.log("relay")
            .contains("refusing peer certificate \"mallory\""),
        "{}",
        lab.log("relay")
    );

    // Garbage UDP at the relay's and the connector's ports disturbs no running tunnel.
    let conn_port: u16 = lab
        .log("connector")
        .split("on 0.0.0.0:")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|p| p.trim().parse().ok())
        .expect("connector port in its log");
    let transfer = in_netns(&lab.ns("agent"), || download(50 << 20, 3));
    in_netns(&lab.ns("agent"), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut p = Pattern(99);
        let mut buf = [0u8; 1400];
        for i in 0..3000usize {
            let n = 1 + i % buf.len();
            p.fill(&mut buf[..n]);
            if i % 3 == 0 {
                buf[0] = 0xc0; // looks like a QUIC long header
            }
            let _ = s.send_to(&buf[..n], ("192.0.2.1", 4433));
            let _ = s.send_to(&buf[..n], ("192.0.2.20", conn_port));
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        transfer.join().unwrap(),
        pattern_digest(3, 50 << 20),
        "transfer during garbage"
    );
    assert!(lab.curl(&format!("http://{SVC}/"), "5").status.success());

    // Truncated and non-IP packets from the TUN are dropped and counted, never a panic.
    let inject = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("sluice0", 0))
for p in [b"\x00", b"\x45\x00\x00", b"\x60\x00", b"garbage!" * 10, b"\x45" + b"\x00" * 30]:
    s.send(p)
"#;
    let out = lab.exec("agent", &["python3", "-c", inject]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.curl(&format!("http://{SVC}/"), "5").status.success(),
        "agent broken by garbage"
    );
    lab.stop("agent", "TERM");
    let log = lab.log("agent");
    assert!(!log.contains("panicked"), "{log}");
    let malformed: u64 = log
        .rsplit("packets from TUN, ")
        .next()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(malformed >= 5, "malformed packets not counted:\n{log}");
    let _ = fs::remove_dir_all(&tmp);
}

/// `sluice ARGS`, run outside the namespaces (the agent's status socket is just a file).
fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn status_after_a_page_shows_the_relayed_tunnel() {
    require_root();
    // Relay only: the direct path and its candidate pair are checked in direct_lab.rs.
    let lab = Lab::up_with("tstat-", &["--relay-only"]);
    let out = lab.curl(&format!("http://{SVC}/"), "5");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = lab.dir.join("agent.sock");
    let sock = sock.to_str().unwrap();
    // The agent publishes a snapshot once a second: wait for one with the tunnel up.
    let t0 = Instant::now();
    let st = loop {
        let st = json_of(&sluice(&["status", "--socket", sock, "--json"]));
        if st["tunnels"][0]["state"] == "up" || t0.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(st["name"], "lab-agent", "{st:#}");
    assert_eq!(st["relay"]["connected"], true, "{st:#}");
    let tunnels = st["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 1, "{st:#}");
    let t = &tunnels[0];
    assert_eq!(t["connector"], "lab-connector", "{st:#}");
    assert_eq!(t["state"], "up", "{st:#}");
    assert_eq!(t["path"], "relay", "{st:#}");
    assert!(t["direct_addr"].is_null(), "{st:#}");
    assert!(t["bytes_sent"].as_u64().unwrap() > 0, "{st:#}");
    assert!(t["bytes_received"].as_u64().unwrap() > 0, "{st:#}");
    assert!(t["packets_received"].as_u64().unwrap() > 0, "{st:#}");
    assert!(t["rtt_ms"].as_f64().is_some_and(|r| r > 0.0), "{st:#}");
    assert!(t["since_switch_secs"].is_null(), "{st:#}");

    // The human form, found through the agent's config as an admin would.
    let cfg = lab.dir.join("agent.yaml");
    let out = sluice(&["status", "--config", cfg.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("lab-connector"))
        .unwrap_or_else(|| panic!("no row for the connector:\n{text}"));
    assert!(row.contains(" up ") && row.contains(" relay "), "{text}");
    assert!(row.contains(" ms") && row.contains("KiB"), "{text}");

    // `sluice lab status --json` carries the same status under `agent`.
    let ls = json_of(&sluice(&[
        "lab",
        "status",
        "--json",
        "--prefix",
        &lab.prefix,
    ]));
    assert_eq!(ls["up"], true, "{ls:#}");
    assert!(ls["agent_error"].is_null(), "{ls:#}");
    assert_eq!(ls["agent"]["tunnels"][0]["connector"], "lab-connector");
    assert_eq!(ls["agent"]["tunnels"][0]["path"], "relay");
    assert!(
        ls["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "agent" && p["state"] == "running"),
        "{ls:#}"
    );

    // A stopped agent takes its socket with it, and both commands say so.
    lab.stop("agent", "TERM");
    assert!(!PathBuf::from(sock).exists(), "socket left behind");
    let out = sluice(&["status", "--socket", sock]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = json_of(&sluice(&[
        "lab",
        "status",
        "--json",
        "--prefix",
        &lab.prefix,
    ]));
    assert!(ls["agent"].is_null(), "{ls:#}");
    assert!(
        ls["agent_error"]
            .as_str()
            .is_some_and(|e| e.contains("no agent running")),
        "{ls:#}"
    );
}

#[test]
fn status_without_an_agent_says_so() {
    let out = sluice(&["status", "--socket", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: no agent running (no socket at /nonexistent); is `sluice agent` running?"
    );
    assert!(out.stdout.is_empty());
}

/// `lab down --prefix P` and `lab status --prefix P` without the `--dir D` that `lab up` was
/// given: they find the lab's state from the prefix, and nothing the lab ran, nor anything else
/// left in its namespaces, survives `down`.
#[test]
fn lab_down_and_status_by_prefix_alone_find_a_lab_up_with_dir() {
    require_root();
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let prefix = "ldpt-";
    let dir = std::env::temp_dir().join(format!("sluice-ldpt-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // Declared before the lab, so dropped after it: the lab's `down` runs first.
    let _rm = RemoveDir(dir.clone());
    let lab = Lab::up_with(prefix, &["--dir", dir.to_str().unwrap()]);

    let names = ["relay", "connector", "agent", "http", "dns", "upstream-dns"];
    let pid_of = |name: &str| -> i32 {
        fs::read_to_string(dir.join(format!("{name}.pid")))
            .unwrap_or_else(|e| panic!("{name}.pid in {}: {e}", dir.display()))
            .trim()
            .parse()
            .unwrap()
    };
    let pids: Vec<(&str, i32)> = names.iter().map(|&n| (n, pid_of(n))).collect();
    for &(name, pid) in &pids {
        assert!(
            proc_alive(pid),
            "{name} ({pid}) is not running after lab up"
        );
    }
    let inodes: Vec<u64> = ["inet", "relay", "agent", "conn", "svc"]
        .iter()
        .map(|n| netns_inode(&lab.ns(n)))
        .collect();
    // A process no file of the lab records: `down` stops it too.
    let mut stray = Command::new("ip")
        .args(["netns", "exec", &lab.ns("conn"), "sleep", "300"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    let out = sluice(&["lab", "status", "--prefix", prefix]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lab status: {out:?}");
    for &(name, pid) in &pids {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{table}"));
        assert!(
            line.contains(&pid.to_string()) && line.contains("running"),
            "lab status without --dir does not show {name} ({pid}) running:\n{table}"
        );
    }
    assert!(
        table.contains(&format!("logs: {}/", dir.display())),
        "lab status names another directory:\n{table}"
    );

    let out = sluice(&["lab", "down", "--prefix", prefix]);
    assert!(out.status.success(), "lab down: {out:?}");
    let t0 = Instant::now();
    let stray_gone = loop {
        if stray.try_wait().unwrap().is_some() {
            break true;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = stray.kill();
            let _ = stray.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left: Vec<_> = pids.iter().filter(|&&(_, p)| proc_alive(p)).collect();
    assert!(left.is_empty(), "still running after lab down: {left:?}");
    let in_ns = pids_in_netns(&inodes);
    assert!(
        in_ns.is_empty(),
        "processes still in the lab's namespaces: {in_ns:?}"
    );
    assert!(
        stray_gone,
        "a process started in {}conn survived lab down",
        prefix
    );
    for n in ["inet", "relay", "agent", "conn", "svc"] {
        assert!(
            !PathBuf::from(format!("/run/netns/{}", lab.ns(n))).exists(),
            "namespace {} is left",
            lab.ns(n)
        );
    }
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        fs::symlink_metadata(format!("/run/sluice-lab/{prefix}")).is_err(),
        "/run/sluice-lab/{prefix} is left"
    );
}

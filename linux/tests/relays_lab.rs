//! Several relays sharing one registry on a real etcd (issue 18), with the real binaries.
//!
//! The lab (`--no-roles`) gains an etcd namespace (192.0.2.70) and a second relay's namespace
//! (192.0.2.4) on its internet bridge; `sluice lab down` removes both with the rest.
//!
//! - Each relay keeps its own record under its lease, and a connector's signed record lands in
//!   etcd through the relay it is connected to; `sluice status` on either relay shows both
//!   relays and where the connector is homed.
//! - The same connector (a second process with its certificate) connecting to the other relay
//!   registers anew: its newer record wins, and the first relay closes the old session.
//! - An older record of the connector written back into etcd (a replay), and a record of the
//!   same name signed by another CA's key, are refused by both relays, and the relay holding
//!   the connector puts its own record back.
//! - A relay killed with SIGKILL leaves the registry when its lease runs out: its record and
//!   its connector's go, and the other relay sees both go.
//!
//! It needs root, the release binary and etcd (`scripts/setup.sh` installs etcd-server and
//! etcd-client); run the lab tests one at a time (`--test-threads=1`).

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_dataplane::connector_record::{ConnectorRecord, RecordDraft};
use sluice_dataplane::identity::{create_ca, issue, unix_now, Role};
use sluice_dataplane::tls::Credentials;

mod common;
use common::*;

const ETCD_ADDR: &str = "192.0.2.70";
const RELAY_B_ADDR: &str = "192.0.2.4";
const PREFIX: &str = "/sluice/";
const CONNECTOR_KEY: &str = "/sluice/connectors/lab-connector";

/// Runs `ip ARGS`; must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace `short` of the lab with `addr`/24 on the lab's internet bridge.
fn add_host(lab: &Lab, short: &str, addr: &str) {
    let ns = lab.ns(short);
    let inet = lab.ns("inet");
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", short, "netns", &inet,
    ]);
    ip(&["-n", &inet, "link", "set", short, "master", "br0", "up"]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &ns, "link", "set", "eth0", "up"]);
}

fn etcdctl(lab: &Lab, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let endpoint = format!("http://{ETCD_ADDR}:2379");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("relay"),
            "etcdctl",
            "--endpoints",
            &endpoint,
        ])
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// The value of `key` in etcd (None when the key is not there).
fn etcd_get(lab: &Lab, key: &str) -> Option<Vec<u8>> {
    let out = etcdctl(lab, &["get", key, "-w", "json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b64 = doc["kvs"][0]["value"].as_str()?;
    let mut dec = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    dec.stdin.take().unwrap().write_all(b64.as_bytes()).unwrap();
    Some(dec.wait_with_output().unwrap().stdout)
}

fn etcd_put(lab: &Lab, key: &str, value: &[u8]) {
    let out = etcdctl(lab, &["put", key], Some(value));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A relay's status (`sluice status --json`); Null while it cannot be read.
fn relay_status(lab: &Lab, sock: &str) -> Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(lab.dir.join(sock))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Where relay `sock` says connector `name` is homed (None: not in its registry).
fn home_seen_by(lab: &Lab, sock: &str, name: &str) -> Option<String> {
    let st = relay_status(lab, sock);
    st["registry"]["connectors"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["home"].as_str().map(String::from))
}

fn relays_seen_by(lab: &Lab, sock: &str) -> Vec<String> {
    let st = relay_status(lab, sock);
    st["registry"]["relays"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("not within {within:?}: {what}");
}

/// Starts `sluice ROLE --config NAME.yaml` in namespace `short`, its log in NAME.log.
fn start_as(lab: &Lab, name: &str, role: &str, short: &str) {
    let cfg = lab.dir.join(format!("{name}.yaml"));
    let argv = vec![
        BIN.to_string(),
        role.to_string(),
        "--config".into(),
        cfg.to_string_lossy().into_owned(),
    ];
    lab.spawn_role(name, short, &argv, &[]);
}

fn home_in_etcd(lab: &Lab) -> Option<(String, u64)> {
    let b = etcd_get(lab, CONNECTOR_KEY)?;
    let r = ConnectorRecord::parse_unverified(&b).ok()?;
    Some((r.home_relay, r.sequence))
}

#[test]
fn relays_share_a_registry_on_etcd_and_the_newest_registration_wins() {
    require_root();
    let lab = Lab::up_with("sl-rel-", &["--no-roles"]);
    let d = lab.dir.display().to_string();
    add_host(&lab, "etcd", ETCD_ADDR);
    add_host(&lab, "relay2", RELAY_B_ADDR);

    // etcd, alone in its namespace, its data in the lab's directory.
    let data = lab.dir.join("etcd-data");
    let client_url = format!("http://{ETCD_ADDR}:2379");
    let argv: Vec<String> = [
        "etcd",
        "--name",
        "lab",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen-client-urls",
        &client_url,
        "--advertise-client-urls",
        &client_url,
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "lab=http://127.0.0.1:2380",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    lab.spawn_role("etcd", "etcd", &argv, &[]);
    wait_for(Duration::from_secs(15), "etcd answers", || {
        etcdctl(&lab, &["endpoint", "health"], None)
            .status
            .success()
    });

    // Relay A is the lab's relay; relay B gets its own certificate from the lab's CA.
    let ok = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(&lab.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&[
        "ca",
        "issue",
        "--dir",
        "ca",
        "--role",
        "relay",
        "--name",
        "lab-relay-b",
        "--out",
        ".",
    ]);
    let registry = |addr: &str, region: &str| {
        format!(
            "registry:\n  etcd: [\"{client_url}\"]\n  prefix: {PREFIX}\n  region: {region}\n  advertise: {addr}:4433\n"
        )
    };
    let relay_a = fs::read_to_string(lab.dir.join("relay.yaml")).unwrap();
    fs::write(
        lab.dir.join("relay.yaml"),
        format!("{relay_a}{}", registry("192.0.2.1", "eu-west")),
    )
    .unwrap();
    fs::write(
        lab.dir.join("relay2.yaml"),
        format!(
            "listen: 0.0.0.0:4433\ncert: {d}/lab-relay-b.pem\nkey: {d}/lab-relay-b.key\nca: {d}/ca/ca.pem\nstatus_socket: {d}/relay2.sock\n{}",
            registry(RELAY_B_ADDR, "us-east")
        ),
    )
    .unwrap();
    lab.start("relay", "relay");
    start_as(&lab, "relay2", "relay", "relay2");
    for sock in ["relay.sock", "relay2.sock"] {
        wait_for(
            Duration::from_secs(10),
            "both relays in the registry",
            || relays_seen_by(&lab, sock) == ["lab-relay", "lab-relay-b"],
        );
    }
    let st = relay_status(&lab, "relay2.sock");
    assert_eq!(st["registry"]["etcd_up"], true, "{st}");
    let human = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(lab.dir.join("relay2.sock"))
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(
        human.contains("registry (etcd up): relays lab-relay (eu-west, 192.0.2.1:4433), lab-relay-b (us-east, 192.0.2.4:4433)"),
        "{human}"
    );

    // The connector on relay A: its record is in etcd, and both relays see it homed on A.
    lab.start("connector", "conn");
    wait_for(
        Duration::from_secs(10),
        "the connector homed on relay A",
        || {
            home_seen_by(&lab, "relay.sock", "lab-connector").as_deref() == Some("lab-relay")
                && home_seen_by(&lab, "relay2.sock", "lab-connector").as_deref()
                    == Some("lab-relay")
        },
    );
    let first = etcd_get(&lab, CONNECTOR_KEY).expect("the connector's record in etcd");
    assert_eq!(home_in_etcd(&lab).unwrap().0, "lab-relay");

    // The same connector again, a second process on relay B: it wins, A closes the first.
    let conn = fs::read_to_string(lab.dir.join("connector.yaml")).unwrap();
    let conn2: String = conn
        .lines()
        .filter(|l| !l.starts_with("metrics_listen"))
        .map(|l| {
            if l.starts_with("relay:") {
                format!("relay: {RELAY_B_ADDR}:4433")
            } else if l.starts_with("status_socket:") {
                format!("status_socket: {d}/connector2.sock")
            } else if l.starts_with("audit_log:") {
                format!("audit_log: {d}/connector2-audit.jsonl")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(lab.dir.join("connector2.yaml"), conn2 + "\n").unwrap();
    start_as(&lab, "connector2", "connector", "conn");
    let moved = wait_for(
        Duration::from_secs(10),
        "the connector homed on relay B",
        || {
            home_seen_by(&lab, "relay.sock", "lab-connector").as_deref() == Some("lab-relay-b")
                && home_seen_by(&lab, "relay2.sock", "lab-connector").as_deref()
                    == Some("lab-relay-b")
        },
    );
    eprintln!("the newer registration on relay B was seen by both relays in {moved:?}");
    wait_for(
        Duration::from_secs(5),
        "relay A closes the older session",
        || {
            lab.log("relay").contains(
                "closing connector \"lab-connector\": it registered anew on relay \"lab-relay-b\"",
            )
        },
    );
    wait_for(Duration::from_secs(5), "relay A holds no connector", || {
        let st = relay_status(&lab, "relay.sock");
        st["peers"].as_array().is_some_and(|p| {
            !p.iter()
                .any(|p| p["role"] == "connector" && p["registered"] == true)
        })
    });
    wait_for(Duration::from_secs(5), "the first process is told", || {
        lab.log("connector")
            .contains("replaced by a newer registration on relay lab-relay-b")
    });
    // Out of the way: told to stay off, it would come back to relay A in 30 s.
    lab.stop("connector", "TERM");
    let (home, newest_seq) = home_in_etcd(&lab).unwrap();
    assert_eq!(home, "lab-relay-b");

    // An agent homed on relay A reaches the connector on relay B: A forwards over its link to
    // B (direct paths off, so that every packet takes the relays).
    let agent_cfg = fs::read_to_string(lab.dir.join("agent.yaml")).unwrap();
    let agent_cfg: String = agent_cfg
        .lines()
        .map(|l| match l.starts_with("direct_paths:") {
            true => "direct_paths: false".to_string(),
            false => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(lab.dir.join("agent.yaml"), agent_cfg + "\n").unwrap();
    start_data_server(&lab);
    lab.start("agent", "agent");
    let t0 = Instant::now();
    let page = loop {
        let out = lab.curl(&format!("http://{SVC}/"), "5");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the page through relays A and B: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!page.is_empty());
    eprintln!(
        "the page came through relay A and relay B {:?} after the agent started",
        t0.elapsed()
    );
    assert!(lab.log("relay").contains("link with relay \"lab-relay-b\""));
    const LEN: u64 = 64 << 20;
    let t1 = Instant::now();
    let got = in_netns(&lab.ns("agent"), move || {
        let mut s = std::net::TcpStream::connect((SVC, DATA_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&data_request(b'D', LEN, 7)).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        loop {
            match std::io::Read::read(&mut s, &mut buf).unwrap() {
                0 => break,
                k => {
                    h.update(&buf[..k]);
                    n += k as u64;
                }
            }
        }
        (n, <[u8; 32]>::from(h.finalize()))
    })
    .join()
    .unwrap();
    let secs = t1.elapsed().as_secs_f64();
    assert_eq!(got.0, LEN);
    assert_eq!(got.1, pattern_digest(7, LEN), "download checksum");
    eprintln!(
        "64 MiB through relays A and B in {secs:.1}s ({:.0} Mbit/s)",
        LEN as f64 * 8.0 / secs / 1e6
    );
    // Both relays carried it (their status is refreshed once a second).
    for sock in ["relay.sock", "relay2.sock"] {
        wait_for(
            Duration::from_secs(3),
            "both relays forwarded the download",
            || {
                relay_status(&lab, sock)["forwarded_bytes"]
                    .as_u64()
                    .is_some_and(|b| b > LEN)
            },
        );
    }

    // A replay of the first record: both relays refuse it, and relay B puts its own back.
    etcd_put(&lab, CONNECTOR_KEY, &first);
    wait_for(
        Duration::from_secs(5),
        "relay B puts its record back",
        || home_in_etcd(&lab).is_some_and(|(h, s)| h == "lab-relay-b" && s >= newest_seq),
    );
    for role in ["relay", "relay2"] {
        wait_for(Duration::from_secs(5), "the replay is refused", || {
            lab.log(role).contains(&format!("{CONNECTOR_KEY} refused"))
                && lab.log(role).contains("(a replay or a stale copy)")
        });
    }
    assert_eq!(
        home_seen_by(&lab, "relay.sock", "lab-connector").as_deref(),
        Some("lab-relay-b")
    );

    // A record of the same name, newer, signed by another CA's connector: refused too.
    let other = create_ca("intruder", Duration::from_secs(3600)).unwrap();
    let node = issue(
        &other,
        Role::Connector,
        "lab-connector",
        &[],
        Duration::from_secs(3600),
    )
    .unwrap();
    let creds = Credentials::from_pem(
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
        other.cert_pem.as_bytes(),
        ["cert", "key", "ca"],
    )
    .unwrap();
    let forged = ConnectorRecord::sign(
        &RecordDraft {
            name: "lab-connector".into(),
            home_relay: "lab-relay".into(),
            sequence: newest_seq + 1_000_000_000,
            expires_at: unix_now() + 600,
        },
        &creds,
    )
    .unwrap();
    etcd_put(&lab, CONNECTOR_KEY, forged.encoded());
    wait_for(
        Duration::from_secs(5),
        "relay B puts its record back",
        || {
            etcd_get(&lab, CONNECTOR_KEY).is_some_and(|v| v != forged.encoded())
                && home_in_etcd(&lab).is_some_and(|(h, _)| h == "lab-relay-b")
        },
    );
    for role in ["relay", "relay2"] {
        wait_for(
            Duration::from_secs(5),
            "the forged record is refused",
            || {
                lab.log(role)
                    .contains("connector record's certificate refused: not signed by our CA")
            },
        );
    }
    assert_eq!(
        home_seen_by(&lab, "relay.sock", "lab-connector").as_deref(),
        Some("lab-relay-b")
    );

    // The connector stops: relay B deletes its record (it is still B's own).
    lab.stop("connector2", "TERM");
    wait_for(Duration::from_secs(5), "the record deleted", || {
        etcd_get(&lab, CONNECTOR_KEY).is_none()
            && home_seen_by(&lab, "relay.sock", "lab-connector").is_none()
    });
    start_as(&lab, "connector2", "connector", "conn");
    wait_for(
        Duration::from_secs(10),
        "the connector back on relay B",
        || home_seen_by(&lab, "relay.sock", "lab-connector").as_deref() == Some("lab-relay-b"),
    );

    // Relay B killed: its lease runs out (10 s), and its keys go with it.
    lab.stop("relay2", "KILL");
    let t0 = Instant::now();
    while !(relays_seen_by(&lab, "relay.sock") == ["lab-relay"]
        && home_seen_by(&lab, "relay.sock", "lab-connector").is_none())
    {
        if t0.elapsed() > Duration::from_secs(16) {
            let keys = etcdctl(&lab, &["get", "--prefix", PREFIX, "-w", "json"], None);
            panic!(
                "relay B's keys not gone within 16 s of SIGKILL: relay A says {}; etcd holds {}",
                relay_status(&lab, "relay.sock")["registry"],
                String::from_utf8_lossy(&keys.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "relay B's record and its connector's left relay A's registry {:?} after SIGKILL",
        t0.elapsed()
    );
    assert!(etcd_get(&lab, CONNECTOR_KEY).is_none());
    assert!(etcd_get(&lab, &format!("{PREFIX}relays/lab-relay-b")).is_none());
    assert!(etcd_get(&lab, &format!("{PREFIX}relays/lab-relay")).is_some());
}

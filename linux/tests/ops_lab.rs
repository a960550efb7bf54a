//! Operations in the lab: each role's `/metrics` passes `promtool check metrics` during a
//! transfer, the counters move as traffic and policy say, and systemd's readiness (sd_notify,
//! played here by a Unix datagram socket) comes only once a role works; SIGHUP reloads.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_root, Lab, BIN, SVC};

const METRICS: &str = "http://127.0.0.1:9464/metrics";
/// The lab's services on tcp/80 only: a flow to another port of theirs is denied.
const STRICT_POLICY: &str = "version: 1\ngroups:\n  lab: {}\nresources:\n  - name: web\n    connector: lab-connector\n    addresses: [198.51.100.0/24]\n    ports: [tcp/80]\nrules:\n  - name: web\n    action: allow\n    who: [group:lab]\n    to: [web]\n";
/// Roles publish their numbers once a second; a scrape after this sees what happened before.
const PUBLISHED: Duration = Duration::from_millis(1500);

fn scrape(lab: &Lab, short: &str) -> String {
    let out = lab.exec(short, &["curl", "-sS", "--max-time", "5", METRICS]);
    assert!(
        out.status.success(),
        "scrape of {short}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The sum of every sample of `name` (all label sets); `name{...}` picks one label set.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            if name.contains('{') {
                *series == name
            } else {
                *series == name || series.starts_with(&format!("{name}{{"))
            }
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

/// The names of the samples in a scrape (`sluice_x_total`, `sluice_y_bucket`, ...).
fn series_names(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every metric the Grafana dashboard's queries name is in a real scrape of the lab.
fn dashboard_uses_only(scraped: &std::collections::BTreeSet<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/sluice.json");
    let dash: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut queries = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            queries.push(q.to_string());
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for q in &queries {
        let mut rest = q.as_str();
        while let Some(i) = rest.find("sluice_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    assert!(used.len() >= 20, "the dashboard queries only {used:?}");
    let missing: Vec<_> = used.difference(scraped).collect();
    assert!(
        missing.is_empty(),
        "{} queries metrics no role serves: {missing:?}",
        path.display()
    );
}

fn promtool(text: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/setup.sh installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool on the {what}'s metrics: {said}\n{text}"
    );
}

#[test]
fn metrics_lint_clean_during_a_transfer_and_count_bytes_and_denials() {
    require_root();
    let lab = Lab::up("om");
    const SIZE: usize = 10 << 20;
    let body: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
    fs::write(lab.dir.join("www/big.bin"), &body).unwrap();
    // A first flow brings the tunnel up, so the counters below see only the download.
    let warm = lab.curl(&format!("http://{SVC}/"), "10");
    assert!(warm.status.success(), "{warm:?}");
    std::thread::sleep(PUBLISHED);
    let agent0 = scrape(&lab, "agent");
    let conn0 = scrape(&lab, "conn");
    // Slowed down, so the scrapes below land while the bytes flow.
    let ns = lab.ns("agent");
    let url = format!("http://{SVC}/big.bin");
    let download = std::thread::spawn(move || {
        Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-sS", "--max-time", "60"])
            .args([
                "--limit-rate",
                "4M",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
            ])
            .arg(&url)
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1200));
    let mut scraped = std::collections::BTreeSet::new();
    for (short, role) in [
        ("agent", "agent"),
        ("conn", "connector"),
        ("relay", "relay"),
    ] {
        let text = scrape(&lab, short);
        promtool(&text, role);
        scraped.extend(series_names(&text));
    }
    dashboard_uses_only(&scraped);
    let out = download.join().unwrap();
    assert!(out.status.success(), "download: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), SIZE.to_string());
    std::thread::sleep(PUBLISHED);
    let agent1 = scrape(&lab, "agent");
    let conn1 = scrape(&lab, "conn");
    let got = value(&agent1, "sluice_tunnel_received_bytes_total")
        - value(&agent0, "sluice_tunnel_received_bytes_total");
    let sent = value(&conn1, "sluice_tunnel_sent_bytes_total")
        - value(&conn0, "sluice_tunnel_sent_bytes_total");
    eprintln!("10 MiB download: the agent received {got} bytes, the connector sent {sent}");
    assert!(got >= SIZE as f64, "agent received only {got} bytes");
    assert!(sent >= SIZE as f64, "connector sent only {sent} bytes");
    assert_eq!(value(&agent1, "sluice_tunnels"), 1.0);
    assert_eq!(value(&conn1, "sluice_tunnels"), 1.0);
    assert!(value(&conn1, "sluice_connector_dials_total{result=\"connected\"}") >= 2.0);

    // `sluice status` of the connector and of the relay, as JSON and as tables.
    let status = |sock: &str, json: bool| {
        let path = lab.dir.join(sock);
        let mut args = vec!["status", "--socket", path.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.success(), "status {sock}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let c: serde_json::Value = serde_json::from_str(&status("connector.sock", true)).unwrap();
    assert_eq!(c["role"], "connector", "{c:#}");
    assert_eq!(c["name"], "lab-connector");
    assert_eq!(c["relay"]["connected"], true);
    let t = &c["tunnels"][0];
    assert_eq!(t["user"], "lab-agent", "{c:#}");
    assert_eq!(t["groups"][0], "lab");
    assert!(t["bytes_sent"].as_u64().unwrap() >= SIZE as u64, "{c:#}");
    let table = status("connector.sock", false);
    eprintln!("{table}");
    assert!(
        table.starts_with("connector lab-connector (peer "),
        "{table}"
    );
    assert!(
        table
            .lines()
            .nth(2)
            .is_some_and(|l| l.starts_with("lab-agent")),
        "{table}"
    );
    let r: serde_json::Value = serde_json::from_str(&status("relay.sock", true)).unwrap();
    assert_eq!(r["role"], "relay", "{r:#}");
    let peers = r["peers"].as_array().unwrap();
    let conn = peers.iter().find(|p| p["name"] == "lab-connector").unwrap();
    assert_eq!(conn["role"], "connector");
    assert_eq!(conn["registered"], true);
    assert!(peers.iter().any(|p| p["name"] == "lab-agent"), "{r:#}");
    let table = status("relay.sock", false);
    eprintln!("{table}");
    assert!(
        table.contains("2 peer(s), 1 connector(s) registered"),
        "{table}"
    );

    // Port 81 is in the resource's network but not in its ports: the agent denies the flow.
    let policy = STRICT_POLICY;
    fs::write(lab.dir.join("policy.yaml"), policy).unwrap();
    let t0 = Instant::now();
    while !lab.log("agent").contains("policy reloaded") && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lab.log("agent").contains("policy reloaded"),
        "{}",
        lab.log("agent")
    );
    std::thread::sleep(PUBLISHED);
    let before = scrape(&lab, "agent");
    let denied = lab.curl(&format!("http://{SVC}:81/"), "5");
    assert!(!denied.status.success(), "port 81 is denied: {denied:?}");
    std::thread::sleep(PUBLISHED);
    let after = scrape(&lab, "agent");
    let policy_drops = "sluice_dropped_packets_total{reason=\"policy\"}";
    assert_eq!(
        value(&after, policy_drops) - value(&before, policy_drops),
        1.0,
        "one denied SYN"
    );
    let denials = "sluice_policy_decisions_total{result=\"deny\"}";
    assert_eq!(value(&after, denials) - value(&before, denials), 1.0);
}

/// A socket playing systemd's part for one process.
struct FakeSystemd {
    sock: UnixDatagram,
    path: PathBuf,
    heard: Vec<String>,
}

impl FakeSystemd {
    fn new(name: &str) -> FakeSystemd {
        let path =
            std::env::temp_dir().join(format!("sluice-notify-{}-{name}", std::process::id()));
        let _ = fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        FakeSystemd {
            sock,
            path,
            heard: Vec::new(),
        }
    }

    /// Waits up to `within` for a message holding `line` (`READY=1`); true if it came.
    fn wait_for(&mut self, line: &str, within: Duration) -> bool {
        let end = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            if self.heard.iter().any(|m| m.lines().any(|l| l == line)) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => self
                    .heard
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => return false,
            }
        }
    }

    /// Starts `role` of the lab in namespace `short` with this socket as NOTIFY_SOCKET and a
    /// 2 s watchdog; its output goes to the role's log as `sluice lab up` does.
    fn start(&self, lab: &Lab, role: &str, short: &str, config: &Path, extra: &[&str]) -> u32 {
        let mut argv = vec![BIN.to_string(), role.into(), "--config".into()];
        argv.push(config.to_string_lossy().into_owned());
        argv.extend(extra.iter().map(|e| e.to_string()));
        let sock = self.path.to_string_lossy();
        let env = [("NOTIFY_SOCKET", &*sock), ("WATCHDOG_USEC", "2000000")];
        lab.spawn_role(role, short, &argv, &env)
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[test]
fn readiness_waits_for_the_role_to_work_and_sighup_reloads() {
    require_root();
    let lab = Lab::up("on");
    lab.stop("connector", "TERM");
    lab.stop("relay", "TERM");

    // The connector cannot register while the relay is down: no READY=1.
    let mut conn = FakeSystemd::new("connector");
    let conn_pid = conn.start(
        &lab,
        "connector",
        "conn",
        &lab.dir.join("connector.yaml"),
        &[],
    );
    assert!(
        !conn.wait_for("READY=1", Duration::from_secs(3)),
        "READY=1 before the connector was registered: {:?}",
        conn.heard
    );
    // The watchdog is fed while the loop runs, ready or not.
    assert!(
        conn.wait_for("WATCHDOG=1", Duration::from_secs(3)),
        "{:?}",
        conn.heard
    );

    // The relay logs for a collector: one JSON object per line.
    let mut relay = FakeSystemd::new("relay");
    let logged = lab.log("relay").len();
    let relay_cfg = lab.dir.join("relay.yaml");
    relay.start(
        &lab,
        "relay",
        "relay",
        &relay_cfg,
        &["--log-format", "json"],
    );
    assert!(
        relay.wait_for("READY=1", Duration::from_secs(5)),
        "relay: {:?}",
        relay.heard
    );
    assert!(
        conn.wait_for("READY=1", Duration::from_secs(15)),
        "the connector never said READY=1 once the relay was up: {:?}\n{}",
        conn.heard,
        lab.log("connector")
    );
    assert!(lab.log("connector").contains("connected to relay"));
    let json_lines = lab.log("relay")[logged..].to_string();
    assert!(json_lines.contains("listening on"), "{json_lines}");
    for line in json_lines.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    // No secret in any role's log: neither a key's PEM nor its base64 body.
    let key = fs::read_to_string(lab.dir.join("lab-relay.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for role in ["relay", "connector", "agent"] {
        let log = lab.log(role);
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains(&body),
            "{role}.log"
        );
    }

    // SIGHUP: a config that names another policy file is read again (only SIGHUP reads the
    // config, so this is the signal's work, not the policy file watcher's).
    let strict = lab.dir.join("policy-strict.yaml");
    fs::write(&strict, STRICT_POLICY).unwrap();
    let cfg = lab.dir.join("connector.yaml");
    let text = fs::read_to_string(&cfg).unwrap();
    let policy_line = format!("policy: {}/policy.yaml", lab.dir.display());
    assert!(text.contains(&policy_line), "{text}");
    fs::write(
        &cfg,
        text.replace(&policy_line, &format!("policy: {}", strict.display())),
    )
    .unwrap();
    conn.heard.clear();
    let hup = Command::new("kill")
        .args(["-HUP", &conn_pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(
        conn.wait_for("RELOADING=1", Duration::from_secs(5)),
        "{:?}",
        conn.heard
    );
    assert!(
        conn.wait_for("READY=1", Duration::from_secs(5)),
        "{:?}",
        conn.heard
    );
    let log = lab.log("connector");
    assert!(
        log.contains(&format!("policy now read from {}", strict.display())),
        "{log}"
    );
    std::thread::sleep(PUBLISHED);
    let m = scrape(&lab, "conn");
    assert_eq!(
        value(&m, "sluice_config_reloads_total{result=\"ok\"}"),
        1.0,
        "{m}"
    );

    // A broken config is refused on SIGHUP; the connector runs on with its policy.
    fs::write(&cfg, "relay: [not an address\n").unwrap();
    conn.heard.clear();
    Command::new("kill")
        .args(["-HUP", &conn_pid.to_string()])
        .status()
        .unwrap();
    assert!(
        conn.wait_for("READY=1", Duration::from_secs(5)),
        "{:?}",
        conn.heard
    );
    assert!(
        conn.heard
            .iter()
            .any(|m| m.contains("STATUS=reload failed")),
        "{:?}",
        conn.heard
    );
    std::thread::sleep(PUBLISHED);
    let m = scrape(&lab, "conn");
    assert_eq!(
        value(&m, "sluice_config_reloads_total{result=\"failed\"}"),
        1.0
    );
    assert!(common::proc_alive(conn_pid as i32));

    // The agent says READY=1 only with its TUN device up.
    lab.stop("agent", "TERM");
    let mut agent = FakeSystemd::new("agent");
    agent.start(&lab, "agent", "agent", &lab.dir.join("agent.yaml"), &[]);
    assert!(
        agent.wait_for("READY=1", Duration::from_secs(10)),
        "{:?}\n{}",
        agent.heard,
        lab.log("agent")
    );
    let link = lab.exec("agent", &["ip", "link", "show", "sluice0"]);
    assert!(link.status.success(), "READY=1 without the TUN device");
    // SIGTERM: systemd hears STOPPING=1.
    agent.heard.clear();
    lab.stop("agent", "TERM");
    assert!(
        agent.wait_for("STOPPING=1", Duration::from_secs(3)),
        "{:?}",
        agent.heard
    );
}

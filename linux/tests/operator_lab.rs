//! What a new operator breaks (issue 14): a second agent start, a policy that covers the relay,
//! a DNS server already on port 53, the relay given by name, and secrets in debug logs. Each
//! test runs the real binary in a lab of its own.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Routes (v4 and v6) of a namespace, as text.
fn routes(lab: &Lab, short: &str) -> String {
    let v4 = lab.exec(short, &["ip", "-4", "route"]);
    let v6 = lab.exec(short, &["ip", "-6", "route"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&v4.stdout),
        String::from_utf8_lossy(&v6.stdout)
    )
}

/// Runs `sluice agent` in the lab's agent namespace until it exits (at most `limit`).
fn run_agent(
    lab: &Lab,
    config: &std::path::Path,
    extra: &[&str],
    limit: Duration,
) -> (Option<i32>, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.ns("agent"), BIN, "agent", "--config"])
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

fn agent_resolv_conf(lab: &Lab) -> String {
    fs::read_to_string(format!("/etc/netns/{}/resolv.conf", lab.ns("agent"))).unwrap()
}

fn page_works(lab: &Lab) -> bool {
    lab.curl(&format!("http://{SVC}/"), "3").status.success()
}

#[test]
fn a_failed_second_agent_start_leaves_the_first_agent_untouched() {
    require_root();
    let lab = Lab::up("op2-");
    let before_routes = routes(&lab, "agent");
    let before_resolv = agent_resolv_conf(&lab);
    assert!(
        before_resolv.contains("nameserver 100.96.0.1"),
        "{before_resolv}"
    );
    let backups = || {
        fs::read_dir("/run/sluice")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".backup"))
                    .count()
            })
            .unwrap_or(0)
    };
    let backups_before = backups();
    assert!(backups_before >= 1);

    // The same config with another TUN name: refused at once, naming the running agent.
    let cfg = lab.dir.join("agent.yaml");
    let (code, err) = run_agent(
        &lab,
        &cfg,
        &["--tun-name", "sluice1"],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another sluice agent holds"), "{err}");
    assert!(err.contains(&format!("pid {}", lab.pid("agent"))), "{err}");
    assert!(!err.contains("restored"), "{err}");

    // A config with a bad pool (host bits) is refused before anything, with exit status 2.
    let bad = lab.dir.join("agent-badpool.yaml");
    fs::write(
        &bad,
        fs::read_to_string(&cfg).unwrap() + "dns:\n  pool_v4: 198.18.0.1/15\n",
    )
    .unwrap();
    let (code, err) = run_agent(&lab, &bad, &[], Duration::from_secs(10));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`dns.pool_v4` 198.18.0.1/15 has host bits set"),
        "{err}"
    );

    // Nothing changed: routes, the rewritten resolv.conf and its backup are the first agent's.
    assert_eq!(routes(&lab, "agent"), before_routes);
    assert_eq!(agent_resolv_conf(&lab), before_resolv);
    assert_eq!(backups(), backups_before);
    assert!(page_works(&lab), "the first agent still carries pages");

    // And the first agent restores the system's resolver when it stops.
    lab.stop("agent", "TERM");
    let log = lab.log("agent");
    assert!(!log.contains("cannot restore"), "{log}");
    assert!(agent_resolv_conf(&lab).contains("nameserver 192.0.2.53"));
}

#[test]
fn a_policy_that_covers_the_relay_never_routes_the_relay_into_the_tunnel() {
    require_root();
    let lab = Lab::up("op7-");
    let policy = lab.dir.join("policy.yaml");
    let text = fs::read_to_string(&policy).unwrap();
    let covered = text.replacen("198.51.100.0/24", "198.51.100.0/24, 192.0.2.0/24", 1);
    assert_ne!(covered, text, "the lab policy names 198.51.100.0/24");
    fs::write(&policy, &covered).unwrap();
    wait_for("the agent's reload", Duration::from_secs(10), || {
        lab.log("agent").contains("stays outside the tunnel")
    });
    let via = lab.exec("agent", &["ip", "route", "get", "192.0.2.1"]);
    let via = String::from_utf8_lossy(&via.stdout).to_string();
    assert!(
        !via.contains("sluice0"),
        "the relay is routed into the tunnel: {via}"
    );
    let other = lab.exec("agent", &["ip", "route", "get", "192.0.2.77"]);
    assert!(
        String::from_utf8_lossy(&other.stdout).contains("sluice0"),
        "the rest of 192.0.2.0/24 is"
    );
    // Longer than the control link's silence limit: it would have reconnected by now.
    std::thread::sleep(Duration::from_secs(8));
    let log = lab.log("agent");
    assert!(!log.contains("relay silent"), "{log}");
    assert!(page_works(&lab));

    // A start with that policy in place works the same.
    lab.stop("agent", "TERM");
    lab.start("agent", "agent");
    wait_for(
        "the restarted agent's page",
        Duration::from_secs(20),
        || page_works(&lab),
    );
}

#[test]
fn the_agent_starts_beside_a_dns_server_on_every_address_and_finds_the_relay_by_name() {
    require_root();
    let lab = Lab::up("op8-");
    lab.stop("agent", "TERM");
    // A local resolver bound to *:53, as a dnsmasq on a laptop would be.
    let pidfile = lab.dir.join("local-dnsmasq.pid");
    let st = lab.exec(
        "agent",
        &[
            "dnsmasq",
            "--port=53",
            "--no-resolv",
            "--no-hosts",
            "--address=/local.test/192.0.2.99",
            &format!("--pid-file={}", pidfile.display()),
        ],
    );
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let _local_dns = KillOnDrop(pidfile.clone());

    lab.start_with("agent", "agent", &["--relay", "relay.example.test:4433"]);
    wait_for("the agent's page", Duration::from_secs(20), || {
        page_works(&lab)
    });
    let log = lab.log("agent");
    assert!(
        log.contains("connected to relay at 192.0.2.1:4433"),
        "{log}"
    );
    // Split DNS answers on the tunnel address over UDP beside the other server.
    let dig = lab.exec(
        "agent",
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "@100.96.0.1",
            "wiki.corp.internal",
        ],
    );
    let answer = String::from_utf8_lossy(&dig.stdout).to_string();
    assert!(answer.trim().starts_with("198.18."), "{answer}\n{log}");
    // The status snapshot is refreshed once a second.
    let status = || {
        let out = Command::new(BIN)
            .args(["status", "--json", "--socket"])
            .arg(lab.dir.join("agent.sock"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    wait_for(
        "the status to show the relay by name",
        Duration::from_secs(5),
        || status().contains("relay.example.test:4433 (192.0.2.1:4433)"),
    );
}

/// Stops the daemon whose pid file this names, also when the test fails.
struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[test]
fn debug_logs_carry_no_key_or_secret() {
    require_root();
    std::env::set_var("RUST_LOG", "debug");
    let lab = Lab::up("opd-");
    std::env::remove_var("RUST_LOG");
    // A page and a direct path: candidates (with their secret) and punches are exchanged.
    assert!(page_works(&lab));
    wait_for("the direct path", Duration::from_secs(20), || {
        lab.log("agent").contains("now direct")
    });
    let logs: Vec<(String, String)> = ["agent", "connector", "relay"]
        .iter()
        .map(|r| (r.to_string(), lab.log(r)))
        .collect();
    let agent = &logs[0].1;
    assert!(agent.contains("DEBUG"), "debug logging was on");
    assert!(
        agent.contains("secret: <redacted>"),
        "the candidates were logged, redacted"
    );
    // Key material: every line of every private key's PEM body.
    for key in [
        "ca/ca.key",
        "lab-agent.key",
        "lab-connector.key",
        "lab-relay.key",
    ] {
        let pem = fs::read_to_string(lab.dir.join(key)).unwrap();
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
        {
            for (role, log) in &logs {
                assert!(!log.contains(line), "{role}.log holds a line of {key}");
            }
        }
    }
    for (role, log) in &logs {
        for l in log.lines() {
            let mut rest = l;
            while let Some(i) = rest.find("secret") {
                rest = &rest[i + "secret".len()..];
                let value = rest.trim_start_matches([':', ' ', '=', '"']);
                assert!(
                    !value.starts_with(|c: char| c.is_ascii_digit()),
                    "{role}.log shows a secret: {l}"
                );
            }
        }
    }
}

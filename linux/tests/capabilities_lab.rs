//! Each role started in the lab with exactly what its systemd unit grants (read from
//! deploy/systemd/*.service: its user and `CapabilityBoundingSet=`) still does its job: the
//! relay and the connector as an unprivileged user, the connector with CAP_NET_RAW alone, the
//! agent as root with only CAP_NET_ADMIN and CAP_NET_BIND_SERVICE. A page and a ping go
//! through the tunnel, split DNS answers, and each process holds no capability beyond its set.
//! `setpriv` (util-linux) plays systemd's part.

mod common;

use std::fs;
use std::os::unix::fs::chown;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_root, Lab, BIN, SVC};

/// The unprivileged user the relay and connector run as here (the package's `sluice` user
/// stands in: any uid without privileges).
const NOBODY: u32 = 65534;

/// Capability numbers (linux/capability.h) of the names the units use.
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        other => panic!("a unit grants {other}: add it to this table"),
    }
}

/// What a role's unit grants: whether it runs as root, and its capabilities.
fn unit_grants(role: &str) -> (bool, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(format!("sluice-{role}.service"));
    let text = fs::read_to_string(&path).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(str::trim).map(str::to_string))
    };
    let root = value("User=").is_none_or(|u| u == "root");
    let caps = value("CapabilityBoundingSet=")
        .unwrap_or_else(|| panic!("{}: no CapabilityBoundingSet=", path.display()));
    let caps = caps.split_whitespace().map(str::to_string).collect();
    (root, caps)
}

/// `setpriv` arguments that give a process exactly `caps`, as `root` or as [`NOBODY`].
fn setpriv(root: bool, caps: &[String]) -> Vec<String> {
    let mut set = "-all".to_string();
    for c in caps {
        set.push_str(&format!(
            ",+{}",
            c.trim_start_matches("CAP_").to_lowercase()
        ));
    }
    let mut a = vec!["setpriv".to_string(), "--no-new-privs".into()];
    if !root {
        a.extend([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ]);
    }
    a.extend([
        format!("--bounding-set={set}"),
        format!("--inh-caps={set}"),
        // Ambient, as the units' AmbientCapabilities=: what an unprivileged process keeps
        // across exec. (Root gets its bounding set anyway.)
        format!("--ambient-caps={}", if root { "-all".into() } else { set }),
        "--".into(),
    ]);
    a
}

/// The effective capabilities of process `pid`.
fn cap_eff(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = s
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

fn uid_of(pid: u32) -> u32 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Starts `role` under `setpriv` in namespace `short`; its pid (ip netns exec and setpriv both
/// exec, so it is the role's own).
fn start(lab: &Lab, role: &str, short: &str, wrap: &[String]) -> u32 {
    let mut argv = wrap.to_vec();
    argv.extend([BIN.to_string(), role.into(), "--config".into()]);
    argv.push(
        lab.dir
            .join(format!("{role}.yaml"))
            .to_string_lossy()
            .into_owned(),
    );
    lab.spawn_role(role, short, &argv, &[])
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn each_role_works_with_only_what_its_unit_grants() {
    require_root();
    let lab = Lab::up("oc");
    for role in ["agent", "connector", "relay"] {
        lab.stop(role, "TERM");
    }
    // What the unprivileged roles read and write is theirs, as the package's install makes it.
    for f in [
        "lab-relay.key",
        "lab-connector.key",
        "connector-audit.jsonl",
    ] {
        let p = lab.dir.join(f);
        if !p.exists() {
            fs::write(&p, "").unwrap();
        }
        chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // Their status sockets go in a folder of theirs, as in their units' runtime directories.
    let run = lab.dir.join("run-unprivileged");
    fs::create_dir_all(&run).unwrap();
    chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    for role in ["relay", "connector"] {
        let cfg = lab.dir.join(format!("{role}.yaml"));
        let text = fs::read_to_string(&cfg).unwrap();
        let from = format!("status_socket: {}/{role}.sock", lab.dir.display());
        assert!(text.contains(&from), "{text}");
        let to = format!("status_socket: {}/{role}.sock", run.display());
        fs::write(&cfg, text.replace(&from, &to)).unwrap();
    }

    let mut pids = Vec::new();
    for (role, short) in [
        ("relay", "relay"),
        ("connector", "conn"),
        ("agent", "agent"),
    ] {
        let (root, caps) = unit_grants(role);
        let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
        let pid = start(&lab, role, short, &setpriv(root, &caps));
        // The metrics endpoint says when the role does its job.
        wait_until(&format!("{role} ready"), Duration::from_secs(20), || {
            lab.exec(
                short,
                &[
                    "curl",
                    "-sf",
                    "--max-time",
                    "2",
                    "http://127.0.0.1:9464/ready",
                ],
            )
            .status
            .success()
        });
        assert!(
            common::proc_alive(pid as i32),
            "{role} exited:\n{}",
            lab.log(role)
        );
        assert_eq!(cap_eff(pid), want, "{role}: effective capabilities");
        assert_eq!(uid_of(pid) == 0, root, "{role}: user");
        eprintln!(
            "{role}: uid {}, capabilities {:#x} ({})",
            uid_of(pid),
            cap_eff(pid),
            if caps.is_empty() {
                "none".to_string()
            } else {
                caps.join(" ")
            }
        );
        pids.push((role, pid));
    }

    // A page by address and by name (split DNS on port 53 needs CAP_NET_BIND_SERVICE).
    let page = lab.curl(&format!("http://{SVC}/"), "10");
    assert!(page.status.success(), "{page:?}\n{}", lab.log("agent"));
    assert!(String::from_utf8_lossy(&page.stdout).contains("Hello from the private service"));
    let dig = lab.exec("agent", &["dig", "+short", "+time=3", "wiki.corp.internal"]);
    assert!(
        !String::from_utf8_lossy(&dig.stdout).trim().is_empty(),
        "split DNS: {dig:?}\n{}",
        lab.log("agent")
    );
    // A ping: the connector answers it with a real echo on its raw socket (CAP_NET_RAW).
    let ping = lab.exec("agent", &["ping", "-c", "2", "-W", "3", SVC]);
    assert!(
        ping.status.success(),
        "ping through the connector: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        lab.log("connector")
    );
    // Their status sockets answer.
    for role in ["relay", "connector"] {
        let sock = run.join(format!("{role}.sock"));
        let out = Command::new(BIN)
            .args(["status", "--socket", sock.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{role} status: {out:?}");
    }
    for (role, pid) in pids {
        assert!(
            common::proc_alive(pid as i32),
            "{role} exited:\n{}",
            lab.log(role)
        );
        let log = lab.log(role);
        assert!(
            !log.contains("Permission denied") && !log.contains("Operation not permitted"),
            "{role} hit a missing permission:\n{log}"
        );
    }
}

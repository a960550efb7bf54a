//! Access policy in the lab: the agent's fast path and the connector's authoritative check,
//! with real clients, and a policy edit that cuts an open SSH session.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Web (tcp/80) and SSH (tcp/22) on the service host as two resources; `web_to` and `ssh_to`
/// are the groups allowed to each.
fn policy(web_to: &str, ssh_to: Option<&str>) -> String {
    let ssh_rule = match ssh_to {
        Some(g) => format!(
            "  - name: ssh-access\n    action: allow\n    who: [group:{g}]\n    to: [ssh]\n"
        ),
        None => String::new(),
    };
    format!(
        "version: 1\ngroups:\n  lab: {{}}\n  admins:\n    members: [root-admin]\nresources:\n  - name: web\n    connector: lab-connector\n    addresses: [198.51.100.10/32]\n    ports: [tcp/80]\n  - name: ssh\n    connector: lab-connector\n    addresses: [198.51.100.10/32]\n    ports: [tcp/22]\nrules:\n  - name: web-access\n    action: allow\n    who: [group:{web_to}]\n    to: [web]\n{ssh_rule}"
    )
}

/// Writes a policy and waits until the given roles logged that they reloaded it.
fn set_policy(lab: &Lab, file: &str, text: &str, roles: &[&str]) {
    let before: Vec<usize> = roles
        .iter()
        .map(|r| lab.log(r).matches("policy reloaded").count())
        .collect();
    fs::write(lab.dir.join(file), text).unwrap();
    let t0 = Instant::now();
    for (r, n) in roles.iter().zip(before) {
        while lab.log(r).matches("policy reloaded").count() == n {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{r} did not reload:\n{}",
                lab.log(r)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Connects from the agent's namespace: Ok, or the error kind, and how long it took.
fn connect(lab: &Lab, port: u16) -> (Result<(), std::io::ErrorKind>, Duration) {
    in_netns(&lab.ns("agent"), move || {
        let t0 = Instant::now();
        let r = TcpStream::connect_timeout(
            &SocketAddr::from(([198, 51, 100, 10], port)),
            Duration::from_secs(5),
        );
        (r.map(|_| ()).map_err(|e| e.kind()), t0.elapsed())
    })
    .join()
    .unwrap()
}

/// A listener on the service host's port 22, so a refusal can only come from the policy.
fn listen_ssh_port(lab: &Lab) {
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let r2 = ready.clone();
    in_netns(&lab.ns("svc"), move || {
        let l = TcpListener::bind(("198.51.100.10", 22)).unwrap();
        r2.wait();
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    ready.wait();
}

fn audit_has(lab: &Lab, who: &str, needle: &[&str]) -> bool {
    fs::read_to_string(lab.dir.join(format!("{who}-audit.jsonl")))
        .unwrap_or_default()
        .lines()
        .any(|l| needle.iter().all(|n| l.contains(n)))
}

#[test]
fn allowed_group_reaches_port_80_not_22_and_outsiders_neither() {
    require_root();
    let lab = Lab::up("tpol-");
    listen_ssh_port(&lab);
    set_policy(
        &lab,
        "policy.yaml",
        &policy("lab", Some("admins")),
        &["agent", "connector"],
    );

    assert_eq!(connect(&lab, 80).0, Ok(()), "group lab may reach port 80");
    let (r, took) = connect(&lab, 22);
    assert_eq!(
        r,
        Err(std::io::ErrorKind::ConnectionRefused),
        "port 22 is for admins only"
    );
    assert!(took < Duration::from_secs(1), "denial took {took:?}");
    // The agent refused it itself (fast path), and said why.
    assert!(audit_has(
        &lab,
        "agent",
        &[
            "\"port\":22",
            "\"decision\":\"deny\"",
            "\"rule\":\"default\""
        ]
    ));
    assert!(audit_has(
        &lab,
        "connector",
        &[
            "\"port\":80",
            "\"decision\":\"allow\"",
            "\"rule\":\"web-access\"",
            "\"user\":\"lab-agent\""
        ]
    ));

    // Now the web is for admins too: the lab agent reaches neither.
    set_policy(
        &lab,
        "policy.yaml",
        &policy("admins", Some("admins")),
        &["agent", "connector"],
    );
    assert_eq!(
        connect(&lab, 80).0,
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        connect(&lab, 22).0,
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    let out = lab.curl("http://198.51.100.10/", "3");
    assert!(!out.status.success());

    // An invalid edit keeps the policy in force and says why.
    fs::write(
        lab.dir.join("policy.yaml"),
        "version: 1\nrules:\n  - action: permit\n",
    )
    .unwrap();
    let t0 = Instant::now();
    while !lab.log("connector").contains("policy change rejected") {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{}",
            lab.log("connector")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        connect(&lab, 80).0,
        Err(std::io::ErrorKind::ConnectionRefused)
    );
}

#[test]
fn the_connector_denies_what_a_permissive_agent_lets_through() {
    require_root();
    let lab = Lab::up("tauth-");
    // The connector's policy lets nobody in.
    set_policy(
        &lab,
        "policy.yaml",
        &policy("admins", None),
        &["agent", "connector"],
    );
    // The agent runs with a policy that allows everything (a tampered or outdated agent).
    let open = lab.dir.join("open-policy.yaml");
    fs::write(&open, policy("lab", Some("lab"))).unwrap();
    lab.stop("agent", "TERM");
    lab.start_with("agent", "agent", &["--policy", open.to_str().unwrap()]);
    let t0 = Instant::now();
    // The restarted agent appends to the same log: wait for its own connection.
    while lab.log("agent").matches("connected to relay").count() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{}",
            lab.log("agent")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r, took) = connect(&lab, 80);
    assert_eq!(
        r,
        Err(std::io::ErrorKind::ConnectionRefused),
        "the connector must refuse"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(audit_has(
        &lab,
        "agent",
        &["\"port\":80", "\"decision\":\"allow\""]
    ));
    assert!(audit_has(
        &lab,
        "connector",
        &[
            "\"port\":80",
            "\"decision\":\"deny\"",
            "\"user\":\"lab-agent\""
        ]
    ));
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn removing_a_rule_cuts_an_open_ssh_session() {
    require_root();
    let lab = Lab::up("tssh-");
    let d = lab.dir.clone();
    let p = |n: &str| d.join(n).to_string_lossy().into_owned();
    sh(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        &p("ssh_host"),
    ]);
    sh(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        &p("id"),
    ]);
    fs::copy(p("id.pub"), p("authorized_keys")).unwrap();
    fs::write(
        p("sshd_config"),
        format!(
            "ListenAddress 198.51.100.10\nPort 22\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
            p("ssh_host"),
            p("authorized_keys")
        ),
    )
    .unwrap();
    fs::create_dir_all("/run/sshd").unwrap();
    let sshd_log = fs::File::create(p("sshd.log")).unwrap();
    let mut sshd = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("svc"),
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            &p("sshd_config"),
        ])
        .stderr(sshd_log)
        .spawn()
        .unwrap();
    set_policy(
        &lab,
        "policy.yaml",
        &policy("lab", Some("lab")),
        &["agent", "connector"],
    );

    let mut ssh = Command::new("ip")
        .args(["netns", "exec", &lab.ns("agent"), "ssh", "-i", &p("id")])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
        ])
        .args(["root@198.51.100.10", "echo ready; sleep 120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(ssh.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "ssh session did not start; sshd log:\n{}",
        fs::read_to_string(p("sshd.log")).unwrap_or_default()
    );

    // Remove the SSH rule: the open session must be cut within 2 s.
    let t0 = Instant::now();
    fs::write(lab.dir.join("policy.yaml"), policy("lab", None)).unwrap();
    let status = loop {
        if let Some(st) = ssh.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "ssh still running 5 s after the edit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    let _ = sshd.kill();
    let _ = sshd.wait();
    assert!(!status.success());
    assert!(took < Duration::from_secs(2), "session cut after {took:?}");
    eprintln!(
        "ssh session cut {:.2}s after the policy edit",
        took.as_secs_f32()
    );
}

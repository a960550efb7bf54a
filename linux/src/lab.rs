//! `sluice lab`: a whole deployment in network namespaces on one machine.
//!
//! ```text
//!   {p}agent ──┐                         ┌── {p}relay
//!   eth0 192.0.2.10/24    {p}inet: br0    eth0 192.0.2.1/24
//!              └──────── "internet" ─────┘
//!                            │
//!   {p}conn  eth0 192.0.2.20/24, svc0 198.51.100.1/24 ── {p}svc eth0 198.51.100.10/24
//! ```
//! `{p}` is the name prefix (default `sl-`), so several labs can exist side by side. The
//! private service network 198.51.100.0/24 (and fd00:5c1c:5c::/64) is reachable only from
//! `{p}conn`; the agent reaches it only through the tunnel. With `--nat-agent` or
//! `--nat-connector`, that side sits behind a NAT router instead (lab_nat.rs).
//! docs/lab.md documents every piece.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::ca;
use crate::lab_nat::{self, NatConfig, NatType, Side, SIDES};

#[derive(Args, Clone)]
pub struct LabOpts {
    /// Prefix of the lab's namespace names; labs with different prefixes are independent.
    #[arg(long, default_value = "sl-")]
    pub prefix: String,
    /// Directory for the lab's certificates, configs, logs and pid files
    /// (default: /run/sluice-lab/PREFIX). `up` records it there (a symlink), so `status` and
    /// `down` find it from the prefix alone.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Do not start relay, connector and agent (just the network and the services).
    #[arg(long)]
    pub no_roles: bool,
}

#[derive(Args, Clone)]
pub struct StatusOpts {
    #[command(flatten)]
    pub lab: LabOpts,
    /// Print JSON: what runs where, and the lab agent's tunnels as `sluice status --json`
    /// shows them (key `agent`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct UpOpts {
    #[command(flatten)]
    pub lab: LabOpts,
    /// Put the agent behind a NAT router of this type.
    #[arg(long, value_enum, default_value_t = NatType::None)]
    pub nat_agent: NatType,
    /// Put the connector behind a NAT router of this type.
    #[arg(long, value_enum, default_value_t = NatType::None)]
    pub nat_connector: NatType,
    /// Keep the agent's tunnels on the relay (`direct_paths: false` in its config).
    #[arg(long)]
    pub relay_only: bool,
    /// A second agent (`lab-agent2`, group lab) in namespace PREFIXagent2 at 192.0.2.11, on
    /// the internet segment: for tests of one agent's flood against another's service.
    #[arg(long)]
    pub second_agent: bool,
}

pub const RELAY_ADDR: &str = "192.0.2.1";
pub const AGENT_ADDR: &str = "192.0.2.10";
/// The second agent's (`--second-agent`).
pub const AGENT2_ADDR: &str = "192.0.2.11";
pub const CONN_ADDR: &str = "192.0.2.20";
pub const CONN_SVC_ADDR: &str = "198.51.100.1";
pub const SVC_ADDR: &str = "198.51.100.10";
pub const SVC_NET: &str = "198.51.100.0/24";
pub const CONN_SVC_ADDR6: &str = "fd00:5c1c:5c::1";
pub const SVC_ADDR6: &str = "fd00:5c1c:5c::10";
pub const SVC_NET6: &str = "fd00:5c1c:5c::/64";
pub const RELAY_PORT: u16 = 4433;
/// Where every role of the lab serves `/metrics`: loopback of its own namespace.
pub const METRICS: &str = "127.0.0.1:9464";
pub const SVC_ZONE: &str = "lab.internal";
/// The private zone served inside the service network; `*.corp.internal` is a lab resource.
pub const CORP_ZONE: &str = "corp.internal";
/// The "public" resolver on the internet segment (a second address of the relay host).
pub const UPSTREAM_DNS: &str = "192.0.2.53";
/// What the upstream resolver answers for the lab's one public name.
pub const PUBLIC_NAME: (&str, &str) = ("www.example.test", "192.0.2.80");
/// The relay's name in the "public" zone.
pub const RELAY_NAME: &str = "relay.example.test";

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
}

const ROLES: [&str; 3] = ["relay", "connector", "agent"];
/// Every process the lab starts, by the name of its log and pid files.
const PROCESSES: [&str; 9] = [
    "relay",
    "connector",
    "agent",
    "agent2",
    "relay2",
    "etcd",
    "http",
    "dns",
    "upstream-dns",
];
const NAMESPACES: [&str; 5] = ["inet", "relay", "agent", "conn", "svc"];
/// The NAT routers' namespaces, made only for the sides `--nat-*` puts behind one.
const ROUTERS: [&str; 2] = ["nat-agent", "nat-conn"];
/// Made only when asked for (`--second-agent`), or by tests of several relays (a second relay
/// and etcd, linux/tests/relays_lab.rs).
const OPTIONAL: [&str; 3] = ["agent2", "relay2", "etcd"];

/// Every namespace a lab may have: what `down` looks for, whatever the lab was built with.
fn all_namespaces() -> impl Iterator<Item = &'static str> {
    NAMESPACES.into_iter().chain(ROUTERS).chain(OPTIONAL)
}

/// Where a lab's state is found from its prefix alone: the default directory itself, or, for a
/// lab started with `--dir D`, a symlink to D.
pub fn state_link(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/sluice-lab/{prefix}"))
}

/// Makes the directory of a lab that is starting and records it under [`state_link`]: the
/// default directory, or D (`--dir D`, made absolute) with a symlink to it. What a previous lab
/// of this prefix recorded is replaced (its namespaces are gone by then).
fn make_state_dir(prefix: &str, dir: Option<&Path>) -> Result<PathBuf> {
    let link = state_link(prefix);
    let want = match dir {
        Some(d) => std::path::absolute(d).with_context(|| format!("--dir {}", d.display()))?,
        None => link.clone(),
    };
    if want != link && want.starts_with(&link) {
        bail!(
            "--dir {}: not inside {}, where the lab records its directory",
            want.display(),
            link.display()
        );
    }
    let is_link = fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    let mkdir =
        |d: &Path| fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()));
    if want == link {
        mkdir(&link)?;
        return Ok(link);
    }
    mkdir(&want)?;
    let want = fs::canonicalize(&want)?;
    if link.is_dir() {
        // The state of a previous lab that used the default directory.
        fs::remove_dir_all(&link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    if let Some(parent) = link.parent() {
        mkdir(parent)?;
    }
    std::os::unix::fs::symlink(&want, &link)
        .with_context(|| format!("cannot record the lab's directory in {}", link.display()))?;
    Ok(want)
}

impl Lab {
    pub fn new(prefix: &str, dir: Option<PathBuf>) -> Result<Self> {
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("--prefix {prefix:?}: use 1-8 characters from a-z 0-9 -");
        }
        // Without --dir: wherever `up` recorded this prefix's state.
        let dir = dir.unwrap_or_else(|| {
            let link = state_link(prefix);
            fs::read_link(&link).unwrap_or(link)
        });
        Ok(Lab {
            prefix: prefix.to_string(),
            dir,
        })
    }

    fn from_opts(o: &LabOpts) -> Result<Self> {
        Lab::new(&o.prefix, o.dir.clone())
    }

    pub fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    fn ns_of_role(&self, role: &str) -> String {
        self.ns(match role {
            "connector" => "conn",
            "relay" => "relay",
            "agent" => "agent",
            other => other,
        })
    }

    /// The lab agent's status socket (`sluice status --socket`).
    pub fn status_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn ns_exists(&self, short: &str) -> bool {
        Path::new("/run/netns").join(self.ns(short)).exists()
    }

    fn any_ns_exists(&self) -> bool {
        all_namespaces().any(|n| self.ns_exists(n))
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// `ip -n NS ...`
pub fn ipn(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    ip(&a)
}

pub fn sysctl(ns: &str, key: &str, val: &str) -> Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={val}"),
        ],
    )
}

pub fn up(u: &UpOpts) -> Result<()> {
    let o = &u.lab;
    // A previous lab of this prefix, with the directory it recorded (its pid files).
    let previous = Lab::new(&o.prefix, None)?;
    let nat = NatConfig {
        agent: u.nat_agent,
        connector: u.nat_connector,
    };
    if previous.any_ns_exists() {
        println!("lab {}: removing what a previous lab left", previous.prefix);
        teardown(&previous);
    }
    let t0 = Instant::now();
    // Before the network: the NAT routers' rulesets are written there. Recorded first, so that
    // `down --prefix` finds even a lab whose `up` failed half-way.
    let dir = make_state_dir(&o.prefix, o.dir.as_deref())?;
    let lab = Lab::new(&o.prefix, Some(dir))?;
    let built = build_network(&lab, nat).and_then(|()| match u.second_agent {
        true => build_second_agent(&lab),
        false => Ok(()),
    });
    if let Err(e) = built {
        teardown(&lab);
        return Err(e.context("building the lab network failed"));
    }
    let r = (|| -> Result<()> {
        nat.write(&lab)?;
        write_identities(&lab)?;
        write_configs(&lab, u.relay_only)?;
        if u.second_agent {
            write_second_agent(&lab, u.relay_only)?;
        }
        start_services(&lab)?;
        if !o.no_roles {
            for role in ROLES {
                start_role(&lab, role)?;
                if role == "relay" {
                    // Clients that start before the relay listens lose their first Initial
                    // and retry only after QUIC's 1 s timeout.
                    wait_until(Duration::from_secs(10), "the relay", || {
                        fs::read_to_string(lab.dir.join("relay.log"))
                            .is_ok_and(|l| l.contains("listening on"))
                    })?;
                }
            }
            wait_for_tunnel(&lab)?;
            if u.second_agent {
                let exe = std::env::current_exe().context("cannot find the sluice binary")?;
                let cfg = lab.dir.join("agent2.yaml");
                spawn_in(
                    &lab,
                    &lab.ns("agent2"),
                    "agent2",
                    &[
                        &exe.to_string_lossy(),
                        "agent",
                        "--config",
                        &cfg.to_string_lossy(),
                    ],
                )?;
                wait_for_agent(&lab, "agent2")?;
            }
        }
        probe_nats(&lab, nat)
    })();
    if let Err(e) = r {
        print_logs(&lab);
        bail!(
            "{e:#}\nthe lab is left up for inspection; `sluice lab down --prefix {}` removes it",
            lab.prefix
        );
    }
    println!(
        "lab {} is up ({:.1}s); state in {}",
        lab.prefix,
        t0.elapsed().as_secs_f32(),
        lab.dir.display()
    );
    print_status(&lab);
    Ok(())
}

/// Measures each NAT router and prints what it does; an error when one does not behave as its
/// type says (a NAT lab with the wrong NAT would make every test on it meaningless).
fn probe_nats(lab: &Lab, nat: NatConfig) -> Result<()> {
    let sides: Vec<Side> = SIDES
        .into_iter()
        .filter(|&s| nat.of(s) != NatType::None)
        .collect();
    if sides.is_empty() {
        return Ok(());
    }
    let reports = lab_nat::probe(lab, &sides, Some(nat))?;
    for r in &reports {
        println!("{}", r.line());
    }
    if let Some(r) = reports.iter().find(|r| r.as_configured == Some(false)) {
        bail!(
            "the {} NAT router does not behave as its type says:\n{}",
            r.side,
            r.detail()
        );
    }
    Ok(())
}

fn build_network(lab: &Lab, nat: NatConfig) -> Result<()> {
    let routers = SIDES
        .into_iter()
        .filter(|&s| nat.of(s) != NatType::None)
        .map(|s| s.site().router);
    for n in NAMESPACES.into_iter().chain(routers) {
        ip(&["netns", "add", &lab.ns(n)])?;
        // Each namespace's own /etc/resolv.conf (ip netns exec mounts it over the host's).
        fs::create_dir_all(netns_etc(lab, n))?;
        ipn(&lab.ns(n), &["link", "set", "lo", "up"])?;
    }
    let inet = lab.ns("inet");
    ipn(&inet, &["link", "add", "br0", "type", "bridge"])?;
    ipn(&inet, &["link", "set", "br0", "up"])?;
    for (short, addr, side) in [
        ("relay", RELAY_ADDR, None),
        ("agent", AGENT_ADDR, Some(Side::Agent)),
        ("conn", CONN_ADDR, Some(Side::Connector)),
    ] {
        if let Some(side) = side.filter(|&s| nat.of(s) != NatType::None) {
            lab_nat::build_router(lab, side, nat.of(side))?;
            continue;
        }
        let ns = lab.ns(short);
        // Created inside the namespaces directly: nothing touches the host's own interfaces.
        ipn(
            &ns,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", short, "netns", &inet,
            ],
        )?;
        ipn(&inet, &["link", "set", short, "master", "br0", "up"])?;
        ipn(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ipn(&ns, &["link", "set", "eth0", "up"])?;
    }
    let conn = lab.ns("conn");
    let svc = lab.ns("svc");
    ipn(
        &conn,
        &[
            "link", "add", "svc0", "type", "veth", "peer", "name", "eth0", "netns", &svc,
        ],
    )?;
    ipn(
        &conn,
        &["addr", "add", &format!("{CONN_SVC_ADDR}/24"), "dev", "svc0"],
    )?;
    ipn(
        &conn,
        &[
            "addr",
            "add",
            &format!("{CONN_SVC_ADDR6}/64"),
            "dev",
            "svc0",
            "nodad",
        ],
    )?;
    ipn(&conn, &["link", "set", "svc0", "up"])?;
    ipn(
        &svc,
        &["addr", "add", &format!("{SVC_ADDR}/24"), "dev", "eth0"],
    )?;
    ipn(
        &svc,
        &[
            "addr",
            "add",
            &format!("{SVC_ADDR6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ipn(&svc, &["link", "set", "eth0", "up"])?;
    // Second addresses of the relay host: the upstream resolver, and the NAT probe's second
    // responder address (filtering by address needs an address the client never contacted).
    for a in [UPSTREAM_DNS.to_string(), lab_nat::PROBE_ADDR_B.to_string()] {
        ipn(
            &lab.ns("relay"),
            &["addr", "add", &format!("{a}/24"), "dev", "eth0"],
        )?;
    }
    // The agent's namespace starts with the upstream as its resolver, like any machine; the
    // agent takes resolution over while it runs (split DNS) and gives it back when it stops.
    // The connector's namespace uses the private zone's server.
    fs::write(
        netns_etc(lab, "conn").join("resolv.conf"),
        format!("nameserver {SVC_ADDR}\n"),
    )?;
    for n in ["agent", "inet", "relay", "svc"]
        .into_iter()
        .chain(ROUTERS.into_iter().filter(|r| lab.ns_exists(r)))
    {
        fs::write(
            netns_etc(lab, n).join("resolv.conf"),
            format!("nameserver {UPSTREAM_DNS}\n"),
        )?;
    }
    // Raw ICMP for the connector's pings needs nothing; ping sockets for lab users do.
    sysctl(
        &lab.ns("agent"),
        "net.ipv4.ping_group_range",
        "0 2147483647",
    )?;
    Ok(())
}

/// The second agent's namespace, on the internet segment beside the first.
fn build_second_agent(lab: &Lab) -> Result<()> {
    let ns = lab.ns("agent2");
    ip(&["netns", "add", &ns])?;
    fs::create_dir_all(netns_etc(lab, "agent2"))?;
    ipn(&ns, &["link", "set", "lo", "up"])?;
    let inet = lab.ns("inet");
    ipn(
        &ns,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "agent2", "netns", &inet,
        ],
    )?;
    ipn(&inet, &["link", "set", "agent2", "master", "br0", "up"])?;
    ipn(
        &ns,
        &["addr", "add", &format!("{AGENT2_ADDR}/24"), "dev", "eth0"],
    )?;
    ipn(&ns, &["link", "set", "eth0", "up"])?;
    fs::write(
        netns_etc(lab, "agent2").join("resolv.conf"),
        format!("nameserver {UPSTREAM_DNS}\n"),
    )?;
    sysctl(&ns, "net.ipv4.ping_group_range", "0 2147483647")
}

/// The second agent's identity and configuration: the first's, with its own files.
fn write_second_agent(lab: &Lab, relay_only: bool) -> Result<()> {
    ca::issue(
        &lab.dir.join("ca"),
        "agent",
        "lab-agent2",
        &["lab".into()],
        "30d",
        &lab.dir,
    )?;
    let d = lab.dir.display();
    let p = lab.dir.join("agent2.yaml");
    fs::write(
        &p,
        format!(
            "# Written by `sluice lab up --second-agent`.\nrelay: {RELAY_ADDR}:{RELAY_PORT}\ncert: {d}/lab-agent2.pem\nkey: {d}/lab-agent2.key\nca: {d}/ca/ca.pem\ntun:\n  name: sluice0\n  mtu: 1280\npolicy: {d}/policy.yaml\naudit_log: {d}/agent2-audit.jsonl\nstatus_socket: {d}/agent2.sock\ndirect_paths: {}\nmetrics_listen: {METRICS}\n",
            !relay_only
        ),
    )
    .with_context(|| format!("cannot write {}", p.display()))
}

fn write_identities(lab: &Lab) -> Result<()> {
    let ca_dir = lab.dir.join("ca");
    ca::init_ca(&ca_dir, "sluice-lab", "30d", true)?;
    ca::issue(&ca_dir, "relay", "lab-relay", &[], "30d", &lab.dir)?;
    ca::issue(&ca_dir, "connector", "lab-connector", &[], "30d", &lab.dir)?;
    ca::issue(
        &ca_dir,
        "agent",
        "lab-agent",
        &["lab".into()],
        "30d",
        &lab.dir,
    )?;
    Ok(())
}

fn write_configs(lab: &Lab, relay_only: bool) -> Result<()> {
    let d = lab.dir.display();
    let files =
        |name: &str| format!("cert: {d}/{name}.pem\nkey: {d}/{name}.key\nca: {d}/ca/ca.pem\n");
    let write = |name: &str, text: String| -> Result<()> {
        let p = lab.dir.join(name);
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    write(
        "relay.yaml",
        format!(
            "# Written by `sluice lab up`.\nlisten: 0.0.0.0:{RELAY_PORT}\n{}metrics_listen: {METRICS}\nstatus_socket: {d}/relay.sock\n",
            files("lab-relay")
        ),
    )?;
    write(
        "connector.yaml",
        format!(
            "# Written by `sluice lab up`.\nrelay: {RELAY_ADDR}:{RELAY_PORT}\n{}policy: {d}/policy.yaml\naudit_log: {d}/connector-audit.jsonl\nmetrics_listen: {METRICS}\nstatus_socket: {d}/connector.sock\n",
            files("lab-connector")
        ),
    )?;
    write("policy.yaml", default_policy())?;
    write(
        "agent.yaml",
        format!(
            "# Written by `sluice lab up`.\nrelay: {RELAY_ADDR}:{RELAY_PORT}\n{}tun:\n  name: sluice0\n  mtu: 1280\npolicy: {d}/policy.yaml\naudit_log: {d}/agent-audit.jsonl\nstatus_socket: {}\ndirect_paths: {}\nmetrics_listen: {METRICS}\n",
            files("lab-agent"),
            // In the lab's directory, so labs side by side each have their own.
            lab.status_socket().display(),
            !relay_only
        ),
    )?;
    let www = lab.dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(
        www.join("index.html"),
        "<!doctype html><title>Sluice lab</title><h1>Hello from the private service network</h1>\n<p>This page was served by 198.51.100.10 in the lab's private service namespace and reached you through the Sluice tunnel.</p>\n",
    )?;
    Ok(())
}

fn netns_etc(lab: &Lab, short: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(lab.ns(short))
}

/// The lab's default access: its agent (certificate group `lab`) reaches every port of the
/// private service network. Tests that need restrictions overwrite DIR/policy.yaml; agent and
/// connector reload it within a second.
pub fn default_policy() -> String {
    format!(
        r#"# Written by `sluice lab up`. See docs/policy.md.
version: 1
groups:
  lab:
    description: every lab agent (its certificate lists this group)
resources:
  - name: lab-services
    connector: lab-connector
    addresses: [{SVC_NET}, {SVC_NET6}]
    ports: [any]
  - name: corp-zone
    connector: lab-connector
    addresses: ["*.{CORP_ZONE}"]
    ports: [any]
rules:
  - name: lab-all
    action: allow
    who: [group:lab]
    to: [lab-services, corp-zone]
"#
    )
}

/// Starts `args` inside namespace `ns` in the background, logging to DIR/NAME.log.
fn spawn_in(lab: &Lab, ns: &str, name: &str, args: &[&str]) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = fs::File::create(lab.dir.join(format!("{name}.log")))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let pid = child.id();
    fs::write(lab.dir.join(format!("{name}.pid")), pid.to_string())?;
    Ok(pid)
}

fn start_services(lab: &Lab) -> Result<()> {
    let svc = lab.ns("svc");
    let www = lab.dir.join("www");
    let www = www.to_string_lossy();
    spawn_in(
        lab,
        &svc,
        "http",
        &[
            "python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "::",
            "--directory",
            &www,
        ],
    )?;
    dnsmasq(
        lab,
        "svc",
        "dns",
        SVC_ADDR,
        &[
            format!("--address=/web.{SVC_ZONE}/{SVC_ADDR}"),
            format!("--address=/web.{SVC_ZONE}/{SVC_ADDR6}"),
            // The private zone: other names in it do not exist (NXDOMAIN, not forwarded).
            format!("--local=/{CORP_ZONE}/"),
            format!("--address=/wiki.{CORP_ZONE}/{SVC_ADDR}"),
            format!("--address=/wiki.{CORP_ZONE}/{SVC_ADDR6}"),
            format!("--address=/app.dev.{CORP_ZONE}/{SVC_ADDR}"),
            // Records the agent cannot synthesize: the connector resolves them here.
            format!("--txt-record=wiki.{CORP_ZONE},team=docs"),
            format!("--mx-host=wiki.{CORP_ZONE},mail.{CORP_ZONE},10"),
            format!("--srv-host=_http._tcp.wiki.{CORP_ZONE},wiki.{CORP_ZONE},80,0,0"),
            // Larger than a classic 512-byte UDP answer: clients must retry over TCP.
            format!(
                "--txt-record=big.{CORP_ZONE},{},{},{}",
                "a".repeat(250),
                "b".repeat(250),
                "c".repeat(250)
            ),
        ],
    )?;
    dnsmasq(
        lab,
        "relay",
        "upstream-dns",
        UPSTREAM_DNS,
        &[
            "--local=/example.test/".to_string(),
            format!("--address=/{}/{}", PUBLIC_NAME.0, PUBLIC_NAME.1),
            // The relay by name, for nodes configured with `relay: relay.example.test:4433`.
            format!("--address=/{}/{RELAY_ADDR}", RELAY_NAME),
        ],
    )?;
    wait_until(Duration::from_secs(10), "the lab's HTTP server", || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &svc,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                &format!("http://{SVC_ADDR}/"),
            ])
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A dnsmasq that answers only what `records` says (no upstream, no /etc/hosts).
fn dnsmasq(lab: &Lab, short: &str, name: &str, listen: &str, records: &[String]) -> Result<u32> {
    let mut args = vec![
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address",
        listen,
        "--pid-file",
        "--log-facility=-",
    ];
    args.extend(records.iter().map(String::as_str));
    spawn_in(lab, &lab.ns(short), name, &args)
}

fn start_role(lab: &Lab, role: &str) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the sluice binary")?;
    let exe = exe.to_string_lossy();
    let cfg = lab.dir.join(format!("{role}.yaml"));
    spawn_in(
        lab,
        &lab.ns_of_role(role),
        role,
        &[&exe, role, "--config", &cfg.to_string_lossy()],
    )?;
    Ok(())
}

fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not come up within {}s", limit.as_secs())
}

fn wait_for_tunnel(lab: &Lab) -> Result<()> {
    wait_for_agent(lab, "agent")
}

/// Waits until the agent in namespace `short` has its TUN device and a page through it.
fn wait_for_agent(lab: &Lab, short: &str) -> Result<()> {
    let agent = lab.ns(short);
    wait_until(Duration::from_secs(10), "the agent's TUN device", || {
        Command::new("ip")
            .args(["-n", &agent, "link", "show", "sluice0"])
            .output()
            .is_ok_and(|o| o.status.success())
    })?;
    wait_until(
        Duration::from_secs(30),
        "the tunnel (HTTP from the agent to 198.51.100.10)",
        || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &agent,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "2",
                    &format!("http://{SVC_ADDR}/"),
                ])
                .status()
                .is_ok_and(|s| s.success())
        },
    )
}

fn print_logs(lab: &Lab) {
    for name in PROCESSES {
        if let Ok(text) = fs::read_to_string(lab.dir.join(format!("{name}.log"))) {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {name}.log (last lines) ---");
            for l in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Whether `pid` runs (a zombie, dead but not yet reaped, does not).
fn pid_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// A process's state letter and start time (clock ticks after boot), from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses, so split after the last ')'.
    let mut f = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = f.next()?.chars().next()?;
    // Fields 3 (state) to 22 (starttime): starttime is the 20th after COMM.
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// When `pid` started, as seconds since the epoch.
fn proc_start_time(pid: u32) -> Option<u64> {
    let (_, ticks) = proc_stat(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&h| h > 0)?;
    let boot: u64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot + ticks / hz)
}

fn read_pid(lab: &Lab, name: &str) -> Option<u32> {
    fs::read_to_string(lab.dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The pid in DIR/NAME.pid if that process is still the one the lab started: it started
/// before the file was written. A pid file that outlived its process may name a pid the
/// system has given to some unrelated process since.
fn recorded_pid(lab: &Lab, name: &str) -> Option<u32> {
    let pid = read_pid(lab, name)?;
    let written = fs::metadata(lab.dir.join(format!("{name}.pid")))
        .ok()?
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    // Start times have a resolution of a clock tick, file times of the file system's clock.
    (proc_start_time(pid)? <= written + 2).then_some(pid)
}

fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Stops every process in the lab's namespaces and deletes them. Never fails: whatever is
/// already gone is skipped.
///
/// The namespaces themselves say what to stop (`ip netns pids`): everything in them goes,
/// whether the lab started it or not and whatever DIR holds, so that a lab whose state is lost
/// leaves nothing behind. The pid files add processes whose namespace was already deleted.
fn teardown(lab: &Lab) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let existing: Vec<String> = all_namespaces()
        .filter(|n| lab.ns_exists(n))
        .map(|n| lab.ns(n))
        .collect();
    // Never this process (`ip netns exec LAB-agent sluice lab down` runs in one of them).
    let me = std::process::id() as i32;
    let in_namespaces = || -> Vec<i32> {
        existing
            .iter()
            .flat_map(|ns| ns_pids(ns))
            .filter(|&p| p != me)
            .collect()
    };
    let mut pids = in_namespaces();
    pids.extend(
        PROCESSES
            .iter()
            .filter_map(|n| recorded_pid(lab, n))
            .map(|p| p as i32)
            .filter(|&p| p != me),
    );
    pids.sort_unstable();
    pids.dedup();
    let signal = |pids: &[i32], sig| {
        for &p in pids {
            let _ = kill(Pid::from_raw(p), sig);
        }
    };
    let alive = |pids: &[i32]| -> Vec<i32> {
        pids.iter()
            .copied()
            .filter(|&p| pid_alive(p as u32))
            .collect()
    };
    signal(&pids, Signal::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) && !alive(&pids).is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    // What ignored SIGTERM, and what started in the namespaces meanwhile, until none is left.
    let t0 = Instant::now();
    loop {
        let mut left = alive(&pids);
        left.extend(in_namespaces().into_iter().filter(|&p| pid_alive(p as u32)));
        left.sort_unstable();
        left.dedup();
        if left.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "lab {}: processes {left:?} did not exit after SIGKILL",
                lab.prefix
            );
            break;
        }
        signal(&left, Signal::SIGKILL);
        pids.extend(left);
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in existing {
        let _ = ip(&["netns", "del", &ns]);
    }
    for n in all_namespaces() {
        // A killed agent leaves its resolv.conf backup behind; it goes with the file.
        if let Ok(b) = crate::resolvconf::backup_path(&netns_etc(lab, n).join("resolv.conf")) {
            let _ = fs::remove_file(b);
        }
        let _ = fs::remove_dir_all(netns_etc(lab, n));
    }
}

pub fn down(o: &LabOpts) -> Result<()> {
    let lab = Lab::from_opts(o)?;
    let link = state_link(&lab.prefix);
    let is_link = fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
    let present = lab.any_ns_exists() || lab.dir.exists() || is_link;
    teardown(&lab);
    if lab.dir.exists() {
        fs::remove_dir_all(&lab.dir)
            .with_context(|| format!("cannot remove {}", lab.dir.display()))?;
    }
    // The record of where this prefix's state was: the lab is gone.
    if is_link {
        fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    if present {
        println!("lab {} is down", lab.prefix);
    } else {
        println!("lab {} was not up; nothing to do", lab.prefix);
    }
    Ok(())
}

/// One process of the lab, as `sluice lab status` lists it.
#[derive(Serialize)]
struct ProcessRow {
    name: &'static str,
    namespace: String,
    pid: Option<u32>,
    /// "running", "exited", or "not started".
    state: &'static str,
    address: String,
}

/// One side's NAT router, when some side is behind one.
#[derive(Serialize)]
struct NatRow {
    side: &'static str,
    /// The router's namespace; None when this side sits directly on the bridge.
    router: Option<String>,
    /// The NAT type ("none" when on the bridge, "unknown" when the lab's file is missing).
    #[serde(rename = "type")]
    nat_type: String,
    addresses: String,
}

fn process_rows(lab: &Lab) -> Vec<ProcessRow> {
    let side_addr = |side: Side| {
        let s = side.site();
        if lab.ns_exists(s.router) {
            format!("{} behind NAT {}", s.host, s.wan)
        } else {
            s.direct.to_string()
        }
    };
    let rows = [
        ("relay", "relay", format!("{RELAY_ADDR}:{RELAY_PORT}/udp")),
        (
            "connector",
            "conn",
            format!(
                "{}, {CONN_SVC_ADDR} (service side)",
                side_addr(Side::Connector)
            ),
        ),
        (
            "agent",
            "agent",
            format!(
                "{}, TUN sluice0 routes {SVC_NET} {SVC_NET6}",
                side_addr(Side::Agent)
            ),
        ),
        (
            "http",
            "svc",
            format!("http://{SVC_ADDR}/ and http://[{SVC_ADDR6}]/"),
        ),
        (
            "dns",
            "svc",
            format!("{SVC_ADDR}:53 (zone {CORP_ZONE}: wiki, app.dev)"),
        ),
        (
            "upstream-dns",
            "relay",
            format!("{UPSTREAM_DNS}:53 ({})", PUBLIC_NAME.0),
        ),
    ];
    rows.into_iter()
        .map(|(name, short, address)| {
            let pid = read_pid(lab, name);
            let state = match pid {
                Some(p) if pid_alive(p) => "running",
                Some(_) => "exited",
                None => "not started",
            };
            ProcessRow {
                name,
                namespace: lab.ns(short),
                pid,
                state,
                address,
            }
        })
        .collect()
}

/// Each side's NAT, or None when neither side is behind a router.
fn nat_rows(lab: &Lab) -> Option<Vec<NatRow>> {
    // A side is behind a router when the router's namespace exists, whatever the file says.
    let behind = |side: Side| lab.ns_exists(side.site().router);
    if !SIDES.into_iter().any(behind) {
        return None;
    }
    let nat = NatConfig::read(lab);
    let rows = SIDES
        .into_iter()
        .map(|side| {
            let s = side.site();
            if behind(side) {
                NatRow {
                    side: side.as_str(),
                    router: Some(lab.ns(s.router)),
                    nat_type: nat.map_or("unknown", |n| n.of(side).as_str()).to_string(),
                    addresses: format!(
                        "wan {}, lan {}/24 in front of {}",
                        s.wan, s.gateway, s.host
                    ),
                }
            } else {
                NatRow {
                    side: side.as_str(),
                    router: None,
                    nat_type: "none".into(),
                    addresses: format!("{} on the bridge", s.direct),
                }
            }
        })
        .collect();
    Some(rows)
}

fn print_status(lab: &Lab) {
    println!(
        "{:<12} {:<14} {:<8} {:<8} address",
        "role", "namespace", "pid", "state"
    );
    for r in process_rows(lab) {
        let pid = r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let state = if r.pid.is_none() { "-" } else { r.state };
        println!(
            "{:<12} {:<14} {pid:<8} {state:<8} {}",
            r.name, r.namespace, r.address
        );
    }
    if let Some(rows) = nat_rows(lab) {
        println!("{:<12} {:<14} {:<19} addresses", "NAT of", "router", "type");
        for r in rows {
            println!(
                "{:<12} {:<14} {:<19} {}",
                r.side,
                r.router.as_deref().unwrap_or("-"),
                r.nat_type,
                r.addresses
            );
        }
    }
    println!("logs: {}/*.log", lab.dir.display());
}

/// `sluice lab status --json`.
#[derive(Serialize)]
struct LabStatus {
    prefix: String,
    dir: PathBuf,
    /// Whether any of the lab's namespaces exists.
    up: bool,
    processes: Vec<ProcessRow>,
    nat: Option<Vec<NatRow>>,
    /// The lab agent's status, as `sluice status --json` prints it; null when unreadable.
    agent: Option<crate::status::AgentStatus>,
    /// Why `agent` is null.
    agent_error: Option<String>,
}

fn lab_status(lab: &Lab) -> LabStatus {
    let up = lab.any_ns_exists();
    let (agent, agent_error) = if !up {
        (None, Some("the lab is not up".to_string()))
    } else {
        match crate::status::fetch_agent(&lab.status_socket()) {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e.to_string())),
        }
    };
    LabStatus {
        prefix: lab.prefix.clone(),
        dir: lab.dir.clone(),
        up,
        processes: if up { process_rows(lab) } else { Vec::new() },
        nat: if up { nat_rows(lab) } else { None },
        agent,
        agent_error,
    }
}

pub fn status(o: &StatusOpts) -> Result<()> {
    let lab = Lab::from_opts(&o.lab)?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&lab_status(&lab))?);
        return Ok(());
    }
    if !lab.any_ns_exists() {
        println!(
            "lab {} is not up (start it with `sluice lab up`)",
            lab.prefix
        );
        return Ok(());
    }
    print_status(&lab);
    Ok(())
}

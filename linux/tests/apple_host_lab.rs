//! The Apple library (apple/, libsluice_apple.a) driven through its C ABI by a C host
//! (apple/tests/c_host/host.c) in the lab, in place of the lab's own `sluice agent`: the host
//! applies the settings event to a real TUN device and moves packets itself, as the Network
//! Extension does with packetFlow, built with AddressSanitizer and LeakSanitizer. A second
//! test runs the host's descriptor-mode self-test (utun framing over a socketpair) under
//! valgrind.
//!
//! The library must be built in the profile of this test, in the same target directory:
//! `cargo build -p sluice-apple` (or `--release`, which a workspace release build does).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The engine's DNS address for the C host: a sentinel routed into the TUN device (on Apple
/// the tunnel's own address would be delivered locally).
const DNS_SENTINEL: &str = "100.96.0.53";
/// What `rustc --print native-static-libs` says the static library needs on Linux.
const NATIVE_LIBS: [&str; 8] = [
    "-lstdc++",
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        let mt = if m.is_dir() {
            newest_mtime(&e.path())
        } else {
            m.modified().unwrap()
        };
        t = t.max(mt);
    }
    t
}

/// Compiles the C host against the checked-in header and the library next to the `sluice`
/// binary this test runs (same profile, same target directory).
fn build_c_host() -> PathBuf {
    build_c_host_as("host", &[])
}

/// The C host with AddressSanitizer and LeakSanitizer: the whole program (the Rust library's
/// allocations go through the same malloc) is checked for leaks at exit, and the C side for
/// memory errors, at about twice the cost, where valgrind's would be too slow for a tunnel run.
fn build_c_host_asan() -> PathBuf {
    build_c_host_as(
        "host-asan",
        &["-fsanitize=address", "-fno-omit-frame-pointer"],
    )
}

fn build_c_host_as(name: &str, flags: &[&str]) -> PathBuf {
    let profile_dir = Path::new(BIN).parent().unwrap();
    let lib = profile_dir.join("libsluice_apple.a");
    let release = profile_dir.ends_with("release");
    let how = format!(
        "build it first: cargo build -p sluice-apple{}",
        if release { " --release" } else { "" }
    );
    let lib_time = std::fs::metadata(&lib)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {how}", lib.display()));
    let apple = Path::new(ROOT).join("apple");
    assert!(
        lib_time >= newest_mtime(&apple.join("src")),
        "{} is older than apple/src: {how}",
        lib.display()
    );
    let out_dir = profile_dir.join("c_host");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(name);
    let out = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(flags)
        .arg("-I")
        .arg(apple.join("include"))
        .arg(apple.join("tests/c_host/host.c"))
        .arg(&lib)
        .args(NATIVE_LIBS)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The lab agent's config for the C host: the lab's own, with the DNS sentinel and the
/// upstream spelled out (its own resolv.conf is the host's to rewrite).
fn write_host_files(lab: &Lab) -> [PathBuf; 5] {
    let text = std::fs::read_to_string(lab.dir.join("agent.yaml")).unwrap();
    let cfg = format!("{text}dns:\n  address: {DNS_SENTINEL}\n  upstream: [192.0.2.53:53]\n");
    let cfg_path = lab.dir.join("apple-agent.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    // The lab's access, less every port of the services but 80: port 9000 is denied.
    let policy = std::fs::read_to_string(lab.dir.join("policy.yaml"))
        .unwrap()
        .replacen("    ports: [any]", "    ports: [tcp/80]", 1);
    assert!(policy.contains("tcp/80"), "{policy}");
    let policy_path = lab.dir.join("apple-policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    [
        cfg_path,
        policy_path,
        lab.dir.join("lab-agent.pem"),
        lab.dir.join("lab-agent.key"),
        lab.dir.join("ca/ca.pem"),
    ]
}

/// The C host in the agent's namespace, its stdout read line by line.
struct CHost {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: PathBuf,
}

impl CHost {
    fn start(lab: &Lab, exe: &Path, args: &[&str], files: &[PathBuf], extra: &[&str]) -> CHost {
        let stderr = lab.dir.join(format!("apple-host-{}.log", args[0]));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("agent")])
            .args(args.iter().skip(1))
            .arg(exe)
            .arg(args[0])
            .args(files)
            .args(extra)
            // For the ASan build: leaks fail the exit status (others ignore it).
            .env("ASAN_OPTIONS", "detect_leaks=1:exitcode=23")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        CHost {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
        }
    }

    fn send(&mut self, cmd: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        writeln!(s, "{cmd}").unwrap();
        s.flush().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next line that `f` accepts, within `secs`.
    fn wait_line(&mut self, secs: u64, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if f(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "C host: no {what} within {secs}s; it printed:\n{}\n--- its log ---\n{}",
                    self.seen.join("\n"),
                    self.log()
                ),
            }
        }
    }

    fn command(&mut self, cmd: &str) {
        self.send(cmd);
        let name = cmd.split(' ').next().unwrap().to_string();
        let l = self.wait_line(5, &format!("answer to {cmd}"), |l| {
            l == format!("ok {name}") || l.starts_with(&format!("fail {name}"))
        });
        assert_eq!(l, format!("ok {name}"), "{cmd}");
    }

    fn status(&mut self) -> serde_json::Value {
        self.send("status");
        let l = self.wait_line(5, "status", |l| l.starts_with("status "));
        serde_json::from_str(&l["status ".len()..]).unwrap()
    }

    /// Waits until the tunnel's status path is `path` (and it is up).
    fn wait_path(&mut self, secs: u64, path: &str) {
        let t0 = Instant::now();
        loop {
            let st = self.status();
            let t = &st["tunnels"][0];
            if t["state"] == "up" && t["path"] == path {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "tunnel not up on {path} after {secs}s: {st}\n--- log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for CHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec!["dig", "+short", "+time=2", "+tries=1"];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&lab.exec("agent", &a).stdout)
        .trim()
        .to_string()
}

fn page_ok(lab: &Lab, url: &str) -> bool {
    let out = lab.curl(url, "5");
    String::from_utf8_lossy(&out.stdout).contains("Hello from the private service network")
}

/// Retries the page for up to `secs` (a path that changed takes a moment to recover).
fn wait_page(lab: &Lab, host: &CHost, secs: u64, what: &str) {
    let t0 = Instant::now();
    while !page_ok(lab, "http://wiki.corp.internal/") {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: no page after {secs}s\n--- C host log ---\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_synthetic_v4(s: &str) -> bool {
    s.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|a| a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18)
}

/// The lab's agent replaced by the C host in host-driven mode over a real TUN device, the
/// whole run under AddressSanitizer and LeakSanitizer.
#[test]
fn the_c_host_drives_the_engine_over_a_tun_device() {
    require_root();
    let exe = build_c_host_asan();
    let lab = Lab::up("tapl-");
    lab.stop("agent", "TERM");
    let files = write_host_files(&lab);
    let resolv = format!("/etc/netns/{}/resolv.conf", lab.ns("agent"));
    let original = std::fs::read_to_string(&resolv).unwrap();
    let mut host = CHost::start(&lab, &exe, &["tun"], &files, &[&resolv]);

    let settings = host.wait_line(10, "settings event", |l| {
        l.contains("\"type\":\"settings\"")
    });
    assert!(
        settings.contains(&format!("\"dns_servers\":[\"{DNS_SENTINEL}\"]")),
        "{settings}"
    );
    assert!(
        settings.contains("\"match_domains\":[\"corp.internal\"]"),
        "{settings}"
    );
    assert!(settings.contains("198.51.100.0/24"), "{settings}");
    host.wait_line(10, "ready", |l| l == "ready");
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        format!("nameserver {DNS_SENTINEL}\n"),
        "the host applied the resolver"
    );

    // Resource names: synthetic answers from the engine, the page by name through it.
    let a = dig(&lab, &["wiki.corp.internal"]);
    assert!(is_synthetic_v4(&a), "{a:?}\n{}", host.log());
    let aaaa = dig(&lab, &["AAAA", "wiki.corp.internal"]);
    assert!(aaaa.starts_with("fd5c:1ce0:d5::"), "{aaaa:?}");
    wait_page(&lab, &host, 10, "first page");
    // Other names: the upstream's answers.
    assert_eq!(dig(&lab, &["www.example.test"]), "192.0.2.80");

    // A denied port is refused at once (a TCP reset from the engine), not left to time out.
    let t0 = Instant::now();
    let out = lab.curl(&format!("http://{SVC}:{DATA_PORT}/"), "5");
    assert!(!out.status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
    // curl's "couldn't connect" (7): the reset came back, no timeout (that would be 28).
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    host.wait_line(5, "the deny's audit event", |l| {
        l.contains("\"type\":\"audit\"") && l.contains("deny") && l.contains(":9000")
    });

    // The tunnel goes direct.
    host.wait_path(20, "direct");

    // The namespace's address moves; after path_changed (interfaces found by getifaddrs) the
    // tunnel recovers and the relay sees the new address.
    let ok = |o: std::process::Output| assert!(o.status.success(), "{o:?}");
    ok(lab.exec(
        "agent",
        &["ip", "addr", "del", "192.0.2.10/24", "dev", "eth0"],
    ));
    ok(lab.exec(
        "agent",
        &["ip", "addr", "add", "192.0.2.11/24", "dev", "eth0"],
    ));
    host.command("path_changed");
    wait_page(&lab, &host, 20, "after the address moved");
    let t0 = Instant::now();
    loop {
        let st = host.status();
        if st["relay"]["observed_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("192.0.2.11:"))
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{st}");
        std::thread::sleep(Duration::from_millis(300));
    }
    host.wait_path(30, "direct");

    // Sleep, a minute passes on the host's clock, wake: the tunnel recovers.
    host.command("sleep");
    std::thread::sleep(Duration::from_millis(300));
    host.command("jump 60");
    host.command("wake");
    wait_page(&lab, &host, 20, "after sleep and wake");
    assert_eq!(host.status()["host"]["asleep"], false);

    // Stop: goodbyes, then no callback for 500 ms; the host restores the resolver and exits 0.
    host.send("stop");
    host.wait_line(10, "the stop", |l| {
        l.starts_with("stopped: callbacks frozen")
    });
    host.wait_line(5, "a clean end", |l| l == "tun host ok");
    let status = host.child.wait().unwrap();
    let log = host.log();
    // Exit status 23: LeakSanitizer found a leak (its report is in the log).
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("ERROR: AddressSanitizer"), "{log}");
    assert!(!log.contains("ERROR: LeakSanitizer"), "{log}");
    assert_eq!(std::fs::read_to_string(&resolv).unwrap(), original);
    assert!(log.contains("agent: shutting down"), "{log}");
}

/// Descriptor mode (utun framing over a socketpair) end to end, under valgrind: no memory
/// errors, no definite leaks, and no callback after stop.
#[test]
fn the_descriptor_mode_self_test_is_clean_under_valgrind() {
    require_root();
    let exe = build_c_host();
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok(),
        "valgrind is missing: scripts/setup.sh installs it"
    );
    let lab = Lab::up("tapv-");
    lab.stop("agent", "TERM");
    let files = write_host_files(&lab);
    let mut host = CHost::start(
        &lab,
        &exe,
        &[
            "selftest",
            "valgrind",
            "--error-exitcode=1",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
        ],
        &files,
        &[],
    );
    host.wait_line(120, "the AF_INET answer", |l| {
        l.starts_with("utun v4: DNS answer with AF_INET header")
    });
    host.wait_line(60, "the AF_INET6 reset", |l| {
        l.starts_with("utun v6: TCP RST with AF_INET6")
    });
    host.wait_line(60, "the quiet after stop", |l| {
        l.starts_with("stopped: callbacks frozen")
    });
    host.wait_line(60, "the end", |l| l == "selftest ok");
    let status = host.child.wait().unwrap();
    let log = host.log();
    let summary: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR SUMMARY") || l.contains("definitely lost"))
        .collect();
    eprintln!("valgrind: {}", summary.join(" | "));
    assert!(status.success(), "valgrind exit {status:?}:\n{log}");
    assert!(log.contains("ERROR SUMMARY: 0 errors"), "{log}");
}

/// `dig +tcp` for a resource name and for another name, answered over TCP by the engine's
/// DNS stack in the packet path (the second forwarded upstream).
#[test]
fn dns_over_tcp_to_the_engine_address() {
    require_root();
    let exe = build_c_host();
    let lab = Lab::up("tapt-");
    lab.stop("agent", "TERM");
    let files = write_host_files(&lab);
    let resolv = format!("/etc/netns/{}/resolv.conf", lab.ns("agent"));
    let mut host = CHost::start(&lab, &exe, &["tun"], &files, &[&resolv]);
    host.wait_line(10, "ready", |l| l == "ready");
    let a = dig(&lab, &["+tcp", "wiki.corp.internal"]);
    assert!(is_synthetic_v4(&a), "{a:?}");
    assert_eq!(dig(&lab, &["+tcp", "www.example.test"]), "192.0.2.80");
    host.send("stop");
    host.wait_line(10, "a clean end", |l| l == "tun host ok");
}

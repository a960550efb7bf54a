//! Helpers for the lab tests: a lab per test (taken down on drop, even after a failure),
//! commands inside its namespaces, and threads that live in a namespace.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");
pub const SVC: &str = "198.51.100.10";
pub const DATA_PORT: u16 = 9000;

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    /// What `sluice lab up` printed.
    pub up_output: String,
}

impl Lab {
    pub fn up(prefix: &str) -> Lab {
        Lab::up_with(prefix, &[])
    }

    /// `sluice lab up` with extra flags (e.g. `--nat-agent symmetric`).
    pub fn up_with(prefix: &str, extra: &[&str]) -> Lab {
        let out = Command::new(BIN)
            .args(["lab", "up", "--prefix", prefix])
            .args(extra)
            .output()
            .unwrap();
        // Built before the check, so a lab left up by a failed `up` is taken down on drop.
        let lab = Lab {
            prefix: prefix.into(),
            dir: PathBuf::from(format!("/run/sluice-lab/{prefix}")),
            up_output: String::from_utf8_lossy(&out.stdout).into_owned(),
        };
        assert!(
            out.status.success(),
            "lab up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    pub fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    pub fn exec(&self, short: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn pid(&self, name: &str) -> i32 {
        fs::read_to_string(self.dir.join(format!("{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn curl(&self, url: &str, max_time: &str) -> Output {
        self.exec("agent", &["curl", "-sS", "--max-time", max_time, url])
    }

    /// Stops a role with `signal` and waits until it has exited.
    pub fn stop(&self, name: &str, signal: &str) {
        let pid = self.pid(name);
        Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        let t0 = Instant::now();
        while PathBuf::from(format!("/proc/{pid}")).exists()
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a role again in its namespace, as `sluice lab up` did.
    pub fn start(&self, role: &str, short: &str) {
        self.start_with(role, short, &[]);
    }

    /// Starts a role again with extra command-line flags.
    pub fn start_with(&self, role: &str, short: &str, extra: &[&str]) {
        let cfg = self.dir.join(format!("{role}.yaml"));
        let mut argv = vec![BIN.to_string(), role.into(), "--config".into()];
        argv.push(cfg.to_string_lossy().into_owned());
        argv.extend(extra.iter().map(|e| e.to_string()));
        self.spawn_role(role, short, &argv, &[]);
    }

    /// Runs `argv` (a role's command line, perhaps behind a wrapper such as setpriv) in
    /// namespace `short` with `env` added, its output appended to ROLE.log; records its pid in
    /// ROLE.pid (ip netns exec execs, so it is the command's own) and returns it.
    pub fn spawn_role(
        &self,
        role: &str,
        short: &str,
        argv: &[String],
        env: &[(&str, &str)],
    ) -> u32 {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{role}.log")))
            .unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        fs::write(self.dir.join(format!("{role}.pid")), pid.to_string()).unwrap();
        // Reaped in the background; `lab down` stops it with everything else in the namespace.
        std::thread::spawn(move || child.wait());
        pid
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test shows what the roles printed: the only clue to a failure seen in CI.
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("sluice-failed-{}", self.prefix));
            let _ = Command::new("cp")
                .arg("-a")
                .arg(&self.dir)
                .arg(&keep)
                .status();
            eprintln!("lab files kept in {}", keep.display());
            for role in ["relay", "connector", "agent"] {
                let log = self.log(role);
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("---- last lines of {role}.log ----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        let _ = Command::new(BIN)
            .args(["lab", "down", "--prefix", &self.prefix])
            .output();
    }
}

/// Whether process `pid` runs: it exists and is no zombie (dead, waiting to be reaped).
pub fn proc_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// The inode of network namespace `ns` (what /proc/PID/ns/net links to as `net:[INODE]`);
/// it names the namespace even after `ip netns del` has removed its name.
pub fn netns_inode(ns: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("namespace {ns}: {e}"))
        .ino()
}

/// The running processes whose network namespace is one of `inodes` (see [`netns_inode`]).
pub fn pids_in_netns(inodes: &[u64]) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(link) = fs::read_link(e.path().join("ns/net")) else {
            continue;
        };
        let ino = link
            .to_str()
            .and_then(|l| l.strip_prefix("net:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse::<u64>().ok());
        if ino.is_some_and(|i| inodes.contains(&i)) && proc_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Runs `f` on a thread that has entered namespace `ns`; sockets it opens live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = fs::File::open(&path).unwrap();
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

static SETUP: Once = Once::new();

pub fn require_root() {
    SETUP.call_once(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "lab tests need root (network namespaces, TUN)"
        );
    });
}

/// A deterministic byte stream: the same `seed` always gives the same bytes.
pub struct Pattern(pub u64);

impl Pattern {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

pub fn pattern_digest(seed: u64, len: u64) -> [u8; 32] {
    let mut p = Pattern(seed | 1);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// A request to the data server (see [`start_data_server`]).
pub fn data_request(mode: u8, len: u64, seed: u64) -> [u8; 17] {
    let mut h = [0u8; 17];
    h[0] = mode;
    h[1..9].copy_from_slice(&len.to_be_bytes());
    h[9..17].copy_from_slice(&seed.to_be_bytes());
    h
}

/// A data server in the service namespace. Request: `[b'D' | b'U'][len: u64 BE][seed: u64 BE]`.
/// `D`: the server sends `len` pattern bytes and closes. `U`: the server reads to EOF and
/// answers the SHA-256 of what it read.
pub fn start_data_server(lab: &Lab) {
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let r2 = ready.clone();
    in_netns(&lab.ns("svc"), move || {
        let l = TcpListener::bind((SVC, DATA_PORT)).unwrap();
        r2.wait();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                let mut hdr = [0u8; 17];
                if s.read_exact(&mut hdr).is_err() {
                    return;
                }
                let len = u64::from_be_bytes(hdr[1..9].try_into().unwrap());
                let seed = u64::from_be_bytes(hdr[9..17].try_into().unwrap());
                if hdr[0] == b'D' {
                    let mut p = Pattern(seed | 1);
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        p.fill(&mut buf[..n]);
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                } else {
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => h.update(&buf[..n]),
                            Err(_) => return,
                        }
                    }
                    let d: [u8; 32] = h.finalize().into();
                    let _ = s.write_all(&d);
                }
            });
        }
    });
    ready.wait();
}

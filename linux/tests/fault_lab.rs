//! Faults in the lab (issue 17, parts 5 and 6): the fast subset of the fault matrix that
//! `bench/fault_matrix.py` runs in full (docs/fault-matrix.md), and what the relay can see.
//!
//! - 1 % loss (on the internet segment's bridge, as tc netem would make it) on the direct and
//!   on the relayed path: a checksummed download arrives intact, and no flow is reset.
//! - A connector restart (direct) or crash (relayed): the app's flow is reset, and a new
//!   connection works within 5 s.
//! - NAT rebinding (a conntrack flush in both NAT routers) during a direct transfer: nothing
//!   lost, no reset, bytes flowing again within seconds.
//! - The relay's capture while a known random file crosses the relayed tunnel both ways holds
//!   not one 32-byte window of it, although the capture is larger than the file; the same
//!   scan of the service network's capture (plaintext there) finds the file, which shows
//!   the scan would see it.
//!
//! Each test builds its own lab and takes it down when it ends, failed or not (rules,
//! captures and every process go with the lab's namespaces). They need root and the release
//! binary; run them one at a time (`--test-threads=1`).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::*;

/// What one download through the tunnel saw.
struct Download {
    bytes: u64,
    digest: [u8; 32],
    /// How it ended, when it did not end cleanly.
    error: Option<std::io::ErrorKind>,
    /// Every interval of at least 200 ms in which no byte arrived.
    gaps: Vec<(Instant, Instant)>,
    secs: f64,
    /// When it ended.
    end: Instant,
}

impl Download {
    /// The bytes that arrived are the first as many bytes the server sent.
    fn intact(&self, seed: u64) -> bool {
        self.digest == pattern_digest(seed, self.bytes)
    }

    fn mbit_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e6
    }

    /// Seconds from `fault_end` until bytes flowed again after the last stall that began
    /// between `fault` and 10 s after `fault_end` (0 when the transfer never stalled).
    fn recovery(&self, fault: Instant, fault_end: Instant) -> f64 {
        self.gaps
            .iter()
            .filter(|(a, b)| {
                (*a + Duration::from_millis(500) >= fault
                    && *a <= fault_end + Duration::from_secs(10))
                    || (*a <= fault && *b >= fault)
            })
            .map(|(_, b)| b.saturating_duration_since(fault_end).as_secs_f64())
            .fold(0.0, f64::max)
    }
}

/// Pacing of a download: at most `rate` bytes a second until `hurry` is set.
#[derive(Clone)]
struct Pace {
    rate: u64,
    hurry: Arc<AtomicBool>,
}

/// Downloads `len` pattern bytes of `seed` from the data server through the tunnel, in the
/// agent's namespace; `progress` counts the bytes as they come.
fn download(
    lab: &Lab,
    len: u64,
    seed: u64,
    pace: Option<Pace>,
    progress: Arc<AtomicU64>,
    connect_timeout: Duration,
) -> JoinHandle<Download> {
    in_netns(&lab.ns("agent"), move || {
        let t0 = Instant::now();
        let mut d = Download {
            bytes: 0,
            digest: [0; 32],
            error: None,
            gaps: Vec::new(),
            secs: 0.0,
            end: t0,
        };
        let mut h = Sha256::new();
        let r = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from(([198, 51, 100, 10], DATA_PORT)),
                connect_timeout,
            )?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(&data_request(b'D', len, seed))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            loop {
                let paced = pace.as_ref().filter(|p| !p.hurry.load(Ordering::Relaxed));
                let want = if paced.is_some() {
                    16 * 1024
                } else {
                    buf.len()
                };
                let n = s.read(&mut buf[..want]);
                let now = Instant::now();
                if now - last >= Duration::from_millis(200) {
                    d.gaps.push((last, now));
                }
                last = now;
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                h.update(&buf[..n]);
                d.bytes += n as u64;
                progress.store(d.bytes, Ordering::Relaxed);
                if let Some(p) = paced {
                    let due = Duration::from_secs_f64(d.bytes as f64 / p.rate as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        })();
        d.error = r.err().map(|e| e.kind());
        if d.error.is_none() && d.bytes < len {
            d.error = Some(std::io::ErrorKind::UnexpectedEof);
        }
        d.digest = h.finalize().into();
        d.end = Instant::now();
        d.secs = (d.end - t0).as_secs_f64();
        d
    })
}

/// Waits until `progress` has grown by `more` bytes; whether it did within `limit`.
fn wait_progress(progress: &AtomicU64, more: u64, limit: Duration) -> bool {
    let start = progress.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if progress.load(Ordering::Relaxed) >= start + more {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Random loss of `per_mille` ‰ of the UDP packets that the internet segment's bridge (in
/// PREFIXinet) forwards to the agent's and to the connector's port: every direction of every
/// path crosses one of them once (direct: agent → conn and conn → agent; relayed: relay →
/// conn and relay → agent, the legs into the relay staying clean). What `tc qdisc add dev
/// agent root netem loss 1%` on those ports would do; made with nftables' bridge family
/// because this kernel has no netem (`CONFIG_NET_SCH_NETEM` is not set). `None` removes it.
/// The ruleset stays in DIR/fault.nft for whoever wonders what the test did.
///
/// Sluice sends UDP in GSO batches (one buffer of up to 64 segments), which cross the veths
/// and the bridge whole; a rule would drop a whole batch at a time. So the hosts' `eth0`
/// first get `gso_max_segs 1`: the kernel cuts every batch into its packets as it leaves
/// the host, as a NIC without UDP segmentation offload does, and each packet is dropped on
/// its own.
fn loss(lab: &Lab, per_mille: Option<u32>) {
    let _ = lab.exec(
        "inet",
        &["nft", "delete", "table", "bridge", "sluice_fault"],
    );
    let Some(p) = per_mille else { return };
    for host in ["agent", "conn", "relay"] {
        let out = lab.exec(
            host,
            &["ip", "link", "set", "dev", "eth0", "gso_max_segs", "1"],
        );
        assert!(out.status.success(), "gso_max_segs in {host}: {out:?}");
    }
    let file = lab.dir.join("fault.nft");
    std::fs::write(
        &file,
        format!(
            "table bridge sluice_fault {{\n  chain forward {{\n    type filter hook forward \
             priority 0; policy accept;\n    oifname {{ \"agent\", \"conn\" }} meta l4proto udp \
             numgen random mod 1000 < {p} counter drop\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let out = lab.exec("inet", &["nft", "-f", &file.to_string_lossy()]);
    assert!(out.status.success(), "nft -f {}: {out:?}", file.display());
}

/// How many packets the loss rule has dropped so far.
fn dropped(lab: &Lab) -> u64 {
    let out = lab.exec("inet", &["nft", "list", "table", "bridge", "sluice_fault"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_once("counter packets ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The kernel's count of TCP connections reset in namespace `short` (`EstabResets`).
fn estab_resets(lab: &Lab, short: &str) -> u64 {
    let out = lab.exec(short, &["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("Tcp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let i = rows[0].iter().position(|f| *f == "EstabResets").unwrap();
    rows[1][i].parse().unwrap()
}

/// The agent's tunnel as `sluice status --json` shows it (Null while it cannot be read).
fn tunnel(lab: &Lab) -> Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(lab.dir.join("agent.sock"))
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)["tunnels"][0].clone()
}

fn wait_path(lab: &Lab, want: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let t = tunnel(lab);
        if t["state"] == "up" && t["path"] == want {
            return;
        }
        assert!(t0.elapsed() < limit, "the tunnel is not {want}: {t}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A 4 MiB download under 1 % loss each way: intact, complete, no reset. (Small: the
/// connector's smoltcp, the sender here, waits out a 1 s retransmission timeout for most
/// losses, so this runs at a few Mbit/s; see docs/fault-matrix.md.)
fn one_percent_loss(prefix: &str, args: &[&str], path: &str) {
    require_root();
    let lab = Lab::up_with(prefix, args);
    start_data_server(&lab);
    wait_path(&lab, path, Duration::from_secs(10));
    loss(&lab, Some(10));
    let resets = estab_resets(&lab, "agent");
    const LEN: u64 = 4 << 20;
    let d = download(
        &lab,
        LEN,
        17,
        None,
        Arc::new(AtomicU64::new(0)),
        Duration::from_secs(5),
    )
    .join()
    .unwrap();
    let lost = dropped(&lab);
    loss(&lab, None);
    eprintln!(
        "{path}, 1 % loss: {} MiB in {:.1} s ({:.0} Mbit/s), {lost} packets dropped, longest \
         stall {:.2} s, now {}",
        d.bytes >> 20,
        d.secs,
        d.mbit_s(),
        d.gaps
            .iter()
            .map(|(a, b)| (*b - *a).as_secs_f64())
            .fold(0.0, f64::max),
        tunnel(&lab)["path"]
    );
    assert_eq!(d.error, None, "the download failed after {} bytes", d.bytes);
    assert_eq!(d.bytes, LEN);
    assert!(
        d.intact(17),
        "the bytes that arrived differ from those sent"
    );
    assert_eq!(estab_resets(&lab, "agent"), resets, "a flow was reset");
    // 4 MiB is some 3,500 packets down and half as many up: about 50 should have gone.
    assert!(lost > 10, "the loss rule dropped only {lost} packets");
}

#[test]
fn one_percent_loss_on_the_direct_path_loses_nothing() {
    one_percent_loss("fld-", &[], "direct");
}

#[test]
fn one_percent_loss_on_the_relayed_path_loses_nothing() {
    one_percent_loss("flr-", &["--relay-only"], "relay");
}

/// A connector restart (SIGTERM, started again) in the middle of a direct download: the app
/// sees a reset, and a new connection works within 5 s of the restart.
#[test]
fn a_connector_restart_resets_the_flow_and_a_new_one_works_within_5_s() {
    connector_restart("fcr-", &[], "direct", "TERM");
}

/// A connector crash (SIGKILL: no goodbye) in the middle of a relayed download: the agent
/// learns the tunnel is gone from the restarted connector and resets the app's flow itself,
/// although the app only receives; a new connection works within 5 s.
#[test]
fn a_connector_crash_on_the_relayed_path_resets_the_flow_within_5_s() {
    connector_restart("fck-", &["--relay-only"], "relay", "KILL");
}

fn connector_restart(prefix: &str, args: &[&str], path: &str, signal: &str) {
    require_root();
    let lab = Lab::up_with(prefix, args);
    start_data_server(&lab);
    wait_path(&lab, path, Duration::from_secs(10));
    let progress = Arc::new(AtomicU64::new(0));
    let pace = Pace {
        rate: 4 << 20,
        hurry: Arc::new(AtomicBool::new(false)),
    };
    let flow = download(
        &lab,
        256 << 20,
        23,
        Some(pace.clone()),
        progress.clone(),
        Duration::from_secs(5),
    );
    assert!(
        wait_progress(&progress, 4 << 20, Duration::from_secs(10)),
        "the download did not start"
    );
    let t_stop = Instant::now();
    lab.stop("connector", signal);
    lab.start("connector", "conn");
    let t_start = Instant::now();
    // New connections (1 MiB each), until one completes intact.
    let mut attempts = 0;
    let new_ok = loop {
        attempts += 1;
        let d = download(
            &lab,
            1 << 20,
            100 + attempts,
            None,
            Arc::new(AtomicU64::new(0)),
            Duration::from_secs(1),
        )
        .join()
        .unwrap();
        if d.error.is_none() && d.intact(100 + attempts) {
            break t_start.elapsed();
        }
        assert!(
            t_start.elapsed() < Duration::from_secs(5),
            "no new connection within 5 s of the restart ({attempts} tries, last: {:?})",
            d.error
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    pace.hurry.store(true, Ordering::Relaxed);
    let old = flow.join().unwrap();
    eprintln!(
        "connector SIG{signal}, {path}: the old flow ended with {:?} after {} MiB, {:.2} s after \
         the stop; a new connection worked {:.2} s after the restart ({attempts} tries)",
        old.error,
        old.bytes >> 20,
        old.end.saturating_duration_since(t_stop).as_secs_f64(),
        new_ok.as_secs_f64()
    );
    assert_eq!(
        old.error,
        Some(std::io::ErrorKind::ConnectionReset),
        "the app must see a reset"
    );
    assert!(
        old.end.saturating_duration_since(t_start) < Duration::from_secs(5),
        "the reset came {:.2} s after the restart",
        old.end.saturating_duration_since(t_start).as_secs_f64()
    );
    assert!(old.intact(23), "what arrived before the reset differs");
}

/// `conntrack -F` in both NAT routers during a direct transfer (the agent behind a symmetric
/// NAT: its next packets leave from new public ports): nothing lost, no reset, bytes flowing
/// again within 5 s.
#[test]
fn nat_rebinding_during_a_direct_transfer_loses_nothing() {
    require_root();
    let lab = Lab::up_with(
        "fnb-",
        &["--nat-agent", "symmetric", "--nat-connector", "full-cone"],
    );
    start_data_server(&lab);
    wait_path(&lab, "direct", Duration::from_secs(10));
    let resets = estab_resets(&lab, "agent");
    let progress = Arc::new(AtomicU64::new(0));
    let pace = Pace {
        rate: 4 << 20,
        hurry: Arc::new(AtomicBool::new(false)),
    };
    const LEN: u64 = 64 << 20;
    let flow = download(
        &lab,
        LEN,
        29,
        Some(pace.clone()),
        progress.clone(),
        Duration::from_secs(5),
    );
    assert!(
        wait_progress(&progress, 4 << 20, Duration::from_secs(10)),
        "the download did not start"
    );
    // The agent's router maps the tunnel's flow (and the control connection's) now.
    let count = lab.exec("nat-agent", &["conntrack", "-C"]);
    let mapped: u64 = String::from_utf8_lossy(&count.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(mapped > 0, "no conntrack entries to flush: {count:?}");
    let fault = Instant::now();
    for router in ["nat-agent", "nat-conn"] {
        let out = lab.exec(router, &["conntrack", "-F"]);
        assert!(out.status.success(), "conntrack -F: {out:?}");
    }
    let fault_end = Instant::now();
    let flowing = wait_progress(&progress, 2 << 20, Duration::from_secs(20));
    pace.hurry.store(true, Ordering::Relaxed);
    let d = flow.join().unwrap();
    let rec = d.recovery(fault, fault_end);
    eprintln!(
        "NAT rebinding: flowing again {rec:.2} s after the flush; path now {}",
        tunnel(&lab)["path"]
    );
    assert!(flowing, "no bytes for 20 s after the flush");
    assert_eq!(d.error, None, "the download failed after {} bytes", d.bytes);
    assert_eq!(d.bytes, LEN);
    assert!(
        d.intact(29),
        "the bytes that arrived differ from those sent"
    );
    assert_eq!(estab_resets(&lab, "agent"), resets, "a flow was reset");
    assert!(
        rec < 5.0,
        "bytes flowed again only {rec:.2} s after the flush"
    );
}

/// tcpdump in a lab namespace writing to DIR/NAME.pcap, stopped (and its drops read) by
/// [`Capture::stop`]; killed on drop.
struct Capture {
    child: Option<Child>,
    name: String,
    /// What tcpdump printed on stderr so far, each time it printed more.
    said: std::sync::mpsc::Receiver<String>,
}

impl Capture {
    fn start(lab: &Lab, short: &str, dev: &str, filter: &str, name: &str) -> Capture {
        let file = lab.dir.join(format!("{name}.pcap"));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(short), "tcpdump", "-i", dev, "-n"])
            .args(["-s", "0", "-B", "32768", "-U", "-w"])
            .arg(&file)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/setup.sh installs it)");
        // tcpdump says "listening on DEV" once it captures.
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let mut b = [0u8; 256];
            while let Ok(n) = err.read(&mut b) {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&b[..n]);
                let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
            }
        });
        let mut cap = Capture {
            child: Some(child),
            name: name.into(),
            said: rx,
        };
        let t0 = Instant::now();
        loop {
            match cap.said.recv_timeout(Duration::from_secs(10)) {
                Ok(text) if text.contains("listening on") => break,
                Ok(_) if t0.elapsed() < Duration::from_secs(10) => continue,
                other => {
                    cap.kill();
                    panic!("tcpdump in {short} did not start: {other:?}");
                }
            }
        }
        cap
    }

    /// Stops the capture (SIGINT flushes it); its file's bytes, and the packets tcpdump
    /// says the kernel dropped.
    fn stop(&mut self, lab: &Lab) -> (Vec<u8>, u64) {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpdump {} did not stop", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The reader thread ends with tcpdump's stderr; its last message has the summary.
        let said = self.said.iter().last().unwrap_or_default();
        let dropped = said
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary from tcpdump {}: {said}", self.name));
        let bytes = std::fs::read(lab.dir.join(format!("{}.pcap", self.name))).unwrap();
        (bytes, dropped)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every 32-byte window of `file`, keyed by its first 8 bytes (random data: the keys are
/// almost all distinct) and sorted, so a window of a capture is looked up in O(log n).
struct Windows<'a> {
    file: &'a [u8],
    keys: Vec<(u64, u32)>,
}

const W: usize = 32;

fn key(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

impl<'a> Windows<'a> {
    fn new(file: &'a [u8]) -> Self {
        let mut keys: Vec<(u64, u32)> = (0..=file.len() - W)
            .map(|i| (key(&file[i..]), i as u32))
            .collect();
        keys.sort_unstable();
        Windows { file, keys }
    }

    /// How many of `capture`'s 32-byte windows (at every offset) are windows of the file.
    fn count_in(&self, capture: &[u8]) -> usize {
        if capture.len() < W {
            return 0;
        }
        let mut hits = 0;
        for j in 0..=capture.len() - W {
            let k = key(&capture[j..]);
            let from = self.keys.partition_point(|&(x, _)| x < k);
            for &(x, i) in &self.keys[from..] {
                if x != k {
                    break;
                }
                if self.file[i as usize..i as usize + W] == capture[j..j + W] {
                    hits += 1;
                    break;
                }
            }
        }
        hits
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut p = Pattern(seed | 1);
    // In 64 KiB pieces, as the data server and pattern_digest make it.
    for c in v.chunks_mut(64 * 1024) {
        p.fill(c);
    }
    v
}

/// Part 6: a known random file (4 MiB from a fixed seed) crosses the relayed tunnel down and
/// another one up while tcpdump captures every UDP packet in the relay's namespace: not one
/// 32-byte window of either file appears in the capture, which holds more bytes than both.
/// The same scan over a capture of the connector's service network, where the files travel
/// in the clear, finds them (the scan would see the file if the relay could).
#[test]
fn the_relay_sees_none_of_the_file() {
    require_root();
    let lab = Lab::up_with("fcap-", &["--relay-only"]);
    start_data_server(&lab);
    wait_path(&lab, "relay", Duration::from_secs(10));
    const LEN: usize = 4 << 20;
    const DOWN_SEED: u64 = 0x5ee1_f11e;
    const UP_SEED: u64 = 0x5ee1_f12e;
    let mut relay = Capture::start(&lab, "relay", "eth0", "udp", "relay");
    let mut plain = Capture::start(&lab, "conn", "svc0", "tcp", "svc");

    // Paced (about 20 MB/s) so that tcpdump keeps up; both directions.
    let pace = Pace {
        rate: 20 << 20,
        hurry: Arc::new(AtomicBool::new(false)),
    };
    let d = download(
        &lab,
        LEN as u64,
        DOWN_SEED,
        Some(pace),
        Arc::new(AtomicU64::new(0)),
        Duration::from_secs(5),
    )
    .join()
    .unwrap();
    assert_eq!(d.error, None);
    assert!(d.intact(DOWN_SEED), "the download arrived damaged");
    let up = pattern(UP_SEED, LEN);
    let up2 = up.clone();
    let digest = in_netns(&lab.ns("agent"), move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([198, 51, 100, 10], DATA_PORT)),
            Duration::from_secs(5),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&data_request(b'U', LEN as u64, UP_SEED))
            .unwrap();
        for c in up2.chunks(64 * 1024) {
            s.write_all(c).unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut d = [0u8; 32];
        s.read_exact(&mut d).unwrap();
        d
    })
    .join()
    .unwrap();
    assert_eq!(digest, pattern_digest(UP_SEED, LEN as u64), "upload");
    std::thread::sleep(Duration::from_millis(300));
    let (relay_cap, relay_dropped) = relay.stop(&lab);
    let (plain_cap, plain_dropped) = plain.stop(&lab);
    // A capture that missed packets would prove less than it seems to.
    assert_eq!(
        (relay_dropped, plain_dropped),
        (0, 0),
        "packets the kernel dropped before tcpdump saw them (relay, service network)"
    );

    let down = pattern(DOWN_SEED, LEN);
    assert_eq!(
        Sha256::digest(&down).as_slice(),
        pattern_digest(DOWN_SEED, LEN as u64)
    );
    let t0 = Instant::now();
    let (wd, wu) = (Windows::new(&down), Windows::new(&up));
    let seen = (wd.count_in(&relay_cap), wu.count_in(&relay_cap));
    let control = (wd.count_in(&plain_cap), wu.count_in(&plain_cap));
    eprintln!(
        "relay capture {} bytes: {} and {} windows of the files; service-network capture {} \
         bytes: {} and {} (scans took {:.1} s)",
        relay_cap.len(),
        seen.0,
        seen.1,
        plain_cap.len(),
        control.0,
        control.1,
        t0.elapsed().as_secs_f32()
    );
    assert!(
        relay_cap.len() >= 2 * LEN,
        "the relay's capture holds {} bytes, less than the {} that crossed",
        relay_cap.len(),
        2 * LEN
    );
    assert_eq!(seen, (0, 0), "windows of the files in the relay's capture");
    // In the clear, nearly every window of each file is there (all but those split between
    // two TCP segments).
    assert!(
        control.0 > LEN / 2 && control.1 > LEN / 2,
        "the scan missed plaintext: {control:?}"
    );
}

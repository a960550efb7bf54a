//! Revocation and renewal in the lab (issue 17, part 1), with the real binaries:
//!
//! - A connector that reads the revocation file cuts a revoked agent's download within 2 s of
//!   the new list being written, and refuses its next tunnel at the handshake (TLS alert 44,
//!   a "revoked" line on both sides). A stale list (a saved copy of the older one written
//!   back) and a list signed by another CA are refused, and the list in force stays; a newer
//!   list that takes the name off lets the agent back in. SIGHUP reads the file at once, even
//!   a list written with the time and size of the one in force, and cuts within 2 s of the
//!   signal.
//! - A relay that reads the file closes the revoked agent's control connection, refuses it at
//!   the handshake, and hands the list to a connector that has no file of its own, which
//!   closes the agent's direct tunnel within 2 s.
//! - Short-lived agent and connector certificates renewed with `sluice ca renew` while a paced
//!   download runs, on the direct and on the relayed path: both sides present the new
//!   certificate in place (to each other and to the relay), and the download goes on past the
//!   old certificates' expiry, intact, without a reset or a stall; new connections after it
//!   work.
//!
//! Every cut is measured from the list file's modification time (or the signal) to the last
//! byte of a download paced by the server, so that no buffered backlog hides a late cut.
//!
//! Each test builds its own lab (`--no-roles`, then its own configuration, then the roles) and
//! takes it down when it ends, failed or not. They need root and the release binary; run them
//! one at a time (`--test-threads=1`).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

mod common;
use common::*;

/// The paced data server's port in the service network.
const PACED_PORT: u16 = 9100;
/// How soon a revoked peer's live tunnel must be cut after the new list is written.
const CUT_WITHIN: Duration = Duration::from_secs(2);

/// `sluice ARGS` in the lab's directory; must succeed.
fn sluice_ok(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(&lab.dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sluice {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if ok() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The revocation list the relay and the connector may read.
fn list_path(lab: &Lab) -> PathBuf {
    lab.dir.join("ca/revoked.pem")
}

/// Where the lab's node certificates are.
fn cert(lab: &Lab, name: &str) -> PathBuf {
    lab.dir.join(format!("{name}.pem"))
}

/// The sequence number `ca revoke` printed.
fn sequence(out: &str) -> u64 {
    out.strip_prefix("revocation list #")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number in {out:?}"))
}

/// Which roles read the revocation file.
#[derive(Clone, Copy)]
struct Files {
    relay: bool,
    connector: bool,
}

/// A lab whose relay and connector read DIR/ca/revoked.pem as `files` says (an empty list is
/// signed first); `prepare` runs before the roles start (to issue other certificates). Returns
/// once a page crosses the tunnel.
fn lab_with(prefix: &str, extra: &[&str], files: Files, prepare: impl FnOnce(&Lab)) -> (Lab, u64) {
    require_root();
    let mut args = vec!["--no-roles"];
    args.extend_from_slice(extra);
    let lab = Lab::up_with(prefix, &args);
    let first = sequence(&sluice_ok(
        &lab,
        &["ca", "revoke", "--dir", "ca", "--refresh"],
    ));
    let line = format!("revocations: {}\n", list_path(&lab).display());
    for (role, on) in [("relay", files.relay), ("connector", files.connector)] {
        if on {
            let cfg = lab.dir.join(format!("{role}.yaml"));
            let mut text = fs::read_to_string(&cfg).unwrap();
            text.push_str(&line);
            fs::write(&cfg, text).unwrap();
        }
    }
    prepare(&lab);
    lab.start("relay", "relay");
    wait_for("the relay listening", Duration::from_secs(10), || {
        lab.log("relay").contains("listening on")
    });
    lab.start("connector", "conn");
    lab.start("agent", "agent");
    wait_for("a page through the tunnel", Duration::from_secs(30), || {
        lab.curl(&format!("http://{SVC}/"), "2").status.success()
    });
    start_paced_server(&lab);
    (lab, first)
}

/// A server in the service network that sends pattern bytes at a steady rate, so that what
/// the agent reads is what just crossed the tunnel (no buffered backlog to drain after a cut).
/// Request: `[len: u64 BE][seed: u64 BE][bytes per second: u64 BE]`.
fn start_paced_server(lab: &Lab) {
    let ready = Arc::new(std::sync::Barrier::new(2));
    let r2 = ready.clone();
    in_netns(&lab.ns("svc"), move || {
        let l = TcpListener::bind((SVC, PACED_PORT)).unwrap();
        r2.wait();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
                let mut hdr = [0u8; 24];
                if s.read_exact(&mut hdr).is_err() {
                    return;
                }
                let word = |i: usize| u64::from_be_bytes(hdr[i * 8..i * 8 + 8].try_into().unwrap());
                let (len, seed, rate) = (word(0), word(1), word(2).max(1));
                // 64 KiB chunks, as `pattern_digest` makes them.
                let mut p = Pattern(seed | 1);
                let mut buf = vec![0u8; 64 * 1024];
                let t0 = Instant::now();
                let mut sent = 0u64;
                while sent < len {
                    let n = (len - sent).min(buf.len() as u64) as usize;
                    p.fill(&mut buf[..n]);
                    for piece in buf[..n].chunks(8 * 1024) {
                        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(t0.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        if s.write_all(piece).is_err() {
                            return;
                        }
                        sent += piece.len() as u64;
                    }
                }
            });
        }
    });
    ready.wait();
}

/// What one paced download saw.
struct Flow {
    bytes: u64,
    len: u64,
    digest: [u8; 32],
    error: Option<std::io::ErrorKind>,
    /// When the last byte arrived (wall clock, to compare with file times).
    last_byte: SystemTime,
    end: SystemTime,
    /// The longest time without a byte.
    longest_gap: Duration,
}

impl Flow {
    fn intact(&self, seed: u64) -> bool {
        self.digest == pattern_digest(seed, self.bytes)
    }
}

/// Downloads `len` paced bytes through the tunnel in the agent's namespace until it ends, or
/// until `stop` is set and no byte came for 300 ms.
fn paced_download(
    lab: &Lab,
    len: u64,
    seed: u64,
    rate: u64,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Flow> {
    in_netns(&lab.ns("agent"), move || {
        let mut f = Flow {
            bytes: 0,
            len,
            digest: [0; 32],
            error: None,
            last_byte: SystemTime::now(),
            end: SystemTime::now(),
            longest_gap: Duration::ZERO,
        };
        let mut h = Sha256::new();
        let t0 = Instant::now();
        let r = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from(([198, 51, 100, 10], PACED_PORT)),
                Duration::from_secs(5),
            )?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            let mut req = [0u8; 24];
            req[..8].copy_from_slice(&len.to_be_bytes());
            req[8..16].copy_from_slice(&seed.to_be_bytes());
            req[16..].copy_from_slice(&rate.to_be_bytes());
            s.write_all(&req)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        let now = Instant::now();
                        f.longest_gap = f.longest_gap.max(now - last);
                        last = now;
                        f.last_byte = SystemTime::now();
                        h.update(&buf[..n]);
                        f.bytes += n as u64;
                        progress.store(f.bytes, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        // A test that is done with the flow, or one stalled far too long.
                        if stop.load(Ordering::Relaxed) || t0.elapsed() > Duration::from_secs(120) {
                            f.longest_gap = f.longest_gap.max(last.elapsed());
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        })();
        f.error = r.err().map(|e| e.kind());
        if f.error.is_none() && f.bytes < len {
            f.error = Some(std::io::ErrorKind::UnexpectedEof);
        }
        f.digest = h.finalize().into();
        f.end = SystemTime::now();
        f
    })
}

fn wait_progress(progress: &AtomicU64, more: u64, limit: Duration) {
    let start = progress.load(Ordering::Relaxed);
    wait_for("the download to make progress", limit, || {
        progress.load(Ordering::Relaxed) >= start + more
    });
}

/// The file's modification time: when the list was written.
fn written_at(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

/// Lines of `text` that contain every one of `words`.
fn lines_with(text: &str, words: &[&str]) -> usize {
    text.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

fn has_line(text: &str, words: &[&str]) -> bool {
    lines_with(text, words) > 0
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

/// The agent's tunnel as `sluice status --json` shows it.
fn tunnel_path(lab: &Lab) -> String {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(lab.dir.join("agent.sock"))
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let t = &v["tunnels"][0];
    if t["state"] == "up" {
        t["path"].as_str().unwrap_or("").to_string()
    } else {
        String::new()
    }
}

/// Restarts the agent (a fresh process connects at once, without a backoff to wait out).
fn restart_agent(lab: &Lab) {
    lab.stop("agent", "TERM");
    lab.start("agent", "agent");
    wait_for("the agent's TUN device", Duration::from_secs(10), || {
        lab.exec("agent", &["ip", "link", "show", "sluice0"])
            .status
            .success()
    });
}

/// Starts a paced download, revokes the lab agent while it runs, and returns the flow (once
/// it stopped), how long after the list was written its last byte arrived, and the list's
/// sequence number.
fn revoke_mid_download(lab: &Lab, seed: u64) -> (Flow, Duration, u64) {
    let mut seq = 0;
    let (f, cut) = cut_mid_download(lab, seed, "the list was written", || {
        seq = sequence(&sluice_ok(
            lab,
            &["ca", "revoke", "--dir", "ca", "lab-agent"],
        ));
        written_at(&list_path(lab))
    });
    (f, cut, seq)
}

/// Starts a paced download, runs `trigger` while it runs (it returns when it revoked the
/// agent), and checks that the download's last byte came within [`CUT_WITHIN`] of that.
fn cut_mid_download(
    lab: &Lab,
    seed: u64,
    what: &str,
    trigger: impl FnOnce() -> SystemTime,
) -> (Flow, Duration) {
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    const RATE: u64 = 4 << 20;
    let flow = paced_download(lab, 1 << 30, seed, RATE, progress.clone(), stop.clone());
    wait_progress(&progress, 4 << 20, Duration::from_secs(10));
    // Still flowing right before the trigger: a stall cannot pass for a quick cut.
    wait_progress(&progress, 1 << 20, Duration::from_secs(2));
    let at = trigger();
    // Long enough for a cut that comes late to show as one.
    std::thread::sleep(CUT_WITHIN + Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let f = flow.join().unwrap();
    // A flow that had stalled before the trigger would pass for one cut at once.
    assert!(
        at.duration_since(f.last_byte)
            .map_or(true, |d| d < Duration::from_millis(250)),
        "the download had stopped before {what}"
    );
    let cut = f.last_byte.duration_since(at).unwrap_or(Duration::ZERO);
    // Signed: a last byte just before the trigger (between two paced writes) shows as < 0.
    let signed_ms = match f.last_byte.duration_since(at) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    };
    eprintln!(
        "the download's last byte came {signed_ms:.0} ms after {what} ({} MiB had arrived, ended with {:?})",
        f.bytes >> 20,
        f.error
    );
    assert!(f.bytes < f.len, "the download finished: it was never cut");
    assert!(
        f.intact(seed),
        "the bytes that arrived differ from those sent"
    );
    assert!(
        cut <= CUT_WITHIN,
        "the revoked agent's download went on {cut:?} after {what}"
    );
    (f, cut)
}

/// The connector reads the list; the relay does not. The connector cuts the live tunnel and
/// refuses the next one at the handshake; stale lists and lists from another CA change
/// nothing; a newer list without the name lets the agent back in.
#[test]
fn connector_cuts_a_revoked_agent_within_2_s_and_refuses_it_until_the_name_is_removed() {
    let (lab, first) = lab_with(
        "rvc-",
        &[],
        Files {
            relay: false,
            connector: true,
        },
        |_| {},
    );
    let older = fs::read(list_path(&lab)).unwrap();
    let (_, _, seq) = revoke_mid_download(&lab, 31);
    assert!(seq > first);
    let current = fs::read(list_path(&lab)).unwrap();

    let conn = lab.log("connector");
    assert!(
        has_line(
            &conn,
            &[
                &format!("revocation list #{seq} from "),
                "in force: 0 peer id(s), 1 name(s), replacing #"
            ]
        ),
        "{conn}"
    );
    assert!(
        has_line(
            &conn,
            &[
                "closing the tunnel of agent \"lab-agent\"",
                &format!("certificate revoked (its name is on revocation list #{seq})")
            ]
        ),
        "{conn}"
    );
    let agent = lab.log("agent");
    assert!(
        has_line(
            &agent,
            &[
                "tunnel to connector \"lab-connector\" closed",
                &format!("certificate revoked (revocation list #{seq})")
            ]
        ),
        "{agent}"
    );

    // Refused on reconnect: the connector's TLS turns the new tunnel away with alert 44, and
    // both sides say so.
    let refused = |lab: &Lab| {
        lines_with(
            &lab.log("connector"),
            &["refusing agent \"lab-agent\"", "certificate revoked"],
        )
    };
    let out = lab.curl(&format!("http://{SVC}/"), "3");
    assert!(!out.status.success(), "the revoked agent got a page");
    wait_for(
        "the connector refusing the new tunnel",
        Duration::from_secs(5),
        || refused(&lab) >= 1,
    );
    wait_for("the agent logging alert 44", Duration::from_secs(5), || {
        has_line(
            &lab.log("agent"),
            &["lab-connector", "certificate revoked (TLS alert 44)"],
        )
    });

    // `ca show --revocations`: YES for the revoked agent, no for the connector.
    let out = Command::new(BIN)
        .args(["ca", "show"])
        .arg(cert(&lab, "lab-agent"))
        .arg("--revocations")
        .arg(list_path(&lab))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "revoked:      YES: its name is on revocation list #{seq}"
        )),
        "{stdout}"
    );
    let out = sluice_ok(
        &lab,
        &[
            "ca",
            "show",
            "lab-connector.pem",
            "--revocations",
            "ca/revoked.pem",
        ],
    );
    assert!(
        out.contains(&format!("revoked:      no (revocation list #{seq}")),
        "{out}"
    );

    // A stale list: the saved copy of the older one written back. Refused; the agent stays out.
    fs::write(list_path(&lab), &older).unwrap();
    wait_for("the stale list refused", Duration::from_secs(3), || {
        has_line(
            &lab.log("connector"),
            &[
                &format!("revocation list #{first} from "),
                &format!("refused: list #{seq} is in force, and a list never replaces a newer one"),
            ],
        )
    });
    let before = refused(&lab);
    restart_agent(&lab);
    let out = lab.curl(&format!("http://{SVC}/"), "4");
    assert!(
        !out.status.success(),
        "a stale list let the revoked agent back in"
    );
    wait_for(
        "a refusal after the stale list",
        Duration::from_secs(5),
        || refused(&lab) > before,
    );

    // A list signed by another CA, newer by its number and naming nobody: refused too.
    sluice_ok(&lab, &["ca", "init", "--dir", "evil", "--org", "evil"]);
    let evil = sequence(&sluice_ok(
        &lab,
        &[
            "ca",
            "revoke",
            "--dir",
            "evil",
            "--list",
            "evil/list.pem",
            "--refresh",
        ],
    ));
    assert!(
        evil > seq,
        "the forged list #{evil} must look newer than #{seq}"
    );
    fs::copy(lab.dir.join("evil/list.pem"), list_path(&lab)).unwrap();
    wait_for(
        "the other CA's list refused",
        Duration::from_secs(3),
        || {
            has_line(
                &lab.log("connector"),
                &["refused: revocation list was signed by another CA"],
            )
        },
    );
    let before = refused(&lab);
    restart_agent(&lab);
    let out = lab.curl(&format!("http://{SVC}/"), "4");
    assert!(
        !out.status.success(),
        "another CA's list let the revoked agent back in"
    );
    wait_for(
        "a refusal after the forged list",
        Duration::from_secs(5),
        || refused(&lab) > before,
    );

    // The CA takes the name off (from the list in force): a newer list, and the agent is back.
    // The list names a placeholder as long as "lab-agent", for the SIGHUP check below.
    fs::write(list_path(&lab), &current).unwrap();
    let scratch = lab.dir.join("ca/scratch.pem");
    fs::copy(list_path(&lab), &scratch).unwrap();
    sluice_ok(
        &lab,
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "ca/scratch.pem",
            "--remove",
            "lab-agent",
        ],
    );
    let removed = sequence(&sluice_ok(
        &lab,
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "ca/scratch.pem",
            "nobody-00",
        ],
    ));
    fs::rename(&scratch, list_path(&lab)).unwrap();
    wait_for("the new list in force", Duration::from_secs(3), || {
        has_line(
            &lab.log("connector"),
            &[
                &format!("revocation list #{removed} from "),
                "in force: 0 peer id(s), 1 name(s)",
            ],
        )
    });
    restart_agent(&lab);
    wait_for(
        "a page once the name is off the list",
        Duration::from_secs(15),
        || lab.curl(&format!("http://{SVC}/"), "2").status.success(),
    );

    // SIGHUP reads the file now, even when its time and size say it did not change: a list
    // revoking the agent again, given the time and size of the one in force, is applied at
    // the signal and cuts a live download within 2 s of it.
    fs::copy(list_path(&lab), &scratch).unwrap();
    sluice_ok(
        &lab,
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "ca/scratch.pem",
            "lab-agent",
        ],
    );
    let again = sequence(&sluice_ok(
        &lab,
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "ca/scratch.pem",
            "--remove",
            "nobody-00",
        ],
    ));
    let touched = Command::new("touch")
        .arg("-r")
        .arg(list_path(&lab))
        .arg(&scratch)
        .status()
        .unwrap();
    assert!(touched.success());
    let (old_meta, new_meta) = (
        fs::metadata(list_path(&lab)).unwrap(),
        fs::metadata(&scratch).unwrap(),
    );
    assert_eq!(old_meta.len(), new_meta.len());
    assert_eq!(old_meta.modified().unwrap(), new_meta.modified().unwrap());
    fs::rename(&scratch, list_path(&lab)).unwrap();
    let connector = lab.pid("connector");
    cut_mid_download(&lab, 61, "SIGHUP", || {
        // The file's stamp is unchanged: without the signal the list would wait.
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !has_line(
                &lab.log("connector"),
                &[&format!("revocation list #{again} ")]
            ),
            "the connector read the list before the signal: this check proves nothing"
        );
        let at = SystemTime::now();
        let hup = Command::new("kill")
            .args(["-HUP", &connector.to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        at
    });
    let conn = lab.log("connector");
    assert!(
        has_line(
            &conn,
            &[
                &format!("revocation list #{again} from "),
                "in force: 0 peer id(s), 1 name(s)"
            ]
        ),
        "{conn}"
    );
    assert!(has_line(&conn, &["SIGHUP: reloading"]), "{conn}");
}

/// The relay reads the list; the connector has no file. The relay closes the revoked agent's
/// control connection and refuses it at the handshake, and hands the list to the connector,
/// which cuts the agent's direct tunnel.
#[test]
fn relay_cuts_and_refuses_a_revoked_agent_and_the_connector_learns_the_list_from_it() {
    let (lab, first) = lab_with(
        "rvr-",
        &[],
        Files {
            relay: true,
            connector: false,
        },
        |_| {},
    );
    let older = fs::read(list_path(&lab)).unwrap();
    // The connector got the relay's (empty) list when it connected.
    assert!(
        has_line(
            &lab.log("connector"),
            &[&format!("revocation list #{first} from the relay in force")]
        ),
        "{}",
        lab.log("connector")
    );
    // On the direct path, only the connector can cut the tunnel: the relay forwards nothing.
    wait_for("the direct path", Duration::from_secs(15), || {
        tunnel_path(&lab) == "direct"
    });
    let (_, _, seq) = revoke_mid_download(&lab, 41);

    let relay = lab.log("relay");
    assert!(
        has_line(
            &relay,
            &[
                "relay: closing agent \"lab-agent\"",
                &format!("certificate revoked (its name is on revocation list #{seq})")
            ]
        ),
        "{relay}"
    );
    let conn = lab.log("connector");
    assert!(
        has_line(
            &conn,
            &[
                &format!("revocation list #{seq} from the relay in force"),
                "1 name(s)"
            ]
        ),
        "{conn}"
    );
    assert!(
        has_line(
            &conn,
            &[
                "closing the tunnel of agent \"lab-agent\"",
                "certificate revoked"
            ]
        ),
        "{conn}"
    );
    // The agent heard why, from the relay and from the connector.
    let agent = lab.log("agent");
    assert!(
        has_line(
            &agent,
            &[
                "relay",
                &format!("certificate revoked (revocation list #{seq})")
            ]
        ),
        "{agent}"
    );
    assert!(
        has_line(
            &agent,
            &[
                "tunnel to connector \"lab-connector\" closed",
                "certificate revoked"
            ]
        ),
        "{agent}"
    );

    // Refused on reconnect by the relay, at the handshake: alert 44 on the agent's side.
    wait_for(
        "the relay refusing the agent",
        Duration::from_secs(10),
        || {
            has_line(
                &lab.log("relay"),
                &["refusing agent \"lab-agent\"", "certificate revoked"],
            )
        },
    );
    wait_for(
        "the agent logging alert 44",
        Duration::from_secs(10),
        || {
            has_line(
                &lab.log("agent"),
                &["relay", "certificate revoked (TLS alert 44)"],
            )
        },
    );
    let out = lab.curl(&format!("http://{SVC}/"), "3");
    assert!(!out.status.success(), "the revoked agent got a page");
    let metrics = lab.exec("relay", &["curl", "-s", "http://127.0.0.1:9464/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let revoked: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_relay_refused_connections_total{reason=\"revoked\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revoked refusals metric:\n{metrics}"));
    // The live connection closed, and at least one handshake refused.
    assert!(
        revoked >= 2,
        "{revoked} revoked refusals counted:\n{metrics}"
    );

    // A stale list written back to the relay's file, then one from another CA: both refused
    // there, and the agent stays out.
    let refused = |lab: &Lab| {
        lines_with(
            &lab.log("relay"),
            &["refusing agent \"lab-agent\"", "certificate revoked"],
        )
    };
    fs::write(list_path(&lab), &older).unwrap();
    wait_for("the stale list refused", Duration::from_secs(3), || {
        has_line(
            &lab.log("relay"),
            &[
                &format!("revocation list #{first} from "),
                &format!("refused: list #{seq} is in force"),
            ],
        )
    });
    sluice_ok(&lab, &["ca", "init", "--dir", "evil", "--org", "evil"]);
    let evil = sequence(&sluice_ok(
        &lab,
        &[
            "ca",
            "revoke",
            "--dir",
            "evil",
            "--list",
            "evil/list.pem",
            "--refresh",
        ],
    ));
    assert!(
        evil > seq,
        "the forged list #{evil} must look newer than #{seq}"
    );
    fs::copy(lab.dir.join("evil/list.pem"), list_path(&lab)).unwrap();
    wait_for(
        "the other CA's list refused",
        Duration::from_secs(3),
        || {
            has_line(
                &lab.log("relay"),
                &["refused: revocation list was signed by another CA"],
            )
        },
    );
    let before = refused(&lab);
    restart_agent(&lab);
    wait_for(
        "the relay refusing the restarted agent",
        Duration::from_secs(5),
        || refused(&lab) > before,
    );
    let out = lab.curl(&format!("http://{SVC}/"), "3");
    assert!(!out.status.success(), "the revoked agent got back in");
    // The connector was handed nothing it must refuse: the relay passes on only what it holds.
    assert!(
        !has_line(&lab.log("connector"), &["from the relay refused"]),
        "{}",
        lab.log("connector")
    );
}

/// A revoked connector, on the direct path: only the relay reads the list. The relay closes
/// the connector's control connection and hands the list to the agent, which closes its
/// direct tunnel to the connector within 2 s (the relay carries none of it) and refuses the
/// connector's next handshake.
#[test]
fn a_revoked_connector_loses_its_direct_tunnels_too() {
    let (lab, _) = lab_with(
        "rvk-",
        &[],
        Files {
            relay: true,
            connector: false,
        },
        |_| {},
    );
    // The agent got the relay's (empty) list when it connected.
    wait_for(
        "the agent holding the relay's list",
        Duration::from_secs(5),
        || {
            has_line(
                &lab.log("agent"),
                &["revocation list #", "from the relay in force"],
            )
        },
    );
    wait_for("the direct path", Duration::from_secs(15), || {
        tunnel_path(&lab) == "direct"
    });
    let mut seq = 0;
    cut_mid_download(&lab, 43, "the list was written", || {
        seq = sequence(&sluice_ok(
            &lab,
            &["ca", "revoke", "--dir", "ca", "lab-connector"],
        ));
        written_at(&list_path(&lab))
    });
    let agent = lab.log("agent");
    assert!(
        has_line(
            &agent,
            &[
                "closing the tunnel to connector \"lab-connector\"",
                &format!("revocation list #{seq}")
            ]
        ),
        "{agent}"
    );
    assert!(
        has_line(
            &lab.log("relay"),
            &[
                "relay: closing connector \"lab-connector\"",
                "certificate revoked"
            ]
        ),
        "{}",
        lab.log("relay")
    );
    // Its reconnects to the relay are refused at the handshake, and no page goes through.
    wait_for(
        "the connector hearing alert 44",
        Duration::from_secs(10),
        || {
            has_line(
                &lab.log("connector"),
                &["certificate revoked (TLS alert 44)"],
            )
        },
    );
    let out = lab.curl(&format!("http://{SVC}/"), "3");
    assert!(
        !out.status.success(),
        "a page came through a revoked connector"
    );
}

/// Short-lived agent and connector certificates, renewed while a paced download runs: the
/// download goes on past the old certificates' expiry without a reset.
#[test]
fn renewed_certificates_keep_a_download_going_past_the_old_expiry() {
    renewal("rvn-", &[], None);
}

/// The same on the relayed path, where the connector presents its renewed certificate before
/// the agent has sent anything on the tunnel's message stream (no candidates to exchange).
#[test]
fn renewed_certificates_keep_a_relayed_download_going_past_the_old_expiry() {
    renewal("rvs-", &["--relay-only"], Some("relay"));
}

fn renewal(prefix: &str, extra: &[&str], path: Option<&str>) {
    // Long enough for the lab to come up and the download to start; short enough to wait out.
    const VALID_S: u64 = 25;
    let valid = format!("{VALID_S}s");
    let (lab, _) = lab_with(
        prefix,
        extra,
        Files {
            relay: true,
            connector: true,
        },
        |lab| {
            for (role, name, group) in [
                ("agent", "lab-agent", "lab"),
                ("connector", "lab-connector", ""),
            ] {
                let mut args = vec![
                    "ca", "issue", "--dir", "ca", "--role", role, "--name", name, "--valid",
                    &valid, "--out", ".", "--force",
                ];
                if !group.is_empty() {
                    args.extend(["--group", group]);
                }
                sluice_ok(lab, &args);
            }
        },
    );
    let expiry = |name: &str| {
        let text = fs::read_to_string(cert(&lab, name)).unwrap();
        sluice_dataplane::identity::identity_from_pem(&text)
            .unwrap()
            .not_after
    };
    let old_expiry = expiry("lab-agent").max(expiry("lab-connector"));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        old_expiry - now >= 5,
        "the lab took too long: {}s left",
        old_expiry - now
    );
    if let Some(want) = path {
        wait_for("the tunnel's path", Duration::from_secs(3), || {
            tunnel_path(&lab) == want
        });
    }
    let resets = estab_resets(&lab, "agent");

    // Paced to end 5 s after the old certificates expire.
    const RATE: u64 = 1 << 20;
    let len = RATE * (old_expiry - now + 5) as u64;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let flow = paced_download(&lab, len, 51, RATE, progress.clone(), stop);
    wait_progress(&progress, 1 << 20, Duration::from_secs(5));

    for name in ["lab-agent", "lab-connector"] {
        let out = sluice_ok(
            &lab,
            &[
                "ca", "renew", "--dir", "ca", "--name", name, "--out", ".", "--valid", "1h",
            ],
        );
        assert!(out.contains("(the same key)"), "{out}");
    }
    // Both nodes pick the new file up and present it in place, to each other and the relay.
    wait_for("the renewals presented", Duration::from_secs(5), || {
        let (a, c, r) = (lab.log("agent"), lab.log("connector"), lab.log("relay"));
        has_line(&a, &["lab-agent.pem renewed"])
            && has_line(&c, &["lab-connector.pem renewed"])
            && has_line(
                &c,
                &["agent \"lab-agent\"", "renewed its certificate in place"],
            )
            && has_line(
                &a,
                &[
                    "connector \"lab-connector\"",
                    "renewed its certificate in place",
                ],
            )
            && has_line(
                &r,
                &[
                    "relay: agent \"lab-agent\"",
                    "renewed its certificate in place",
                ],
            )
            && has_line(
                &r,
                &[
                    "relay: connector \"lab-connector\"",
                    "renewed its certificate in place",
                ],
            )
    });

    let f = flow.join().unwrap();
    let ended = f
        .end
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    eprintln!(
        "renewed: {} MiB in one flow, ended {}s after the old certificates expired, longest gap {:.0} ms",
        f.bytes >> 20,
        ended - old_expiry,
        f.longest_gap.as_secs_f64() * 1000.0
    );
    assert_eq!(f.error, None, "the download failed after {} bytes", f.bytes);
    assert_eq!(f.bytes, len);
    assert!(
        f.intact(51),
        "the bytes that arrived differ from those sent"
    );
    assert!(
        ended > old_expiry + 2,
        "the download did not outlive the old certificates"
    );
    assert!(
        f.longest_gap < Duration::from_secs(1),
        "the download stalled for {:?}",
        f.longest_gap
    );
    assert_eq!(estab_resets(&lab, "agent"), resets, "a flow was reset");
    for role in ["relay", "connector", "agent"] {
        let log = lab.log(role);
        assert!(
            !has_line(&log, &["certificate expired"]),
            "{role} closed something for an expired certificate:\n{log}"
        );
    }
    // New connections after the old expiry present the renewed certificates.
    let out = lab.curl(&format!("http://{SVC}/"), "5");
    assert!(out.status.success(), "{out:?}");
    restart_agent(&lab);
    wait_for(
        "a page from a restarted agent",
        Duration::from_secs(15),
        || lab.curl(&format!("http://{SVC}/"), "2").status.success(),
    );
}
